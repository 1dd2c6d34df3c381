module Pmg.Fs.Tests.DataPipelineTests

open System
open System.IO
open Expecto
open SixLabors.ImageSharp
open SixLabors.ImageSharp.Formats.Jpeg
open SixLabors.ImageSharp.PixelFormats
open Pmg.Fs.Data
open Pmg.Fs.Data.Transforms
open Pmg.Fs.Tests.TestKit

/// An image whose pixel (x, y) is f x y.
let private image (width: int) (height: int) (f: int -> int -> Rgb24) =
    let img = new Image<Rgb24>(width, height)
    for y in 0 .. height - 1 do
        for x in 0 .. width - 1 do
            img[x, y] <- f x y
    img

/// Writes a PNG and disposes the image.
let private savePng (path: string) (img: Image<Rgb24>) =
    use img = img
    img.SaveAsPng path

let private pixels (img: Image<Rgb24>) =
    [| for y in 0 .. img.Height - 1 do
           for x in 0 .. img.Width - 1 do
               img[x, y] |]

/// A fixed pseudo-random image, different per key.
let private noisy (key: int) (width: int) (height: int) =
    let rng = Random(key)
    image width height (fun _ _ -> Rgb24(byte (rng.Next 256), byte (rng.Next 256), byte (rng.Next 256)))

/// mean = std = 0.5 normalisation of one 8-bit level.
let private norm (v: int) = float32 ((float v / 255.0 - 0.5) / 0.5)

/// Value of channel c at (x, y) of a CHW image of side n.
let private at (chw: float32[]) (n: int) c x y = chw[c * n * n + y * n + x]

let private transforms =
    testList "transforms" [
        test "output has 3 x crop x crop values within [-1, 1]" {
            use img = noisy 1 37 23
            let out = apply (Spec.train 30 24) (Random 3) img
            Expect.equal out.Length (3 * 24 * 24) "length"
            Expect.all out (fun v -> v >= -1.0f && v <= 1.0f) "range"
        }

        test "0.5 / 0.5 normalisation maps 0 to -1 and 255 to 1" {
            let spec = Spec.test 6 6
            use black = image 6 6 (fun _ _ -> Rgb24(0uy, 0uy, 0uy))
            use white = image 6 6 (fun _ _ -> Rgb24(255uy, 255uy, 255uy))
            Expect.all (apply spec (Random 0) black) ((=) -1.0f) "black"
            Expect.all (apply spec (Random 0) white) ((=) 1.0f) "white"
        }

        test "test transform is deterministic and takes the centre window" {
            // Red encodes the column and green the row, so every output pixel says where it came from.
            use img = image 10 10 (fun x y -> Rgb24(byte (x * 20), byte (y * 20), 7uy))
            let spec = Spec.test 10 6
            let a = apply spec (Random 1) img
            let b = apply spec (Random 2) img
            Expect.equal a b "independent of the Random"
            for y in 0 .. 5 do
                for x in 0 .. 5 do
                    Expect.equal (at a 6 0 x y) (norm ((x + 2) * 20)) "column"
                    Expect.equal (at a 6 1 x y) (norm ((y + 2) * 20)) "row"
                    Expect.equal (at a 6 2 x y) (norm 7) "blue"
        }

        test "centre offset rounds half to even like torchvision" {
            // 9 - 6 = 3 spare rows: round(1.5) = 2.
            use img = image 9 9 (fun x y -> Rgb24(byte (x * 20), byte (y * 20), 0uy))
            let out = apply (Spec.test 9 6) (Random 0) img
            Expect.equal (at out 6 0 0 0) (norm 40) "left edge"
            Expect.equal (at out 6 1 0 0) (norm 40) "top edge"
        }

        test "train transform is reproducible with a fixed Random" {
            use img = noisy 2 50 40
            let spec = Spec.train 32 24
            Expect.equal (apply spec (Random 42) img) (apply spec (Random 42) img) "same seed"
            Expect.notEqual (apply spec (Random 42) img) (apply spec (Random 43) img) "other seed"
        }

        test "train transform flips about half the time" {
            // No padding and crop = resize leave the flip as the only randomness.
            use img = noisy 3 8 8
            let spec = { Spec.train 8 8 with Padding = 0 }
            let plain = apply (Spec.test 8 8) (Random 0) img
            let mirrored = Array.init plain.Length (fun i -> let x = i % 8 in plain[i - x + 7 - x])
            let outs = [ for s in 0 .. 99 -> apply spec (Random s) img ]
            let flips = outs |> List.filter ((=) mirrored) |> List.length
            let keeps = outs |> List.filter ((=) plain) |> List.length
            Expect.equal (flips + keeps) 100 "only the two outcomes"
            Expect.isTrue (flips > 25 && keeps > 25) $"balanced ({flips} flips)"
        }

        test "random crop pads with zero pixels" {
            use img = image 8 8 (fun _ _ -> Rgb24(255uy, 255uy, 255uy))
            let spec = { Spec.train 8 8 with Padding = 3; Flip = false }
            let outs = [ for s in 0 .. 49 -> apply spec (Random s) img ]
            Expect.all outs (Array.forall (fun v -> v = 1.0f || v = -1.0f)) "only image or padding"
            Expect.exists outs (Array.contains -1.0f) "padding shows up"
        }

        test "no resampling when the image already has the resize size" {
            use img = noisy 4 12 12
            let out = apply (Spec.test 12 12) (Random 0) img
            let expected =
                [| for c in 0 .. 2 do
                       for p in pixels img -> norm (int (match c with 0 -> p.R | 1 -> p.G | _ -> p.B)) |]
            Expect.equal out expected "exact pixels"
        }

        test "applyInto writes at the offset only" {
            use img = noisy 5 20 20
            let spec = Spec.test 16 8
            let dest = Array.create (2 * Spec.sampleLength spec + 3) 9.0f
            applyInto spec (Random 0) img dest 3
            Expect.equal dest[0..2] [| 9.0f; 9.0f; 9.0f |] "before untouched"
            Expect.equal dest[3 .. 3 + Spec.sampleLength spec - 1] (apply spec (Random 0) img) "content"
            Expect.all dest[3 + Spec.sampleLength spec ..] ((=) 9.0f) "after untouched"
        }
    ]

let private writeGrayJpeg (path: string) (width: int) (height: int) =
    use gray = new Image<L8>(width, height)
    for y in 0 .. height - 1 do
        for x in 0 .. width - 1 do
            gray[x, y] <- L8(byte ((x * 15 + y) % 256))
    gray.SaveAsJpeg(path, JpegEncoder(ColorType = JpegColorType.Luminance))

let private images =
    testList "images" [
        test "TrimBottom removes exactly N rows" {
            use img = image 20 30 (fun _ y -> Rgb24(byte y, 0uy, 0uy))
            let cut = Images.cut 5 None img
            Expect.equal (cut.Width, cut.Height) (20, 25) "size"
            Expect.equal cut[0, 24].R 24uy "last kept row"
            Expect.equal cut[0, 0].R 0uy "first row"
        }

        test "box is clamped to the trimmed image" {
            let box = Some { X = -5; Y = 10; Width = 100; Height = 100 }
            Expect.equal (Images.region 20 30 5 box) (Rectangle(0, 10, 20, 15)) "clamped"
            Expect.throws (fun () -> Images.region 20 30 0 (Some { X = 40; Y = 0; Width = 5; Height = 5 }) |> ignore)
                "box outside"
        }

        test "load applies TrimBottom and the box only when asked" {
            use dir = new TempDir "images"
            let path = dir.File "trim.png"
            image 20 30 (fun x y -> Rgb24(byte x, byte y, 0uy)) |> savePng path
            let sample = { Path = path; Label = 0; Box = Some { X = 2; Y = 3; Width = 5; Height = 6 }; TrimBottom = 4 }
            use plain = Images.load sample false
            use boxed = Images.load sample true
            Expect.equal (plain.Width, plain.Height) (20, 26) "trimmed"
            Expect.equal (boxed.Width, boxed.Height) (5, 6) "boxed"
            Expect.equal (boxed[0, 0].R, boxed[0, 0].G) (2uy, 3uy) "box origin"
        }

        test "grayscale JPEG loads as RGB with equal channels" {
            use dir = new TempDir "images"
            let path = dir.File "gray.jpg"
            writeGrayJpeg path 16 12
            use img = Images.loadChecked path
            Expect.equal (img.Width, img.Height) (16, 12) "size"
            Expect.all (pixels img) (fun p -> p.R = p.G && p.G = p.B) "gray"
            Expect.isGreaterThan (pixels img |> Array.map _.R |> Array.distinct |> Array.length) 4 "not flat"
        }
    ]

/// Images of varied sizes; label = index so order is visible in the labels.
let private source (count: int) (failing: Set<int>) : Loader.Source =
    { Count = count
      Label = id
      Name = fun i -> $"img{i}"
      Load =
        fun i ->
            if failing.Contains i then failwith $"cannot decode {i}"
            noisy (100 + i) (20 + i % 7) (18 + i % 5) }

let private labels (bs: Loader.Batch list) = bs |> List.collect (fun b -> List.ofArray b.Labels)

let private loader =
    let spec = Spec.train 16 12
    let run src batch shuffle seed epoch workers =
        Loader.batches src spec batch shuffle seed epoch workers 2 |> List.ofSeq
    testList "loader" [
        test "same seed gives the same batches, whatever the worker count" {
            let a = run (source 23 Set.empty) 5 true 7 0 1
            let b = run (source 23 Set.empty) 5 true 7 0 3
            Expect.equal (a |> List.map _.Labels) (b |> List.map _.Labels) "labels"
            Expect.equal (a |> List.map _.Images) (b |> List.map _.Images) "images"
        }

        test "epochs visit in different orders, each index exactly once" {
            let e0 = run (source 30 Set.empty) 4 true 7 0 2 |> labels
            let e1 = run (source 30 Set.empty) 4 true 7 1 2 |> labels
            Expect.notEqual e0 e1 "order changes"
            Expect.equal (List.sort e0) [ 0L .. 29L ] "permutation 0"
            Expect.equal (List.sort e1) [ 0L .. 29L ] "permutation 1"
        }

        test "no shuffle keeps the index order and the last batch is partial" {
            let bs = run (source 10 Set.empty) 4 false 1 0 2
            Expect.equal (bs |> List.map _.Size) [ 4; 4; 2 ] "sizes"
            Expect.equal (labels bs) [ 0L .. 9L ] "order"
            let last = List.last bs
            Expect.equal last.Images.Length (2 * 3 * 12 * 12) "images of the last batch"
            Expect.equal (last.Height, last.Width) (12, 12) "shape"
        }

        test "a failing sample is skipped and reported" {
            let bs = run (source 9 (set [ 4 ])) 3 false 1 0 2
            Expect.equal (bs |> List.map _.Size) [ 3; 2; 3 ] "sizes"
            Expect.equal (labels bs) [ 0L; 1L; 2L; 3L; 5L; 6L; 7L; 8L ] "others kept"
            Expect.equal (bs |> List.collect _.Skipped) [ "img4", "cannot decode 4" ] "skip record"
            Expect.equal bs[1].Images.Length (2 * 3 * 12 * 12) "compacted"
            let alone = run (source 9 Set.empty) 3 false 1 0 2
            Expect.equal bs[1].Images[.. 3 * 144 - 1] alone[1].Images[.. 3 * 144 - 1] "sample 3 unchanged"
            Expect.equal bs[1].Images[3 * 144 ..] alone[1].Images[3 * 144 * 2 ..] "sample 5 moved up"
        }

        test "an all-failing batch passes its skips to the next" {
            let bs = run (source 6 (set [ 2; 3 ])) 2 false 1 0 2
            Expect.equal (bs |> List.map _.Size) [ 2; 2 ] "sizes"
            Expect.equal (bs[1].Skipped |> List.map fst) [ "img2"; "img3" ] "carried"
        }

        test "stopping early ends the workers" {
            // No sleeps: the loads of later batches wait at a gate until the first batch has been taken, so the
            // workers are known to be busy when the enumerator is disposed; disposal must wait for them.
            let started = ref 0
            let finished = ref 0
            let afterDisposal = ref 0
            let disposed = ref false
            use firstBatchTaken = new Threading.ManualResetEventSlim false
            let firstBatch = Set.ofArray (Loader.batches (source 200 Set.empty) spec 2 true 1 0 1 1 |> Seq.head).Labels
            let load i =
                if disposed.Value then Threading.Interlocked.Increment &afterDisposal.contents |> ignore
                Threading.Interlocked.Increment &started.contents |> ignore
                try
                    if not (firstBatch.Contains(int64 i)) then firstBatchTaken.Wait()
                    noisy i 20 20
                finally
                    Threading.Interlocked.Increment &finished.contents |> ignore
            do
                use batches = (Loader.batches { source 200 Set.empty with Load = load } spec 2 true 1 0 2 2).GetEnumerator()
                try
                    Expect.isTrue (batches.MoveNext()) "a first batch"
                    Expect.equal (Set.ofArray batches.Current.Labels) firstBatch "the first batch (same seed)"
                finally
                    // Before disposal, which waits for the workers.
                    firstBatchTaken.Set()
            // The enumerator is disposed: every load that started has returned, and none starts any more.
            disposed.Value <- true
            Expect.equal finished.Value started.Value "no load still running after disposal"
            let after = started.Value
            // Batch 0, and at most the 2 batches queued behind it (prefetch 2), nothing more.
            Expect.isTrue (after >= 2 && after <= 6) $"bounded prefetch ({after} loads)"
            // A worker that outlived disposal would load on while another loader runs.
            Expect.equal (Loader.batches (source 4 Set.empty) spec 2 false 1 0 2 2 |> Seq.length) 2 "another loader runs"
            Expect.equal (afterDisposal.Value, started.Value) (0, after) "no loads after disposal"
        }

        test "fromSamples reads files and reports missing ones" {
            use dir = new TempDir "loader"
            let write i =
                let p = dir.File $"{i}.png"
                noisy i 20 20 |> savePng p
                p
            let samples =
                [| for i in 0 .. 3 ->
                       { Path = (if i = 2 then dir.File "missing.png" else write i)
                         Label = i * 10; Box = None; TrimBottom = 0 } |]
            let bs = Loader.batches (Loader.fromSamples samples false) spec 4 false 0 0 2 1 |> List.ofSeq
            Expect.equal (labels bs) [ 0L; 10L; 30L ] "labels"
            Expect.equal (bs |> List.collect _.Skipped |> List.map fst) [ samples[2].Path ] "missing"
        }
    ]

let private meanAbsDiff (a: Image<Rgb24>) (b: Image<Rgb24>) =
    Array.map2 (fun (p: Rgb24) (q: Rgb24) ->
        float (abs (int p.R - int q.R) + abs (int p.G - int q.G) + abs (int p.B - int q.B)) / 3.0)
        (pixels a) (pixels b)
    |> Array.average

let private changedFraction (a: Image<Rgb24>) (b: Image<Rgb24>) =
    Array.map2 (fun p q -> if p <> q then 1.0 else 0.0) (pixels a) (pixels b) |> Array.average

let private synthetic =
    let config = Synthetic.Config.Default
    testList "synthetic" [
        test "same seed gives identical pixels" {
            use a = Synthetic.render config Synthetic.Train 5
            use b = Synthetic.render config Synthetic.Train 5
            Expect.equal (pixels a) (pixels b) "same"
            use c = Synthetic.render { config with Seed = config.Seed + 1 } Synthetic.Train 5
            Expect.notEqual (pixels a) (pixels c) "seed matters"
        }

        test "classes differ only in small local details" {
            let size = config.ImageSize
            for seed in 0 .. 19 do
                use reference = Synthetic.renderClass size 0 seed
                use other = Synthetic.renderClass size 0 (seed + 1000)
                let nuisance = meanAbsDiff reference other
                for c in 1 .. config.Classes - 1 do
                    use img = Synthetic.renderClass size c seed
                    let changed = changedFraction reference img
                    // Integer pixel arithmetic, no rounding: the bounds are the design's. The three parts (wing
                    // marking, eye, tail tip) cover well under 8% of the image, and a class changes the picture at
                    // most a third as much as redrawing the nuisances does.
                    Expect.isGreaterThan changed 0.0 $"class {c} visible (seed {seed})"
                    Expect.isLessThan changed 0.08 $"class {c} local (seed {seed})"
                    Expect.isLessThan (meanAbsDiff reference img * 3.0) nuisance $"class {c} vs nuisance (seed {seed})"
        }

        test "details survive the synthetic test transform" {
            let input = Pmg.Fs.Experiment.embedded.Input
            let spec = Transforms.Spec.test input.Resize input.Crop
            for seed in 0 .. 19 do
                use reference = Synthetic.renderClass config.ImageSize 0 seed
                let r = apply spec (Random 0) reference
                for c in 1 .. config.Classes - 1 do
                    use img = Synthetic.renderClass config.ImageSize c seed
                    Expect.notEqual (apply spec (Random 0) img) r $"class {c} seed {seed}"
        }

        test "labels are balanced and names distinct" {
            let data = Synthetic.create config
            Expect.equal data.Classes.Length config.Classes "class count"
            Expect.equal (Array.distinct data.Classes).Length config.Classes "distinct names"
            Expect.equal data.Classes[0] "stripe-h/eye-dot/tail-fork" "name format"
            for src, perClass in [ data.Train, config.TrainPerClass; data.Test, config.TestPerClass ] do
                let counts = Array.init src.Count src.Label |> Array.countBy id |> Array.sort
                Expect.equal counts (Array.init config.Classes (fun c -> c, perClass)) "balanced"
        }

        test "train and test images differ and have the configured size" {
            use a = Synthetic.render config Synthetic.Train 0
            use b = Synthetic.render config Synthetic.Test 0
            Expect.equal (a.Width, a.Height) (config.ImageSize, config.ImageSize) "size"
            Expect.notEqual (pixels a) (pixels b) "splits differ"
        }
    ]

[<Tests>]
let tests = testList "data pipeline" [ transforms; images; loader; synthetic ]
