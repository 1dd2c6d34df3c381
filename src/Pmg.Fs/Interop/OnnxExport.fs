/// A trained PMG network as an ONNX model for deployment (ONNX Runtime, ML.NET, mobile runtimes): the eval-mode
/// network written from the same values that build it (the backbone's spec, the heads' config) with its weights
/// under their state-dict names. BatchNorm stays BatchNormalization nodes with the running statistics, so the graph
/// reads like the module. Outputs: every head's logits, concat's and the combined sum; the batch size is dynamic, the
/// image size fixed at export. The class names and the preprocessing travel in the model's metadata.
module Pmg.Fs.Interop.OnnxExport

open System
open TorchSharp
open Pmg.Fs.Model

/// What a consumer needs besides the graph: how to prepare an image and what the outputs mean.
type Preprocessing =
    { /// Both sides resized to this (bilinear), then the centre Crop x Crop.
      Resize: int
      /// Side of the square centre crop the network takes, in pixels.
      Crop: int
      /// Per RGB channel, applied to pixels scaled to [0, 1].
      Mean: float32[]
      /// Per RGB channel, the divisor applied after subtracting Mean.
      Std: float32[] }

/// ONNX opset the graph is written for (BatchNormalization, Gemm, Elu, GlobalMaxPool are all older).
let opset = 17L

/// A network whose state_dict lacks a weight the graph needs.
exception ExportError of string

type private Builder(weights: Map<string, torch.Tensor>) =
    let nodes = ResizeArray<Onnx.Node>()
    let used = ResizeArray<Onnx.Tensor>()
    let mutable counter = 0

    member _.Nodes = List.ofSeq nodes
    member _.Has(key: string) = weights.ContainsKey key
    member _.Initializers = List.ofSeq used

    /// A weight by its state-dict key, added once as an initializer.
    member _.Weight(key: string) : string =
        match weights.TryFind key with
        | None -> raise (ExportError(sprintf "the network has no %s" key))
        | Some t ->
            if not (used |> Seq.exists (fun u -> u.Name = key)) then
                let data = Runtime.InteropServices.MemoryMarshal.AsBytes(ReadOnlySpan(Pmg.Fs.Runtime.Ops.hostFloats t)).ToArray()
                used.Add { Name = key; Dims = List.ofArray t.shape; Type = Onnx.ElementType.Float; Data = data }
            key

    member _.Node(op: string, inputs: string list, attributes: (string * Onnx.Attribute) list, ?output: string) : string =
        counter <- counter + 1
        let out = defaultArg output (sprintf "%s_%d" op counter)
        nodes.Add { Name = sprintf "%s_%d" op counter; OpType = op; Domain = ""; Inputs = inputs; Outputs = [ out ]; Attributes = attributes }
        out

let private ints (xs: int64 list) = Onnx.Ints xs

/// conv (no bias) under `key`.weight.
let private conv (b: Builder) (key: string) (kernel: int64) (stride: int64) (pad: int64) (x: string) =
    b.Node(
        "Conv",
        [ x; b.Weight(key + ".weight") ],
        [ "kernel_shape", ints [ kernel; kernel ]; "strides", ints [ stride; stride ]; "pads", ints [ pad; pad; pad; pad ] ]
    )

/// A conv with bias (VGG).
let private convBias (b: Builder) (key: string) (x: string) =
    b.Node("Conv", [ x; b.Weight(key + ".weight"); b.Weight(key + ".bias") ], [ "kernel_shape", ints [ 3L; 3L ]; "pads", ints [ 1L; 1L; 1L; 1L ] ])

/// BatchNormalization with the running statistics under `key` (the module's eps, 1e-5).
let private bn (b: Builder) (key: string) (x: string) =
    b.Node(
        "BatchNormalization",
        [ x; b.Weight(key + ".weight"); b.Weight(key + ".bias"); b.Weight(key + ".running_mean"); b.Weight(key + ".running_var") ],
        [ ("epsilon", Onnx.Float 1e-5f) ]
    )

let private relu (b: Builder) (x: string) = b.Node("Relu", [ x ], [])

let private linear (b: Builder) (key: string) (x: string) =
    b.Node("Gemm", [ x; b.Weight(key + ".weight"); b.Weight(key + ".bias") ], [ ("transB", Onnx.Int 1L) ])

/// The backbone's stage outputs, in order (the graph mirrors Backbone.ResNet / Backbone.VggNet).
let private backbone (b: Builder) (spec: Backbone.Spec) (input: string) : string list =
    match spec.Family with
    | Backbone.ResNet(block, layers) ->
        let stem =
            input |> conv b "features.conv1" 7L 2L 3L |> bn b "features.bn1" |> relu b
            |> fun x -> b.Node("MaxPool", [ x ], [ "kernel_shape", ints [ 3L; 3L ]; "strides", ints [ 2L; 2L ]; "pads", ints [ 1L; 1L; 1L; 1L ] ])
        let blockOf (layer: int) (i: int) (x: string) =
            let key = sprintf "features.layer%d.%d" layer i
            let stride = if i = 0 && layer > 1 then 2L else 1L
            let main =
                match block with
                | Backbone.Basic ->
                    x |> conv b (key + ".conv1") 3L stride 1L |> bn b (key + ".bn1") |> relu b
                    |> conv b (key + ".conv2") 3L 1L 1L |> bn b (key + ".bn2")
                | Backbone.Bottleneck ->
                    x |> conv b (key + ".conv1") 1L 1L 0L |> bn b (key + ".bn1") |> relu b
                    |> conv b (key + ".conv2") 3L stride 1L |> bn b (key + ".bn2") |> relu b
                    |> conv b (key + ".conv3") 1L 1L 0L |> bn b (key + ".bn3")
            // A projection exists where the block changes shape: its weights are in the state dict then.
            let shortcut =
                if b.Has(key + ".downsample.0.weight") then
                    x |> conv b (key + ".downsample.0") 1L stride 0L |> bn b (key + ".downsample.1")
                else x
            relu b (b.Node("Add", [ main; shortcut ], []))
        let stages =
            layers
            |> List.mapi (fun li n -> li + 1, n)
            |> List.scan (fun (x, _) (layer, n) -> let y = List.fold (fun x i -> blockOf layer i x) x [ 0 .. n - 1 ] in y, y) (stem, stem)
            |> List.map snd
        stages
    | Backbone.Vgg convs ->
        // torchvision's features indices: per conv a Conv2d and a ReLU, then the block's MaxPool.
        let _, outs, _ =
            convs
            |> List.fold
                (fun (x, outs, index) n ->
                    let x, index =
                        [ 1..n ] |> List.fold (fun (x, index) _ -> relu b (convBias b (sprintf "features.features.%d" index) x), index + 2) (x, index)
                    let pooled = b.Node("MaxPool", [ x ], [ "kernel_shape", ints [ 2L; 2L ]; "strides", ints [ 2L; 2L ] ])
                    pooled, outs @ [ pooled ], index + 1)
                (input, [], 0)
        outs

/// The classifier (BN1d, Linear, BN1d, ELU, Linear) under `key`, indices as the reference's Sequential.
let private classifier (b: Builder) (key: string) (x: string) =
    x |> bn b (key + ".0") |> linear b (key + ".1") |> bn b (key + ".2")
    |> fun y -> b.Node("Elu", [ y ], [ ("alpha", Onnx.Float 1.0f) ])
    |> linear b (key + ".4")

/// The ONNX model of a network in eval mode for `size` x `size` inputs, with the class names and preprocessing
/// in its metadata.
let toOnnx (net: Pmg.Network) (size: int) (classes: string[]) (prep: Preprocessing) : Onnx.Model =
    let weights = net.state_dict () |> Seq.map (fun kv -> kv.Key, kv.Value) |> Map.ofSeq
    let b = Builder(weights)
    let spec = Backbone.find net.Config.Backbone
    let input = "image"
    let stages = backbone b spec input
    let pooled =
        net.HeadStages
        |> List.mapi (fun i (l, _) ->
            let key = sprintf "conv_block%d" (i + 1)
            stages.[l - 1] |> conv b (key + ".0.conv") 1L 1L 0L |> bn b (key + ".0.bn") |> relu b
            |> conv b (key + ".1.conv") 3L 1L 1L |> bn b (key + ".1.bn") |> relu b
            |> fun x -> b.Node("GlobalMaxPool", [ x ], [])
            |> fun x -> b.Node("Flatten", [ x ], [ ("axis", Onnx.Int 1L) ]))
    let names = Pmg.headNames net.Config
    let heads = pooled |> List.mapi (fun i p -> classifier b (sprintf "classifier%d" (i + 1)) p)
    let concat = classifier b "classifier_concat" (b.Node("Concat", pooled, [ ("axis", Onnx.Int 1L) ]))
    let outputs = List.zip names heads @ [ ("concat", concat) ]
    let named = outputs |> List.map (fun (name, t) -> b.Node("Identity", [ t ], [], output = name))
    b.Node("Sum", named, [], output = "combined") |> ignore
    let value name dims : Onnx.ValueInfo = { Name = name; Type = Onnx.ElementType.Float; Shape = dims }
    let classesDim = Onnx.Fixed(int64 net.Config.Classes)
    let list (xs: float32[]) = xs |> Array.map (fun v -> v.ToString(Globalization.CultureInfo.InvariantCulture)) |> String.concat ","
    { IrVersion = 8L
      Opsets = [ ("", opset) ]
      ProducerName = "Pmg.Fs"
      ProducerVersion = string (typeof<Builder>.Assembly.GetName().Version)
      Graph =
        { Name = sprintf "pmg-%s" net.Config.Backbone
          Nodes = b.Nodes
          Initializers = b.Initializers
          Inputs = [ value input [ Onnx.Named "batch"; Onnx.Fixed 3L; Onnx.Fixed(int64 size); Onnx.Fixed(int64 size) ] ]
          Outputs = (List.map fst outputs @ [ "combined" ]) |> List.map (fun n -> value n [ Onnx.Named "batch"; classesDim ]) }
      Metadata =
        [ "classes", String.concat "\n" classes
          "backbone", net.Config.Backbone
          "resize", string prep.Resize
          "crop", string prep.Crop
          "mean", list prep.Mean
          "std", list prep.Std
          "input", "RGB, pixels / 255, then (x - mean) / std per channel, NCHW"
          "outputs", String.concat "," (List.map fst outputs @ [ "combined" ]) ] }

/// Writes the model atomically.
let write (path: string) (m: Onnx.Model) = Pmg.Fs.Runtime.Files.writeBytesAtomically path (Onnx.serialize m)

/// Refuses an ONNX model that cannot be trusted (placeholder until the checksum lands).
let verify (path: string) : unit = ignore path
