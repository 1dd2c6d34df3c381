/// torchvision's ResNets (v1.5: the stride on the 3x3 convolution) as PMG's five stages: the stem, then layer1..layer4.
module Pmg.Fs.Model.ResNet

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch
open type TorchSharp.torch.nn
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators
open Pmg.Fs.Runtime
open Pmg.Fs.Model.Backbone

// Field names are state-dict keys.

type private BasicBlock(inC: int64, width: int64, stride: int64) as this =
    inherit Module<Tensor, Tensor>("BasicBlock")
    let conv1 = Conv2d(inC, width, 3L, stride = stride, padding = 1L, bias = false)
    let bn1 = Layers.batchNorm2d width Layers.defaultMomentum
    let conv2 = Conv2d(width, width, 3L, stride = 1L, padding = 1L, bias = false)
    let bn2 = Layers.batchNorm2d width Layers.defaultMomentum
    let relu = ReLU(true)
    let downsample: Module<Tensor, Tensor> =
        if stride <> 1L || inC <> width then
            Sequential(Conv2d(inC, width, 1L, stride = stride, bias = false), Layers.batchNorm2d width Layers.defaultMomentum)
        else
            null
    do this.RegisterComponents()

    override _.forward(x) =
        use y = conv1.forward x
        use y = bn1.forward y
        use y = relu.forward y
        use y = conv2.forward y
        let y = bn2.forward y
        use identity = if isNull downsample then x.alias () else downsample.forward x
        let y = Ops.addInPlace y identity
        relu.forward y

    interface Graph.IExportable with
        member this.Emit(b, prefix, inputs) =
            let x = List.head inputs
            let e m y = Graph.emitChild b prefix this m y
            let main = x |> e conv1 |> e bn1 |> Graph.emit b prefix relu |> e conv2 |> e bn2
            let shortcut = if isNull downsample then x else e downsample x
            [ Graph.emit b prefix relu (b.Node("Add", [ main; shortcut ], [])) ]

type private BottleneckBlock(inC: int64, width: int64, stride: int64) as this =
    inherit Module<Tensor, Tensor>("Bottleneck")
    let outC = width * 4L
    let conv1 = Conv2d(inC, width, 1L, bias = false)
    let bn1 = Layers.batchNorm2d width Layers.defaultMomentum
    // torchvision's v1.5: the stride sits on the 3x3 conv.
    let conv2 = Conv2d(width, width, 3L, stride = stride, padding = 1L, bias = false)
    let bn2 = Layers.batchNorm2d width Layers.defaultMomentum
    let conv3 = Conv2d(width, outC, 1L, bias = false)
    let bn3 = Layers.batchNorm2d outC Layers.defaultMomentum
    let relu = ReLU(true)
    let downsample: Module<Tensor, Tensor> =
        if stride <> 1L || inC <> outC then
            Sequential(Conv2d(inC, outC, 1L, stride = stride, bias = false), Layers.batchNorm2d outC Layers.defaultMomentum)
        else
            null
    do this.RegisterComponents()

    override _.forward(x) =
        use y = conv1.forward x
        use y = bn1.forward y
        use y = relu.forward y
        use y = conv2.forward y
        use y = bn2.forward y
        use y = relu.forward y
        use y = conv3.forward y
        let y = bn3.forward y
        use identity = if isNull downsample then x.alias () else downsample.forward x
        let y = Ops.addInPlace y identity
        relu.forward y

    interface Graph.IExportable with
        member this.Emit(b, prefix, inputs) =
            let x = List.head inputs
            let e m y = Graph.emitChild b prefix this m y
            let r = Graph.emit b prefix relu
            let main = x |> e conv1 |> e bn1 |> r |> e conv2 |> e bn2 |> r |> e conv3 |> e bn3
            let shortcut = if isNull downsample then x else e downsample x
            [ r (b.Node("Add", [ main; shortcut ], [])) ]

/// A ResNet whose forward returns every stage's output. `fc` is torchvision's ImageNet classifier: PMG does not
/// use it, but it is kept so that ImageNet and reference PMG state_dicts load strictly.
type Net(spec: Spec, block: Block, blocksPerLayer: int list) as this =
    inherit Features(spec.Name)
    let stageList = stages spec
    let conv1 = Conv2d(3L, int64 stemChannels, 7L, stride = 2L, padding = 3L, bias = false)
    let bn1 = Layers.batchNorm2d (int64 stemChannels) Layers.defaultMomentum
    let relu = ReLU(true)
    let maxpool = MaxPool2d(3L, stride = 2L, padding = 1L)

    let makeLayer (inC: int) (width: int) (blocks: int) (stride: int) : Module<Tensor, Tensor> =
        let e = expansion block
        let block i =
            let c = if i = 0 then inC else width * e
            let s = if i = 0 then int64 stride else 1L
            match block with
            | Basic -> new BasicBlock(int64 c, int64 width, s) :> Module<Tensor, Tensor>
            | Bottleneck -> new BottleneckBlock(int64 c, int64 width, s) :> Module<Tensor, Tensor>
        Sequential(Array.init blocks block)

    let layers =
        // Each layer reads the previous stage's output.
        let ins = stageList |> List.take (List.length layerWidths) |> List.map _.Channels
        List.zip3 layerWidths blocksPerLayer ins
        |> List.mapi (fun i (w, n, inC) -> makeLayer inC w n (if i = 0 then 1 else 2))
        |> Array.ofList
    let layer1 = layers.[0]
    let layer2 = layers.[1]
    let layer3 = layers.[2]
    let layer4 = layers.[3]
    let fc =
        spec.ImageNetClassifier
        |> Option.map (fun classes -> Linear(int64 (List.last stageList).Channels, int64 classes))
        |> Option.toObj
    do this.RegisterComponents()

    /// The stem and layer1..layer4.
    override _.Stages = stageList

    /// Outputs of the stem, then of layer1.. up to stage `upTo` (1-based; the stem is stage 1).
    override _.ForwardStages(x: Tensor, upTo: int) : Tensor list =
        use y = conv1.forward x
        use y = bn1.forward y
        use y = relu.forward y
        let stem = maxpool.forward y
        let rest = [ layer1; layer2; layer3; layer4 ] |> List.truncate (upTo - 1)
        (List.scan (fun (prev: Tensor) (layer: Module<Tensor, Tensor>) -> layer.forward prev) stem rest)

    /// The stem, then each residual layer's blocks.
    override this.EmitStages(b, prefix, x) =
        let e (m: Module<Tensor, Tensor>) y = Graph.emitChild b prefix this m y
        let stem = x |> e conv1 |> e bn1 |> Graph.emit b prefix relu |> e maxpool
        List.scan (fun prev layer -> e layer prev) stem [ layer1; layer2; layer3; layer4 ]

    /// The ImageNet classifier path, for checking pretrained weights: logits, or the pooled features where the
    /// backbone keeps no classifier.
    override this.forward(x) =
        use _ = NewDisposeScope()
        let last = this.ForwardStages x |> List.last
        let pooled = nn.functional.adaptive_avg_pool2d(last, [| 1L; 1L |]).flatten(1L)
        (if isNull fc then pooled else fc.forward pooled).MoveToOuterDisposeScope()

