/// BatchNorm whose forward hands no temporary Scalar to native code. TorchSharp's own BatchNorm counts batches
/// with `num_batches_tracked.add_(1)`, which builds Scalars that the GC may finalise during the call (see
/// Runtime.Scalars); it crashed an ablation run after minutes. Same parameters, buffers and names.
module Pmg.Fs.Model.Norm

open System
open TorchSharp
open type TorchSharp.torch
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators

type BatchNorm(features: int64, eps: float, momentum: float, dims: int list, name: string) =
    inherit Modules.BatchNorm(features, eps, momentum, true, true, null, Nullable(), name)

    override _.ValidateInputDimensions(input: Tensor) =
        if not (List.contains (int (input.dim ())) dims) then
            invalidArg (nameof input) (sprintf "%s expects %A dimensions, got %d" name dims (input.dim ()))

    override this.forward(input: Tensor) =
        this.ValidateInputDimensions input
        if this.training then Pmg.Fs.Runtime.Scalars.increment this.num_batches_tracked
        // Training uses the batch's statistics and updates the running ones with `momentum`; eval uses the running.
        nn.functional.batch_norm (input, this.running_mean, this.running_var, this.weight, this.bias, this.training, momentum, eps)

/// BatchNorm over (N, C, H, W), PyTorch's defaults (eps 1e-5, momentum 0.1).
type Norm =
    static member BatchNorm2d(features: int64, ?eps: float, ?momentum: float) =
        new BatchNorm(features, defaultArg eps 1e-5, defaultArg momentum 0.1, [ 4 ], "BatchNorm2d")

    /// BatchNorm over (N, C) or (N, C, L).
    static member BatchNorm1d(features: int64, ?eps: float, ?momentum: float) =
        new BatchNorm(features, defaultArg eps 1e-5, defaultArg momentum 0.1, [ 2; 3 ], "BatchNorm1d")
