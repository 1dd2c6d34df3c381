/// ONNX models as OnnxSharp's types (onnx.proto compiled for .NET, read and written by Google.Protobuf): reading a
/// file with an error that names it, and the few accessors the readers of this project need.
module Pmg.Fs.Interop.Onnx

open System
open System.IO
open Google.Protobuf

/// A whole ONNX model (onnx.proto's ModelProto).
type Model = global.Onnx.ModelProto
/// A model's computation (GraphProto).
type Graph = global.Onnx.GraphProto
/// One operator (NodeProto).
type Node = global.Onnx.NodeProto
/// A stored tensor (TensorProto).
type Tensor = global.Onnx.TensorProto
/// A graph input or output (ValueInfoProto).
type ValueInfo = global.Onnx.ValueInfoProto

/// TensorProto.DataType of 32-bit floats.
let floatType = int global.Onnx.TensorProto.Types.DataType.Float

/// Parses an ONNX model from its bytes; `path` names it in the error.
let parse (path: string) (bytes: byte[]) : Model =
    let m =
        try
            Model.Parser.ParseFrom bytes
        with :? InvalidProtocolBufferException as e ->
            Pmg.Fs.Errors.modelFile path (sprintf "%s is not a readable ONNX model (%s): give an .onnx file as written by an ONNX exporter" path e.Message)
    if isNull m.Graph then
        Pmg.Fs.Errors.modelFile path (sprintf "%s is not an ONNX model (it holds no graph): give an .onnx file as written by an ONNX exporter" path)
    m

/// Reads an ONNX file; anything that is not one is refused in one line naming the file.
let read (path: string) : Model =
    let bytes =
        try
            File.ReadAllBytes path
        with
        | :? FileNotFoundException
        | :? DirectoryNotFoundException -> Pmg.Fs.Errors.modelFile path (sprintf "%s: no such file; check the path" path)
        | :? UnauthorizedAccessException
        | :? IOException -> Pmg.Fs.Errors.modelFile path (sprintf "%s cannot be read (a folder, or no permission): give a readable .onnx file" path)
    parse path bytes

/// The model as ONNX bytes.
let serialize (m: Model) : byte[] = m.ToByteArray()

/// The elements of a float tensor, from raw_data or float_data; `path` names the file in the error.
let floats (path: string) (t: Tensor) : float32[] =
    if t.DataType <> floatType then
        Pmg.Fs.Errors.modelFile path (sprintf "%s: tensor %s holds element type %d, not floats" path t.Name t.DataType)
    if t.DataLocation = global.Onnx.TensorProto.Types.DataLocation.External then
        Pmg.Fs.Errors.modelFile path (sprintf "%s: tensor %s keeps its data in an external file; save the model with its weights inside" path t.Name)
    let count = t.Dims |> Seq.fold (*) 1L
    let values =
        if not t.RawData.IsEmpty then
            Runtime.InteropServices.MemoryMarshal.Cast<byte, float32>(t.RawData.Span).ToArray()
        else
            Array.ofSeq t.FloatData
    if int64 values.Length <> count then
        Pmg.Fs.Errors.modelFile path (sprintf "%s: tensor %s holds %d values for shape %A: the file is damaged" path t.Name values.Length (List.ofSeq t.Dims))
    values

/// A node's attribute of that name, if it has one.
let attribute (n: Node) (name: string) : global.Onnx.AttributeProto option = n.Attribute |> Seq.tryFind (fun a -> a.Name = name)

/// A node's integer list attribute (a single integer as a list of one), or `fallback`.
let ints (n: Node) (name: string) (fallback: int64 list) : int64 list =
    match attribute n name with
    | Some a when a.Ints.Count > 0 -> List.ofSeq a.Ints
    | Some a when a.Type = global.Onnx.AttributeProto.Types.AttributeType.Int -> [ a.I ]
    | _ -> fallback

/// The model's metadata, in file order.
let metadata (m: Model) : (string * string) list = m.MetadataProps |> Seq.map (fun p -> p.Key, p.Value) |> List.ofSeq
