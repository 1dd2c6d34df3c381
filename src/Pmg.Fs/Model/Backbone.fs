/// Backbones as lists of stages. A backbone value says what each stage outputs (name, channels, reduction);
/// heads read their widths from it, so no width is typed twice. Module and parameter names follow
/// torchvision's (conv1, bn1, layer1.0.downsample.1, fc), so ImageNet weights and the reference PMG
/// checkpoints load by name.
module Pmg.Fs.Model.Backbone

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch
open type TorchSharp.torch.nn
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators

/// What one stage of a backbone outputs.
type Stage =
    { Name: string
      Channels: int
      /// Input size divided by this stage's output size.
      Reduction: int }

type Block =
    | Basic
    | Bottleneck

/// A ResNet described as data: its block kind and how many blocks each of the four residual layers holds.
type Spec =
    { Name: string
      Block: Block
      Layers: int list
      ImageNetClasses: int }

let private expansion =
    function
    | Basic -> 1
    | Bottleneck -> 4

let private stemChannels = 64
let private layerWidths = [ 64; 128; 256; 512 ]

/// The five stages (L = 5): the stem (conv1, bn1, relu, maxpool) then layer1..layer4.
let stages (spec: Spec) : Stage list =
    let e = expansion spec.Block
    { Name = "stem"; Channels = stemChannels; Reduction = 4 }
    :: (layerWidths
        |> List.mapi (fun i w -> { Name = sprintf "layer%d" (i + 1); Channels = w * e; Reduction = 4 <<< max 0 i }))

/// The registry: every backbone this project knows, by name.
let registry: Map<string, Spec> =
    [ "resnet18", Basic, [ 2; 2; 2; 2 ]
      "resnet34", Basic, [ 3; 4; 6; 3 ]
      "resnet50", Bottleneck, [ 3; 4; 6; 3 ]
      "resnet101", Bottleneck, [ 3; 4; 23; 3 ]
      "resnet152", Bottleneck, [ 3; 8; 36; 3 ] ]
    |> List.map (fun (n, b, l) -> n, { Name = n; Block = b; Layers = l; ImageNetClasses = 1000 })
    |> Map.ofList

exception UnknownBackbone of string

/// Looks a backbone up by name, with the valid names in the error.
let find (name: string) : Spec =
    match Map.tryFind (name.ToLowerInvariant()) registry with
    | Some s -> s
    | None ->
        raise (UnknownBackbone(sprintf "unknown backbone '%s'; choose one of: %s" name (String.concat ", " registry.Keys)))

// ---------------------------------------------------------------------------------------------------
// Layers. Field names are state-dict keys.

type private BasicBlock(inC: int64, width: int64, stride: int64) as this =
    inherit Module<Tensor, Tensor>("BasicBlock")
    let conv1 = Conv2d(inC, width, 3L, stride = stride, padding = 1L, bias = false)
    let bn1 = BatchNorm2d(width)
    let conv2 = Conv2d(width, width, 3L, stride = 1L, padding = 1L, bias = false)
    let bn2 = BatchNorm2d(width)
    let relu = ReLU(true)
    let downsample: Module<Tensor, Tensor> =
        if stride <> 1L || inC <> width then
            Sequential(Conv2d(inC, width, 1L, stride = stride, bias = false), BatchNorm2d(width))
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
        let y = Pmg.Fs.Runtime.Scalars.addInPlace y identity
        relu.forward y

type private BottleneckBlock(inC: int64, width: int64, stride: int64) as this =
    inherit Module<Tensor, Tensor>("Bottleneck")
    let outC = width * 4L
    let conv1 = Conv2d(inC, width, 1L, bias = false)
    let bn1 = BatchNorm2d(width)
    // torchvision's v1.5: the stride sits on the 3x3 conv.
    let conv2 = Conv2d(width, width, 3L, stride = stride, padding = 1L, bias = false)
    let bn2 = BatchNorm2d(width)
    let conv3 = Conv2d(width, outC, 1L, bias = false)
    let bn3 = BatchNorm2d(outC)
    let relu = ReLU(true)
    let downsample: Module<Tensor, Tensor> =
        if stride <> 1L || inC <> outC then
            Sequential(Conv2d(inC, outC, 1L, stride = stride, bias = false), BatchNorm2d(outC))
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
        let y = Pmg.Fs.Runtime.Scalars.addInPlace y identity
        relu.forward y

/// A ResNet whose forward returns every stage's output. `fc` is torchvision's ImageNet classifier: PMG does not
/// use it, but it is kept so that ImageNet and reference PMG state_dicts load strictly.
type ResNet(spec: Spec) as this =
    inherit Module<Tensor, Tensor>(spec.Name)
    let stageList = stages spec
    let conv1 = Conv2d(3L, int64 stemChannels, 7L, stride = 2L, padding = 3L, bias = false)
    let bn1 = BatchNorm2d(int64 stemChannels)
    let relu = ReLU(true)
    let maxpool = MaxPool2d(3L, stride = 2L, padding = 1L)

    let makeLayer (inC: int) (width: int) (blocks: int) (stride: int) : Module<Tensor, Tensor> =
        let e = expansion spec.Block
        let block i =
            let c = if i = 0 then inC else width * e
            let s = if i = 0 then int64 stride else 1L
            match spec.Block with
            | Basic -> new BasicBlock(int64 c, int64 width, s) :> Module<Tensor, Tensor>
            | Bottleneck -> new BottleneckBlock(int64 c, int64 width, s) :> Module<Tensor, Tensor>
        Sequential(Array.init blocks block)

    let layers =
        // Each layer reads the previous stage's output.
        let ins = stageList |> List.take (List.length layerWidths) |> List.map _.Channels
        List.zip3 layerWidths spec.Layers ins
        |> List.mapi (fun i (w, n, inC) -> makeLayer inC w n (if i = 0 then 1 else 2))
        |> Array.ofList
    let layer1 = layers.[0]
    let layer2 = layers.[1]
    let layer3 = layers.[2]
    let layer4 = layers.[3]
    let fc = Linear(int64 (List.last stageList).Channels, int64 spec.ImageNetClasses)
    do this.RegisterComponents()

    member _.Spec = spec
    member _.Stages = stageList

    /// Outputs of stages 1..upTo (1-based, at most 5), in order. Stopping early skips the deeper stages.
    member _.ForwardStages(x: Tensor, upTo: int) : Tensor list =
        use y = conv1.forward x
        use y = bn1.forward y
        use y = relu.forward y
        let stem = maxpool.forward y
        let rest = [ layer1; layer2; layer3; layer4 ] |> List.truncate (upTo - 1)
        (List.scan (fun (prev: Tensor) (layer: Module<Tensor, Tensor>) -> layer.forward prev) stem rest)

    member this.ForwardStages(x: Tensor) = this.ForwardStages(x, 5)

    /// The ImageNet classifier path, for checking pretrained weights.
    override this.forward(x) =
        use _ = NewDisposeScope()
        let last = this.ForwardStages x |> List.last
        let pooled = nn.functional.adaptive_avg_pool2d(last, [| 1L; 1L |]).flatten(1L)
        (fc.forward pooled).MoveToOuterDisposeScope()

let create (spec: Spec) = new ResNet(spec)
