/// The jigsaw generator: split an image batch into n x n equal patches, shuffle them, reassemble.
/// One gather on the tensor's own device, no loop of patch copies.
///
/// Sizes not divisible by n: patches are floor(H/n) x floor(W/n); the leftover rows at the bottom and columns
/// at the right stay where they are. An image smaller than n pixels on a side is returned unchanged.
module Pmg.Fs.Jigsaw

open TorchSharp
open type TorchSharp.torch
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators
open Pmg.Fs.Runtime

/// One permutation shared by the whole batch (as the reference code does) or one per sample.
type Permutation =
    /// The same patch order for every image of the batch.
    | PerBatch
    /// A patch order drawn for each image.
    | PerSample

/// Which permutations of the n*n patches are drawn.
type Draw =
    /// A uniformly random n*n-cycle: every patch moves. The reference shuffles the cells and swaps cell (0,0) with
    /// each in turn, a product of transpositions that is always one n*n-cycle (at n = 2, one of the six 4-cycles).
    | Cycle
    /// Any permutation, uniformly: a patch may stay, and at n = 2 the image is left whole 1/24 of the time.
    | Uniform

/// Sattolo's algorithm over uniforms u (one per cell): a uniformly random cyclic permutation.
let private sattolo (u: float32[]) : int64[] =
    let p = Array.init u.Length int64
    for i in u.Length - 1 .. -1 .. 1 do
        // j uniform in 0..i-1: never i itself, which is what makes a single cycle.
        let j = min (i - 1) (int (float u.[i] * float i))
        let t = p.[i]
        p.[i] <- p.[j]
        p.[j] <- t
    p

/// Patch orders for a batch: rows of indices into the n*n patches (one row when PerBatch), drawn from `gen`.
let permutations (gen: Generator) (mode: Permutation) (draw: Draw) (batch: int) (n: int) : Tensor =
    let cells = int64 (n * n)
    let rows = match mode with PerBatch -> 1L | PerSample -> int64 batch
    match draw with
    // float32 draws whatever the default dtype is (a float64 session reads them as float32 below).
    | Uniform -> torch.rand([| rows; cells |], dtype = ScalarType.Float32, generator = gen).argsort(1L)
    | Cycle ->
        use u = torch.rand([| rows; cells |], dtype = ScalarType.Float32, generator = gen)
        let all = u.data<float32>().ToArray()
        let perms = Array.init (int rows) (fun r -> sattolo all.[r * int cells .. (r + 1) * int cells - 1]) |> Array.concat
        torch.tensor(perms).reshape(rows, cells)

/// Reassembles `x` (B, C, H, W) with its patches in the order `perm` gives (see `permutations`).
let apply (perm: Tensor) (n: int) (x: Tensor) : Tensor =
    let shape = x.shape
    let b, c, h, w = shape.[0], shape.[1], shape.[2], shape.[3]
    let nn = int64 n
    let ph, pw = h / nn, w / nn
    if n <= 1 || ph = 0L || pw = 0L then
        x.alias ()
    else
        use _ = torch.NewDisposeScope()
        let cells = nn * nn
        let core = x.narrow(2L, 0L, nn * ph).narrow(3L, 0L, nn * pw)
        // (B, C, n, ph, n, pw) -> (B*n*n, C, ph, pw): one row per patch, row-major over the grid.
        let patches = core.reshape(b, c, nn, ph, nn, pw).permute(0L, 2L, 4L, 1L, 3L, 5L).reshape(b * cells, c, ph, pw)
        let perm =
            if x.device.``type`` = DeviceType.CUDA then
                // From pinned memory without blocking: a pageable copy would wait for the GPU's queue.
                use pinned = perm.to_type(ScalarType.Int64).pin_memory ()
                pinned.``to`` (x.device, non_blocking = true)
            else
                perm.to_type ScalarType.Int64
        let rows =
            if perm.shape.[0] = 1L then perm.expand(b, cells) else perm
        let starts = Ops.scalarInt cells (torch.arange(b, device = x.device).unsqueeze(1L)).mul
        let flat = (Ops.add rows starts).flatten()
        let shuffled =
            patches.index_select(0L, flat).reshape(b, nn, nn, c, ph, pw).permute(0L, 3L, 1L, 4L, 2L, 5L).reshape(b, c, nn * ph, nn * pw)
        let result =
            if nn * ph = h && nn * pw = w then
                shuffled
            else
                let out = x.clone ()
                out.narrow(2L, 0L, nn * ph).narrow(3L, 0L, nn * pw).copy_(shuffled) |> ignore
                out
        result.MoveToOuterDisposeScope()

/// Jigsaw of `x` with n x n patches, permutations drawn from `gen`.
let shuffle (gen: Generator) (mode: Permutation) (draw: Draw) (n: int) (x: Tensor) : Tensor =
    if n <= 1 then
        x.alias ()
    else
        use perm = permutations gen mode draw (int x.shape.[0]) n
        apply perm n x
