/// Layers whose TorchSharp originals pass temporary Scalars to native code (see Runtime.Ops), the one home of
/// those replacements: BatchNorm (TorchSharp's counts batches with `num_batches_tracked.add_(1)`, which crashed
/// an ablation run after minutes) and ELU. Same parameters, buffers and state-dict names as the originals.
module Pmg.Fs.Model.Layers

open System
open TorchSharp
open type TorchSharp.torch
open Pmg.Fs.Runtime
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators

/// BatchNorm; while training, optionally over groups of at most `Group` images (ghost batches): each group is normalised
/// with its own statistics and the running statistics follow the first group only. That is what nn.DataParallel
/// does with a batch split over GPUs (each replica normalises its part; replica 0's buffers are kept).
type BatchNorm(features: int64, eps: float, momentum: float, dims: int list, name: string) =
    inherit Modules.BatchNorm(features, eps, momentum, true, true, null, Nullable(), name)

    /// Images per normalisation group while training; None: the whole batch.
    member val Group: int option = None with get, set

    /// Fails unless the input has one of the dimension counts this norm takes.
    override _.ValidateInputDimensions(input: Tensor) =
        if not (List.contains (int (input.dim ())) dims) then
            invalidArg (nameof input) (sprintf "%s expects %A dimensions, got %d" name dims (input.dim ()))

    /// Normalises the batch; while training with Group set, each group of at most Group images on its own.
    override this.forward(input: Tensor) =
        this.ValidateInputDimensions input
        if this.training then Ops.increment this.num_batches_tracked
        let norm (x: Tensor) (mean: Tensor) (var: Tensor) =
            // Training uses the batch's statistics and updates the given running ones with `momentum` (none given:
            // none updated); eval uses the running ones.
            nn.functional.batch_norm (x, mean, var, this.weight, this.bias, this.training, momentum, eps)
        match this.Group with
        | Some k when this.training && input.shape.[0] > int64 k ->
            use _ = NewDisposeScope()
            // As DataParallel scatters: ceil(N/k) near-equal chunks (16 -> 8 + 8; 9 -> 5 + 4, never a chunk of 1).
            let groups = input.chunk ((input.shape.[0] + int64 k - 1L) / int64 k, 0L)
            let first = norm groups.[0] this.running_mean this.running_var
            let rest = groups |> Array.skip 1 |> Array.map (fun g -> norm g null null)
            torch.cat(Array.append [| first |] rest, 0L).MoveToOuterDisposeScope()
        | _ -> norm input this.running_mean this.running_var

/// Sets the training normalisation group of every BatchNorm in a module (see BatchNorm.Group).
let setBatchNormGroup (group: int option) (m: nn.Module) =
    for sub in m.modules () do
        match sub with
        | :? BatchNorm as bn -> bn.Group <- group
        | _ -> ()

/// BatchNorm over (N, C, H, W), PyTorch's defaults (eps 1e-5, momentum 0.1).
let batchNorm2d (features: int64) (momentum: float) = new BatchNorm(features, 1e-5, momentum, [ 4 ], "BatchNorm2d")

/// BatchNorm over (N, C) or (N, C, L).
let batchNorm1d (features: int64) (momentum: float) = new BatchNorm(features, 1e-5, momentum, [ 2; 3 ], "BatchNorm1d")

/// PyTorch's default BatchNorm momentum.
let defaultMomentum = 0.1

/// ELU as a module (the reference's nn.ELU).
type Elu() =
    inherit nn.Module<Tensor, Tensor>("ELU")
    /// ELU with alpha 1.
    override _.forward(x) = Ops.elu x

    // ELU with alpha 1, as its one operator.
    interface Graph.IExportable with
        member _.Emit(b, _, inputs) = [ b.Node("Elu", inputs, [ "alpha", Graph.Float 1.0f ]) ]

/// torch.nn.init.trunc_normal_(t, std) with its default cut at -2 and 2 (absolute), as PyTorch computes it: uniform
/// on the cut's CDF range from the global generator, erfinv, scaled, then clamped. TorchSharp 0.107's own
/// trunc_normal_ leaves values that are not finite (8 in 160 million draws: about one per ConvNeXt-T), so the
/// transformer-era backbones (ConvNeXt, Swin) initialise through this one.
let truncNormal (std: float) (t: Tensor) =
    use _ = torch.no_grad ()
    // 2 CDF(v) - 1 = erf(v / (std sqrt 2)) at the cut's ends (-1 and 1 to double precision for std 0.02).
    let ends =
        use v = torch.tensor ([| -2.0 / std / sqrt 2.0; 2.0 / std / sqrt 2.0 |], dtype = ScalarType.Float64)
        use e = v.erf ()
        e.data<float>().ToArray()
    t.uniform_ (ends.[0], ends.[1]) |> ignore
    t.erfinv_ () |> ignore
    Ops.scalar (std * sqrt 2.0) (fun s -> t.mul_ s) |> ignore
    Ops.scalar -2.0 (fun a -> Ops.scalar 2.0 (fun b -> t.clamp_ (a, b))) |> ignore

/// torchvision's stochastic depth, the randomness and the rule of both transformer-era backbones (ConvNeXt, Swin):
/// one CPU generator per backbone, reseeded at every epoch start (Features.Reseed), so a resumed run draws what an
/// uninterrupted one would. Its seeds are mixed so that its draws are not those of another generator seeded alike
/// (the trainer seeds the jigsaw's generator with the same epoch seed).
type StochasticDepth(seed: int64) =
    static let mix (seed: int64) = (seed ^^^ 0x436F6E764E6558L) &&& Int64.MaxValue
    let generator = new Generator(uint64 (mix seed))

    /// torchvision's linear rule: block k (0-based) of all `total` blocks drops with probability p * k / (total - 1).
    static member Probability(p: float, total: int, k: int) = if total <= 1 then 0.0 else p * float k / float (total - 1)

    /// Reseeds the draws.
    member _.Reseed(seed: int64) = generator.manual_seed (mix seed) |> ignore

    /// "row" mode: each sample's branch `y` kept with probability 1 - p, then divided by 1 - p. The draws are on the
    /// CPU (one number a sample), so they are the same on every device.
    member _.Rows(p: float, y: Tensor) : Tensor =
        let keep = 1.0 - p
        let shape = Array.append [| y.shape.[0] |] (Array.create (int (y.dim ()) - 1) 1L)
        use noise = torch.empty (shape, dtype = ScalarType.Float32)
        noise.bernoulli_ (keep, generator) |> ignore
        if keep > 0.0 then Ops.scalar keep (fun s -> noise.div_ s) |> ignore
        use typed = noise.to_type y.dtype
        use placed = typed.``to`` y.device
        y.mul placed

    interface IDisposable with
        member _.Dispose() = generator.Dispose()
