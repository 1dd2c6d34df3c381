/// One verdict per image: `Images.verdict` decides for `pmg data` (Inspect), training and evaluation (the loader)
/// and prediction (`Images.loadChecked`). Broken files are made here from good ones: cut bytes, a forged header,
/// a WebP under a .jpg name.
module Pmg.Fs.Tests.ImageVerdictTests

open System
open System.IO
open Expecto
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open SixLabors.ImageSharp.Formats.Png
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Data
open Pmg.Fs.Model
open Pmg.Fs.Training
open Pmg.Fs.Tests.TestKit

/// Good and broken image files, written from a synthetic bird.
module BrokenImages =

    let private bird (size: int) (seed: int) = Synthetic.renderClass size (abs seed % 3) seed

    /// A good JPEG.
    let jpeg (path: string) (seed: int) =
        use img = bird 48 seed
        img.SaveAsJpeg path

    /// A good PNG.
    let png (path: string) (seed: int) =
        use img = bird 48 seed
        img.SaveAsPng path

    /// A good WebP (lossless), saved under whatever name `path` has.
    let webp (path: string) (seed: int) =
        use img = bird 48 seed
        use stream = File.Create path
        img.Save(stream, Formats.Webp.WebpEncoder(FileFormat = Formats.Webp.WebpFileFormatType.Lossless))

    /// A synthetic bird written by `save`.
    let other (save: Image<Rgb24> -> unit) (seed: int) =
        use img = bird 40 seed
        save img

    /// The first `fraction` of a file's bytes, in place.
    let cut (fraction: float) (path: string) =
        let bytes = File.ReadAllBytes path
        File.WriteAllBytes(path, bytes[.. int (float bytes.Length * fraction) - 1])

    // The CRC-32 of PNG chunks (ISO 3309), so that a forged header is a well-formed chunk.
    let private crcTable =
        Array.init 256 (fun n ->
            let mutable c = uint32 n
            for _ in 0..7 do
                c <- if c &&& 1u <> 0u then 0xEDB88320u ^^^ (c >>> 1) else c >>> 1
            c)

    let private crc (bytes: byte[]) (offset: int) (count: int) =
        let mutable c = 0xFFFFFFFFu
        for i in offset .. offset + count - 1 do
            c <- crcTable[int ((c ^^^ uint32 bytes[i]) &&& 0xFFu)] ^^^ (c >>> 8)
        c ^^^ 0xFFFFFFFFu

    let private putBe (bytes: byte[]) (at: int) (v: uint32) =
        bytes[at] <- byte (v >>> 24)
        bytes[at + 1] <- byte (v >>> 16)
        bytes[at + 2] <- byte (v >>> 8)
        bytes[at + 3] <- byte v

    /// A good small PNG whose IHDR (with a correct CRC) says width x height: a header that lies.
    let lyingPng (path: string) (width: int) (height: int) =
        png path 7
        let b = File.ReadAllBytes path
        // IHDR is the first chunk: length at 8, type at 12, width at 16, height at 20, CRC at 29.
        putBe b 16 (uint32 width)
        putBe b 20 (uint32 height)
        putBe b 29 (crc b 12 17)
        File.WriteAllBytes(path, b)

    /// A good small JPEG whose frame header says width x height (its end marker kept).
    let lyingJpeg (path: string) (width: int) (height: int) =
        jpeg path 8
        let b = File.ReadAllBytes path
        let sof = [ 0 .. b.Length - 2 ] |> List.find (fun i -> b[i] = 0xFFuy && b[i + 1] = 0xC0uy)
        b[sof + 5] <- byte (height >>> 8)
        b[sof + 6] <- byte height
        b[sof + 7] <- byte (width >>> 8)
        b[sof + 8] <- byte width
        File.WriteAllBytes(path, b)

    /// Every broken kind, by name, each writing its file: what data, train and predict must all refuse.
    let refused: (string * (string -> unit)) list =
        [ "truncated JPEG (60%)", (fun p -> jpeg p 1; cut 0.6 p)
          "truncated PNG (60%)", (fun p -> png p 2; cut 0.6 p)
          "PNG whose header says 20000x20000", (fun p -> lyingPng p 20000 20000)
          "PNG whose header says 9000x9000", (fun p -> lyingPng p 9000 9000)
          "JPEG whose header says 9000x9000", (fun p -> lyingJpeg p 9000 9000) ]

let private isUnusable (path: string) (e: exn) =
    match Errors.tryOf e with
    | Some(UnusableInput(p, _)) -> p = path
    | _ -> false

let private sample path : Sample = { Path = path; Label = 0; Box = None; TrimBottom = 0 }

/// The verdict of the three consumers on one file: Inspect's problem (None when usable), the loader's skip
/// reason, loadChecked's error message.
let private threeVerdicts (path: string) =
    let index: DatasetIndex = { Name = "t"; Root = Path.GetDirectoryName path; Classes = [| "a" |]; Train = [| sample path |]; Test = [||]; Problems = [] }
    let inspected = (Inspect.inspect index).Problems |> List.tryHead |> Option.map _.Problem
    let source = Loader.fromSamples [| sample path |] false
    let skipped =
        Loader.batches source (Transforms.Spec.test 32 28) 1 false 0 0 1 1
        |> Seq.collect (fun b -> b.Skipped)
        |> Seq.tryHead
        |> Option.map snd
    let predicted =
        try
            use img = Images.loadChecked path
            None
        with e when isUnusable path e -> Some e.Message
    inspected, skipped, predicted

let private imageTests =
    testList "files" [
        test "good JPEG, PNG, WebP, BMP and GIF files are usable, their format read from the content" {
            use dir = new TempDir "verdict"
            BrokenImages.jpeg (dir.File "a.jpg") 1
            BrokenImages.png (dir.File "b.png") 2
            BrokenImages.webp (dir.File "c.webp") 3
            BrokenImages.other (fun img -> img.SaveAsBmp(dir.File "d.bmp")) 4
            BrokenImages.other (fun img -> img.SaveAsGif(dir.File "e.gif")) 5
            for name, format in [ "a.jpg", "JPEG"; "b.png", "PNG"; "c.webp", "WebP"; "d.bmp", "BMP"; "e.gif", "GIF" ] do
                match Images.verdict (dir.File name) with
                | Ok info -> Expect.equal info.Format format name
                | Error e -> failtestf "%s refused: %s" name e
        }

        test "a WebP named .jpg is a usable WebP for data, the loader and predict" {
            use dir = new TempDir "verdict"
            let path = dir.File "bird.jpg"
            BrokenImages.webp path 3
            Expect.equal (Images.verdict path |> Result.map _.Format) (Ok "WebP") "sniffed by content"
            Expect.equal (threeVerdicts path) (None, None, None) "usable everywhere"
        }

        test "truncated JPEG and PNG files and lying headers get the same refusal from data, the loader and predict" {
            use dir = new TempDir "verdict"
            for name, write in BrokenImages.refused do
                let path = dir.File(name.Replace(' ', '_').Replace("%", "") + ".img")
                write path
                let inspected, skipped, predicted = threeVerdicts path
                Expect.isSome inspected (sprintf "%s: refused by Inspect" name)
                Expect.isSome skipped (sprintf "%s: skipped by the loader" name)
                Expect.stringStarts skipped.Value inspected.Value (sprintf "%s: the loader skips it for the same reason" name)
                Expect.isSome predicted (sprintf "%s: refused by loadChecked" name)
                Expect.stringContains predicted.Value path (sprintf "%s: the message names the file" name)
                Expect.stringContains predicted.Value inspected.Value (sprintf "%s: the same reason" name)
                Expect.stringContains predicted.Value "re-download" (sprintf "%s: the fix" name)
        }

        test "the reasons say what is wrong" {
            use dir = new TempDir "verdict"
            let reason (write: string -> unit) =
                let path = dir.File(Guid.NewGuid().ToString "N")
                write path
                match Images.verdict path with
                | Error e -> e
                | Ok _ -> "usable"
            Expect.stringContains (reason (fun p -> BrokenImages.jpeg p 1; BrokenImages.cut 0.6 p)) "end-of-image" "JPEG"
            Expect.stringContains (reason (fun p -> BrokenImages.png p 1; BrokenImages.cut 0.6 p)) "cut off" "PNG cut in a chunk"
            // Cut exactly after the data: every chunk whole, no IEND.
            Expect.stringContains (reason (fun p -> BrokenImages.png p 1; let b = File.ReadAllBytes p in File.WriteAllBytes(p, b[.. b.Length - 13]))) "IEND" "PNG without IEND"
            Expect.stringContains (reason (fun p -> BrokenImages.lyingPng p 20000 20000)) "megapixels" "over the pixel cap"
            Expect.stringContains (reason (fun p -> BrokenImages.lyingPng p 9000 9000)) "holds only" "more pixels than the data can hold"
            Expect.stringContains (reason (fun p -> BrokenImages.lyingJpeg p 9000 9000)) "holds only" "JPEG too"
            Expect.stringContains (reason (fun p -> BrokenImages.other (fun img -> img.SaveAsBmp p) 4; BrokenImages.cut 0.6 p)) "cut off" "BMP"
            Expect.stringContains (reason (fun p -> BrokenImages.other (fun img -> img.SaveAsGif p) 4; BrokenImages.cut 0.6 p)) "cut off" "GIF"
            Expect.stringContains (reason (fun p -> BrokenImages.webp p 1; BrokenImages.cut 0.6 p)) "cut off" "WebP"
            Expect.stringContains (reason (fun p -> File.WriteAllText(p, "not an image"))) "not an image" "text"
            Expect.stringContains (reason (fun p -> File.WriteAllBytes(p, [||]))) "empty" "empty file"
            Expect.equal (reason ignore) "missing image file" "missing"
        }

        test "a symbolic link that loops is refused by name, not an abort" {
            use dir = new TempDir "verdict"
            let a = dir.File "a.jpg"
            let b = dir.File "b.jpg"
            File.CreateSymbolicLink(a, b) |> ignore
            File.CreateSymbolicLink(b, a) |> ignore
            Expect.equal (Images.verdict a) (Error "a symbolic link that loops or leads nowhere") "verdict"
            let e = Expect.throwsC (fun () -> Images.loadChecked a |> ignore) id
            Expect.isTrue (isUnusable a e) "UnusableInput naming the link"
        }

        test "16-bit, palette and animated images and non-ASCII paths keep working (the first frame)" {
            use dir = new TempDir "verdict"
            let folder = Path.Combine(dir.Path, "vögel 鳥")
            Directory.CreateDirectory folder |> ignore
            let deep = Path.Combine(folder, "tief-16.png")
            let palette = Path.Combine(folder, "palette.png")
            let gif = Path.Combine(folder, "anim.gif")
            let write () =
                use wide = new Image<Rgb48>(20, 10, Rgb48(60000us, 1000us, 30000us))
                wide.Save(deep, PngEncoder(BitDepth = PngBitDepth.Bit16, ColorType = PngColorType.Rgb))
                use bird = Synthetic.renderClass 32 0 3
                bird.Save(palette, PngEncoder(ColorType = PngColorType.Palette))
                use red = new Image<Rgb24>(16, 16, Rgb24(250uy, 0uy, 0uy))
                use blue = new Image<Rgb24>(16, 16, Rgb24(0uy, 0uy, 250uy))
                red.Frames.AddFrame(blue.Frames.RootFrame) |> ignore
                red.SaveAsGif gif
            write ()
            for p in [ deep; palette; gif ] do
                Expect.isOk (Images.verdict p) p
            let deepImage = Images.loadChecked deep
            Expect.equal (deepImage.Width, deepImage.Height) (20, 10) "16-bit size"
            Expect.isGreaterThan (int deepImage[0, 0].R) 200 "16-bit red"
            deepImage.Dispose()
            use first = Images.loadChecked gif
            Expect.equal first.Frames.Count 1 "first frame only"
            Expect.isGreaterThan (int first[3, 3].R) 200 "the first frame's red"
        }
    ]

/// A network small enough to evaluate in a test: ResNet18 from the seed, 3 classes, 28 px crops.
let private tiny: Experiment.Experiment =
    { Experiment.withBackbone "resnet18" Experiment.embedded with
        Weights = Backbone.Scratch
        BatchNormGroup = None
        Model = { Experiment.embedded.Model with Classes = 3 }
        BatchSize = 4
        Input = { Resize = 32; Crop = 28; Padding = 2 }
        Workers = 1 }

let private evaluationTests =
    testSequenced
    <| testList "evaluation" [
        test "unusable test images are counted beside the accuracies; a split of none is an error naming its folder" {
            use dir = new TempDir "verdict-eval"
            let folder = Path.Combine(dir.Path, "test", "a")
            Directory.CreateDirectory folder |> ignore
            let files =
                [ for i in 0..4 ->
                      let p = Path.Combine(folder, sprintf "%d.jpg" i)
                      BrokenImages.jpeg p i
                      p ]
            BrokenImages.cut 0.6 files[1]
            BrokenImages.lyingPng files[3] 20000 20000
            let net = Pmg.create tiny.Model
            let samples = files |> List.map sample |> Array.ofList
            let acc = Trainer.evaluateNet tiny net torch.CPU 3 (Loader.fromSamples samples false)
            Expect.equal acc.Images 3 "three usable"
            Expect.equal (acc.Skipped |> List.map fst |> List.sort) [ files[1]; files[3] ] "the two unusable, by name"
            for f in files do
                if f <> files[0] && f <> files[2] && f <> files[4] then ()
                else BrokenImages.cut 0.5 f
            let e = Expect.throwsC (fun () -> Trainer.evaluateNet tiny net torch.CPU 3 (Loader.fromSamples samples false) |> ignore) id
            match Errors.tryOf e with
            | Some(DatasetInvalid(root, message)) ->
                Expect.equal root (Path.Combine(dir.Path, "test")) "the split's folder"
                Expect.stringContains message "none of the 5 test images" "says none"
            | other -> failtestf "expected DatasetInvalid, got %A (%s)" other e.Message
        }
    ]

[<Tests>]
let tests = testList "verdict" [ imageTests; evaluationTests ]
