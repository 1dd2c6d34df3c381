/// Decodes every image of an index once, to find unusable files before training starts (`pmg data`).
module Pmg.Fs.Data.Inspect

open System
open System.IO
open System.Text.Json
open SixLabors.ImageSharp
open SixLabors.ImageSharp.Formats.Jpeg
open SixLabors.ImageSharp.Formats.Png

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
      /// The index's own problems, then every image that cannot be used, sorted by path.
      Problems: Problem list }

type private Colour =
    | Colour
    | Gray
    | Cmyk

// A JPEG ends with the EOI marker FF D9; the decoder fills a cut-off scan with grey instead of failing,
// so a missing marker is the reliable sign of a truncated download. Some writers append padding after it.
let private endOfImage = [| 0xFFuy; 0xD9uy |]
let private trailerWindow = 4096

let private isJpeg (path: string) =
    let ext = Path.GetExtension(path).ToLowerInvariant()
    ext = ".jpg" || ext = ".jpeg"

let private endsWithEoi (path: string) =
    let bytes = File.ReadAllBytes path
    let window = min trailerWindow bytes.Length
    ReadOnlySpan(bytes, bytes.Length - window, window).LastIndexOf(ReadOnlySpan endOfImage) >= 0

/// Decodes one image fully; Ok with its colour model, or Error with the reason it cannot be used.
let private decode (path: string) : Result<Colour, string> =
    try
        if not (File.Exists path) then Error "missing image file"
        elif isJpeg path && not (endsWithEoi path) then Error "unreadable or truncated: no JPEG end-of-image marker"
        else
            use image = Image.Load path
            let jpeg = image.Metadata.GetJpegMetadata()
            let png = image.Metadata.GetPngMetadata()
            match Option.ofNullable jpeg.ColorType, Option.ofNullable png.ColorType with
            | Some JpegColorType.Luminance, _ -> Ok Gray
            | Some JpegColorType.Cmyk, _ -> Ok Cmyk
            | _, Some PngColorType.Grayscale
            | _, Some PngColorType.GrayscaleWithAlpha -> Ok Gray
            | _ -> Ok Colour
    with ex ->
        Error(sprintf "unreadable or truncated: %s" ex.Message)

/// Decodes every train and test image once, in parallel, and counts what is usable.
let inspect (index: DatasetIndex) : Report =
    let check (samples: Sample[]) =
        samples |> Array.Parallel.map (fun s -> s.Path, decode s.Path)
    let train = check index.Train
    let test = check index.Test
    let all = Array.append train test
    let usable (results: (string * Result<Colour, string>)[]) =
        results |> Array.filter (snd >> Result.isOk) |> Array.length
    let colour wanted = all |> Array.filter (fun (_, r) -> r = Ok wanted) |> Array.length
    let imageProblems =
        all
        |> Array.choose (function path, Error reason -> Some { File = path; Problem = reason } | _, Ok _ -> None)
        |> Array.sortBy (fun p -> p.File)
        |> List.ofArray
    { Classes = index.Classes.Length
      Train = usable train
      Test = usable test
      Grayscale = colour Gray
      Cmyk = colour Cmyk
      Problems = index.Problems @ imageProblems }

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
