namespace Pmg.Fs.Data

open System
open System.IO
open Pmg.Fs

/// Helpers shared by the layout readers: file checks, line parsing and problem records.
module internal Layout =

    /// Raises DatasetInvalid for `root` (the dataset folder, or the file at fault) with a formatted message.
    let fail (root: string) fmt =
        Printf.ksprintf (fun msg -> Errors.fail (DatasetInvalid(Path.GetFullPath root, msg))) fmt

    /// A DatasetInvalid error from Mat (a value not of the expected kind), to record as a problem instead.
    let isMatError (e: exn) =
        match Errors.tryOf e with
        | Some(DatasetInvalid _) -> true
        | _ -> false

    /// The full path of a required file, or a DatasetInvalid error naming it and the expected layout.
    let requireFile (dataset: string) (expected: string) (path: string) =
        if not (File.Exists path) then fail path "%s: missing %s. %s" dataset (Path.GetFullPath path) expected
        path

    /// The path of a required folder, or a DatasetInvalid error naming it and the expected layout.
    let requireDirectory (dataset: string) (expected: string) (path: string) =
        if not (Directory.Exists path) then fail path "%s: missing folder %s. %s" dataset (Path.GetFullPath path) expected
        path

    /// Non-blank lines, trimmed; annotation files sometimes end with blank lines or CRLF.
    let lines (path: string) =
        File.ReadAllLines path |> Array.map (fun l -> l.Trim()) |> Array.filter (fun l -> l <> "")

    /// Splits "<id> <rest>" at the first run of whitespace; the rest may itself contain spaces.
    let idAndRest (line: string) =
        let cut = line.IndexOfAny [| ' '; '\t' |]
        if cut < 0 then line, "" else line.Substring(0, cut), line.Substring(cut).Trim()

    let fields (line: string) =
        line.Split([| ' '; '\t' |], StringSplitOptions.RemoveEmptyEntries)

    let problem file text : Problem = { File = file; Problem = text }

    let tryInt (s: string) =
        match Int32.TryParse(s, Globalization.NumberStyles.Integer, Globalization.CultureInfo.InvariantCulture) with
        | true, v -> Some v
        | _ -> None

    let tryFloat (s: string) =
        match Double.TryParse(s, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
        | true, v -> Some v
        | _ -> None

    /// A box from 1-based inclusive pixel corners (the MATLAB/PASCAL convention of Aircraft, Cars and Dogs).
    let boxFromInclusive (xmin: float) (ymin: float) (xmax: float) (ymax: float) : Box =
        let x = int (Math.Floor xmin) - 1
        let y = int (Math.Floor ymin) - 1
        { X = max 0 x
          Y = max 0 y
          Width = int (Math.Ceiling xmax) - max 0 x
          Height = int (Math.Ceiling ymax) - max 0 y }

    /// Keeps a sample whose image exists and whose label is in range; otherwise records why not.
    let check (classCount: int) (sample: Sample) : Result<Sample, Problem> =
        if sample.Label < 0 || sample.Label >= classCount then
            Error(problem sample.Path (sprintf "label %d out of range 1..%d" (sample.Label + 1) classCount))
        elif not (File.Exists sample.Path) then
            Error(problem sample.Path "missing image file")
        else
            Ok sample

    let partition (results: Result<Sample, Problem> seq) : Sample[] * Problem list =
        let results = Array.ofSeq results
        let ok = results |> Array.choose (function Ok s -> Some s | Error _ -> None)
        let bad = results |> Array.choose (function Error p -> Some p | Ok _ -> None) |> List.ofArray
        ok, bad

    /// Keeps the first occurrence of each key and reports the later ones as duplicates.
    let firstByKey (file: string) (what: string) (pairs: (string * 'v)[]) : Map<string, 'v> * Problem list =
        pairs
        |> Array.fold
            (fun (seen: Map<string, 'v>, problems) (key, value) ->
                if seen.ContainsKey key then
                    seen, problem file (sprintf "duplicate %s %s" what key) :: problems
                else
                    seen.Add(key, value), problems)
            (Map.empty, [])
        |> fun (seen, problems) -> seen, List.rev problems

    let index name root classes (train, trainProblems) (test, testProblems) extra : DatasetIndex =
        { Name = name
          Root = Path.GetFullPath root
          Classes = classes
          Train = train
          Test = test
          Problems = extra @ trainProblems @ testProblems }

/// CUB-200-2011: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, optional bounding_boxes.txt.
module Cub =
    open Layout

    let private name = "CUB-200-2011"

    let private expected =
        "Expected the dataset folder to be the CUB_200_2011 folder holding images.txt, image_class_labels.txt, "
        + "train_test_split.txt, classes.txt and images/"

    let private trainFlag = "1"

    /// CUB boxes are 0-based float "x y width height"; round outward so the box covers the whole object.
    let private box (x: float) (y: float) (w: float) (h: float) : Box =
        let x0 = int (Math.Floor x)
        let y0 = int (Math.Floor y)
        { X = x0; Y = y0; Width = int (Math.Ceiling(x + w)) - x0; Height = int (Math.Ceiling(y + h)) - y0 }

    /// Parses "<id> <value>" lines into a map, reporting duplicate ids.
    let private keyed path =
        lines path |> Array.map idAndRest |> firstByKey path "image id"

    /// Reads the CUB-200-2011 layout under `root` (its official train/test split).
    let load (root: string) : DatasetIndex =
        let file n = requireFile name expected (Path.Combine(root, n))
        let imagesFile = file "images.txt"
        let labelsFile = file "image_class_labels.txt"
        let splitFile = file "train_test_split.txt"
        let classesFile = file "classes.txt"
        let imagesDir = requireDirectory name expected (Path.Combine(root, "images"))
        let classes =
            lines classesFile
            |> Array.map (fun l -> snd (idAndRest l))
            // "001.Black_footed_Albatross" -> "Black_footed_Albatross"
            |> Array.map (fun c -> let dot = c.IndexOf '.' in if dot >= 0 then c.Substring(dot + 1) else c)
        let imageOrder = lines imagesFile |> Array.map (idAndRest >> fst) |> Array.distinct
        let images, imageProblems = keyed imagesFile
        let labels, labelProblems = keyed labelsFile
        let splits, splitProblems = keyed splitFile
        let boxes =
            let path = Path.Combine(root, "bounding_boxes.txt")
            if File.Exists path then
                lines path
                |> Array.choose (fun l ->
                    match fields l |> Array.map tryFloat with
                    | [| _; Some x; Some y; Some w; Some h |] -> Some(fst (idAndRest l), box x y w h)
                    | _ -> None)
                |> Map.ofArray
            else
                Map.empty
        let entry id : Result<bool * Sample, Problem> =
            let imagePath = Path.Combine(imagesDir, images[id])
            match Map.tryFind id labels |> Option.bind tryInt, Map.tryFind id splits with
            | None, _ -> Error(problem imagePath (sprintf "image id %s has no valid label in image_class_labels.txt" id))
            | _, None -> Error(problem imagePath (sprintf "image id %s has no entry in train_test_split.txt" id))
            | Some label, Some split ->
                let sample =
                    { Path = imagePath; Label = label - 1; Box = Map.tryFind id boxes; TrimBottom = 0 }
                check classes.Length sample |> Result.map (fun s -> split = trainFlag, s)
        let entries = imageOrder |> Array.map entry
        let inSplit wanted =
            entries |> Array.choose (function Ok(isTrain, s) when isTrain = wanted -> Some s | _ -> None)
        let problems = entries |> Array.choose (function Error p -> Some p | Ok _ -> None) |> List.ofArray
        index name root classes (inSplit true, problems) (inSplit false, []) (imageProblems @ labelProblems @ splitProblems)

/// Stanford Cars: the devkit layout (cars_train/, cars_test/, devkit/*.mat, cars_test_annos_withlabels.mat)
/// or the single-file variant (car_ims/ and cars_annos.mat).
module Cars =
    open Layout

    let private name = "Stanford Cars"

    let private expected =
        "Expected the dataset folder to be the stanford_cars folder holding devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
        + "cars_test_annos_withlabels.mat (or devkit/cars_test_annos_withlabels.mat), cars_train/ and cars_test/; "
        + "or car_ims/ and cars_annos.mat"

    let private testFlag = 1

    let private sample (imagePath: string) (a: Map<string, Mat.MatValue>) : Sample =
        let coord f = Mat.toFloat (Mat.get imagePath f a)
        let box =
            if [ "bbox_x1"; "bbox_y1"; "bbox_x2"; "bbox_y2" ] |> List.forall a.ContainsKey then
                Some(boxFromInclusive (coord "bbox_x1") (coord "bbox_y1") (coord "bbox_x2") (coord "bbox_y2"))
            else
                None
        { Path = imagePath; Label = Mat.toInt (Mat.get imagePath "class" a) - 1; Box = box; TrimBottom = 0 }

    /// Samples from a struct array of annotations, with any unreadable annotation recorded as a problem.
    let private samples (matFile: string) (imageOf: Map<string, Mat.MatValue> -> string) classCount annotations =
        annotations
        |> Array.map (fun a ->
            try
                check classCount (sample (imageOf a) a)
            with e when isMatError e ->
                Error(problem matFile (sprintf "unusable annotation: %s" e.Message)))
        |> partition

    let private annotations (matFile: string) =
        Mat.read matFile |> Mat.get matFile "annotations" |> Mat.toStructs

    let private classNames (matFile: string) =
        Mat.read matFile |> Mat.get matFile "class_names" |> Mat.toStrings |> Array.map (fun s -> s.Trim())

    let private devkit (root: string) : DatasetIndex =
        let devkitDir = Path.Combine(root, "devkit")
        let meta = requireFile name expected (Path.Combine(devkitDir, "cars_meta.mat"))
        let trainAnnos = requireFile name expected (Path.Combine(devkitDir, "cars_train_annos.mat"))
        let labelledTest = "cars_test_annos_withlabels.mat"
        let testAnnos =
            [ Path.Combine(root, labelledTest); Path.Combine(devkitDir, labelledTest) ]
            |> List.tryFind File.Exists
            |> Option.defaultWith (fun () ->
                fail root "%s: missing %s (looked in %s and %s). The test labels ship separately from the devkit. %s"
                    name labelledTest (Path.GetFullPath root) (Path.GetFullPath devkitDir) expected)
        let trainDir = requireDirectory name expected (Path.Combine(root, "cars_train"))
        let testDir = requireDirectory name expected (Path.Combine(root, "cars_test"))
        let classes = classNames meta
        let fname dir a = Path.Combine(dir, (Mat.toString (Mat.get dir "fname" a)).Trim())
        let train = samples trainAnnos (fname trainDir) classes.Length (annotations trainAnnos)
        let test = samples testAnnos (fname testDir) classes.Length (annotations testAnnos)
        index name root classes train test []

    let private singleFile (root: string) (annosFile: string) : DatasetIndex =
        let classes = classNames annosFile
        let all = annotations annosFile
        let isTest (a: Map<string, Mat.MatValue>) =
            try Mat.toInt (Mat.get annosFile "test" a) = testFlag with e when isMatError e -> false
        let imageOf a = Path.Combine(root, (Mat.toString (Mat.get annosFile "relative_im_path" a)).Trim())
        let train = samples annosFile imageOf classes.Length (all |> Array.filter (isTest >> not))
        let test = samples annosFile imageOf classes.Length (all |> Array.filter isTest)
        index name root classes train test []

    /// Reads Stanford Cars under `root`: the single-file variant when cars_annos.mat is there, else the devkit layout.
    let load (root: string) : DatasetIndex =
        let single = Path.Combine(root, "cars_annos.mat")
        if File.Exists single then singleFile root single else devkit root

/// FGVC-Aircraft 2013b at one of its three label levels.
module Aircraft =
    open Layout

    let private name = "FGVC-Aircraft"

    /// Every image carries a 20-pixel copyright banner at the bottom, removed before use.
    let bannerHeight = 20

    /// The label levels and the file listing each level's class names.
    let levels = [ "variant", "variants.txt"; "family", "families.txt"; "manufacturer", "manufacturers.txt" ]

    let private expected level =
        sprintf "Expected the dataset folder to be fgvc-aircraft-2013b or its data/ folder, holding images_%s_trainval.txt, " level
        + sprintf "images_%s_test.txt, %s, images_box.txt and images/" level
            (levels |> List.tryFind (fst >> (=) level) |> Option.map snd |> Option.defaultValue "variants.txt")

    let private split (imagesDir: string) (classIndex: Map<string, int>) boxes listFile =
        let classCount = classIndex.Count
        let pairs = lines listFile |> Array.map idAndRest
        let _, duplicates = pairs |> firstByKey listFile "image id"
        let samples, problems =
            pairs
            |> Array.distinctBy fst
            |> Array.map (fun (id, cls) ->
                let imagePath = Path.Combine(imagesDir, id + ".jpg")
                match Map.tryFind cls classIndex with
                | None -> Error(problem imagePath (sprintf "unknown class '%s' in %s" cls (Path.GetFileName listFile)))
                | Some label ->
                    check classCount
                        { Path = imagePath; Label = label; Box = Map.tryFind id boxes; TrimBottom = bannerHeight })
            |> partition
        samples, duplicates @ problems

    /// Reads FGVC-Aircraft under `root` (the archive folder or its data/ folder) at `level`: "variant", "family" or "manufacturer".
    let load (root: string, level: string) : DatasetIndex =
        let classFile =
            match levels |> List.tryFind (fst >> (=) level) with
            | Some(_, f) -> f
            | None ->
                fail root "%s: unknown level '%s'; valid levels are %s" name level
                    (levels |> List.map fst |> String.concat ", ")
        // Accept both the archive folder and its data/ subfolder.
        let dataDir =
            let nested = Path.Combine(root, "data")
            if Directory.Exists nested then nested else root
        let file n = requireFile name (expected level) (Path.Combine(dataDir, n))
        let classes = lines (file classFile)
        let trainFile = file (sprintf "images_%s_trainval.txt" level)
        let testFile = file (sprintf "images_%s_test.txt" level)
        let imagesDir = requireDirectory name (expected level) (Path.Combine(dataDir, "images"))
        let classIndex = classes |> Array.mapi (fun i c -> c, i) |> Map.ofArray
        let boxes =
            let path = Path.Combine(dataDir, "images_box.txt")
            if File.Exists path then
                lines path
                |> Array.choose (fun l ->
                    match fields l with
                    | [| id; x1; y1; x2; y2 |] ->
                        match tryFloat x1, tryFloat y1, tryFloat x2, tryFloat y2 with
                        | Some a, Some b, Some c, Some d -> Some(id, boxFromInclusive a b c d)
                        | _ -> None
                    | _ -> None)
                |> Map.ofArray
            else
                Map.empty
        let train = split imagesDir classIndex boxes trainFile
        let test = split imagesDir classIndex boxes testFile
        index (sprintf "%s (%s)" name level) root classes train test []

/// Stanford Dogs: train_list.mat / test_list.mat, Images/<wnid-breed>/, optional Annotation/ XML boxes.
module Dogs =
    open Layout
    open System.Xml.Linq

    let private name = "Stanford Dogs"

    let private expected =
        "Expected the dataset folder to be the stanford_dogs folder holding train_list.mat, test_list.mat and Images/ "
        + "(Annotation/ optional)"

    /// "n02085620-Chihuahua" -> "Chihuahua".
    let private breed (folder: string) =
        let dash = folder.IndexOf '-'
        if dash >= 0 then folder.Substring(dash + 1) else folder

    /// The first object's box of an annotation file, if the file exists and parses.
    let private box (annotationPath: string) : Box option =
        if not (File.Exists annotationPath) then None
        else
            try
                let doc = XDocument.Load annotationPath
                let bnd = doc.Descendants(XName.Get "bndbox") |> Seq.tryHead
                let value (e: XElement) n = e.Element(XName.Get n) |> Option.ofObj |> Option.bind (fun v -> tryFloat v.Value)
                bnd
                |> Option.bind (fun e ->
                    match value e "xmin", value e "ymin", value e "xmax", value e "ymax" with
                    | Some a, Some b, Some c, Some d -> Some(boxFromInclusive a b c d)
                    | _ -> None)
            with :? Xml.XmlException ->
                None

    let private split (root: string) (folders: string[]) (listFile: string) =
        let mat = Mat.read listFile
        let files = Mat.get listFile "file_list" mat |> Mat.toStrings
        let labels = Mat.get listFile "labels" mat |> Mat.toFloats
        let annotations =
            if mat.ContainsKey "annotation_list" then Mat.get listFile "annotation_list" mat |> Mat.toStrings
            else files |> Array.map (fun f -> Path.ChangeExtension(f, null))
        if files.Length <> labels.Length then
            fail listFile "%s: %s has %d files but %d labels" name listFile files.Length labels.Length
        Array.zip3 files labels annotations
        |> Array.map (fun (file, label, annotation) ->
            let imagePath = Path.Combine(root, "Images", file)
            let sample =
                { Path = imagePath
                  Label = int label - 1
                  Box = box (Path.Combine(root, "Annotation", annotation))
                  TrimBottom = 0 }
            match check folders.Length sample with
            | Ok s when not (file.StartsWith(folders[s.Label] + "/")) ->
                Error(problem imagePath (sprintf "label %d is %s but the file lies in another folder" (s.Label + 1) folders[s.Label]))
            | result -> result)
        |> partition

    /// Reads Stanford Dogs under `root`; labels number the breed folders in ordinal order.
    let load (root: string) : DatasetIndex =
        let trainFile = requireFile name expected (Path.Combine(root, "train_list.mat"))
        let testFile = requireFile name expected (Path.Combine(root, "test_list.mat"))
        let imagesDir = requireDirectory name expected (Path.Combine(root, "Images"))
        // Labels number the breed folders in sorted (WordNet id) order.
        let folders =
            Directory.GetDirectories imagesDir
            |> Array.map Path.GetFileName
            |> Array.sortWith (fun a b -> String.CompareOrdinal(a, b))
        let classes = folders |> Array.map breed
        index name root classes (split root folders trainFile) (split root folders testFile) []

/// A plain folder layout: root/train/<class>/<image> and root/test/<class>/<image>, images in any format
/// ImageSharp reads, recognised by their content (the verdict), not by their extension.
module Folder =
    open Layout

    let private name = "Folder dataset"

    let private expected =
        "Expected the dataset folder to hold train/<class>/ and test/<class>/ folders of images (JPEG, PNG, BMP, GIF, WebP, TIFF, TGA, PBM)"

    let private ordinal (items: string[]) = items |> Array.sortWith (fun a b -> String.CompareOrdinal(a, b))

    // Hidden entries (".DS_Store", "._x.jpg", ".git") are the file system's or a tool's, never the user's images.
    let private hidden (path: string) = Path.GetFileName(path).StartsWith "."

    /// Whether `path` is a symbolic link whose target cannot be reached (a loop, or nothing there).
    let private brokenLink (path: string) =
        let info = FileInfo path
        not (isNull info.LinkTarget)
        && (try
                match info.ResolveLinkTarget true with
                | null -> true
                | target -> not (File.Exists target.FullName || Directory.Exists target.FullName)
            with :? IOException -> true)

    /// The class folders of a split; a file, or a link that loops or leads nowhere, where a class folder belongs
    /// is a layout error naming it.
    let private classFolders (dir: string) =
        Directory.GetFileSystemEntries dir
        |> Array.filter (hidden >> not)
        |> Array.map (fun entry ->
            if brokenLink entry then
                fail entry "%s: %s is a symbolic link that loops or leads nowhere, where a class folder belongs: remove it or point it at a folder of images. %s"
                    name entry expected
            elif not (Directory.Exists entry) then
                fail entry "%s: %s is a file, where a class folder belongs: move it into the folder of its class or remove it. %s"
                    name entry expected
            else Path.GetFileName entry)

    let private split (dir: string) (classIndex: Map<string, int>) : Sample[] =
        classFolders dir
        |> ordinal
        |> Array.collect (fun cls ->
            // Every file counts: the verdict reads its content, and one it cannot use is reported by name.
            Directory.GetFiles(Path.Combine(dir, cls))
            |> Array.filter (hidden >> not)
            |> ordinal
            |> Array.map (fun f -> { Path = f; Label = classIndex[cls]; Box = None; TrimBottom = 0 }))

    /// Reads root/train and root/test; classes are the union of both splits' folder names, in ordinal order.
    let load (root: string) : DatasetIndex =
        let trainDir = requireDirectory name expected (Path.Combine(root, "train"))
        let testDir = requireDirectory name expected (Path.Combine(root, "test"))
        let classes = Array.append (classFolders trainDir) (classFolders testDir) |> Array.distinct |> ordinal
        let classIndex = classes |> Array.mapi (fun i c -> c, i) |> Map.ofArray
        index name root classes (split trainDir classIndex, []) (split testDir classIndex, []) []

/// Chooses a layout reader by name.
module Dataset =

    /// A supported dataset layout.
    [<RequireQualifiedAccess>]
    type Kind =
        /// CUB-200-2011 birds.
        | Cub
        /// Stanford Cars.
        | Cars
        /// FGVC-Aircraft at a label level: "variant", "family" or "manufacturer".
        | Aircraft of level: string
        /// Stanford Dogs.
        | Dogs
        /// A plain train/<class>/, test/<class>/ folder tree.
        | Folder

    /// The dataset names `parse` accepts.
    let names = [ "cub"; "cars"; "aircraft"; "dogs"; "folder" ]

    /// Parses a dataset name (case-insensitive); Aircraft uses the variant level unless told otherwise.
    let parse (name: string) : Kind =
        match name.Trim().ToLowerInvariant() with
        | "cub" -> Kind.Cub
        | "cars" -> Kind.Cars
        | "aircraft" -> Kind.Aircraft "variant"
        | "dogs" -> Kind.Dogs
        | "folder" -> Kind.Folder
        | other -> Errors.setting Setting.Dataset (sprintf "unknown dataset '%s'; valid names are %s" other (String.concat ", " names))

    /// FGVC-Aircraft's label levels.
    let aircraftLevels = [ "variant"; "family"; "manufacturer" ]

    /// A dataset name with FGVC-Aircraft's level (ignored for the others).
    let parseWithLevel (name: string) (level: string option) : Kind =
        match parse name, level with
        | Kind.Aircraft _, Some l when List.contains (l.ToLowerInvariant()) aircraftLevels -> Kind.Aircraft(l.ToLowerInvariant())
        | Kind.Aircraft _, Some l -> Errors.setting Setting.Level (sprintf "aircraft level '%s': use %s" l (String.concat ", " aircraftLevels))
        | kind, _ -> kind

    /// The name `parse` reads.
    let name =
        function
        | Kind.Cub -> "cub"
        | Kind.Cars -> "cars"
        | Kind.Aircraft _ -> "aircraft"
        | Kind.Dogs -> "dogs"
        | Kind.Folder -> "folder"

    /// Reads the dataset of `kind` under `root`; a DatasetInvalid error when the root or a required file is
    /// missing, or the layout cannot be read (a file where a class folder belongs, a folder that loops).
    let load (kind: Kind) (root: string) : DatasetIndex =
        if not (Directory.Exists root) then
            Layout.fail root "dataset root %s does not exist" (Path.GetFullPath root)
        match kind with
        | Kind.Cub -> Cub.load root
        | Kind.Cars -> Cars.load root
        | Kind.Aircraft level -> Aircraft.load (root, level)
        | Kind.Dogs -> Dogs.load root
        | Kind.Folder -> Folder.load root
