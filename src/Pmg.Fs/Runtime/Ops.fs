/// Tensor arithmetic that is safe from TorchSharp's Scalar lifetime bug, the one home of that workaround.
/// TorchSharp hands a Scalar's raw handle to native code without keeping the Scalar alive, so a temporary
/// Scalar can be finalised by the GC in the middle of the call (seen as "Expected false to be true" from
/// Scalar::toFloat after minutes of training). Every Scalar this project passes goes through `scalar`, which
/// holds it until the call returns; `a + b`, `t.add_(1)` and `t.mul(0.5)` are not written anywhere else (a test
/// scans the sources for them).
module Pmg.Fs.Runtime.Ops

open TorchSharp

/// Calls `f` with `value` as a Scalar that is kept alive until `f` returns, then disposed.
let scalar (value: float) (f: Scalar -> 'T) : 'T =
    use s = value.ToScalar()
    let result = f s
    System.GC.KeepAlive s
    result

/// Calls `f` with the integer `value` as a Scalar that is kept alive until `f` returns, then disposed.
let scalarInt (value: int64) (f: Scalar -> 'T) : 'T =
    use s = value.ToScalar()
    let result = f s
    System.GC.KeepAlive s
    result

/// The alpha of a plain addition, held for the life of the process so it is never finalised. TorchSharp's own
/// `a + b` and `add_(b)` build a temporary Scalar 1 on every call: use `add` and `addInPlace` instead.
let private one = (1L).ToScalar()

/// a + b, without a temporary Scalar; returns a new tensor.
let add (a: torch.Tensor) (b: torch.Tensor) : torch.Tensor = a.add (b, one)
/// a += b in place, without a temporary Scalar; returns `a`.
let addInPlace (a: torch.Tensor) (b: torch.Tensor) : torch.Tensor = a.add_ (b, one)

/// t += 1 (an integer counter such as BatchNorm's num_batches_tracked).
let increment (t: torch.Tensor) = t.add_ (one, one) |> ignore

/// t * k with a float factor.
let scale (k: float) (t: torch.Tensor) = scalar k t.mul

/// ELU (alpha 1) from unary tensor ops, since TorchSharp's elu passes its alpha as temporary Scalars:
/// relu(x) + expm1(-relu(-x)), i.e. x for x > 0, e^x - 1 else.
let elu (x: torch.Tensor) : torch.Tensor =
    // Not in place: relu's backward needs its output.
    use pos = x.relu ()
    use negx = x.neg ()
    use clipped = negx.relu ()
    use negated = clipped.neg ()
    use negPart = negated.expm1 ()
    add pos negPart

/// A tensor's values on the host as fp32, in row-major order. The chain's temporaries (detach, cpu, cast,
/// contiguous) live in a scope: unreferenced, the GC could free one while libtorch still reads it (a segfault in
/// at::native::to).
let hostFloats (t: torch.Tensor) : float32[] =
    use _ = torch.NewDisposeScope()
    t.detach().cpu().to_type(torch.float32).contiguous().data<float32>().ToArray()

/// A tensor's values on the host in its own dtype, row-major, as raw little-endian bytes (temporaries scoped as in
/// hostFloats).
let hostBytes (t: torch.Tensor) : byte[] =
    use _ = torch.NewDisposeScope()
    t.detach().cpu().contiguous().bytes.ToArray()
