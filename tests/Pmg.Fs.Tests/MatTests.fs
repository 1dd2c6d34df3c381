module Pmg.Fs.Tests.MatTests

open System
open System.Buffers.Binary
open System.IO
open System.IO.Compression
open System.Text
open Expecto
open Pmg.Fs.Data
open Pmg.Fs.Data.Mat

/// A minimal little-endian MAT 5 writer, built byte by byte from the format reference, so the tests cover the
/// uncompressed and small-element paths that the scipy-written fixtures never use.
module MatWriter =

    // Data types and array classes used below (MAT-File Format reference).
    let miINT8, miUINT8, miUINT16, miINT32, miUINT32, miDOUBLE = 1, 2, 4, 5, 6, 9
    let miMATRIX, miCOMPRESSED = 14, 15
    let mxCELL, mxSTRUCT, mxCHAR, mxSPARSE, mxDOUBLE, mxUINT16 = 1, 2, 4, 5, 6, 11
    let complexFlag = 0x0800

    let int32 (v: int) =
        let b = Array.zeroCreate 4
        BinaryPrimitives.WriteInt32LittleEndian(Span b, v)
        b

    let uint16 (v: int) =
        let b = Array.zeroCreate 2
        BinaryPrimitives.WriteUInt16LittleEndian(Span b, uint16 v)
        b

    let float64 (v: float) =
        let b = Array.zeroCreate 8
        BinaryPrimitives.WriteDoubleLittleEndian(Span b, v)
        b

    let private padTo n (b: byte[]) = Array.append b (Array.zeroCreate ((n - b.Length % n) % n))

    /// A normal data element: 8-byte tag, payload padded to 8 bytes.
    let element miType (payload: byte[]) =
        Array.concat [ int32 miType; int32 payload.Length; padTo 8 payload ]

    /// A small data element: type and length packed into 4 bytes, payload (at most 4 bytes) in the other 4.
    let small miType (payload: byte[]) =
        Array.concat [ uint16 miType; uint16 payload.Length; padTo 4 payload ]

    let matrixWith flags cls (dims: int list) (name: string) (body: byte[]) =
        element miMATRIX (Array.concat [
            element miUINT32 (Array.append (int32 (cls ||| flags)) (int32 0))
            element miINT32 (dims |> List.map int32 |> Array.concat)
            element miINT8 (Encoding.ASCII.GetBytes name)
            body ])

    let matrix = matrixWith 0

    let doubles name dims (data: float list) =
        matrix mxDOUBLE dims name (element miDOUBLE (data |> List.map float64 |> Array.concat))

    /// A double array stored compactly as uint8, as MATLAB does for small integral values.
    let doublesAsBytes name dims (data: byte list) =
        matrix mxDOUBLE dims name (element miUINT8 (Array.ofList data))

    /// A uint16 array with a small-element payload (at most two values).
    let smallUint16 name (value: int) =
        matrix mxUINT16 [ 1; 1 ] name (small miUINT16 (uint16 value))

    /// A char matrix of equal-length rows, stored column-major as UTF-16 code units.
    let chars name (rows: string list) =
        let columns = match rows with [] -> 0 | r :: _ -> r.Length
        let data =
            [ for c in 0 .. columns - 1 do
                  for r in rows -> uint16 (int r[c]) ]
            |> Array.concat
        matrix mxCHAR [ rows.Length; columns ] name (element miUINT16 data)

    let cell name dims (items: byte[] list) = matrix mxCELL dims name (Array.concat items)

    /// A struct array: field-name width as a small element, the padded names, then each element's fields.
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
        let data = output.ToArray()
        Array.concat [ int32 miCOMPRESSED; int32 data.Length; data ]

    let header () =
        let text = "MATLAB 5.0 MAT-file, written by Pmg.Fs tests".PadRight(116)
        Array.concat [ Encoding.ASCII.GetBytes text; Array.zeroCreate 8; uint16 0x0100; Encoding.ASCII.GetBytes "IM" ]

    let file (elements: byte[] list) = Array.concat (header () :: elements)

    let write (path: string) (elements: byte[] list) = File.WriteAllBytes(path, file elements)

open MatWriter

/// A miniature dataset's folder under the shared fixtures.
let dataset (name: string) = Path.Combine(Fixtures.root (), name)

let private fixture name file = Path.Combine(dataset name, file)

let private raisesWith (fragment: string) (f: unit -> 'a) =
    try
        f () |> ignore
        failtestf "expected a MatError mentioning '%s'" fragment
    with MatError msg ->
        Expect.stringContains msg fragment "error message"

let private fixtureTests =
    testList "fixtures" [
        test "cars_meta.mat class_names is a cell of three names" {
            let names = Mat.read (fixture "stanford_cars" "devkit/cars_meta.mat") |> Mat.get "meta" "class_names"
            match names with
            | Cell(dims, _) -> Expect.equal (Array.fold (*) 1 dims) 3 "three cells"
            | other -> failtestf "class_names is %A" other
            let strings = Mat.toStrings names
            Expect.equal strings.Length 3 "three names"
            Expect.all strings (fun s -> s.Trim() <> "") "non-empty names"
        }

        test "cars_train_annos.mat annotations name existing images with in-range classes and boxes" {
            let path = fixture "stanford_cars" "devkit/cars_train_annos.mat"
            let annotations = Mat.read path |> Mat.get path "annotations" |> Mat.toStructs
            Expect.equal annotations.Length 9 "nine annotations"
            for a in annotations do
                let fname = Mat.toString (Mat.get path "fname" a)
                Expect.isTrue (File.Exists(fixture "stanford_cars" (Path.Combine("cars_train", fname)))) fname
                Expect.isTrue (Mat.toInt (Mat.get path "class" a) |> fun c -> c >= 1 && c <= 3) "class in 1..3"
                let v f = Mat.toFloat (Mat.get path f a)
                Expect.isLessThan (v "bbox_x1") (v "bbox_x2") "x1 < x2"
                Expect.isLessThan (v "bbox_y1") (v "bbox_y2") "y1 < y2"
            let fnames = annotations |> Array.map (fun a -> Mat.toString a["fname"])
            Expect.equal (Array.distinct fnames).Length 9 "distinct file names"
        }

        test "cars_test_annos.mat has no class but names existing test images" {
            let path = fixture "stanford_cars" "devkit/cars_test_annos.mat"
            let annotations = Mat.read path |> Mat.get path "annotations" |> Mat.toStructs
            Expect.equal annotations.Length 9 "nine annotations"
            Expect.all annotations (fun a -> not (a.ContainsKey "class")) "no class field"
            for a in annotations do
                let fname = Mat.toString a["fname"]
                Expect.isTrue (File.Exists(fixture "stanford_cars" (Path.Combine("cars_test", fname)))) fname
        }

        test "cars_test_annos_withlabels.mat has classes 1..3" {
            let path = fixture "stanford_cars" "cars_test_annos_withlabels.mat"
            let classes =
                Mat.read path |> Mat.get path "annotations" |> Mat.toStructs |> Array.map (fun a -> Mat.toInt a["class"])
            Expect.equal (Array.sort (Array.distinct classes)) [| 1; 2; 3 |] "every class present"
        }

        for list in [ "train_list.mat"; "test_list.mat" ] do
            test $"dogs {list} lists existing images with double labels" {
                let path = fixture "stanford_dogs" list
                let mat = Mat.read path
                let files = Mat.get path "file_list" mat |> Mat.toStrings
                let annotations = Mat.get path "annotation_list" mat |> Mat.toStrings
                let labels = Mat.get path "labels" mat |> Mat.toFloats
                Expect.equal files.Length 9 "nine files"
                Expect.equal annotations.Length 9 "nine annotations"
                Expect.equal labels.Length 9 "nine labels"
                for f in files do
                    Expect.isTrue (File.Exists(fixture "stanford_dogs" (Path.Combine("Images", f)))) f
                Expect.all labels (fun l -> l >= 1.0 && l <= 3.0 && l = Math.Round l) "integral labels in 1..3"
            }
    ]

let private writtenFileTests =
    testList "written files" [
        test "uncompressed double matrix, char matrix, cell and struct round-trip" {
            let path = Path.Combine(Path.GetTempPath(), $"pmg-mat-{Guid.NewGuid():N}.mat")
            try
                write path [
                    doubles "m" [ 2; 3 ] [ 1.0; 2.0; 3.0; 4.0; 5.5; -6.0 ]
                    chars "names" [ "ab"; "cd" ]
                    cell "c" [ 1; 2 ] [ chars "" [ "hello" ]; doublesAsBytes "" [ 1; 1 ] [ 200uy ] ]
                    structs "s" [ 1; 2 ] [ "id"; "label" ] [
                        [ doublesAsBytes "" [ 1; 1 ] [ 7uy ]; chars "" [ "first" ] ]
                        [ smallUint16 "" 513; chars "" [ "second" ] ] ] ]
                let vars = Mat.read path
                Expect.equal (vars |> Map.keys |> List.ofSeq) [ "c"; "m"; "names"; "s" ] "variable names"
                Expect.equal vars["m"] (Numeric([| 2; 3 |], [| 1.0; 2.0; 3.0; 4.0; 5.5; -6.0 |])) "column-major doubles"
                Expect.equal vars["names"] (Char([| 2; 2 |], [| "ab"; "cd" |])) "one string per row"
                Expect.equal (Mat.toString (match vars["c"] with Cell(_, items) -> items[0] | v -> v)) "hello" "cell text"
                match vars["s"] with
                | Struct(dims, fields, elements) ->
                    Expect.equal dims [| 1; 2 |] "struct dims"
                    Expect.equal fields [| "id"; "label" |] "field order"
                    let first, second = elements[0], elements[1]
                    Expect.equal (Mat.toInt first.["id"]) 7 "uint8-stored double"
                    Expect.equal (Mat.toInt second.["id"]) 513 "small-element uint16"
                    Expect.equal (Mat.toString second.["label"]) "second" "struct char field"
                | other -> failtestf "s is %A" other
            finally
                File.Delete path
        }

        test "compressed and plain variables mix in file order" {
            let bytes = file [ compressed (doubles "a" [ 1; 1 ] [ 42.0 ]); doubles "b" [ 1; 1 ] [ 43.0 ] ]
            let vars = Mat.parseList "mixed.mat" bytes
            Expect.equal (vars |> List.map fst) [ "a"; "b" ] "file order"
            Expect.equal (vars |> List.map (snd >> Mat.toFloat)) [ 42.0; 43.0 ] "values"
        }

        test "an empty char array reads as an empty string" {
            let vars = Mat.parse "empty.mat" (file [ matrix mxCHAR [ 0; 0 ] "e" (element miUINT16 [||]) ])
            Expect.equal (Mat.toString vars["e"]) "" "empty"
        }
    ]

let private errorTests =
    testList "errors" [
        test "a non-MAT file is rejected with its name" {
            raisesWith "notes.txt: not a MAT 5 file" (fun () ->
                Mat.parse "notes.txt" (Encoding.ASCII.GetBytes(String('x', 200))))
        }

        test "a short file is rejected" {
            raisesWith "shorter than the 128-byte header" (fun () -> Mat.parse "tiny.mat" [| 1uy; 2uy |])
        }

        test "a truncated uncompressed file names the problem" {
            let bytes = file [ doubles "m" [ 2; 2 ] [ 1.0; 2.0; 3.0; 4.0 ] ]
            raisesWith "cut.mat: truncated" (fun () -> Mat.parse "cut.mat" bytes[.. bytes.Length - 9])
        }

        test "a truncated compressed fixture is rejected" {
            let path = fixture "stanford_cars" "devkit/cars_train_annos.mat"
            let bytes = File.ReadAllBytes path
            raisesWith "cut.mat:" (fun () -> Mat.parse "cut.mat" bytes[.. bytes.Length - 40])
        }

        test "sparse, complex and unknown classes are rejected by name" {
            raisesWith "sparse" (fun () -> Mat.parse "f.mat" (file [ matrix mxSPARSE [ 1; 1 ] "sp" [||] ]))
            raisesWith "complex" (fun () ->
                Mat.parse "f.mat" (file [ matrixWith complexFlag mxDOUBLE [ 1; 1 ] "z" (element miDOUBLE (float64 1.0)) ]))
            raisesWith "unsupported class 16" (fun () -> Mat.parse "f.mat" (file [ matrix 16 [ 1; 1 ] "fn" [||] ]))
        }

        test "a missing variable lists the ones present" {
            let vars = Mat.parse "f.mat" (file [ doubles "a" [ 1; 1 ] [ 1.0 ] ])
            raisesWith "no variable or field 'b' (has: a)" (fun () -> Mat.get "f.mat" "b" vars)
        }

        test "MATLAB 7.3 files are named as such" {
            let bytes = Array.append (Encoding.ASCII.GetBytes("MATLAB 7.3 MAT-file".PadRight 128)) [||]
            raisesWith "7.3" (fun () -> Mat.parse "v73.mat" bytes)
        }
    ]

[<Tests>]
let tests = testList "Mat" [ fixtureTests; writtenFileTests; errorTests ]
