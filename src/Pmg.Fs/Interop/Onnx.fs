/// ONNX models as values: the subset of onnx.proto that a convolutional network uses (graph, nodes, attributes,
/// dense initializers, typed inputs and outputs, metadata), read from and written to the protobuf wire format.
/// Field numbers are onnx.proto's.
module Pmg.Fs.Interop.Onnx

open System
open System.IO
open Pmg.Fs.Interop.Protobuf

/// TensorProto.DataType values this project reads or writes.
type ElementType =
    /// 32-bit float.
    | Float = 1
    /// 32-bit signed integer.
    | Int32 = 6
    /// 64-bit signed integer.
    | Int64 = 7
    /// 64-bit float.
    | Double = 11

/// A dense tensor: its elements as little-endian bytes, whatever field of TensorProto carried them.
type Tensor =
    { /// Name that nodes use to read the tensor.
      Name: string
      /// Shape, outermost dimension first; empty for a scalar.
      Dims: int64 list
      /// Element type.
      Type: ElementType
      /// The elements, row-major, as little-endian bytes.
      Data: byte[] }

    /// Number of elements.
    member t.Count = t.Dims |> List.fold (*) 1L

    /// The elements as floats; fails unless Type is Float.
    member t.Floats: float32[] =
        if t.Type <> ElementType.Float then
            raise (ProtobufError(sprintf "tensor %s holds %A, not floats" t.Name t.Type))
        System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float32>(ReadOnlySpan t.Data).ToArray()

/// The value of a node attribute.
type Attribute =
    /// A single float.
    | Float of float32
    /// A single integer.
    | Int of int64
    /// A string, decoded as UTF-8.
    | Text of string
    /// A list of floats.
    | Floats of float32 list
    /// A list of integers.
    | Ints of int64 list
    /// A tensor.
    | TensorValue of Tensor
    /// A kind this project never reads (graphs, sparse tensors, type protos): kept by name only.
    | Unsupported of kind: int

/// One operator in the graph.
type Node =
    { /// The node's name (may be empty).
      Name: string
      /// Operator name, e.g. "Conv".
      OpType: string
      /// Operator set domain; "" for the default ONNX domain.
      Domain: string
      /// Names of the tensors the node reads, in operator order.
      Inputs: string list
      /// Names of the tensors the node writes, in operator order.
      Outputs: string list
      /// Named attributes, in file order.
      Attributes: (string * Attribute) list }

    /// The attribute of that name, or None.
    member n.Attribute(name: string) = n.Attributes |> List.tryFind (fst >> (=) name) |> Option.map snd

/// One dimension of a graph input's or output's shape.
type Dim =
    /// A size fixed in the model.
    | Fixed of int64
    /// A symbolic size given at run time, e.g. "batch".
    | Named of string

/// A graph input or output: a tensor's element type and shape.
type ValueInfo =
    { /// Tensor name that nodes read or write.
      Name: string
      /// Element type.
      Type: ElementType
      /// Dimensions, outermost first.
      Shape: Dim list }

/// A model's computation: nodes, stored weights, inputs and outputs.
type Graph =
    { /// The graph's name.
      Name: string
      /// Operators, in file order.
      Nodes: Node list
      /// Stored weights, referenced by name from node inputs.
      Initializers: Tensor list
      /// Declared inputs; some exporters list the initializers here too.
      Inputs: ValueInfo list
      /// Declared outputs.
      Outputs: ValueInfo list }

/// A whole ONNX model: the graph and what describes it.
type Model =
    { /// Version of the ONNX file format (IR version).
      IrVersion: int64
      /// Operator sets by domain ("" is the default ONNX domain).
      Opsets: (string * int64) list
      /// Name of the tool that wrote the model.
      ProducerName: string
      /// Version of that tool.
      ProducerVersion: string
      /// The computation.
      Graph: Graph
      /// Key-value metadata, in file order.
      Metadata: (string * string) list }

/// A file that cannot be read as an ONNX model, or a model that cannot be written; the message names the cause.
exception OnnxError of string

// ---- Reading ------------------------------------------------------------------------------------------

let private elementSize =
    function
    | ElementType.Float
    | ElementType.Int32 -> 4
    | ElementType.Int64
    | ElementType.Double -> 8
    | t -> raise (ProtobufError(sprintf "element type %d is not supported" (int t)))

let private readTensor (m: ReadOnlyMemory<byte>) : Tensor =
    let fs = fields m
    let name = text 8 fs
    let t = enum<ElementType> (int (integer 2 fs))
    let dims = integers 1 fs
    if not (List.isEmpty (messages 13 fs)) || integer 14 fs <> 0L then
        raise (ProtobufError(sprintf "tensor %s keeps its data in an external file, which is not supported" name))
    let raw = messages 9 fs
    let data =
        match raw with
        | r :: _ -> r.ToArray()
        | [] ->
            match t with
            | ElementType.Float -> fixed32s 4 fs
            | ElementType.Int32 -> integers 5 fs |> List.map int32 |> List.toArray |> Array.collect BitConverter.GetBytes
            | ElementType.Int64 -> integers 7 fs |> List.toArray |> Array.collect BitConverter.GetBytes
            | ElementType.Double -> fixed64s 10 fs
            | _ -> raise (ProtobufError(sprintf "tensor %s: element type %d is not supported" name (int t)))
    let expected = (dims |> List.fold (*) 1L) * int64 (elementSize t)
    if int64 data.Length <> expected then
        raise (ProtobufError(sprintf "tensor %s: %d bytes of data for shape %A (%d expected)" name data.Length dims expected))
    { Name = name; Dims = dims; Type = t; Data = data }

let private readAttribute (m: ReadOnlyMemory<byte>) : string * Attribute =
    let fs = fields m
    let name = text 1 fs
    let value =
        match int (integer 20 fs) with
        | 1 -> Float(single 2 fs)
        | 2 -> Int(integer 3 fs)
        | 3 -> Text(text 4 fs)
        | 4 -> TensorValue(readTensor (List.head (messages 5 fs)))
        | 6 ->
            let bytes = fixed32s 7 fs
            Floats(List.init (bytes.Length / 4) (fun i -> BitConverter.ToSingle(bytes, 4 * i)))
        | 7 -> Ints(integers 8 fs)
        | k -> Unsupported k
    name, value

let private readNode (m: ReadOnlyMemory<byte>) : Node =
    let fs = fields m
    { Name = text 3 fs
      OpType = text 4 fs
      Domain = text 7 fs
      Inputs = texts 1 fs
      Outputs = texts 2 fs
      Attributes = messages 5 fs |> List.map readAttribute }

let private readValueInfo (m: ReadOnlyMemory<byte>) : ValueInfo =
    let fs = fields m
    let tensorType = messages 2 fs |> List.collect (fields >> messages 1) |> List.tryHead |> Option.map fields
    let elem, shape =
        match tensorType with
        | None -> ElementType.Float, []
        | Some tt ->
            let dims =
                messages 2 tt
                |> List.collect (fields >> messages 1)
                |> List.map (fun d ->
                    let dfs = fields d
                    match messages 2 dfs with
                    | p :: _ -> Named(System.Text.Encoding.UTF8.GetString p.Span)
                    | [] -> Fixed(integer 1 dfs))
            enum<ElementType> (int (integer 1 tt)), dims
    { Name = text 1 fs; Type = elem; Shape = shape }

let private readGraph (m: ReadOnlyMemory<byte>) : Graph =
    let fs = fields m
    { Name = text 2 fs
      Nodes = messages 1 fs |> List.map readNode
      Initializers = messages 5 fs |> List.map readTensor
      Inputs = messages 11 fs |> List.map readValueInfo
      Outputs = messages 12 fs |> List.map readValueInfo }

/// Parses an ONNX model from its bytes.
let parse (bytes: byte[]) : Model =
    let fs = fields (ReadOnlyMemory bytes)
    let graph =
        match messages 7 fs with
        | [ g ] -> readGraph g
        | [] -> raise (ProtobufError "no graph (ModelProto field 7)")
        | _ -> raise (ProtobufError "more than one graph")
    { IrVersion = integer 1 fs
      Opsets =
        messages 8 fs
        |> List.map (fun o ->
            let ofs = fields o
            text 1 ofs, integer 2 ofs)
      ProducerName = text 2 fs
      ProducerVersion = text 3 fs
      Graph = graph
      Metadata =
        messages 14 fs
        |> List.map (fun kv ->
            let kfs = fields kv
            text 1 kfs, text 2 kfs) }

/// Reads an ONNX file; anything that is not one fails with a one-line OnnxError naming the file.
let read (path: string) : Model =
    let bytes =
        try
            File.ReadAllBytes path
        with
        | :? FileNotFoundException
        | :? DirectoryNotFoundException -> raise (OnnxError(sprintf "%s: no such file" path))
        | :? UnauthorizedAccessException -> raise (OnnxError(sprintf "%s: cannot be read (a folder, or no permission)" path))
    try
        parse bytes
    with
    | ProtobufError msg
    | OnnxError msg -> raise (OnnxError(sprintf "%s is not a readable ONNX model (%s)" path msg))
    | :? ArgumentException as ex -> raise (OnnxError(sprintf "%s is not a readable ONNX model (%s)" path ex.Message))

// ---- Writing ------------------------------------------------------------------------------------------

let private tensorMessage (t: Tensor) =
    let w = Writer()
    w.PackedInt64s(1, t.Dims)
    w.Int64(2, int64 t.Type)
    w.String(8, t.Name)
    w.Bytes(9, ReadOnlySpan t.Data)
    w

let private attributeMessage (name: string, a: Attribute) =
    let w = Writer()
    w.String(1, name)
    match a with
    | Float f ->
        w.Float32(2, f)
        w.Int64(20, 1L)
    | Int i ->
        w.Int64(3, i)
        w.Int64(20, 2L)
    | Text s ->
        w.String(4, s)
        w.Int64(20, 3L)
    | TensorValue t ->
        w.Message(5, tensorMessage t)
        w.Int64(20, 4L)
    | Floats fs ->
        w.PackedFloat32s(7, fs)
        w.Int64(20, 6L)
    | Ints is ->
        w.PackedInt64s(8, is)
        w.Int64(20, 7L)
    | Unsupported k -> raise (OnnxError(sprintf "attribute %s: kind %d cannot be written" name k))
    w

let private nodeMessage (n: Node) =
    let w = Writer()
    for i in n.Inputs do
        w.String(1, i)
    for o in n.Outputs do
        w.String(2, o)
    w.String(3, n.Name)
    w.String(4, n.OpType)
    for a in n.Attributes do
        w.Message(5, attributeMessage a)
    if n.Domain <> "" then w.String(7, n.Domain)
    w

let private valueInfoMessage (v: ValueInfo) =
    let shape = Writer()
    for d in v.Shape do
        let dim = Writer()
        match d with
        | Fixed n -> dim.Int64(1, n)
        | Named p -> dim.String(2, p)
        shape.Message(1, dim)
    let tensorType = Writer()
    tensorType.Int64(1, int64 v.Type)
    tensorType.Message(2, shape)
    let typ = Writer()
    typ.Message(1, tensorType)
    let w = Writer()
    w.String(1, v.Name)
    w.Message(2, typ)
    w

/// The model as ONNX bytes.
let serialize (m: Model) : byte[] =
    let g = Writer()
    for n in m.Graph.Nodes do
        g.Message(1, nodeMessage n)
    g.String(2, m.Graph.Name)
    for t in m.Graph.Initializers do
        g.Message(5, tensorMessage t)
    for i in m.Graph.Inputs do
        g.Message(11, valueInfoMessage i)
    for o in m.Graph.Outputs do
        g.Message(12, valueInfoMessage o)
    let w = Writer()
    w.Int64(1, m.IrVersion)
    w.String(2, m.ProducerName)
    w.String(3, m.ProducerVersion)
    w.Message(7, g)
    for (domain, version) in m.Opsets do
        let o = Writer()
        o.String(1, domain)
        o.Int64(2, version)
        w.Message(8, o)
    for (k, v) in m.Metadata do
        let e = Writer()
        e.String(1, k)
        e.String(2, v)
        w.Message(14, e)
    w.ToArray()
