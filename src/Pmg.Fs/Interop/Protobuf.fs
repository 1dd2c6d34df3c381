/// The protocol-buffers wire format, read and written by hand: ONNX files are protobuf messages, and the few
/// messages this project needs (Interop/Onnx.fs) do not justify generated code. Reading slices the file's bytes
/// without copying them, so a 60 MB weight file costs one read.
module Pmg.Fs.Interop.Protobuf

open System
open System.IO
open System.Text

/// One field's payload as the wire format carries it; what it means is the message's business.
type Value =
    /// Wire type 0: integers, booleans and enums.
    | Varint of uint64
    /// Wire type 1: 64-bit doubles and fixed integers, as raw bits.
    | Fixed64 of uint64
    /// Wire type 2: strings, bytes, embedded messages and packed repeated fields; a slice of the message, not a copy.
    | Bytes of ReadOnlyMemory<byte>
    /// Wire type 5: 32-bit floats and fixed integers, as raw bits.
    | Fixed32 of uint32

/// A malformed message, or a field of another wire type than asked for (Onnx.parse also raises it for unsupported content).
exception ProtobufError of string

let private fail fmt = Printf.kprintf (ProtobufError >> raise) fmt

let private readVarint (span: ReadOnlySpan<byte>) (pos: byref<int>) : uint64 =
    let mutable result = 0UL
    let mutable shift = 0
    let mutable fin = false
    while not fin do
        if pos >= span.Length then fail "truncated varint at byte %d" pos
        if shift > 63 then fail "varint longer than 10 bytes at byte %d" pos
        let b = span.[pos]
        pos <- pos + 1
        result <- result ||| (uint64 (b &&& 0x7fuy) <<< shift)
        shift <- shift + 7
        fin <- b &&& 0x80uy = 0uy
    result

/// The fields of one message, in file order (a repeated field appears once per occurrence).
let fields (message: ReadOnlyMemory<byte>) : (int * Value) list =
    let span = message.Span
    let mutable pos = 0
    let acc = ResizeArray()
    while pos < span.Length do
        let key = readVarint span &pos
        let number = int (key >>> 3)
        if number < 1 then fail "field number 0 at byte %d" pos
        let value =
            match int (key &&& 7UL) with
            | 0 -> Varint(readVarint span &pos)
            | 1 ->
                if pos + 8 > span.Length then fail "truncated fixed64 at byte %d" pos
                let v = BitConverter.ToUInt64(span.Slice(pos, 8))
                pos <- pos + 8
                Fixed64 v
            | 2 ->
                let n = readVarint span &pos
                if n > uint64 (span.Length - pos) then fail "field %d claims %d bytes, %d left" number n (span.Length - pos)
                let v = message.Slice(pos, int n)
                pos <- pos + int n
                Bytes v
            | 5 ->
                if pos + 4 > span.Length then fail "truncated fixed32 at byte %d" pos
                let v = BitConverter.ToUInt32(span.Slice(pos, 4))
                pos <- pos + 4
                Fixed32 v
            | w -> fail "wire type %d (field %d) is not supported" w number
        acc.Add((number, value))
    List.ofSeq acc

// ---- Field accessors: proto3 leaves a default out, so a missing field reads as its default. ---------------

let private all (number: int) (fs: (int * Value) list) = fs |> List.filter (fst >> (=) number) |> List.map snd

/// Every occurrence of a length-delimited field (embedded message, string or bytes), in order.
let messages (number: int) (fs: (int * Value) list) : ReadOnlyMemory<byte> list =
    all number fs
    |> List.map (function
        | Bytes b -> b
        | v -> fail "field %d: expected bytes, found %A" number v)

/// A string field (UTF-8): its last occurrence, or "" when absent.
let text (number: int) (fs: (int * Value) list) : string =
    match messages number fs with
    | [] -> ""
    | bs -> Encoding.UTF8.GetString((List.last bs).Span)

/// A repeated string field (UTF-8), every occurrence in order.
let texts (number: int) (fs: (int * Value) list) : string list =
    messages number fs |> List.map (fun b -> Encoding.UTF8.GetString b.Span)

/// A varint field: its last occurrence, or 0 when absent.
let integer (number: int) (fs: (int * Value) list) : int64 =
    match all number fs |> List.tryLast with
    | None -> 0L
    | Some(Varint v) -> int64 v
    | Some v -> fail "field %d: expected a varint, found %A" number v

/// A 32-bit float field: its last occurrence, or 0 when absent.
let single (number: int) (fs: (int * Value) list) : float32 =
    match all number fs |> List.tryLast with
    | None -> 0.0f
    | Some(Fixed32 v) -> BitConverter.UInt32BitsToSingle v
    | Some v -> fail "field %d: expected a 32-bit float, found %A" number v

let private unpackVarints (b: ReadOnlyMemory<byte>) : int64 list =
    let span = b.Span
    let mutable pos = 0
    let acc = ResizeArray()
    while pos < span.Length do
        acc.Add(int64 (readVarint span &pos))
    List.ofSeq acc

/// A repeated integer field, packed or not (writers differ).
let integers (number: int) (fs: (int * Value) list) : int64 list =
    all number fs
    |> List.collect (function
        | Varint v -> [ int64 v ]
        | Bytes b -> unpackVarints b
        | v -> fail "field %d: expected integers, found %A" number v)

/// A repeated 32-bit field (float or fixed), packed or not, as raw little-endian bytes.
let fixed32s (number: int) (fs: (int * Value) list) : byte[] =
    all number fs
    |> List.map (function
        | Fixed32 v -> BitConverter.GetBytes v
        | Bytes b when b.Length % 4 = 0 -> b.ToArray()
        | v -> fail "field %d: expected 32-bit values, found %A" number v)
    |> Array.concat

/// A repeated 64-bit field (double or fixed), packed or not, as raw little-endian bytes.
let fixed64s (number: int) (fs: (int * Value) list) : byte[] =
    all number fs
    |> List.map (function
        | Fixed64 v -> BitConverter.GetBytes v
        | Bytes b when b.Length % 8 = 0 -> b.ToArray()
        | v -> fail "field %d: expected 64-bit values, found %A" number v)
    |> Array.concat

// ---- Writing ------------------------------------------------------------------------------------------

/// A message being written: fields appended in the order given.
type Writer() =
    let stream = new MemoryStream()

    member private _.Varint(v: uint64) =
        let mutable v = v
        while v >= 0x80UL do
            stream.WriteByte(byte (v &&& 0x7fUL) ||| 0x80uy)
            v <- v >>> 7
        stream.WriteByte(byte v)

    member private w.Key(number: int, wire: int) = w.Varint(uint64 ((number <<< 3) ||| wire))

    /// Appends an integer field as a varint (a negative value takes ten bytes).
    member w.Int64(number: int, v: int64) =
        w.Key(number, 0)
        w.Varint(uint64 v)

    /// Appends a 32-bit float field.
    member w.Float32(number: int, v: float32) =
        w.Key(number, 5)
        stream.Write(BitConverter.GetBytes v)

    /// Appends a length-delimited field holding `data`.
    member w.Bytes(number: int, data: ReadOnlySpan<byte>) =
        w.Key(number, 2)
        w.Varint(uint64 data.Length)
        stream.Write(data)

    /// Appends a string field, UTF-8 encoded.
    member w.String(number: int, s: string) = w.Bytes(number, ReadOnlySpan<byte>(Encoding.UTF8.GetBytes s))

    /// An embedded message.
    member w.Message(number: int, m: Writer) = w.Bytes(number, ReadOnlySpan<byte>(m.ToArray()))

    /// Appends a repeated integer field, packed into one length-delimited field.
    member w.PackedInt64s(number: int, vs: int64 seq) =
        let inner = Writer()
        for v in vs do
            inner.Varint(uint64 v)
        w.Bytes(number, ReadOnlySpan<byte>(inner.ToArray()))

    /// Appends a repeated 32-bit float field, packed into one length-delimited field.
    member w.PackedFloat32s(number: int, vs: float32 seq) =
        w.Bytes(number, ReadOnlySpan<byte>(vs |> Seq.collect BitConverter.GetBytes |> Array.ofSeq))

    /// The message written so far, as bytes.
    member _.ToArray() : byte[] = stream.ToArray()
