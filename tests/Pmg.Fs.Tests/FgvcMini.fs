/// Miniature copies of the four FGVC benchmarks in their official on-disk layouts, generated at test time (once
/// per test process, into a temporary folder): CUB-200-2011, Stanford Cars (devkit), FGVC-Aircraft 2013b and
/// Stanford Dogs. Every image is a small JPEG of dark noise with one bright 10x10 square whose colour encodes the
/// class, inside the annotated box, so that a model can learn the classes. Deterministic: the same bytes in every
/// run (fixed seeds).
///
/// | folder              | classes    | train        | test | oddities                                               |
/// |---------------------|------------|--------------|------|--------------------------------------------------------|
/// | CUB_200_2011        | 4          | 12           | 12   | image id 3 is a grayscale JPEG; bounding_boxes.txt      |
/// | stanford_cars       | 3          | 9            | 9    | devkit .mat files (bbox uint8/uint16, class uint8,      |
/// |                     |            |              |      | fname char), test annotations without class plus        |
/// |                     |            |              |      | cars_test_annos_withlabels.mat, shuffled order          |
/// | fgvc-aircraft-2013b | 3 variants | 18 trainval  | 9    | variant F/A-18 has a slash; a 20-pixel white banner     |
/// |                     |            |              |      | with a dark stroke at the bottom; family, manufacturer  |
/// | stanford_dogs       | 3          | 9            | 9    | train/test/file_list.mat (cells, double labels);        |
/// |                     |            |              |      | Annotation/ XML files without extension                 |
module Pmg.Fs.Tests.FgvcMini

open System
open System.IO
open SixLabors.ImageSharp
open SixLabors.ImageSharp.Formats.Jpeg
open SixLabors.ImageSharp.PixelFormats

/// The class colours of the squares: far apart, so that one 10x10 patch tells the class.
let classColours =
    [| Rgb24(255uy, 40uy, 40uy); Rgb24(40uy, 255uy, 40uy); Rgb24(60uy, 90uy, 255uy); Rgb24(255uy, 230uy, 40uy) |]

let squareSize = 10

/// Rows of FGVC-Aircraft's copyright banner.
let bannerHeight = 20

/// Image of dark noise (levels 0..63) with the class square at a random place inside `area` (x, y, w, h).
let private noiseWithSquare (rng: Random) (width: int) (height: int) (colour: Rgb24) (ax, ay, aw, ah) =
    let img = new Image<Rgb24>(width, height)
    for y in 0 .. height - 1 do
        for x in 0 .. width - 1 do
            img[x, y] <- Rgb24(byte (rng.Next 64), byte (rng.Next 64), byte (rng.Next 64))
    let sx = ax + rng.Next(max 1 (aw - squareSize))
    let sy = ay + rng.Next(max 1 (ah - squareSize))
    for y in sy .. sy + squareSize - 1 do
        for x in sx .. sx + squareSize - 1 do
            img[x, y] <- colour
    img

let private saveJpeg (path: string) (img: Image<Rgb24>) =
    use img = img
    Directory.CreateDirectory(Path.GetDirectoryName path) |> ignore
    img.SaveAsJpeg(path, JpegEncoder(Quality = 90))

/// A single-channel (luminance) JPEG, as some of CUB's photographs are.
let private saveGrayJpeg (path: string) (img: Image<Rgb24>) =
    use img = img
    use gray = img.CloneAs<L8>()
    Directory.CreateDirectory(Path.GetDirectoryName path) |> ignore
    gray.SaveAsJpeg(path, JpegEncoder(Quality = 90, ColorType = JpegColorType.Luminance))

let private writeLines (path: string) (lines: string seq) =
    Directory.CreateDirectory(Path.GetDirectoryName path) |> ignore
    File.WriteAllLines(path, lines)

let private size (rng: Random) (minW, maxW) (minH, maxH) = minW + rng.Next(maxW - minW + 1), minH + rng.Next(maxH - minH + 1)

// ---------------------------------------------------------------------------------------------------

/// CUB-200-2011: images/<nnn.Class>/<Class>_<k>_<id>.jpg, images.txt, image_class_labels.txt,
/// train_test_split.txt (alternating, 1 = train), classes.txt and bounding_boxes.txt (x y w h, one decimal).
/// Image 1 is 114x74, so its box "11.4 7.4 91.2 59.2" has fractional corners; image 3 is grayscale.
module Cub =
    let folder = "CUB_200_2011"
    let classes = [| "Black_footed_Albatross"; "Laysan_Albatross"; "Sooty_Albatross"; "Groove_billed_Ani" |]
    let perClass = 6
    let grayscaleId = 3

    let generate (root: string) =
        let dir = Path.Combine(root, folder)
        let rng = Random 200
        let images =
            [ for c in 0 .. classes.Length - 1 do
                  for k in 0 .. perClass - 1 ->
                      let id = c * perClass + k + 1
                      let w, h = if id = 1 then 114, 74 else size rng (60, 120) (50, 110)
                      let relative = sprintf "%03d.%s/%s_%04d_%d.jpg" (c + 1) classes.[c] classes.[c] k (100000 + id)
                      id, c, relative, w, h ]
        for id, c, relative, w, h in images do
            // The box is the central 80% of the image; the square lies inside it.
            let box = int (0.1 * float w) + 1, int (0.1 * float h) + 1, int (0.8 * float w) - 2, int (0.8 * float h) - 2
            let img = noiseWithSquare rng w h classColours.[c] box
            let path = Path.Combine(dir, "images", relative)
            if id = grayscaleId then saveGrayJpeg path img else saveJpeg path img
        let f (v: float) = v.ToString("0.0", Globalization.CultureInfo.InvariantCulture)
        writeLines (Path.Combine(dir, "images.txt")) [ for id, _, rel, _, _ in images -> sprintf "%d %s" id rel ]
        writeLines (Path.Combine(dir, "image_class_labels.txt")) [ for id, c, _, _, _ in images -> sprintf "%d %d" id (c + 1) ]
        writeLines (Path.Combine(dir, "train_test_split.txt")) [ for id, _, _, _, _ in images -> sprintf "%d %d" id (id % 2) ]
        writeLines (Path.Combine(dir, "classes.txt")) [ for c in 0 .. classes.Length - 1 -> sprintf "%d %03d.%s" (c + 1) (c + 1) classes.[c] ]
        writeLines (Path.Combine(dir, "bounding_boxes.txt"))
            [ for id, _, _, w, h in images ->
                  sprintf "%d %s %s %s %s" id (f (0.1 * float w)) (f (0.1 * float h)) (f (0.8 * float w)) (f (0.8 * float h)) ]

/// Stanford Cars, devkit layout: cars_train/ and cars_test/ (00001.jpg ...), devkit/cars_meta.mat (class_names, a
/// 1x3 cell), devkit/cars_train_annos.mat and devkit/cars_test_annos.mat (1xN struct arrays "annotations" with
/// bbox_x1, bbox_y1, bbox_y2 as uint8, bbox_x2 as uint16, class as uint8 and fname as char; the test file without
/// class), and cars_test_annos_withlabels.mat (the test annotations with class), all zlib-compressed, each in a
/// shuffled order.
module Cars =
    let folder = "stanford_cars"
    let classes = [| "AM General Hummer SUV 2000"; "Acura RL Sedan 2012"; "Acura TL Sedan 2012" |]
    let perSplit = 9

    type Annotation = { X1: int; Y1: int; X2: int; Y2: int; Class: int; File: string }

    let private annotations (withClass: bool) (items: Annotation list) =
        let fields = [ "bbox_x1"; "bbox_y1"; "bbox_x2"; "bbox_y2" ] @ (if withClass then [ "class" ] else []) @ [ "fname" ]
        MatWriter.structs "annotations" [ 1; items.Length ] fields
            [ for a in items ->
                  [ MatWriter.uint8s "" [ 1; 1 ] [ byte a.X1 ]
                    MatWriter.uint8s "" [ 1; 1 ] [ byte a.Y1 ]
                    MatWriter.uint16s "" [ 1; 1 ] [ a.X2 ]
                    MatWriter.uint8s "" [ 1; 1 ] [ byte a.Y2 ]
                    if withClass then MatWriter.uint8s "" [ 1; 1 ] [ byte (a.Class + 1) ]
                    MatWriter.text "" a.File ] ]

    let private shuffled (rng: Random) (items: 'a list) = items |> List.sortBy (fun _ -> rng.Next())

    let generate (root: string) =
        let dir = Path.Combine(root, folder)
        let rng = Random 196
        let split (subfolder: string) =
            [ for i in 1 .. perSplit ->
                  let c = (i - 1) % classes.Length
                  let w, h = size rng (200, 290) (120, 200)
                  let a = { X1 = 1 + rng.Next 30; Y1 = 1 + rng.Next 30; X2 = w - 1 - rng.Next 10; Y2 = h - 1 - rng.Next 10; Class = c; File = sprintf "%05d.jpg" i }
                  // Corners are 1-based and inclusive.
                  let img = noiseWithSquare rng w h classColours.[c] (a.X1 - 1, a.Y1 - 1, a.X2 - a.X1, a.Y2 - a.Y1)
                  saveJpeg (Path.Combine(dir, subfolder, a.File)) img
                  a ]
        let train = split "cars_train" |> shuffled rng
        let test = split "cars_test" |> shuffled rng
        let devkit = Path.Combine(dir, "devkit")
        Directory.CreateDirectory devkit |> ignore
        MatWriter.writeCompressed (Path.Combine(devkit, "cars_meta.mat"))
            [ MatWriter.cell "class_names" [ 1; classes.Length ] [ for c in classes -> MatWriter.text "" c ] ]
        MatWriter.writeCompressed (Path.Combine(devkit, "cars_train_annos.mat")) [ annotations true train ]
        MatWriter.writeCompressed (Path.Combine(devkit, "cars_test_annos.mat")) [ annotations false test ]
        MatWriter.writeCompressed (Path.Combine(dir, "cars_test_annos_withlabels.mat")) [ annotations true test ]

/// FGVC-Aircraft 2013b: data/images/<id>.jpg with the 20-pixel banner, data/variants.txt, families.txt,
/// manufacturers.txt, images_box.txt (1-based inclusive corners, the banner left out), and for each level
/// (variant, family, manufacturer) and split (train, val, trainval, test) images_<level>_<split>.txt, plus the
/// unlabelled images_<split>.txt. Image 1000001 is 99x88, its box "3 4 96 64".
module Aircraft =
    let folder = "fgvc-aircraft-2013b"
    /// Variant, family, manufacturer of each class, in variants.txt order.
    let classes =
        [| "707-320", "Boeing 707", "Boeing"; "F/A-18", "F/A-18", "McDonnell Douglas"; "Cessna 172", "Cessna 172", "Cessna" |]
    let perClass = 9
    let firstId = 1000001

    let generate (root: string) =
        let data = Path.Combine(root, folder, "data")
        let rng = Random 2013
        let images =
            [ for c in 0 .. classes.Length - 1 do
                  for k in 0 .. perClass - 1 ->
                      let id = firstId + c * perClass + k
                      // Every third image train, val, test in turn.
                      let split = [| "train"; "val"; "test" |].[k % 3]
                      let w, h = if id = firstId then 99, 88 else size rng (60, 120) (70, 130)
                      id, c, split, w, h ]
        for id, c, _, w, h in images do
            let content = h - bannerHeight
            let img = noiseWithSquare rng w h classColours.[c] (3, 4, w - 6, content - 8)
            // The banner: white, with a dark stroke where the copyright text would be.
            for y in content .. h - 1 do
                for x in 0 .. w - 1 do
                    img[x, y] <- Rgb24(255uy, 255uy, 255uy)
            for y in content + 8 .. content + 11 do
                for x in 4 .. w / 2 do
                    img[x, y] <- Rgb24(30uy, 30uy, 30uy)
            saveJpeg (Path.Combine(data, "images", sprintf "%d.jpg" id)) img
        let name level c = let v, f, m = classes.[c] in match level with "variant" -> v | "family" -> f | _ -> m
        let ordinal (xs: string seq) = xs |> Seq.sortWith (fun a b -> String.CompareOrdinal(a, b))
        writeLines (Path.Combine(data, "variants.txt")) [ for c in 0 .. classes.Length - 1 -> name "variant" c ]
        writeLines (Path.Combine(data, "families.txt")) (ordinal [ for c in 0 .. classes.Length - 1 -> name "family" c ])
        writeLines (Path.Combine(data, "manufacturers.txt")) (ordinal [ for c in 0 .. classes.Length - 1 -> name "manufacturer" c ])
        writeLines (Path.Combine(data, "images_box.txt"))
            [ for id, _, _, w, h in images -> sprintf "%d 3 4 %d %d" id (w - 3) (h - bannerHeight - 4) ]
        let inSplit split = images |> List.filter (fun (_, _, s, _, _) -> s = split)
        let splits = [ "train", inSplit "train"; "val", inSplit "val"; "trainval", inSplit "train" @ inSplit "val"; "test", inSplit "test" ]
        for split, members in splits do
            writeLines (Path.Combine(data, sprintf "images_%s.txt" split)) [ for id, _, _, _, _ in members -> string id ]
            for level in [ "variant"; "family"; "manufacturer" ] do
                writeLines (Path.Combine(data, sprintf "images_%s_%s.txt" level split))
                    [ for id, c, _, _, _ in members -> sprintf "%d %s" id (name level c) ]

/// Stanford Dogs: Images/<wnid-breed>/<wnid>_<n>.jpg, Annotation/<wnid-breed>/<wnid>_<n> (VOC-style XML, no
/// extension), train_list.mat, test_list.mat and file_list.mat (file_list and annotation_list as Nx1 cells of
/// strings, labels as an Nx1 double array, 1-based), compressed.
module Dogs =
    let folder = "stanford_dogs"
    let breeds = [| "n02085620", "Chihuahua"; "n02085782", "Japanese_spaniel"; "n02085936", "Maltese_dog" |]
    let perBreed = 6

    let private listFile (path: string) (items: (string * int) list) =
        let column name (values: string list) = MatWriter.cell name [ values.Length; 1 ] [ for v in values -> MatWriter.text "" v ]
        MatWriter.writeCompressed path
            [ column "file_list" [ for f, _ in items -> f ]
              column "annotation_list" [ for f, _ in items -> Path.ChangeExtension(f, null) ]
              MatWriter.doubles "labels" [ items.Length; 1 ] [ for _, label in items -> float label ] ]

    let generate (root: string) =
        let dir = Path.Combine(root, folder)
        let rng = Random 120
        let images =
            [ for b in 0 .. breeds.Length - 1 do
                  let wnid, breed = breeds.[b]
                  for k in 0 .. perBreed - 1 ->
                      let file = sprintf "%s-%s/%s_%d.jpg" wnid breed wnid (10001 + b + 7 * k)
                      file, b, k % 2 = 0 ]
        for file, b, _ in images do
            let w, h = size rng (60, 120) (50, 100)
            let x1, y1, x2, y2 = 2, 3, w - 2, h - 3
            saveJpeg (Path.Combine(dir, "Images", file)) (noiseWithSquare rng w h classColours.[b] (x1, y1, x2 - x1, y2 - y1))
            let wnid, breed = breeds.[b]
            let name = Path.GetFileNameWithoutExtension file
            let xml =
                sprintf "<annotation><folder>%s</folder><filename>%s</filename><source><database>ImageNet database</database></source>" wnid name
                + sprintf "<size><width>%d</width><height>%d</height><depth>3</depth></size><segment>0</segment>" w h
                + sprintf "<object><name>%s</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>" breed
                + sprintf "<bndbox><xmin>%d</xmin><ymin>%d</ymin><xmax>%d</xmax><ymax>%d</ymax></bndbox></object></annotation>" x1 y1 x2 y2
            let annotation = Path.Combine(dir, "Annotation", Path.ChangeExtension(file, null))
            Directory.CreateDirectory(Path.GetDirectoryName annotation) |> ignore
            File.WriteAllText(annotation, xml)
        let pick train = [ for file, b, isTrain in images do if isTrain = train then (file, b + 1) ]
        listFile (Path.Combine(dir, "train_list.mat")) (pick true)
        listFile (Path.Combine(dir, "test_list.mat")) (pick false)
        listFile (Path.Combine(dir, "file_list.mat")) (pick true @ pick false)

// ---------------------------------------------------------------------------------------------------

/// Writes all four miniatures under `root`.
let generate (root: string) =
    Cub.generate root
    Cars.generate root
    Aircraft.generate root
    Dogs.generate root

/// The miniatures of this test process, generated on first use into a temporary folder removed at exit.
let private generated =
    lazy
        (let root = TestKit.processTempDir "fgvc-mini"
         generate root
         root)

/// The folder holding the four miniatures.
let root () = generated.Force()

/// One miniature's folder: CUB_200_2011, stanford_cars, fgvc-aircraft-2013b or stanford_dogs.
let dataset (folder: string) = Path.Combine(root (), folder)
