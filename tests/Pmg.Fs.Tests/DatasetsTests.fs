module Pmg.Fs.Tests.DatasetsTests

open System
open System.IO
open System.Text.Json
open Expecto
open Pmg.Fs
open Pmg.Fs.Data
open SixLabors.ImageSharp
open Pmg.Fs.Tests.TestKit

/// A generated miniature (FgvcMini).
let private dataset = FgvcMini.dataset

let rec private copyTree (source: string) (target: string) =
    Directory.CreateDirectory target |> ignore
    for f in Directory.GetFiles source do
        File.Copy(f, Path.Combine(target, Path.GetFileName f))
    for d in Directory.GetDirectories source do
        copyTree d (Path.Combine(target, Path.GetFileName d))

let private datasetError (fragments: string list) (f: unit -> 'a) =
    try
        f () |> ignore
        failtestf "expected a DatasetInvalid error mentioning %A" fragments
    with :? PmgException as e when (match e.Error with DatasetInvalid _ | InvalidSetting _ -> true | _ -> false) ->
        for fragment in fragments do
            Expect.stringContains e.Message fragment "error message"

let private expectWellFormed (index: DatasetIndex) =
    for s in Array.append index.Train index.Test do
        Expect.isTrue (Path.IsPathRooted s.Path) $"absolute path {s.Path}"
        Expect.isTrue (File.Exists s.Path) $"existing image {s.Path}"
        Expect.isTrue (s.Label >= 0 && s.Label < index.Classes.Length) $"label in range {s.Label}"
    Expect.isEmpty index.Problems "no problems"

let private expectCounts classes train test (index: DatasetIndex) =
    Expect.equal index.Classes.Length classes "classes"
    Expect.equal index.Train.Length train "train samples"
    Expect.equal index.Test.Length test "test samples"

let private labelsCover (index: DatasetIndex) =
    let used = Array.append index.Train index.Test |> Array.map (fun s -> s.Label) |> Array.distinct |> Array.sort
    Expect.equal used [| 0 .. index.Classes.Length - 1 |] "every class used"

let private cubTests =
    testList "Cub" [
        test "the fixture loads with 4 classes and 12/12 samples with boxes" {
            let index = Cub.load (dataset "CUB_200_2011")
            expectCounts 4 12 12 index
            expectWellFormed index
            labelsCover index
            Expect.equal index.Classes[0] "Black_footed_Albatross" "class name without its number"
            Expect.all (Array.append index.Train index.Test) (fun s -> s.Box.IsSome && s.TrimBottom = 0) "boxes"
            // bounding_boxes.txt id 1: "11.4 7.4 91.2 59.2" -> covering integer box
            let first = index.Train |> Array.find (fun s -> s.Path.EndsWith "Black_footed_Albatross_0000_100001.jpg")
            Expect.equal first.Box (Some { X = 11; Y = 7; Width = 92; Height = 60 }) "rounded outward"
        }

        test "a missing file names the file and the expected layout" {
            use dir = new TempDir "data"
            datasetError [ "CUB-200-2011"; Path.Combine(dir.Path, "images.txt"); "Expected the dataset folder" ] (fun () ->
                Cub.load dir.Path)
        }

        test "bad labels and duplicate ids become problems, not failures" {
            use dir = new TempDir "data"
            copyTree (dataset "CUB_200_2011") dir.Path
            let labels = Path.Combine(dir.Path, "image_class_labels.txt")
            let lines = File.ReadAllLines labels
            lines[1] <- "2 9"
            File.WriteAllLines(labels, Array.append lines [| "5 1" |])
            let index = Cub.load dir.Path
            Expect.equal (index.Train.Length + index.Test.Length) 23 "one sample dropped"
            Expect.equal index.Problems.Length 2 "two problems"
            Expect.exists index.Problems (fun p -> p.Problem.Contains "out of range") "label out of range"
            Expect.exists index.Problems (fun p -> p.Problem.Contains "duplicate image id 5") "duplicate id"
        }
    ]

let private carsTests =
    testList "Cars" [
        test "the devkit fixture loads with 3 classes and 9/9 samples" {
            let index = Cars.load (dataset "stanford_cars")
            expectCounts 3 9 9 index
            expectWellFormed index
            labelsCover index
            Expect.all index.Train (fun s -> s.Path.Contains "cars_train") "train images from cars_train/"
            Expect.all index.Test (fun s -> s.Path.Contains "cars_test") "test images from cars_test/"
            Expect.all index.Train (fun s -> s.Box.IsSome) "boxes"
        }

        test "missing test labels name the file and both places looked in" {
            use dir = new TempDir "data"
            copyTree (dataset "stanford_cars") dir.Path
            File.Delete(Path.Combine(dir.Path, "cars_test_annos_withlabels.mat"))
            datasetError [ "cars_test_annos_withlabels.mat"; Path.Combine(dir.Path, "devkit") ] (fun () ->
                Cars.load dir.Path)
        }

        test "the car_ims/ + cars_annos.mat variant loads" {
            use dir = new TempDir "data"
            let images = Directory.CreateDirectory(Path.Combine(dir.Path, "car_ims")).FullName
            let source = Path.Combine(dataset "stanford_cars", "cars_train")
            for i in 1..3 do
                File.Copy(Path.Combine(source, $"0000{i}.jpg"), Path.Combine(images, $"00000{i}.jpg"))
            let annotation (file: string) (cls: byte) (isTest: byte) =
                [ MatWriter.chars "" [ file ]
                  MatWriter.doublesAsBytes "" [ 1; 1 ] [ 2uy ]
                  MatWriter.doublesAsBytes "" [ 1; 1 ] [ 3uy ]
                  MatWriter.doublesAsBytes "" [ 1; 1 ] [ 40uy ]
                  MatWriter.doublesAsBytes "" [ 1; 1 ] [ 30uy ]
                  MatWriter.doublesAsBytes "" [ 1; 1 ] [ cls ]
                  MatWriter.doublesAsBytes "" [ 1; 1 ] [ isTest ] ]
            MatWriter.write (Path.Combine(dir.Path, "cars_annos.mat")) [
                MatWriter.compressed (
                    MatWriter.structs "annotations" [ 1; 4 ]
                        [ "relative_im_path"; "bbox_x1"; "bbox_y1"; "bbox_x2"; "bbox_y2"; "class"; "test" ]
                        [ annotation "car_ims/000001.jpg" 1uy 0uy
                          annotation "car_ims/000002.jpg" 2uy 0uy
                          annotation "car_ims/000003.jpg" 2uy 1uy
                          annotation "car_ims/000009.jpg" 1uy 1uy ])
                MatWriter.cell "class_names" [ 1; 2 ] [ MatWriter.chars "" [ "AM General Hummer" ]; MatWriter.chars "" [ "Acura RL" ] ] ]
            let index = Cars.load dir.Path
            expectCounts 2 2 1 index
            Expect.equal index.Classes [| "AM General Hummer"; "Acura RL" |] "class names"
            Expect.equal (index.Test[0].Label, index.Test[0].Box) (1, Some { X = 1; Y = 2; Width = 39; Height = 28 }) "test sample"
            Expect.equal (index.Problems |> List.map (fun p -> Path.GetFileName p.File, p.Problem)) [ "000009.jpg", "missing image file" ] "missing image"
        }
    ]

let private aircraftTests =
    testList "Aircraft" [
        test "the variant level loads 3 classes, 18/9, a slash-named class and the banner trim" {
            let index = Aircraft.load (dataset "fgvc-aircraft-2013b", "variant")
            expectCounts 3 18 9 index
            expectWellFormed index
            labelsCover index
            Expect.contains index.Classes "F/A-18" "slash in a class name"
            Expect.contains index.Classes "Cessna 172" "space in a class name"
            Expect.all (Array.append index.Train index.Test) (fun s -> s.TrimBottom = 20) "20-pixel banner"
            let first = index.Train |> Array.find (fun s -> s.Path.EndsWith "1000001.jpg")
            // images_box.txt: "1000001 3 4 96 64", 1-based inclusive corners
            Expect.equal first.Box (Some { X = 2; Y = 3; Width = 94; Height = 61 }) "box"
        }

        for level in [ "family"; "manufacturer" ] do
            test $"the {level} level loads from the data/ folder too" {
                let index = Aircraft.load (Path.Combine(dataset "fgvc-aircraft-2013b", "data"), level)
                expectCounts 3 18 9 index
                expectWellFormed index
                labelsCover index
            }

        test "an unknown level lists the valid ones" {
            datasetError [ "variant, family, manufacturer" ] (fun () ->
                Aircraft.load (dataset "fgvc-aircraft-2013b", "model"))
        }
    ]

let private dogsTests =
    testList "Dogs" [
        test "the fixture loads 3 breeds and 9/9 samples with boxes" {
            let index = Dogs.load (dataset "stanford_dogs")
            expectCounts 3 9 9 index
            expectWellFormed index
            labelsCover index
            Expect.equal index.Classes [| "Chihuahua"; "Japanese_spaniel"; "Maltese_dog" |] "breeds by label"
            Expect.all (Array.append index.Train index.Test) (fun s -> s.Box.IsSome) "boxes from Annotation/"
            for s in Array.append index.Train index.Test do
                Expect.stringContains s.Path index.Classes[s.Label] "image in its breed's folder"
        }
    ]

let private folderTests =
    testList "Folder" [
        test "classes are the ordinal union of train and test subfolders; every file is a sample, whatever its extension" {
            use dir = new TempDir "data"
            let touch (relative: string) =
                let path = Path.Combine(dir.Path, relative)
                Directory.CreateDirectory(Path.GetDirectoryName path) |> ignore
                File.WriteAllBytes(path, [||])
            for f in [ "train/b/1.jpg"; "train/B/2.PNG"; "train/a/3.jpeg"; "train/a/notes.txt"; "test/c/4.bmp"; "test/a/5.jpg" ] do
                touch f
            let index = Folder.load dir.Path
            Expect.equal index.Classes [| "B"; "a"; "b"; "c" |] "ordinal order"
            Expect.equal (index.Train |> Array.map (fun s -> Path.GetFileName s.Path, s.Label)) [| "2.PNG", 0; "3.jpeg", 1; "notes.txt", 1; "1.jpg", 2 |] "train (the verdict judges notes.txt)"
            Expect.equal (index.Test |> Array.map (fun s -> Path.GetFileName s.Path, s.Label)) [| "5.jpg", 1; "4.bmp", 3 |] "test"
        }

        test "a missing test folder is named" {
            use dir = new TempDir "data"
            Directory.CreateDirectory(Path.Combine(dir.Path, "train")) |> ignore
            datasetError [ Path.Combine(dir.Path, "test"); "train/<class>/" ] (fun () -> Folder.load dir.Path)
        }
    ]

let private facadeTests =
    testList "Dataset" [
        test "names parse to kinds and load" {
            Expect.equal (Dataset.parse "CUB") Dataset.Kind.Cub "case-insensitive"
            Expect.equal (Dataset.parse "aircraft") (Dataset.Kind.Aircraft "variant") "variant by default"
            let index = Dataset.load (Dataset.parse "dogs") (dataset "stanford_dogs")
            expectCounts 3 9 9 index
        }

        test "an unknown name lists the valid ones" {
            datasetError [ "'imagenet'"; "cub, cars, aircraft, dogs, folder" ] (fun () -> Dataset.parse "imagenet")
        }
    ]

let private inspectTests =
    testList "Inspect" [
        test "the CUB fixture is clean and has one grayscale image" {
            let report = Inspect.inspect (Cub.load (dataset "CUB_200_2011"))
            Expect.equal (report.Classes, report.Train, report.Test) (4, 12, 12) "counts"
            Expect.equal (report.Grayscale, report.Cmyk) (1, 0) "image id 3 is grayscale"
            Expect.isEmpty report.Problems "no problems"
        }

        test "a truncated and a deleted JPEG are exactly the problems" {
            use dir = new TempDir "data"
            copyTree (dataset "CUB_200_2011") dir.Path
            let index = Cub.load dir.Path
            let truncated = index.Train[2].Path
            let deleted = index.Test[2].Path
            let bytes = File.ReadAllBytes truncated
            File.WriteAllBytes(truncated, bytes[.. bytes.Length / 2])
            File.Delete deleted
            let report = Inspect.inspect index
            Expect.equal (report.Train, report.Test) (11, 11) "usable counts"
            Expect.equal report.Grayscale 1 "grayscale still counted"
            let problems = report.Problems |> List.map (fun p -> p.File, (p.Problem.Split ':').[0]) |> List.sort
            Expect.equal problems (List.sort [ truncated, "no JPEG end-of-image marker"; deleted, "missing image file" ]) "problems"
            use json = JsonDocument.Parse(Inspect.toJson report)
            let root = json.RootElement
            Expect.equal (root.GetProperty("train").GetInt32(), root.GetProperty("grayscale").GetInt32()) (11, 1) "json counts"
            Expect.equal (root.GetProperty("problems").GetArrayLength()) 2 "json problems"
            let firstFile = root.GetProperty("problems").[0].GetProperty("file").GetString()
            Expect.equal firstFile report.Problems.Head.File "json file"
        }
    ]


/// A `folder` dataset under `root`: per split, per class, `count` good JPEGs.
let private folderOf (root: string) (classes: string list) (count: int) =
    TestKit.folderDataset root classes (fun _ -> count) (fun dir _ c i ->
        use img = Synthetic.renderClass 32 (abs (hash c) % 3) i
        img.SaveAsJpeg(Path.Combine(dir, sprintf "%d.jpg" i)))

/// What `pmg data` decides (the layout, then the refusal of its inspection) and what training decides
/// (Run.openData): each None, or the DatasetInvalid message.
let private dataAndTrain (root: string) =
    let invalid (f: unit -> string option) =
        try
            f ()
        with :? PmgException as e when (match e.Error with DatasetInvalid _ -> true | _ -> false) -> Some e.Message
    let data =
        invalid (fun () ->
            let index = Dataset.load Dataset.Kind.Folder root
            Inspect.refusal index (Inspect.inspect index))
    let train =
        invalid (fun () ->
            Run.openData (Experiment.OnDisk { Kind = Dataset.Kind.Folder; Root = root }) false |> ignore
            None)
    data, train

let private refusalTests =
    testList "refusal" [
        let refused (name: string) (arrange: string -> unit) (mentions: string -> string list) =
            test name {
                use dir = new TempDir "refusal"
                let root = dir.File "data"
                arrange root
                let data, train = dataAndTrain root
                Expect.isSome data "data refuses"
                Expect.equal train data "training refuses with the same message"
                for m in mentions root do
                    Expect.stringContains data.Value m "the message names it"
            }
        test "a good dataset is accepted by both" {
            use dir = new TempDir "refusal"
            folderOf dir.Path [ "a"; "b" ] 1
            Expect.equal (dataAndTrain dir.Path) (None, None) "accepted"
        }
        refused "a class only in test/" (fun root -> folderOf root [ "a"; "b" ] 1; Directory.CreateDirectory(Path.Combine(root, "test", "c")) |> ignore; File.Copy(Path.Combine(root, "test", "a", "1.jpg"), Path.Combine(root, "test", "c", "1.jpg")))
            (fun _ -> [ "class c"; "no usable training images" ])
        refused "train/c a file, not a folder" (fun root -> folderOf root [ "a"; "b" ] 1; File.WriteAllText(Path.Combine(root, "train", "c"), "x"))
            (fun root -> [ Path.Combine(root, "train", "c"); "is a file"; "move it" ])
        refused "a class folder with no usable image" (fun root -> folderOf root [ "a"; "b" ] 1; for f in Directory.GetFiles(Path.Combine(root, "train", "b")) do File.WriteAllBytes(f, Array.create 64 7uy))
            (fun _ -> [ "class b"; "no usable training images" ])
        refused "a folder symlink loop where a class belongs" (fun root ->
            folderOf root [ "a"; "b" ] 1
            let loop = Path.Combine(root, "train", "d_loop")
            Directory.CreateSymbolicLink(loop, loop) |> ignore)
            (fun root -> [ Path.Combine(root, "train", "d_loop"); "symbolic link" ])
        refused "a single class" (fun root -> folderOf root [ "a" ] 1) (fun _ -> [ "1 class"; "at least 2" ])
        refused "a test split whose every image is unreadable" (fun root ->
            folderOf root [ "a"; "b" ] 1
            for f in Directory.GetFiles(Path.Combine(root, "test"), "*", SearchOption.AllDirectories) do
                let b = File.ReadAllBytes f
                File.WriteAllBytes(f, b[.. b.Length / 2]))
            (fun root -> [ Path.Combine(root, "test"); "no usable test images"; "cut off" ])
        test "a class of only .webp files is listed and used" {
            use dir = new TempDir "refusal"
            folderOf dir.Path [ "a"; "b" ] 1
            for split in [ "train"; "test" ] do
                let w = Path.Combine(dir.Path, split, "w")
                Directory.CreateDirectory w |> ignore
                use img = Synthetic.renderClass 32 2 5
                img.SaveAsWebp(Path.Combine(w, "1.webp"))
            let index = Dataset.load Dataset.Kind.Folder dir.Path
            Expect.equal index.Classes [| "a"; "b"; "w" |] "listed"
            let report = Inspect.inspect index
            Expect.equal (report.Train, report.Test) (3, 3) "usable"
            Expect.equal (dataAndTrain dir.Path) (None, None) "accepted by both"
        }
    ]

[<Tests>]
let tests =
    testList "Datasets" [ cubTests; carsTests; aircraftTests; dogsTests; folderTests; facadeTests; inspectTests; refusalTests ]
