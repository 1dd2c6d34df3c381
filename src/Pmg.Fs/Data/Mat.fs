/// A reader for the subset of MATLAB 5 MAT-files (the "-v6"/"-v7" format, not the HDF5-based 7.3) that the
/// FGVC annotation files use: numeric, logical, char, cell and struct arrays, plain or zlib-compressed.
module Pmg.Fs.Data.Mat

open System
open System.Buffers.Binary
open System.IO
open System.IO.Compression
open System.Text

/// A decoded MATLAB array. Every array keeps its MATLAB dimensions; elements are in MATLAB's column-major order.
type MatValue =
    /// Any numeric or logical class, widened to float (int64 beyond 2^53 loses precision, irrelevant for annotations).
    | Numeric of dims: int[] * data: float[]
    /// A char array as one string per row (a 1xN char array is one string).
    | Char of dims: int[] * rows: string[]
    /// A cell array: one value per cell, column-major.
    | Cell of dims: int[] * items: MatValue[]
    /// A struct array: the field names in file order and one map per element.
    | Struct of dims: int[] * fields: string[] * elements: Map<string, MatValue>[]

/// A file that is not a readable MAT 5 file, or a value that is not what the caller asked for: a DatasetInvalid
/// error for `file` (the MAT file, or "" where only the value is known), the message naming what was expected.
let private matError (file: string) (message: string) : 'a =
    Pmg.Fs.Errors.fail (Pmg.Fs.PmgError.DatasetInvalid(file, message))

// Raised inside the pure parser without a file name; `parse` adds the source name.
exception private Malformed of string

let private malformed fmt = Printf.ksprintf (fun msg -> raise (Malformed msg)) fmt

// Layout constants of the MAT 5 format (MATLAB "MAT-File Format" reference).
let private headerLength = 128
let private headerTextLength = 116
let private endianOffset = 126
let private headerMagic = "MATLAB 5.0 MAT-file"
let private tagLength = 8
let private smallTagPayloadOffset = 4 // also the most payload a small element holds
let private alignment = 8

// Data types (miXXX) of data elements.
let private miINT8 = 1
let private miUINT8 = 2
let private miINT16 = 3
let private miUINT16 = 4
let private miINT32 = 5
let private miUINT32 = 6
let private miSINGLE = 7
let private miDOUBLE = 9
let private miINT64 = 12
let private miUINT64 = 13
let private miMATRIX = 14
let private miCOMPRESSED = 15
let private miUTF8 = 16
let private miUTF16 = 17
let private miUTF32 = 18

// Array classes (mxXXX) from the array-flags sub-element.
let private mxCELL = 1
let private mxSTRUCT = 2
let private mxOBJECT = 3
let private mxCHAR = 4
let private mxSPARSE = 5
let private mxDOUBLE = 6
let private mxUINT64 = 15

let private classMask = 0xFFu
let private complexFlag = 0x0800u

/// The bytes being parsed and their byte order.
type private Source = { Bytes: byte[]; Little: bool }

/// One data element: its type, where its payload lies, and where the next element starts.
type private Element = { Type: int; Start: int; Length: int; Next: int }

let private need (src: Source) (offset: int) (count: int) what =
    if offset < 0 || count < 0 || offset + count > src.Bytes.Length then
        malformed "truncated: %s needs %d bytes at offset %d but only %d remain" what count offset
            (max 0 (src.Bytes.Length - offset))

let private u16 (src: Source) offset =
    let span = ReadOnlySpan(src.Bytes, offset, 2)
    if src.Little then BinaryPrimitives.ReadUInt16LittleEndian span else BinaryPrimitives.ReadUInt16BigEndian span

let private u32 (src: Source) offset =
    let span = ReadOnlySpan(src.Bytes, offset, 4)
    if src.Little then BinaryPrimitives.ReadUInt32LittleEndian span else BinaryPrimitives.ReadUInt32BigEndian span

let private i32 src offset = int (u32 src offset)

let private padded length = (length + alignment - 1) / alignment * alignment

/// Reads the tag at `offset`; a non-zero upper half of the first word marks the packed "small element" form,
/// whose payload (at most 4 bytes) shares the 8 bytes of the tag.
let private element (src: Source) offset what =
    need src offset tagLength what
    let first = u32 src offset
    let smallLength = int (first >>> 16)
    if smallLength > smallTagPayloadOffset then
        malformed "corrupt small element at offset %d (claims %d bytes, at most 4 fit)" offset smallLength
    elif smallLength <> 0 then
        { Type = int (first &&& 0xFFFFu); Start = offset + smallTagPayloadOffset; Length = smallLength; Next = offset + tagLength }
    else
        let length = i32 src (offset + 4)
        let start = offset + tagLength
        need src start length what
        let kind = int first
        // Compressed elements are not padded; everything else is padded to 8 bytes.
        let next = if kind = miCOMPRESSED then start + length else start + padded length
        { Type = kind; Start = start; Length = length; Next = min next src.Bytes.Length }

let private elementSize miType =
    match miType with
    | t when t = miINT8 || t = miUINT8 || t = miUTF8 -> 1
    | t when t = miINT16 || t = miUINT16 || t = miUTF16 -> 2
    | t when t = miINT32 || t = miUINT32 || t = miSINGLE || t = miUTF32 -> 4
    | t when t = miDOUBLE || t = miINT64 || t = miUINT64 -> 8
    | t -> malformed "unsupported data type %d in a numeric element" t

let private i64 (src: Source) offset =
    let span = ReadOnlySpan(src.Bytes, offset, 8)
    if src.Little then BinaryPrimitives.ReadInt64LittleEndian span else BinaryPrimitives.ReadInt64BigEndian span

let private u64 (src: Source) offset =
    let span = ReadOnlySpan(src.Bytes, offset, 8)
    if src.Little then BinaryPrimitives.ReadUInt64LittleEndian span else BinaryPrimitives.ReadUInt64BigEndian span

/// Decodes a numeric payload of any stored type, widening to float (MATLAB may store a double array as uint8).
let private numbers (src: Source) (e: Element) : float[] =
    let size = elementSize e.Type
    let at i = e.Start + i * size
    let read: int -> float =
        match e.Type with
        | t when t = miINT8 -> fun i -> float (sbyte src.Bytes[at i])
        | t when t = miUINT8 || t = miUTF8 -> fun i -> float src.Bytes[at i]
        | t when t = miINT16 -> fun i -> float (int16 (u16 src (at i)))
        | t when t = miUINT16 || t = miUTF16 -> fun i -> float (u16 src (at i))
        | t when t = miINT32 -> fun i -> float (i32 src (at i))
        | t when t = miUINT32 || t = miUTF32 -> fun i -> float (u32 src (at i))
        | t when t = miSINGLE -> fun i -> float (BitConverter.Int32BitsToSingle(i32 src (at i)))
        | t when t = miDOUBLE -> fun i -> BitConverter.Int64BitsToDouble(i64 src (at i))
        | t when t = miINT64 -> fun i -> float (i64 src (at i))
        | _ -> fun i -> float (u64 src (at i))
    Array.init (e.Length / size) read

/// Decodes the characters of a char array payload, one char per MATLAB element.
let private characters (src: Source) (e: Element) : char[] =
    match e.Type with
    | t when t = miUTF8 -> Encoding.UTF8.GetString(src.Bytes, e.Start, e.Length).ToCharArray()
    | t when t = miUINT8 || t = miINT8 -> Encoding.Latin1.GetString(src.Bytes, e.Start, e.Length).ToCharArray()
    | t when t = miUINT16 || t = miUTF16 || t = miINT16 ->
        Array.init (e.Length / 2) (fun i -> char (u16 src (e.Start + 2 * i)))
    | t when t = miUTF32 || t = miUINT32 || t = miINT32 ->
        (Array.init (e.Length / 4) (fun i -> Char.ConvertFromUtf32(i32 src (e.Start + 4 * i))) |> String.Concat)
            .ToCharArray()
    | t -> malformed "unsupported data type %d for char data" t

/// Splits column-major chars into one string per row (MATLAB pads shorter rows with spaces; kept as stored).
let private charRows (dims: int[]) (chars: char[]) : string[] =
    let rows = if dims.Length = 0 then 0 else dims[0]
    if rows = 0 || chars.Length = 0 then Array.create rows ""
    else
        let columns = chars.Length / rows
        Array.init rows (fun r -> String(Array.init columns (fun c -> chars[r + c * rows])))

let private count (dims: int[]) = Array.fold (*) 1 dims

let private ascii (src: Source) (e: Element) =
    Encoding.ASCII.GetString(src.Bytes, e.Start, e.Length).TrimEnd('\000')

/// Parses the body of an miMATRIX element (the part after its tag) into its name and value.
let rec private matrix (src: Source) (body: Element) : string * MatValue =
    if body.Length = 0 then
        // MATLAB writes empty cell contents as a bare miMATRIX tag.
        "", Numeric([| 0; 0 |], [||])
    else
        let flags = element src body.Start "array flags"
        let flagWord = u32 src flags.Start
        let cls = int (flagWord &&& classMask)
        let dimsElement = element src flags.Next "dimensions"
        let dims = Array.init (dimsElement.Length / 4) (fun i -> i32 src (dimsElement.Start + 4 * i))
        let nameElement = element src dimsElement.Next "array name"
        let name = ascii src nameElement
        let described = if name = "" then "an array" else sprintf "array '%s'" name
        if flagWord &&& complexFlag <> 0u then
            malformed "%s is complex, which is not supported" described
        let value =
            match cls with
            | c when c = mxCELL ->
                let items, _ =
                    Array.mapFold
                        (fun offset _ ->
                            let item = element src offset "cell element"
                            snd (matrix src item), item.Next)
                        nameElement.Next
                        (Array.zeroCreate (count dims))
                Cell(dims, items)
            | c when c = mxSTRUCT ->
                let nameLength = element src nameElement.Next "field name length"
                let width = i32 src nameLength.Start
                let namesElement = element src nameLength.Next "field names"
                let fields =
                    Array.init (if width = 0 then 0 else namesElement.Length / width) (fun i ->
                        Encoding.ASCII.GetString(src.Bytes, namesElement.Start + i * width, width).TrimEnd('\000'))
                let elements, _ =
                    Array.mapFold
                        (fun offset _ ->
                            let values, next =
                                Array.mapFold
                                    (fun fieldOffset _ ->
                                        let item = element src fieldOffset "struct field"
                                        snd (matrix src item), item.Next)
                                    offset
                                    fields
                            Map(Array.zip fields values), next)
                        namesElement.Next
                        (Array.zeroCreate (count dims))
                Struct(dims, fields, elements)
            | c when c = mxCHAR ->
                let data = element src nameElement.Next "char data"
                Char(dims, charRows dims (characters src data))
            | c when c >= mxDOUBLE && c <= mxUINT64 ->
                let data = element src nameElement.Next "numeric data"
                Numeric(dims, numbers src data)
            | c when c = mxSPARSE -> malformed "%s is sparse, which is not supported" described
            | c when c = mxOBJECT -> malformed "%s is a MATLAB object, which is not supported" described
            | c -> malformed "%s has unsupported class %d" described c
        name, value

let private inflate (src: Source) (e: Element) : Source =
    use input = new MemoryStream(src.Bytes, e.Start, e.Length)
    use zlib = new ZLibStream(input, CompressionMode.Decompress)
    use output = new MemoryStream()
    try
        zlib.CopyTo output
    with :? InvalidDataException as ex ->
        malformed "corrupt or truncated compressed element at offset %d: %s" (e.Start - tagLength) ex.Message
    { src with Bytes = output.ToArray() }

/// Reads the top-level variables from `offset` on, expanding compressed elements (each holds one miMATRIX).
let rec private variables (src: Source) offset : (string * MatValue) list =
    if offset >= src.Bytes.Length then []
    else
        let e = element src offset "variable"
        let here =
            match e.Type with
            | t when t = miMATRIX -> [ matrix src e ]
            | t when t = miCOMPRESSED -> variables (inflate src e) 0
            | t -> malformed "unexpected top-level data type %d at offset %d (expected a matrix)" t offset
        here @ variables src e.Next

let private header (bytes: byte[]) : Source =
    if bytes.Length < headerLength then
        malformed "not a MAT 5 file (only %d bytes, shorter than the %d-byte header)" bytes.Length headerLength
    let text = Encoding.ASCII.GetString(bytes, 0, headerTextLength)
    if text.StartsWith "MATLAB 7.3 MAT-file" then
        malformed "a MATLAB 7.3 (HDF5) file, which is not supported; re-save it with save(..., '-v7')"
    if not (text.StartsWith headerMagic) then
        malformed "not a MAT 5 file (the header does not start with \"%s\")" headerMagic
    match char bytes[endianOffset], char bytes[endianOffset + 1] with
    | 'I', 'M' -> { Bytes = bytes; Little = true }
    | 'M', 'I' -> { Bytes = bytes; Little = false }
    | a, b -> malformed "not a MAT 5 file (endian indicator is \"%c%c\", expected \"IM\" or \"MI\")" a b

/// Parses MAT 5 file contents; `source` names the file in error messages. Variables keep file order.
let parseList (source: string) (bytes: byte[]) : (string * MatValue) list =
    try
        let src = header bytes
        variables src headerLength
    with Malformed msg -> matError source (sprintf "%s: %s" source msg)

/// Parses MAT 5 file contents into a map from variable name to value.
let parse (source: string) (bytes: byte[]) : Map<string, MatValue> = parseList source bytes |> Map.ofList

/// Reads a MAT 5 file into a map from variable name to value.
let read (path: string) : Map<string, MatValue> =
    if not (File.Exists path) then matError path (sprintf "%s: file not found" path)
    parse path (File.ReadAllBytes path)

let private describe value =
    match value with
    | Numeric(dims, _) -> sprintf "a numeric %s array" (dims |> Array.map string |> String.concat "x")
    | Char(dims, _) -> sprintf "a char %s array" (dims |> Array.map string |> String.concat "x")
    | Cell(dims, _) -> sprintf "a %s cell array" (dims |> Array.map string |> String.concat "x")
    | Struct(dims, _, _) -> sprintf "a %s struct array" (dims |> Array.map string |> String.concat "x")

let private wrong expected value = matError "" (sprintf "expected %s but found %s" expected (describe value))

/// A variable of a file, or a field of a struct element; `context` names the file or struct in the error.
let get (context: string) (name: string) (values: Map<string, MatValue>) : MatValue =
    match Map.tryFind name values with
    | Some value -> value
    | None ->
        let known = values |> Map.keys |> String.concat ", "
        matError context (sprintf "%s: no variable or field '%s' (has: %s)" context name known)

/// Unwraps 1x1 cells, which MATLAB code often uses around single values.
let rec private unwrap value =
    match value with
    | Cell(_, [| item |]) -> unwrap item
    | other -> other

/// All numbers of a numeric array, column-major.
let toFloats (value: MatValue) : float[] =
    match unwrap value with
    | Numeric(_, data) -> data
    | other -> wrong "a numeric array" other

/// The single number of a 1x1 numeric array.
let toFloat (value: MatValue) : float =
    match toFloats value with
    | [| x |] -> x
    | _ -> wrong "a numeric scalar" value

/// The single number of a 1x1 numeric array, which must be integral.
let toInt (value: MatValue) : int =
    let x = toFloat value
    if x <> Math.Round x then matError "" (sprintf "expected an integer but found %g" x)
    int x

/// The text of a char array with one row (an empty char array is ""), or of a 1x1 cell holding one.
let toString (value: MatValue) : string =
    match unwrap value with
    | Char(_, [| row |]) -> row
    | Char(_, [||]) -> ""
    | other -> wrong "a single-row char array" other

/// One string per element of a cell array of strings, or per row of a char matrix.
let toStrings (value: MatValue) : string[] =
    match value with
    | Cell(_, items) -> items |> Array.map toString
    | Char(_, rows) -> rows
    | other -> wrong "a cell array of strings or a char matrix" other

/// The elements of a struct array, column-major.
let toStructs (value: MatValue) : Map<string, MatValue>[] =
    match unwrap value with
    | Struct(_, _, elements) -> elements
    | other -> wrong "a struct array" other
