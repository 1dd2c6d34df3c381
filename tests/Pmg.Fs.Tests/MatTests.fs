module Pmg.Fs.Tests.MatTests

open System
open System.IO
open System.Text
open Expecto
open Pmg.Fs.Data
open Pmg.Fs.Data.Mat
open Pmg.Fs.Tests.MatWriter
open Pmg.Fs.Tests.TestKit

/// A generated miniature's file.
let private fixture folder file = Path.Combine(FgvcMini.dataset folder, file)

let private raisesWith (fragment: string) (f: unit -> 'a) =
    try
        f () |> ignore
        failtestf "expected a DatasetInvalid error mentioning '%s'" fragment
    with :? Pmg.Fs.PmgException as e when (match e.Error with Pmg.Fs.DatasetInvalid _ -> true | _ -> false) ->
        Expect.stringContains e.Message fragment "error message"

let private fixtureTests =
    testList "generated miniatures" [
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
            use dir = new TempDir "mat"
            let path = dir.File "round-trip.mat"
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
        }

        test "uint8, uint16 and int32 arrays and a compressed struct array read back with their values" {
            let bytes =
                file [
                    uint8s "u8" [ 1; 3 ] [ 0uy; 7uy; 255uy ]
                    compressed (uint16s "u16" [ 2; 1 ] [ 513; 65535 ])
                    int32s "i32" [ 1; 2 ] [ -5; 100000 ]
                    compressed (
                        structs "annotations" [ 1; 2 ] [ "bbox_x2"; "class"; "fname" ] [
                            [ uint16s "" [ 1; 1 ] [ 569 ]; uint8s "" [ 1; 1 ] [ 14uy ]; text "" "00001.jpg" ]
                            [ uint16s "" [ 1; 1 ] [ 868 ]; uint8s "" [ 1; 1 ] [ 3uy ]; text "" "00002.jpg" ] ]) ]
            let vars = Mat.parse "typed.mat" bytes
            Expect.equal vars["u8"] (Numeric([| 1; 3 |], [| 0.0; 7.0; 255.0 |])) "uint8"
            Expect.equal vars["u16"] (Numeric([| 2; 1 |], [| 513.0; 65535.0 |])) "uint16"
            Expect.equal vars["i32"] (Numeric([| 1; 2 |], [| -5.0; 100000.0 |])) "int32, negative included"
            let annotations = Mat.toStructs vars["annotations"]
            Expect.equal (annotations |> Array.map (fun a -> Mat.toInt a["bbox_x2"], Mat.toInt a["class"], Mat.toString a["fname"]))
                [| 569, 14, "00001.jpg"; 868, 3, "00002.jpg" |] "struct elements in order"
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

/// Prints every variable of each MAT file named on the command line as scipy.io.loadmat reads it, one line per
/// variable: "name: class dims values", structs and cells nested in braces, elements in column-major order.
/// mat_dtype=True gives each array its MATLAB class (a double stored as uint8 reads as float64), so the array
/// flags are checked, not only the storage types.
let private describeWithScipy = """
import sys, numpy as np, scipy.io as sio
def show(v):
    dims = 'x'.join(str(d) for d in v.shape)
    flat = v.flatten(order='F')
    if v.dtype.names:
        return 'struct %s {%s}' % (dims, ' | '.join(';'.join(n + '=' + show(e[n]) for n in v.dtype.names) for e in flat))
    if v.dtype == object:
        return 'cell %s {%s}' % (dims, ' | '.join(show(e) for e in flat))
    if v.dtype.kind == 'U':
        return 'char %s %s' % (dims, ','.join(repr(str(s)) for s in flat))
    return '%s %s %s' % (v.dtype, dims, ','.join(repr(x) for x in flat.tolist()))
for path in sys.argv[1:]:
    for name, value in sorted(sio.loadmat(path, mat_dtype=True).items()):
        if not name.startswith('__'):
            print('%s: %s' % (name, show(value)))
"""

/// scipy's reading of MAT files, one line per variable; skips the test where no python3 with scipy is installed.
let private scipyReads (paths: string list) : string list =
    match pythonWithScipy.Force() with
    | None -> skiptest "needs python3 with scipy (/usr/bin/python3 or python3 on PATH) to check the MAT writer against scipy.io.loadmat"
    | Some python ->
        let r = run python ([ "-c"; describeWithScipy ] @ paths) None []
        Expect.equal r.Code 0 ("scipy.io.loadmat reads the files: " + r.Err)
        r.Out.Split('\n', StringSplitOptions.RemoveEmptyEntries) |> List.ofArray

let private scipyTests =
    testList "scipy" [
        test "scipy.io.loadmat reads the writer's output: every class, compressed and plain" {
            use dir = new TempDir "mat-scipy"
            let path = dir.File "all.mat"
            write path [
                compressed (doubles "d" [ 2; 3 ] [ 1.0; 2.0; 3.0; 4.0; 5.5; -6.0 ])
                uint8s "u8" [ 1; 3 ] [ 0uy; 7uy; 255uy ]
                compressed (uint16s "u16" [ 1; 2 ] [ 513; 65535 ])
                int32s "i32" [ 2; 1 ] [ -5; 100000 ]
                doublesAsBytes "small" [ 1; 1 ] [ 200uy ]
                text "s" "hello"
                chars "names" [ "ab"; "cd" ]
                cell "c" [ 1; 2 ] [ text "" "x"; doubles "" [ 1; 1 ] [ 42.0 ] ]
                compressed (
                    structs "st" [ 1; 2 ] [ "a"; "name" ] [
                        [ uint8s "" [ 1; 1 ] [ 7uy ]; text "" "first" ]
                        [ uint16s "" [ 1; 1 ] [ 513 ]; text "" "second" ] ]) ]
            Expect.equal (scipyReads [ path ]) [
                "c: cell 1x2 {char 1 'x' | float64 1x1 42.0}"
                "d: float64 2x3 1.0,2.0,3.0,4.0,5.5,-6.0"
                "i32: int32 2x1 -5,100000"
                "names: char 2 'ab','cd'"
                "s: char 1 'hello'"
                "small: float64 1x1 200.0"
                "st: struct 1x2 {a=uint8 1x1 7;name=char 1 'first' | a=uint16 1x1 513;name=char 1 'second'}"
                "u16: uint16 1x2 513,65535"
                "u8: uint8 1x3 0,7,255" ] "scipy's view of every variable"
        }

        test "scipy.io.loadmat reads the generated Cars and Dogs annotation files with the official classes" {
            let cars = fixture "stanford_cars" "devkit/cars_train_annos.mat"
            let dogs = fixture "stanford_dogs" "train_list.mat"
            let lines = scipyReads [ cars; dogs ]
            let line name = lines |> List.find (fun l -> l.StartsWith(name + ": "))
            let annotations = line "annotations"
            Expect.stringStarts annotations "annotations: struct 1x9 {bbox_x1=uint8 1x1 " "a 1x9 struct array, uint8 x1"
            for field in [ "bbox_y1=uint8 1x1"; "bbox_x2=uint16 1x1"; "bbox_y2=uint8 1x1"; "class=uint8 1x1"; "fname=char 1 '" ] do
                Expect.equal (annotations.Split(field).Length - 1) 9 $"{field} in every element"
            // What scipy reads is what our reader reads.
            let ours = Mat.read cars |> Mat.get cars "annotations" |> Mat.toStructs
            let expected =
                ours
                |> Array.map (fun a -> sprintf "class=uint8 1x1 %d;fname=char 1 '%s'" (Mat.toInt a["class"]) (Mat.toString a["fname"]))
            for e in expected do
                Expect.stringContains annotations e "same class and file name as Mat.fs reads"
            Expect.stringStarts (line "labels") "labels: float64 9x1 1.0,1.0,1.0,2.0,2.0,2.0,3.0,3.0,3.0" "dogs labels, double"
            Expect.stringStarts (line "file_list") "file_list: cell 9x1 {char 1 'n02085620-Chihuahua/n02085620_10001.jpg' | " "dogs file_list, a cell column"
        }

        // Files written by scipy.io.savemat (committed in data/, a few hundred bytes each): a second, independent
        // writer for the reader.
        test "a scipy-written compressed file: Cars-style struct array and cell of names" {
            let path = dataFile "scipy-compressed.mat"
            let vars = Mat.read path
            let annotations = Mat.get path "annotations" vars |> Mat.toStructs
            let value f (a: Map<string, MatValue>) = Mat.toInt a[f]
            Expect.equal (annotations |> Array.map (fun a -> value "bbox_x1" a, value "bbox_y1" a, value "bbox_x2" a, value "bbox_y2" a))
                [| 39, 116, 569, 375; 36, 116, 868, 587 |] "boxes (uint8 and uint16)"
            Expect.equal (annotations |> Array.map (fun a -> value "class" a, Mat.toString a["fname"])) [| 14, "00001.jpg"; 3, "00002.jpg" |] "class, fname"
            Expect.equal (Mat.get path "class_names" vars |> Mat.toStrings) [| "AM General Hummer SUV 2000"; "Acura RL Sedan 2012" |] "class names"
        }

        test "a scipy-written plain file: Dogs-style cell column, double labels, int32 and char matrices" {
            let path = dataFile "scipy-plain.mat"
            let vars = Mat.read path
            Expect.equal (Mat.get path "file_list" vars |> Mat.toStrings)
                [| "n02085620-Chihuahua/n02085620_10074.jpg"; "n02085782-Japanese_spaniel/n02085782_1039.jpg" |] "file list"
            Expect.equal vars["labels"] (Numeric([| 2; 1 |], [| 1.0; 2.0 |])) "labels"
            Expect.equal vars["m"] (Numeric([| 2; 3 |], [| 1.0; 4.0; -2.0; 5.0; 3.0; -600000.0 |])) "int32 matrix, column-major"
            Expect.equal (Mat.toStrings vars["names"]) [| "ab"; "cd" |] "char matrix rows"
        }
    ]

[<Tests>]
let tests = testList "Mat" [ fixtureTests; writtenFileTests; errorTests; scipyTests ]
