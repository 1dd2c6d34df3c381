/// Backbones as lists of stages. A backbone value says what each stage outputs (name, channels, reduction);
/// heads read their widths from it, so no width is typed twice. Module and parameter names follow
/// torchvision's (conv1, bn1, layer1.0.downsample.1, fc; VGG's features.0 ... features.28), so ImageNet weights
/// and the reference PMG checkpoints load by name.
module Pmg.Fs.Model.Backbone

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch
open type TorchSharp.torch.nn
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators
open Pmg.Fs.Runtime

/// What one stage of a backbone outputs.
type Stage =
    { /// The stage's name: "stem" and "layer1".."layer4" (ResNet), or "block1".."block5" (VGG).
      Name: string
      /// Channels of the stage's output.
      Channels: int
      /// Input size divided by this stage's output size.
      Reduction: int }

/// The residual block a ResNet is built of.
type Block =
    /// Two 3x3 convolutions (ResNet-18, -34); the block outputs its layer's width.
    | Basic
    /// 1x1, 3x3 and 1x1 convolutions (ResNet-50 and deeper); the block outputs four times its layer's width.
    | Bottleneck

/// A backbone's architecture and depth.
type Family =
    /// Block kind and how many blocks each of the four residual layers holds.
    | ResNet of block: Block * layers: int list
    /// How many 3x3 convolutions each of the five blocks holds (each block ends with a 2x2 max pool).
    | Vgg of convs: int list

/// A file inside a NuGet package that the project restores (paket.dependencies): weights that ship without a
/// download.
type Packaged =
    { /// NuGet package id.
      Package: string
      /// Package version.
      Version: string
      /// Path inside the package folder.
      File: string }

/// torchvision's published ImageNet weights for a backbone: fetched once into PyTorch's hub cache (Interop/Hub.fs),
/// where the reference's own `torchvision.models.resnet50(pretrained=True)` keeps them too.
type Download =
    { /// The official URL; its last segment is the file name.
      Url: string
      /// The file name in the hub cache: torchvision's, ending in "-" and the first hex digits of its SHA-256.
      File: string
      /// The file's size in MiB, for "will be downloaded (98 MB)" before any request.
      Megabytes: int }

/// A backbone described as data.
type Spec =
    { /// Registry name, lower case (e.g. "resnet50").
      Name: string
      /// Architecture and depth.
      Family: Family
      /// Classes of the ImageNet classifier kept beside the stages (torchvision's `fc`) so that ImageNet and
      /// reference state_dicts load strictly; None where the weights' source has no classifier.
      ImageNetClassifier: int option
      /// ImageNet weights that ship with the project, if any.
      ImageNet: Packaged option
      /// torchvision's ImageNet weights for this backbone, downloaded on first use; None where torchvision has none.
      Torchvision: Download option }

/// Where a backbone's starting weights come from.
type Weights =
    /// Random initialisation from the seed.
    | Scratch
    /// The backbone's ImageNet weights: the ones that ship with the project (Spec.ImageNet), else torchvision's,
    /// from PyTorch's hub cache or downloaded into it (Spec.Torchvision).
    | ImageNet
    /// A file: a torchvision state_dict (.pth, .safetensors), a PMG checkpoint's backbone, or an ONNX ResNet.
    | File of path: string

let private expansion =
    function
    | Basic -> 1
    | Bottleneck -> 4

let private stemChannels = 64
let private layerWidths = [ 64; 128; 256; 512 ]

let private vggWidths = [ 64; 128; 256; 512; 512 ]

/// Reading and describing where a backbone's weights come from.
[<RequireQualifiedAccess>]
module Weights =
    /// The command-line spelling: `imagenet`, `none` (random initialisation), or a file.
    let parse (text: string) : Weights =
        match text.Trim().ToLowerInvariant() with
        | "imagenet" -> ImageNet
        | "none" | "scratch" -> Scratch
        | _ -> File text

    /// A short phrase for reports: "from scratch", "ImageNet weights", or "weights from" and the file name.
    let describe =
        function
        | Scratch -> "from scratch"
        | ImageNet -> "ImageNet weights"
        | File path -> sprintf "weights from %s" (System.IO.Path.GetFileName path)

/// The five stages (L = 5). ResNet: the stem (conv1, bn1, relu, maxpool) then layer1..layer4. VGG: its five
/// conv blocks, each ending with its max pool.
let stages (spec: Spec) : Stage list =
    match spec.Family with
    | ResNet(block, _) ->
        let e = expansion block
        { Name = "stem"; Channels = stemChannels; Reduction = 4 }
        :: (layerWidths
            |> List.mapi (fun i w -> { Name = sprintf "layer%d" (i + 1); Channels = w * e; Reduction = 4 <<< max 0 i }))
    | Vgg _ -> vggWidths |> List.mapi (fun i w -> { Name = sprintf "block%d" (i + 1); Channels = w; Reduction = 2 <<< i })

/// The stages PMG's granularity heads read: the last `heads` of the backbone's (S of L), each with its 1-based
/// position l, finest first. The network, the schedule, Grad-CAM, the jigsaw view and the optimizer groups all
/// take the heads from here.
let headStages (spec: Spec) (heads: int) : (int * Stage) list =
    let all = stages spec
    let l = List.length all
    if heads < 1 || heads > l - 1 then
        Pmg.Fs.Errors.setting Pmg.Fs.Setting.Heads (sprintf "heads %d: must be 1..%d for %s (heads sit on the last stages, never the stem)" heads (l - 1) spec.Name)
    all |> List.indexed |> List.skip (l - heads) |> List.map (fun (i, st) -> i + 1, st)

/// torchvision's files as the reference's torchvision (before 0.13) fetched them with `pretrained=True`: the
/// reference trains from resnet50-19c8e357.pth, so a run here starts from the same bytes.
let private torchvision (file: string) (megabytes: int) : Download option =
    Some { Url = "https://download.pytorch.org/models/" + file; File = file; Megabytes = megabytes }

/// The registry: every backbone this project knows, by name.
let registry: Map<string, Spec> =
    [ "resnet18", Basic, [ 2; 2; 2; 2 ], torchvision "resnet18-5c106cde.pth" 45
      "resnet34", Basic, [ 3; 4; 6; 3 ], torchvision "resnet34-333f7ec4.pth" 83
      "resnet50", Bottleneck, [ 3; 4; 6; 3 ], torchvision "resnet50-19c8e357.pth" 98
      "resnet101", Bottleneck, [ 3; 4; 23; 3 ], torchvision "resnet101-5d3b4d8f.pth" 170
      "resnet152", Bottleneck, [ 3; 8; 36; 3 ], torchvision "resnet152-b121ed2d.pth" 230 ]
    |> List.map (fun (n, b, l, w) ->
        n, { Name = n; Family = ResNet(b, l); ImageNetClassifier = Some 1000; ImageNet = None; Torchvision = w })
    |> List.append
        [ "vgg16",
          { Name = "vgg16"
            Family = Vgg [ 2; 2; 3; 3; 3 ]
            ImageNetClassifier = Some 1000
            ImageNet = None
            Torchvision = torchvision "vgg16-397923af.pth" 528 }
          // ML.NET's ImageNet "ResNet18" (exported from CNTK): basic blocks, but three in the last stage, so it is not
          // torchvision's resnet18. Its weights ship on NuGet; Interop/ImageNet.fs converts them.
          "resnet18-mlnet",
          { Name = "resnet18-mlnet"
            Family = ResNet(Basic, [ 2; 2; 2; 3 ])
            ImageNetClassifier = None
            ImageNet =
              Some
                  { Package = "Microsoft.ML.DnnImageFeaturizer.ResNet18"
                    Version = "0.23.1"
                    File = "tools/DnnImageModels/ResNet18Onnx/ResNet18.onnx" }
            Torchvision = None } ]
    |> Map.ofList

/// Looks a backbone up by name, with the valid names in the error.
let find (name: string) : Spec =
    match Map.tryFind (name.ToLowerInvariant()) registry with
    | Some s -> s
    | None ->
        Pmg.Fs.Errors.setting Pmg.Fs.Setting.Backbone (sprintf "unknown backbone '%s'; choose one of: %s" name (String.concat ", " registry.Keys))

// ---------------------------------------------------------------------------------------------------
// Layers. Field names are state-dict keys.

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

/// A backbone as PMG uses it: its stages, and their outputs for an input.
[<AbstractClass>]
type Features(name: string) =
    inherit Module<Tensor, Tensor>(name)
    /// What each stage outputs, in order (see `stages`).
    abstract Stages: Stage list
    /// Outputs of stages 1..upTo (1-based), in order. Stopping early skips the deeper stages.
    abstract ForwardStages: x: Tensor * upTo: int -> Tensor list
    /// Outputs of every stage, in order.
    member this.ForwardStages(x: Tensor) = this.ForwardStages(x, List.length this.Stages)
    /// Writes the eval-mode computation as operators (weights under `prefix`, empty or ending with "."), reading
    /// `input`; returns every stage's output, in order.
    abstract EmitStages: builder: Graph.IBuilder * prefix: string * input: string -> string list

/// A ResNet whose forward returns every stage's output. `fc` is torchvision's ImageNet classifier: PMG does not
/// use it, but it is kept so that ImageNet and reference PMG state_dicts load strictly.
type ResNet(spec: Spec, block: Block, blocksPerLayer: int list) as this =
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

/// torchvision's VGG without batch norm: `features` holds conv, relu (and a max pool closing each block) at the
/// same indices as torchvision's, so its ImageNet weights load by name. Its fully connected classifier is left
/// out: PMG does not use it, and it would be most of the parameters.
type VggNet(spec: Spec, convs: int list) as this =
    inherit Features(spec.Name)
    let stageList = stages spec
    let blocks =
        List.zip convs (List.map _.Channels stageList)
        |> List.scan (fun (inC, _) (n, width) ->
            width,
            [ for i in 0 .. n - 1 do
                  yield Conv2d((if i = 0 then int64 inC else int64 width), int64 width, 3L, padding = 1L) :> Module<Tensor, Tensor>
                  yield ReLU(true) :> Module<Tensor, Tensor>
              yield MaxPool2d(2L, stride = 2L) :> Module<Tensor, Tensor> ]) (3, [])
        |> List.tail
        |> List.map snd
    let features = Sequential(blocks |> List.concat |> Array.ofList)
    do this.RegisterComponents()

    /// The five conv blocks.
    override _.Stages = stageList

    /// The torchvision-named layers (referenced here so that RegisterComponents sees the field).
    member _.Layers = features

    /// Outputs of blocks 1..upTo (1-based), each taken after the block's max pool.
    override _.ForwardStages(x: Tensor, upTo: int) : Tensor list =
        blocks
        |> List.truncate upTo
        |> List.scan (fun (prev: Tensor) (layers: Module<Tensor, Tensor> list) -> layers |> List.fold (fun t l -> l.forward t) prev) x
        |> List.tail

    /// torchvision's layers in order; a stage's output is its block's max pool.
    override this.EmitStages(b, prefix, x) =
        let inner = prefix + Graph.childName this features + "."
        features.named_children ()
        |> Seq.fold
            (fun (y, outs) struct (n, m) ->
                let z = Graph.emit b (inner + n + ".") m y
                z, (if m :? MaxPool2d then outs @ [ z ] else outs))
            (x, [])
        |> snd

    /// The stage outputs' last, for shape checks.
    override this.forward(x) = this.ForwardStages x |> List.last

/// Builds the backbone a spec describes, with freshly initialised weights.
let create (spec: Spec) : Features =
    match spec.Family with
    | ResNet(block, layers) -> new ResNet(spec, block, layers)
    | Vgg convs -> new VggNet(spec, convs)
