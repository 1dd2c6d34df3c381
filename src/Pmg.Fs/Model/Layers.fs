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

type BatchNorm(features: int64, eps: float, momentum: float, dims: int list, name: string) =
    inherit Modules.BatchNorm(features, eps, momentum, true, true, null, Nullable(), name)

    override _.ValidateInputDimensions(input: Tensor) =
        if not (List.contains (int (input.dim ())) dims) then
            invalidArg (nameof input) (sprintf "%s expects %A dimensions, got %d" name dims (input.dim ()))

    override this.forward(input: Tensor) =
        this.ValidateInputDimensions input
        if this.training then Ops.increment this.num_batches_tracked
        // Training uses the batch's statistics and updates the running ones with `momentum`; eval uses the running.
        nn.functional.batch_norm (input, this.running_mean, this.running_var, this.weight, this.bias, this.training, momentum, eps)

/// BatchNorm over (N, C, H, W), PyTorch's defaults (eps 1e-5, momentum 0.1).
let batchNorm2d (features: int64) (momentum: float) = new BatchNorm(features, 1e-5, momentum, [ 4 ], "BatchNorm2d")

/// BatchNorm over (N, C) or (N, C, L).
let batchNorm1d (features: int64) (momentum: float) = new BatchNorm(features, 1e-5, momentum, [ 2; 3 ], "BatchNorm1d")

/// PyTorch's default BatchNorm momentum.
let defaultMomentum = 0.1

/// ELU as a module (the reference's nn.ELU).
type Elu() =
    inherit nn.Module<Tensor, Tensor>("ELU")
    override _.forward(x) = Ops.elu x
