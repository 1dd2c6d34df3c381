/// PMG's granularity heads: a conv block on one backbone stage, global max pooling, and a classifier.
/// Layer indices inside each Sequential match the reference code's, so state-dict keys agree
/// (conv_block1.0.conv.weight, classifier1.4.bias, ...).
module Pmg.Fs.Model.Heads

open TorchSharp
open type TorchSharp.torch
open type TorchSharp.torch.nn
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators

/// Widths of the heads, from the paper: a 1x1 conv to FeatureSize, a 3x3 conv to BlockChannels,
/// classifiers FeatureSize wide.
type Config =
    { /// Output channels of each head's 1x1 conv, and the hidden width of every classifier (512 in the paper).
      FeatureSize: int
      /// Output channels of each head's 3x3 conv, the width of a head's pooled feature (1024 in the paper).
      BlockChannels: int
      /// BatchNorm momentum in the conv blocks (the reference's BasicConv uses 0.01).
      BlockBnMomentum: float }

    /// The paper's widths (512, 1024) with the reference's BN momentum 0.01.
    static member Paper = { FeatureSize = 512; BlockChannels = 1024; BlockBnMomentum = 0.01 }

/// The reference's BasicConv: conv (no bias), BN, ReLU. Field names are the state-dict keys.
type BasicConv(inC: int64, outC: int64, kernel: int64, padding: int64, momentum: float) as this =
    inherit Module<Tensor, Tensor>("BasicConv")
    let conv = Conv2d(inC, outC, kernel, stride = 1L, padding = padding, bias = false)
    let bn = Layers.batchNorm2d outC momentum
    let relu = ReLU()
    do this.RegisterComponents()

    /// Conv, BN, ReLU.
    override _.forward(x) =
        use y = conv.forward x
        use y = bn.forward y
        relu.forward y

    // Conv, BN, ReLU as operators.
    interface Graph.IExportable with
        member this.Emit(b, prefix, inputs) =
            let e (m: Module<Tensor, Tensor>) y = Graph.emitChild b prefix this m y
            [ List.head inputs |> e conv |> e bn |> Graph.emit b prefix relu ]

/// Conv block of one head: stage channels -> FeatureSize (1x1) -> BlockChannels (3x3).
let convBlock (config: Config) (stageChannels: int) : Module<Tensor, Tensor> =
    let f, c = int64 config.FeatureSize, int64 config.BlockChannels
    Sequential(
        new BasicConv(int64 stageChannels, f, 1L, 0L, config.BlockBnMomentum) :> Module<Tensor, Tensor>,
        new BasicConv(f, c, 3L, 1L, config.BlockBnMomentum) :> Module<Tensor, Tensor>
    )

/// BN1d, Linear to FeatureSize, BN1d, ELU, Linear to classes; indices 0..4 as in the reference.
let classifier (config: Config) (inputs: int) (classes: int) : Module<Tensor, Tensor> =
    let f = int64 config.FeatureSize
    Sequential(
        Layers.batchNorm1d (int64 inputs) Layers.defaultMomentum :> Module<Tensor, Tensor>,
        Linear(int64 inputs, f),
        Layers.batchNorm1d f Layers.defaultMomentum,
        new Layers.Elu(),
        Linear(f, int64 classes)
    )

/// Global max pooling: any input size works (the reference's MaxPool2d(56/28/14) assumed 448 px).
let globalMaxPool (x: Tensor) : Tensor = x.amax([| 2L; 3L |])
