/// ImageNet weights from an ONNX ResNet: the graph is walked as the stem and its basic blocks, each convolution
/// and BatchNormalization renamed to torchvision's keys (conv1, bn1, layer2.0.downsample.1, ...), so a stage-list
/// backbone loads them strictly. The input convention of the ONNX model (here ML.NET's: BGR, 0-255, minus a mean
/// image) is folded into the first convolution and bn1's running mean, so the backbone takes this project's
/// normalised RGB like any other.
module Pmg.Fs.Interop.ImageNet

open System
open System.IO
open TorchSharp
open Pmg.Fs.Model
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators

/// Refuses the ONNX file `path` (a graph this converter does not understand, or weights that do not fit the
/// backbone) as a ModelFile error.
let private refuse (path: string) fmt = Printf.kprintf (fun m -> Pmg.Fs.Errors.modelFile path m) fmt

/// ImageNet weights that cannot be had (none ship for the backbone, or the package is not restored).
let private fail fmt = Printf.kprintf (fun m -> Pmg.Fs.Errors.fail (Pmg.Fs.PmgError.WeightsUnavailable m)) fmt

/// What an ONNX model expects of its input before its first layer: channel order, scale and a per-channel mean.
type InputConvention =
    { /// Source RGB channel of each input channel (2, 1, 0 for BGR).
      Channels: int list
      /// Pixel values arrive as [0, 1] times this (255 for 8-bit levels).
      Scale: float
      /// Subtracted from each input channel (after reordering and scaling).
      Mean: float list }

/// A converted backbone: blocks per residual stage, and the state in torchvision's key names.
type Converted =
    { /// Basic blocks in each of the four residual stages (2, 2, 2, 3 for ML.NET's ResNet18).
      Blocks: int list
      /// The backbone's weights under torchvision's keys.
      Entries: StateDict.Entries }

// ---- Reading the graph ---------------------------------------------------------------------------------

type private Graph(model: Onnx.Model, path: string) =
    let g = model.Graph
    let inits = g.Initializer |> Seq.map (fun t -> t.Name, t) |> dict
    let consumers =
        g.Node
        |> List.ofSeq
        |> List.collect (fun n -> n.Input |> Seq.map (fun i -> i, n) |> List.ofSeq)
        |> List.groupBy fst
        |> List.map (fun (k, ns) -> k, ns |> List.map snd)
        |> dict

    member _.Path = path
    member _.Input =
        match g.Input |> Seq.filter (fun i -> not (inits.ContainsKey i.Name)) |> List.ofSeq with
        | [ i ] -> i
        | is -> refuse path "%s: expected one image input, found %d" path is.Length
    member _.Consumers(name: string) =
        match consumers.TryGetValue name with
        | true, ns -> ns
        | _ -> []
    member _.Init(node: Onnx.Node, name: string) : Onnx.Tensor =
        match inits.TryGetValue name with
        | true, t -> t
        | _ -> refuse path "%s: %s node %s reads %s, which is not a stored weight" path node.OpType node.Name name

let private ints = Onnx.ints

/// The one node reading `tensor`, which must be `op`.
let private only (g: Graph) (op: string) (tensor: string) : Onnx.Node =
    match g.Consumers tensor with
    | [ n ] when n.OpType = op -> n
    | ns ->
        refuse g.Path "%s: expected %s after %s, found %s; this reader understands ResNets of basic blocks (conv, BN, ReLU, add)"
            g.Path op tensor (if ns.IsEmpty then "nothing" else ns |> List.map _.OpType |> String.concat ", ")

/// A convolution and the BatchNormalization after it, in torchvision's keys under `prefix` (conv, bn names).
type private ConvBn =
    { Conv: Onnx.Node
      Bn: Onnx.Node
      Kernel: int64
      Stride: int64 }

let private convBn (g: Graph) (conv: Onnx.Node) : ConvBn =
    if conv.OpType <> "Conv" then refuse g.Path "%s: expected Conv, found %s (%s)" g.Path conv.OpType conv.Name
    let w = g.Init(conv, conv.Input.[1])
    let kernel = w.Dims.[2]
    if w.Dims.Count <> 4 || w.Dims.[3] <> kernel then refuse g.Path "%s: convolution %s is not square" g.Path conv.Name
    if ints conv "group" [ 1L ] <> [ 1L ] then refuse g.Path "%s: grouped convolution %s is not supported" g.Path conv.Name
    if ints conv "dilations" [ 1L; 1L ] |> List.exists ((<>) 1L) then refuse g.Path "%s: dilated convolution %s is not supported" g.Path conv.Name
    let strides = ints conv "strides" [ 1L; 1L ]
    if strides.Length <> 2 || strides.[0] <> strides.[1] then refuse g.Path "%s: convolution %s has uneven strides" g.Path conv.Name
    // torchvision pads (k-1)/2 on every side; an end pad smaller than that changes nothing where the stride skips
    // the last row and column, which holds for the even sizes these networks take.
    match ints conv "pads" [ 0L; 0L; 0L; 0L ] with
    | [ t; l; b; r ] when t = (kernel - 1L) / 2L && l = t && b <= t && r <= t -> ()
    | pads -> refuse g.Path "%s: convolution %s has pads %A, not torchvision's %d" g.Path conv.Name pads ((kernel - 1L) / 2L)
    let bn = only g "BatchNormalization" conv.Output.[0]
    match Onnx.attribute bn "epsilon" with
    | Some a when abs (float a.F - 1e-5) > 1e-9 -> refuse g.Path "%s: %s has epsilon %g; the backbone's BatchNorm uses 1e-5" g.Path bn.Name a.F
    | _ -> ()
    { Conv = conv; Bn = bn; Kernel = kernel; Stride = strides.[0] }

let private tensor (path: string) (t: Onnx.Tensor) : torch.Tensor = torch.tensor(Onnx.floats path t).reshape(Array.ofSeq t.Dims)

/// torchvision's keys for one conv + BN. A convolution bias (some exporters keep one) moves into the running mean.
let private entries (g: Graph) (convKey: string) (bnKey: string) (c: ConvBn) : StateDict.Entries =
    let tensor = tensor g.Path
    let p (i: int) = tensor (g.Init(c.Bn, c.Bn.Input.[i]))
    let mean = p 3
    let mean =
        if c.Conv.Input.Count > 2 then mean.sub(tensor (g.Init(c.Conv, c.Conv.Input.[2]))) else mean
    [ convKey + ".weight", tensor (g.Init(c.Conv, c.Conv.Input.[1]))
      bnKey + ".weight", p 1
      bnKey + ".bias", p 2
      bnKey + ".running_mean", mean
      bnKey + ".running_var", p 4 ]

type private Block =
    { Main: ConvBn
      Second: ConvBn
      Projection: ConvBn option
      Output: string }

    member b.Downsamples = b.Projection.IsSome || b.Main.Stride <> 1L

/// One basic block from its input: conv1 (3x3) and an optional 1x1 projection read the input; conv2 follows
/// conv1's ReLU; the sum with the shortcut goes through a ReLU to the block's output.
let private basicBlock (g: Graph) (input: string) : Block =
    let convs = g.Consumers input |> List.filter (fun n -> n.OpType = "Conv")
    let main, projection =
        match convs |> List.map (convBn g) |> List.sortBy (fun c -> -c.Kernel) with
        | [ c ] when c.Kernel = 3L -> c, None
        | [ c; p ] when c.Kernel = 3L && p.Kernel = 1L -> c, Some p
        | cs -> refuse g.Path "%s: a basic block reads %s with %d convolutions; expected a 3x3 and at most one 1x1" g.Path input cs.Length
    let relu = only g "Relu" main.Bn.Output.[0]
    let second = convBn g (only g "Conv" relu.Output.[0])
    if second.Kernel <> 3L || second.Stride <> 1L then refuse g.Path "%s: %s is not a 3x3 stride-1 convolution" g.Path second.Conv.Name
    let add = only g "Add" second.Bn.Output.[0]
    let shortcut = match projection with Some p -> p.Bn.Output.[0] | None -> input
    if not (add.Input.Contains shortcut) then refuse g.Path "%s: %s does not add the block's shortcut" g.Path add.Name
    { Main = main; Second = second; Projection = projection; Output = (only g "Relu" add.Output.[0]).Output.[0] }

let private blockEntries (g: Graph) (key: string) (b: Block) : StateDict.Entries =
    entries g (key + ".conv1") (key + ".bn1") b.Main
    @ entries g (key + ".conv2") (key + ".bn2") b.Second
    @ (b.Projection |> Option.map (entries g (key + ".downsample.0") (key + ".downsample.1")) |> Option.defaultValue [])

/// The stem (7x7 conv, BN, ReLU, max pool) and every basic block; a block that downsamples starts a stage.
let private walk (g: Graph) : StateDict.Entries * int list =
    let stem = convBn g (only g "Conv" g.Input.Name)
    if stem.Kernel <> 7L || stem.Stride <> 2L then refuse g.Path "%s: the first convolution is not a 7x7 stride-2 stem" g.Path
    let pool = only g "MaxPool" (only g "Relu" stem.Bn.Output.[0]).Output.[0]
    // Blocks in order, until the tensor is read by no convolution (the final pooling).
    let rec chain (input: string) =
        if g.Consumers input |> List.exists (fun n -> n.OpType = "Conv") then
            let b = basicBlock g input
            b :: chain b.Output
        else
            []
    let blocks = chain pool.Output.[0]
    // Stage of each block: layer1 starts at the first block, every later stage at a block that downsamples.
    let stageOf =
        blocks |> List.mapi (fun i b -> i = 0 || b.Downsamples) |> List.scan (fun k starts -> if starts then k + 1 else k) 0 |> List.tail
    let counts = stageOf |> List.countBy id |> List.map snd
    if counts.Length <> 4 then refuse g.Path "%s: found %d residual stages; a ResNet has 4" g.Path counts.Length
    let indexed = List.zip stageOf blocks |> List.groupBy fst |> List.collect (fun (k, bs) -> bs |> List.mapi (fun j (_, b) -> k, j, b))
    entries g "conv1" "bn1" stem @ (indexed |> List.collect (fun (k, j, b) -> blockEntries g (sprintf "layer%d.%d" k j) b)), counts

// ---- The input convention --------------------------------------------------------------------------------

/// ML.NET's preprocessing graph: Split into R, G, B, Concat in another order, Sub a mean image. Pixels arrive as
/// 8-bit levels. The mean image varies a little over the image; its per-channel average stands in for it.
let convention (preprocess: Onnx.Model) (path: string) : InputConvention =
    let nodes = List.ofSeq preprocess.Graph.Node
    let find op =
        match nodes |> List.filter (fun n -> n.OpType = op) with
        | [ n ] -> n
        | _ -> refuse path "%s: expected one %s node in the preprocessing graph (Split, Concat, Sub)" path op
    let split, concat, sub = find "Split", find "Concat", find "Sub"
    let channels = concat.Input |> Seq.map (fun i -> Seq.findIndex ((=) i) split.Output) |> List.ofSeq
    let mean =
        match preprocess.Graph.Initializer |> Seq.tryFind (fun t -> t.Name = sub.Input.[1]) with
        | Some t when t.Dims.Count = 4 && t.Dims.[1] = 3L ->
            let v = Onnx.floats path t
            let per = v.Length / 3
            [ for c in 0..2 -> v.[c * per .. (c + 1) * per - 1] |> Array.averageBy float ]
        | _ -> refuse path "%s: the Sub node does not subtract a stored 1x3xHxW mean image" path
    { Channels = channels; Scale = 255.0; Mean = mean }

/// Folds the convention into conv1 and bn1 so that the backbone takes x = (rgb - mean) / std instead: with
/// rgb = std x + mean, input channel c is Scale (std x + mean) of source channel Channels[c], minus Mean[c]. The
/// weights take the per-channel factor; the constant, convolved, leaves bn1's running mean. Zero padding then pads
/// with the normalisation's mean colour where the original padded with Mean, which only touches the border.
let fold (conv: InputConvention) (mean: float32[]) (std: float32[]) (entries: StateDict.Entries) : StateDict.Entries =
    let lookup k = entries |> List.find (fst >> (=) k) |> snd
    let w, rm = lookup "conv1.weight", lookup "bn1.running_mean"
    let folded, runningMean =
        use _ = torch.NewDisposeScope()
        // Input channel c of the ONNX weight reads source channel Channels[c]: reorder to source (RGB) order.
        let toSource = Array.init 3 (fun s -> List.findIndex ((=) s) conv.Channels |> int64)
        let scale = torch.tensor(Array.init 3 (fun s -> float32 (conv.Scale * float std.[s]))).reshape(1L, 3L, 1L, 1L)
        let shift = Array.init 3 (fun c -> float32 (conv.Scale * float mean.[conv.Channels.[c]] - conv.Mean.[c]))
        let constant = w.mul(torch.tensor(shift).reshape(1L, 3L, 1L, 1L)).sum([| 1L; 2L; 3L |])
        w.index_select(1L, torch.tensor toSource).mul(scale).MoveToOuterDisposeScope(), rm.sub(constant).MoveToOuterDisposeScope()
    w.Dispose()
    rm.Dispose()
    entries
    |> List.map (fun (k, t) ->
        match k with
        | "conv1.weight" -> k, folded
        | "bn1.running_mean" -> k, runningMean
        | _ -> k, t)

/// Converts an ONNX ResNet of basic blocks, with its preprocessing graph if it has one, into torchvision-named
/// entries for a backbone that takes this project's normalisation (mean, std per RGB channel).
let convert (resnet: string) (preprocess: string option) (mean: float32[]) (std: float32[]) : Converted =
    let model = Onnx.read resnet
    let g = Graph(model, resnet)
    let dims =
        match g.Input.Type with
        | null -> []
        | t when isNull t.TensorType || isNull t.TensorType.Shape -> []
        | t -> t.TensorType.Shape.Dim |> List.ofSeq
    match dims with
    | [ _; c; _; _ ] when c.DimValue = 3L || c.DimParam <> "" -> ()
    | _ -> refuse resnet "%s: the input %s is not N x 3 x H x W" resnet g.Input.Name
    let es, blocks = walk g
    let es =
        match preprocess with
        | Some p -> fold (convention (Onnx.read p) p) mean std es
        | None -> es
    { Blocks = blocks; Entries = es }

// ---- Packaged weights -------------------------------------------------------------------------------------

/// A packaged file's path, or WeightsUnavailable naming the package and how to restore it (Hub.packagedFile).
let packagedFile (p: Backbone.Packaged) : string = Hub.packagedFile p

/// ML.NET ships its preprocessing beside the network: ResNetPrepOnnx/ResNetPreprocess.onnx next to the model's
/// folder. Another ONNX ResNet is taken to read this project's normalised input as it is.
let private preprocessBeside (onnx: string) =
    let candidate = Path.Combine(Path.GetDirectoryName(Path.GetDirectoryName onnx), "ResNetPrepOnnx", "ResNetPreprocess.onnx")
    if File.Exists candidate then Some candidate else None

/// Converts an ONNX file for `spec`, checking that its blocks are the spec's.
let load (spec: Backbone.Spec) (onnx: string) (mean: float32[]) (std: float32[]) : StateDict.Entries =
    let c = convert onnx (preprocessBeside onnx) mean std
    match spec.Family with
    | Backbone.ResNet(Backbone.Basic, blocks) when blocks = c.Blocks -> c.Entries
    | _ ->
        c.Entries |> List.iter (snd >> _.Dispose())
        let fits =
            Backbone.registry
            |> Map.toList
            |> List.tryPick (fun (name, s) ->
                match s.Family with
                | Backbone.ResNet(Backbone.Basic, b) when b = c.Blocks -> Some name
                | _ -> None)
        refuse onnx "%s holds a ResNet of basic blocks %A, which does not fit the %s backbone%s" onnx c.Blocks spec.Name
            (match fits with Some n -> sprintf ": it is the %s backbone's" n | None -> ": convert a ResNet whose blocks per stage are the backbone's")

/// The project's input normalisation, which converted weights are folded for.
let private normalisation = Array.create 3 Pmg.Fs.Data.Transforms.Spec.halfNormalisation

/// Loads resolved starting weights into the network's backbone, by the file's kind: an ONNX ResNet (converted),
/// a Pmg.Fs checkpoint (its network's backbone), or a torchvision / PMG state_dict (.pth, .safetensors).
let loadResolved (net: Pmg.Network) (r: Hub.Resolved) : unit =
    let spec = Backbone.find net.Config.Backbone
    let loadEntries (es: StateDict.Entries) (into: StateDict.Entries -> unit) =
        try
            into es
        finally
            es |> List.iter (snd >> _.Dispose())
    if r.Path.EndsWith(".onnx", StringComparison.OrdinalIgnoreCase) then
        loadEntries (load spec r.Path normalisation normalisation) (fun es -> StateDict.loadInto net.Backbone es true)
    elif PmgCheckpoint.looksLikeCheckpoint r.Path then
        loadEntries (PmgCheckpoint.readModel r.Path) (StateDict.loadBackboneEntries net r.Path)
    else
        StateDict.loadPretrainedBackbone net r.Path

/// Resolves `weights` for `spec` with `options` (Hub.resolveWith: the package, PyTorch's hub cache or a download,
/// or the file given) and loads them into the network's backbone; returns the file it started from (None: random
/// weights), for the run's manifest.
let loadBackboneWith (options: Hub.Options) (spec: Backbone.Spec) (net: Pmg.Network) (weights: Backbone.Weights) : Hub.Resolved option =
    let resolved = Hub.resolveWith options spec weights
    resolved |> Option.iter (loadResolved net)
    resolved

/// Loads a backbone's starting weights into the network: nothing (Scratch), its ImageNet weights (the ones that
/// ship, else torchvision's from PyTorch's hub cache, downloaded there on first use), or a file (an ONNX ResNet, a
/// Pmg.Fs checkpoint, a torchvision / PMG state_dict). `Hub.resolve` names the file afterwards without a download.
let loadBackbone (net: Pmg.Network) (weights: Backbone.Weights) : unit =
    loadBackboneWith (Hub.options ()) (Backbone.find net.Config.Backbone) net weights |> ignore
