/// torchvision's ConvNeXt as PMG's five stages (see Backbone.stages): the stem (features.0), stage1 (features.1),
/// then stage2..stage4, each a downsampling (features.2, .4, .6) and its blocks (features.3, .5, .7). Module and
/// parameter names are torchvision's, so its ImageNet files load by name.
module Pmg.Fs.Model.ConvNeXt

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch
open type TorchSharp.torch.nn
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators
open Pmg.Fs.Runtime
open Pmg.Fs.Model.Backbone

/// torchvision's LayerNorm epsilon for ConvNeXt (`partial(nn.LayerNorm, eps=1e-6)`).
let private eps = 1e-6

/// torchvision's initial layer scale.
let private layerScaleInit = 1e-6

/// Channels-last to channels-first and back, as permutations of (N, C, H, W).
let private toLast = [| 0L; 2L; 3L; 1L |]
let private toFirst = [| 0L; 3L; 1L; 2L |]

// ---------------------------------------------------------------------------------------------------
// Operators for the ONNX graph (Graph.IBuilder).

let private transpose (b: Graph.IBuilder) (perm: int64[]) (x: string) =
    b.Node("Transpose", [ x ], [ "perm", Graph.Ints(List.ofArray perm) ])

/// A convolution with its groups (Graph.emit writes only ungrouped ones).
let private emitConv (b: Graph.IBuilder) (prefix: string) (c: Conv2d) (x: string) =
    let two (xs: int64[]) = if xs.Length = 1 then [ xs.[0]; xs.[0] ] else List.ofArray xs
    let weights = [ b.Weight(prefix + "weight") ] @ (if isNull c.bias then [] else [ b.Weight(prefix + "bias") ])
    let p = two c.padding
    b.Node(
        "Conv",
        x :: weights,
        [ "kernel_shape", Graph.Ints(two c.kernel_size)
          "strides", Graph.Ints(two c.stride)
          "pads", Graph.Ints(p @ p)
          "group", Graph.Int c.groups ]
    )

// ---------------------------------------------------------------------------------------------------
// Modules. Field and registration names are torchvision's state-dict keys.

/// torchvision's Permute: a view with the axes reordered.
type private Permute(dims: int64[]) =
    inherit Module<Tensor, Tensor>("Permute")
    override _.forward(x) = x.permute dims

    interface Graph.IExportable with
        member _.Emit(b, _, inputs) = [ transpose b dims (List.head inputs) ]

/// GELU, the exact (erf) form as torchvision's nn.GELU().
type private Gelu() =
    inherit Module<Tensor, Tensor>("GELU")
    override _.forward(x) = functional.gelu x

    interface Graph.IExportable with
        member _.Emit(b, _, inputs) = [ Graph.gelu b (List.head inputs) ]

/// torchvision's LayerNorm2d: LayerNorm over the channels of an (N, C, H, W) tensor.
type private LayerNorm2d(channels: int64) as this =
    inherit Module<Tensor, Tensor>("LayerNorm2d")
    do
        this.register_parameter ("weight", Parameter(torch.ones [| channels |]))
        this.register_parameter ("bias", Parameter(torch.zeros [| channels |]))

    override this.forward(x) =
        // Looked up on every call: moving the module to a device replaces the parameters.
        use last = x.permute toLast
        use y = functional.layer_norm (last, [| channels |], this.get_parameter "weight", this.get_parameter "bias", eps)
        y.permute toFirst

    interface Graph.IExportable with
        member _.Emit(b, prefix, inputs) =
            [ List.head inputs |> transpose b toLast |> Graph.layerNormLast b prefix eps |> transpose b toFirst ]

/// torchvision's CNBlock: depthwise 7x7 convolution, LayerNorm, Linear 4x, GELU, Linear back, times the layer
/// scale, stochastic depth (training only), plus the input. `dropProbability` is this block's stochastic depth;
/// `depth` the backbone's draws, which the trainer reseeds.
type private CNBlock(dim: int64, dropProbability: float, depth: Layers.StochasticDepth) as this =
    inherit Module<Tensor, Tensor>("CNBlock")
    let dwconv = Conv2d(dim, dim, 7L, padding = 3L, groups = dim)
    let norm = LayerNorm(dim, eps = eps)
    let block =
        Sequential(
            [| dwconv :> Module<Tensor, Tensor>
               new Permute(toLast)
               norm
               Linear(dim, 4L * dim)
               new Gelu()
               Linear(4L * dim, dim)
               new Permute(toFirst) |]
        )
    do
        this.register_module ("block", block)
        use ones = torch.ones [| dim; 1L; 1L |]
        this.register_parameter ("layer_scale", Parameter(Ops.scale layerScaleInit ones))

    override this.forward(x) =
        use _ = NewDisposeScope()
        let y = block.forward x
        let y = y.mul (this.get_parameter "layer_scale")
        let y = if this.training && dropProbability > 0.0 then depth.Rows(dropProbability, y) else y
        (Ops.add y x).MoveToOuterDisposeScope()

    // Eval mode: no stochastic depth. The layer scale (C, 1, 1) broadcasts over (N, C, H, W) as in PyTorch.
    interface Graph.IExportable with
        member _.Emit(b, prefix, inputs) =
            let x = List.head inputs
            let p = prefix + "block."
            let y =
                x
                |> emitConv b (p + "0.") dwconv
                |> transpose b toLast
                |> Graph.layerNormLast b (p + "2.") norm.eps
                |> Graph.linearLast b (p + "3.") true
                |> Graph.gelu b
                |> Graph.linearLast b (p + "5.") true
                |> transpose b toFirst
            let scaled = b.Node("Mul", [ y; b.Weight(prefix + "layer_scale") ], [])
            [ b.Node("Add", [ scaled; x ], []) ]

/// A ConvNeXt whose forward returns the ImageNet classifier's logits; `classifier` (LayerNorm2d, Flatten,
/// Linear) is torchvision's, kept so that ImageNet state_dicts load strictly. Stochastic depth acts in training
/// mode only, drawn from a generator of its own that `Reseed` reseeds.
type Net(spec: Spec, config: ConvNeXtConfig) as this =
    inherit Features(spec.Name)
    let stageList = stages spec
    let dims = config.Dims |> List.map int64 |> Array.ofList
    // Seeded from the global generator's seed without drawing from it, so the weights' draws stay torchvision's
    // sequence; the trainer reseeds it every epoch.
    let depth = new Layers.StochasticDepth(torch.initial_seed ())
    let total = List.sum config.Depths

    let dropOf (k: int) = Layers.StochasticDepth.Probability(config.StochasticDepth, total, k)

    let stem =
        Sequential([| Conv2d(3L, dims.[0], 4L, stride = 4L) :> Module<Tensor, Tensor>; new LayerNorm2d(dims.[0]) |])
    let stageBlocks =
        config.Depths
        |> List.mapi (fun s n ->
            let first = config.Depths |> List.take s |> List.sum
            Sequential(Array.init n (fun i -> new CNBlock(dims.[s], dropOf (first + i), depth) :> Module<Tensor, Tensor>)))
    let downsamples =
        [ for s in 1..3 ->
              Sequential([| new LayerNorm2d(dims.[s - 1]) :> Module<Tensor, Tensor>; Conv2d(dims.[s - 1], dims.[s], 2L, stride = 2L) |]) ]
    // features.0 .. features.7: stem, stage, downsample, stage, ...
    let parts: Module<Tensor, Tensor>[] =
        [| yield stem :> Module<Tensor, Tensor>
           for s in 0..3 do
               if s > 0 then yield downsamples.[s - 1]
               yield stageBlocks.[s] |]
    let features = Sequential parts
    let classifier =
        spec.ImageNetClassifier
        |> Option.map (fun classes ->
            Sequential(
                [| new LayerNorm2d(dims.[3]) :> Module<Tensor, Tensor>
                   Flatten(1L)
                   Linear(dims.[3], int64 classes) |]
            ))
        |> Option.toObj
    /// Which of features.0..7 each of the five stages runs.
    let stageParts = [ [ 0 ]; [ 1 ]; [ 2; 3 ]; [ 4; 5 ]; [ 6; 7 ] ]

    do
        this.register_module ("features", features)
        if not (isNull classifier) then this.register_module ("classifier", classifier)
        // torchvision's initialisation, in its module order, from the global generator.
        use _ = torch.no_grad ()
        for struct (_, m) in this.named_modules () do
            match m with
            | :? Conv2d as c ->
                Layers.truncNormal 0.02 c.weight
                if not (isNull c.bias) then init.zeros_ c.bias |> ignore
            | :? Linear as l ->
                Layers.truncNormal 0.02 l.weight
                if not (isNull l.bias) then init.zeros_ l.bias |> ignore
            | _ -> ()

    /// The stem and stage1..stage4.
    override _.Stages = stageList

    /// Outputs of the stem, then of stage1.. up to stage `upTo` (1-based; the stem is stage 1).
    override _.ForwardStages(x: Tensor, upTo: int) : Tensor list =
        let run (prev: Tensor) (indices: int list) =
            match indices with
            | [ i ] -> parts.[i].forward prev
            | [ i; j ] ->
                use down = parts.[i].forward prev
                parts.[j].forward down
            | _ -> invalidOp "a stage runs one or two parts"
        stageParts |> List.truncate upTo |> List.scan run x |> List.tail

    /// torchvision's layers in order; a stage's output is its blocks' output.
    override this.EmitStages(b, prefix, x) =
        let inner = prefix + Graph.childName this features + "."
        let run (prev: string) (indices: int list) =
            indices |> List.fold (fun y i -> Graph.emit b (inner + string i + ".") parts.[i] y) prev
        stageParts |> List.scan run x |> List.tail

    /// Reseeds stochastic depth's generator (the trainer calls it at every epoch start).
    override _.Reseed(seed: int64) = depth.Reseed seed

    /// The ImageNet classifier path (average pool, LayerNorm2d, Linear), for checking pretrained weights: logits,
    /// or the pooled features where the backbone keeps no classifier.
    override this.forward(x) =
        use _ = NewDisposeScope()
        let last = this.ForwardStages x |> List.last
        let pooled = functional.adaptive_avg_pool2d (last, [| 1L; 1L |])
        (if isNull classifier then pooled.flatten 1L else classifier.forward pooled).MoveToOuterDisposeScope()

    /// Frees the stochastic depth generator with the modules.
    override _.Dispose(disposing: bool) =
        if disposing then (depth :> System.IDisposable).Dispose()
        base.Dispose disposing

/// Builds a ConvNeXt backbone with freshly initialised weights (torchvision's initialisation, drawn from the global
/// generator). Four stages of at least one block and one channel each, and a drop probability in [0, 1].
let create (spec: Spec) (config: ConvNeXtConfig) : Features =
    let fail (why: string) =
        Pmg.Fs.Errors.setting Pmg.Fs.Setting.Backbone (sprintf "backbone %s: %s" spec.Name why)
    if config.Depths.Length <> 4 || config.Dims.Length <> 4 then
        fail (sprintf "a ConvNeXt has four stages; got %d depths and %d widths" config.Depths.Length config.Dims.Length)
    if config.Depths |> List.exists (fun d -> d < 1) || config.Dims |> List.exists (fun d -> d < 1) then
        fail (sprintf "every stage needs at least one block and one channel; got depths %A, widths %A" config.Depths config.Dims)
    if not (config.StochasticDepth >= 0.0 && config.StochasticDepth <= 1.0) then
        fail (sprintf "stochastic depth %g is not a probability: give a value in [0, 1]" config.StochasticDepth)
    new Net(spec, config)
