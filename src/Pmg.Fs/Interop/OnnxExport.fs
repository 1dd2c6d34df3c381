/// A trained PMG network as an ONNX model for deployment (ONNX Runtime, ML.NET, mobile runtimes). The network
/// writes its own operators (Model.Graph: every block from its own fields), so this module only maps them to ONNX
/// and adds what a consumer needs besides the graph: the outputs' names, the class names, the preprocessing, the
/// model's description and a checksum that `verify` checks on load. BatchNorm stays BatchNormalization nodes with
/// the running statistics; weights keep their state-dict names. Outputs: every head's logits, concat's and the
/// combined sum; the batch size is dynamic, the image size fixed at export.
module Pmg.Fs.Interop.OnnxExport

open System
open System.Collections.Generic
open System.Security.Cryptography
open Google.Protobuf
open TorchSharp
open Pmg.Fs.Model

/// How a consumer prepares an image (resize, crop, normalisation): a model description's input.
type Preprocessing = Description.Input

/// ONNX opset the graph is written for (BatchNormalization, Gemm, Elu, GlobalMaxPool are all older).
let opset = 17L

/// The metadata key of the checksum: SHA-256 of the serialized graph (nodes and weights), lower-case hex.
let checksumKey = "sha256"

type private Builder(weights: IDictionary<string, torch.Tensor>, graph: Onnx.Graph) =
    let used = HashSet<string>()
    let mutable counter = 0

    let attribute (name: string, a: Graph.Attribute) =
        let p = global.Onnx.AttributeProto(Name = name)
        match a with
        | Graph.Int i ->
            p.Type <- global.Onnx.AttributeProto.Types.AttributeType.Int
            p.I <- i
        | Graph.Ints xs ->
            p.Type <- global.Onnx.AttributeProto.Types.AttributeType.Ints
            p.Ints.AddRange xs
        | Graph.Float f ->
            p.Type <- global.Onnx.AttributeProto.Types.AttributeType.Float
            p.F <- f
        p

    /// Adds a node whose output has the given name.
    member _.Named(op: string, inputs: string list, attributes: (string * Graph.Attribute) list, output: string) =
        counter <- counter + 1
        let n = Onnx.Node(Name = sprintf "%s_%d" op counter, OpType = op)
        n.Input.AddRange inputs
        n.Output.Add output
        n.Attribute.AddRange(List.map attribute attributes)
        graph.Node.Add n
        output

    interface Graph.IBuilder with
        member this.Node(op, inputs, attributes) = this.Named(op, inputs, attributes, sprintf "%s_%d" op (counter + 1))

        member _.Weight(key: string) =
            if used.Add key then
                match weights.TryGetValue key with
                | true, t ->
                    let data = Runtime.InteropServices.MemoryMarshal.AsBytes(ReadOnlySpan(Pmg.Fs.Runtime.Ops.hostFloats t))
                    let p = Onnx.Tensor(Name = key, DataType = Onnx.floatType, RawData = ByteString.CopyFrom data)
                    p.Dims.AddRange t.shape
                    graph.Initializer.Add p
                | _ -> invalidOp (sprintf "the network's state_dict has no %s, which its graph reads" key)
            key

let private value (name: string) (dims: Choice<string, int64> list) : Onnx.ValueInfo =
    let shape = global.Onnx.TensorShapeProto()
    for d in dims do
        let dim = global.Onnx.TensorShapeProto.Types.Dimension()
        match d with
        | Choice1Of2 p -> dim.DimParam <- p
        | Choice2Of2 v -> dim.DimValue <- v
        shape.Dim.Add dim
    let tensor = global.Onnx.TypeProto.Types.Tensor(ElemType = Onnx.floatType, Shape = shape)
    Onnx.ValueInfo(Name = name, Type = global.Onnx.TypeProto(TensorType = tensor))

/// SHA-256 of the graph's serialized form (nodes, weights, inputs, outputs), lower-case hex.
let checksum (g: Onnx.Graph) : string = Convert.ToHexStringLower(SHA256.HashData(g.ToByteArray()))

/// The ONNX model of a network in eval mode for `size` x `size` inputs, with the class names, the preprocessing,
/// the model's description (key Description.key) and the graph's checksum in its metadata.
let toOnnx (net: Pmg.Network) (size: int) (classes: string[]) (prep: Preprocessing) : Onnx.Model =
    let graph = Onnx.Graph(Name = sprintf "pmg-%s" net.Config.Backbone)
    let b = Builder(net.state_dict (), graph)
    let input = "image"
    let outputs = (net :> Graph.IExportable).Emit(b, "", [ input ])
    let names = Pmg.headNames net.Config @ [ "concat"; "combined" ]
    if names.Length <> outputs.Length then
        invalidOp (sprintf "the network writes %d outputs, %d expected" outputs.Length names.Length)
    for name, out in List.zip names outputs do
        b.Named("Identity", [ out ], [], name) |> ignore
    graph.Input.Add(value input [ Choice1Of2 "batch"; Choice2Of2 3L; Choice2Of2(int64 size); Choice2Of2(int64 size) ])
    for name in names do
        graph.Output.Add(value name [ Choice1Of2 "batch"; Choice2Of2(int64 net.Config.Classes) ])
    let model =
        Onnx.Model(
            IrVersion = 8L,
            ProducerName = "Pmg.Fs",
            ProducerVersion = string (typeof<Preprocessing>.Assembly.GetName().Version),
            Graph = graph
        )
    model.OpsetImport.Add(global.Onnx.OperatorSetIdProto(Domain = "", Version = opset))
    let list (xs: float32[]) = xs |> Array.map (fun v -> v.ToString(Globalization.CultureInfo.InvariantCulture)) |> String.concat ","
    let description = Description.describe net classes { prep with Crop = size }
    [ "classes", String.concat "\n" description.Classes
      "backbone", net.Config.Backbone
      "resize", string prep.Resize
      "crop", string size
      "mean", list prep.Mean
      "std", list prep.Std
      "input", "RGB, pixels / 255, then (x - mean) / std per channel, NCHW"
      "outputs", String.concat "," names
      Description.key, Description.toJson description
      checksumKey, checksum graph ]
    |> List.iter (fun (k, v) -> model.MetadataProps.Add(global.Onnx.StringStringEntryProto(Key = k, Value = v)))
    model

/// Writes the model atomically.
let write (path: string) (m: Onnx.Model) = Pmg.Fs.Runtime.Files.writeBytesAtomically path (Onnx.serialize m)

/// Checks an ONNX model before it is used: a readable model, its graph matching the checksum written at export
/// (models of other tools carry none), every float weight finite. Anything else is refused naming the file.
let verify (path: string) : unit =
    let m = Onnx.read path
    let again = "the file is damaged: export it again from its checkpoint"
    match Onnx.metadata m |> List.tryFind (fst >> (=) checksumKey) with
    | Some(_, sum) when sum <> checksum m.Graph ->
        Pmg.Fs.Errors.modelFile path (sprintf "%s does not match the checksum written when it was exported; %s" path again)
    | _ -> ()
    for t in m.Graph.Initializer do
        if t.DataType = Onnx.floatType && Onnx.floats path t |> Array.exists (Single.IsFinite >> not) then
            Pmg.Fs.Errors.modelFile path (sprintf "%s: weight %s holds values that are not finite; %s" path t.Name again)

/// The description an ONNX file carries (exports of this project), if any.
let readDescription (path: string) : Description.ModelDescription option =
    Onnx.read path |> Onnx.metadata |> List.tryFind (fst >> (=) Description.key) |> Option.map (snd >> Description.ofJson path)

/// The description any model file carries: an ONNX model's metadata (.onnx), a .pth's zip entry or a
/// .safetensors' `__metadata__` (see StateDict.readDescription); None for a file without one (the reference's
/// .pth: StateDict.inferConfig describes its network from its shapes).
let describeFile (path: string) : Description.ModelDescription option =
    if IO.Path.GetExtension(path).Equals(".onnx", StringComparison.OrdinalIgnoreCase) then readDescription path
    else StateDict.readDescription path
