/// Gives every image of an index its verdict once, to find unusable files and refuse a dataset that cannot train
/// before training starts (`pmg data` and training).
module Pmg.Fs.Data.Inspect

open System
open System.IO
open System.Text.Json
open Pmg.Fs

/// What `inspect` found in a dataset index.
type Report =
    { /// Number of classes in the index.
      Classes: int
      /// Training images that decode.
      Train: int
      /// Test images that decode.
      Test: int
      /// Usable single-channel images (converted to RGB by the pipeline).
      Grayscale: int
      /// Usable CMYK JPEGs (converted to RGB by the pipeline).
      Cmyk: int
      /// Usable training images of each class, by label.
      TrainPerClass: int[]
      /// The index's own problems, then every image that cannot be used, sorted by path.
      Problems: Problem list }

/// Gives every train and test image its verdict (`Images.verdict`: the one used by training, evaluation and
/// prediction) once, in parallel, and counts what is usable.
let inspect (index: DatasetIndex) : Report =
    let check (samples: Sample[]) =
        samples |> Array.Parallel.map (fun s -> s, Images.verdict s.Path)
    let train = check index.Train
    let test = check index.Test
    let all = Array.append train test
    let usable (results: (Sample * Result<Images.Info, string>)[]) =
        results |> Array.filter (snd >> Result.isOk) |> Array.length
    let colour wanted =
        all |> Array.filter (function _, Ok i -> i.Colour = wanted | _ -> false) |> Array.length
    let perClass = Array.zeroCreate index.Classes.Length
    for s, r in train do
        if Result.isOk r && s.Label >= 0 && s.Label < perClass.Length then perClass[s.Label] <- perClass[s.Label] + 1
    let imageProblems =
        all
        |> Array.choose (function s, Error reason -> Some { File = s.Path; Problem = reason } | _, Ok _ -> None)
        |> Array.sortBy (fun p -> p.File)
        |> List.ofArray
    { Classes = index.Classes.Length
      Train = usable train
      Test = usable test
      Grayscale = colour Images.Gray
      Cmyk = colour Images.Cmyk
      TrainPerClass = perClass
      Problems = index.Problems @ imageProblems }

/// Why a dataset cannot train or be evaluated, from its index and its inspection; None when it can. `pmg data`
/// and training both decide with this one function, so the one refuses exactly what the other does.
let refusal (index: DatasetIndex) (report: Report) : string option =
    // The split's own unusable files: an example from the other split would point at the wrong folder.
    let unusable (samples: Sample[]) =
        let paths = samples |> Array.map _.Path |> set
        report.Problems |> List.filter (fun p -> paths.Contains p.File)
    let splitFolder split =
        // Folder layouts name their split folder; the others share one images folder.
        let dir = Path.Combine(index.Root, split)
        if Directory.Exists dir then dir else index.Root
    let noUsable split words (samples: Sample[]) =
        let examples =
            match unusable samples with
            | [] -> ""
            | p :: _ as all -> sprintf " (%d unusable; e.g. %s: %s)" all.Length p.File p.Problem
        if samples.Length = 0 then
            Some(sprintf "%s holds no %s images: add them, a folder of images per class" (splitFolder split) words)
        else
            Some(
                sprintf "%s has no usable %s images%s: replace the damaged files or download the dataset again"
                    (splitFolder split) words examples
            )
    let empty = report.TrainPerClass |> Array.indexed |> Array.filter (fun (_, n) -> n = 0) |> Array.map fst
    if index.Classes.Length < 2 then
        Some(
            sprintf "%s has %d class%s (%s): a classifier needs at least 2; add a folder of images per class"
                index.Root index.Classes.Length (if index.Classes.Length = 1 then "" else "es")
                (index.Classes |> String.concat ", ")
        )
    elif report.Train = 0 then noUsable "train" "training" index.Train
    elif report.Test = 0 then noUsable "test" "test" index.Test
    elif empty.Length > 0 then
        let c = index.Classes[empty[0]]
        Some(
            sprintf "%s: class %s has no usable training images (%d class%s without any; a class only in the test split has none): add training images for it or remove its folder"
                index.Root c empty.Length (if empty.Length = 1 then "" else "es")
        )
    else None

/// Raises DatasetInvalid naming the dataset's folder when `refusal` finds a reason.
let validate (index: DatasetIndex) (report: Report) : unit =
    match refusal index report with
    | Some message -> Errors.fail (DatasetInvalid(index.Root, message))
    | None -> ()

/// The report as one indented JSON object.
let toJson (report: Report) : string =
    use stream = new MemoryStream()
    (
        use w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
        w.WriteStartObject()
        w.WriteNumber("classes", report.Classes)
        w.WriteNumber("train", report.Train)
        w.WriteNumber("test", report.Test)
        w.WriteNumber("grayscale", report.Grayscale)
        w.WriteNumber("cmyk", report.Cmyk)
        w.WriteStartArray "problems"
        for p in report.Problems do
            w.WriteStartObject()
            w.WriteString("file", p.File)
            w.WriteString("problem", p.Problem)
            w.WriteEndObject()
        w.WriteEndArray()
        w.WriteEndObject()
    )
    Text.Encoding.UTF8.GetString(stream.ToArray())
