/// A little-endian MATLAB level-5 MAT-file writer, built byte by byte from MathWorks' "MAT-File Format"
/// reference: the 128-byte header, data elements in their normal and small (packed into the tag) forms, miMATRIX
/// arrays of class double, uint8, uint16, int32, char, cell and struct, and miCOMPRESSED (zlib) wrapping. It
/// writes the Stanford Cars and Stanford Dogs annotation files of the generated miniatures (FgvcMini) and the
/// odd or broken files of the reader's tests; scipy.io.loadmat reads its output (MatTests checks that).
module Pmg.Fs.Tests.MatWriter

open System
open System.Buffers.Binary
open System.IO
open System.IO.Compression
open System.Text

// Data types (miXXX) and array classes (mxXXX) used below.
let miINT8, miUINT8, miUINT16, miINT32, miUINT32, miDOUBLE = 1, 2, 4, 5, 6, 9
let miMATRIX, miCOMPRESSED = 14, 15
let mxCELL, mxSTRUCT, mxCHAR, mxSPARSE, mxDOUBLE, mxINT32, mxUINT8, mxUINT16 = 1, 2, 4, 5, 6, 12, 9, 11
let complexFlag = 0x0800

let int32 (v: int) =
    let b = Array.zeroCreate 4
    BinaryPrimitives.WriteInt32LittleEndian(Span b, v)
    b

let uint16 (v: int) =
    let b = Array.zeroCreate 2
    BinaryPrimitives.WriteUInt16LittleEndian(Span b, Operators.uint16 v)
    b

let float64 (v: float) =
    let b = Array.zeroCreate 8
    BinaryPrimitives.WriteDoubleLittleEndian(Span b, v)
    b

let private padTo n (b: byte[]) = Array.append b (Array.zeroCreate ((n - b.Length % n) % n))

/// A normal data element: 8-byte tag (type, byte count), payload padded to 8 bytes.
let element miType (payload: byte[]) =
    Array.concat [ int32 miType; int32 payload.Length; padTo 8 payload ]

/// A small data element: type and byte count packed into 4 bytes, the payload (at most 4 bytes) in the other 4.
let small miType (payload: byte[]) =
    if payload.Length > 4 then invalidArg (nameof payload) "a small element holds at most 4 bytes"
    Array.concat [ uint16 miType; uint16 payload.Length; padTo 4 payload ]

/// The form MATLAB and scipy choose: small for payloads of 1 to 4 bytes, normal otherwise.
let data miType (payload: byte[]) =
    if payload.Length >= 1 && payload.Length <= 4 then small miType payload else element miType payload

/// An miMATRIX element: array flags (class and flag bits), dimensions, name, then the class's body.
let matrixWith flags cls (dims: int list) (name: string) (body: byte[]) =
    element miMATRIX (Array.concat [
        element miUINT32 (Array.append (int32 (cls ||| flags)) (int32 0))
        element miINT32 (dims |> List.map int32 |> Array.concat)
        element miINT8 (Encoding.ASCII.GetBytes name)
        body ])

let matrix = matrixWith 0

/// A double array (column-major data) stored as miDOUBLE.
let doubles name dims (values: float list) =
    matrix mxDOUBLE dims name (data miDOUBLE (values |> List.map float64 |> Array.concat))

/// A double array stored compactly as miUINT8, as MATLAB does for small integral values.
let doublesAsBytes name dims (values: byte list) =
    matrix mxDOUBLE dims name (data miUINT8 (Array.ofList values))

/// A uint8 array.
let uint8s name dims (values: byte list) = matrix mxUINT8 dims name (data miUINT8 (Array.ofList values))

/// A uint16 array.
let uint16s name dims (values: int list) =
    matrix mxUINT16 dims name (data miUINT16 (values |> List.map uint16 |> Array.concat))

/// An int32 array.
let int32s name dims (values: int list) =
    matrix mxINT32 dims name (data miINT32 (values |> List.map int32 |> Array.concat))

/// A uint16 array with a small-element payload (one value).
let smallUint16 name (value: int) = matrix mxUINT16 [ 1; 1 ] name (small miUINT16 (uint16 value))

/// A char matrix of equal-length rows, stored column-major as UTF-16 code units (miUINT16, as MATLAB writes).
let chars name (rows: string list) =
    let columns = match rows with [] -> 0 | r :: _ -> r.Length
    let units =
        [ for c in 0 .. columns - 1 do
              for r in rows -> uint16 (int r[c]) ]
        |> Array.concat
    matrix mxCHAR [ rows.Length; columns ] name (data miUINT16 units)

/// A 1xN char array: one string.
let text name (s: string) = chars name [ s ]

/// A cell array; the items are unnamed miMATRIX elements in column-major order.
let cell name dims (items: byte[] list) = matrix mxCELL dims name (Array.concat items)

/// A struct array: field-name width as a small element, the NUL-padded names, then each element's fields in order
/// (elements in column-major order).
let structs name dims (fields: string list) (elements: byte[] list list) =
    let width = 1 + (fields |> List.map String.length |> List.max)
    let names =
        fields
        |> List.map (fun f -> Array.append (Encoding.ASCII.GetBytes f) (Array.zeroCreate (width - f.Length)))
        |> Array.concat
    matrix mxSTRUCT dims name (Array.concat [
        small miINT32 (int32 width)
        element miINT8 names
        elements |> List.concat |> Array.concat ])

/// Wraps one element in a zlib-compressed element (not padded, as MATLAB and scipy write it).
let compressed (elementBytes: byte[]) =
    use output = new MemoryStream()
    (
        use z = new ZLibStream(output, CompressionLevel.Optimal)
        z.Write(elementBytes, 0, elementBytes.Length)
    )
    let payload = output.ToArray()
    Array.concat [ int32 miCOMPRESSED; int32 payload.Length; payload ]

/// The 128-byte header: descriptive text padded with spaces to 116 bytes, no subsystem data offset, version
/// 0x0100 and the "IM" endian indicator (little-endian).
let header () =
    let description = "MATLAB 5.0 MAT-file, Platform: Pmg.Fs tests, written by MatWriter.fs".PadRight 116
    Array.concat [ Encoding.ASCII.GetBytes description; Array.zeroCreate 8; uint16 0x0100; Encoding.ASCII.GetBytes "IM" ]

/// A whole file: the header, then the variables' elements.
let file (elements: byte[] list) = Array.concat (header () :: elements)

let write (path: string) (elements: byte[] list) = File.WriteAllBytes(path, file elements)

/// Writes every variable compressed, as MATLAB's default save and scipy's savemat(do_compression=True) do.
let writeCompressed (path: string) (elements: byte[] list) = write path (List.map compressed elements)
