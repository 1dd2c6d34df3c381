module Pmg.Fs.Tests.VisualTests

open System
open System.IO
open Expecto
open Argu
open SixLabors.ImageSharp
open SkiaSharp
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Training
open Pmg.Fs.Visual

/// Width and height of a PNG file.
let private pngSize (path: string) =
    use bmp = SKBitmap.Decode path
    Expect.isNotNull bmp (sprintf "%s decodes as an image" path)
    bmp.Width, bmp.Height

let private argmax2D (m: float32[,]) =
    seq { for i in 0 .. Array2D.length1 m - 1 do for j in 0 .. Array2D.length2 m - 1 -> (i, j), m.[i, j] }
    |> Seq.maxBy snd |> fst

/// Features of 2 channels on a 10 x 10 grid: channel 0 lights a 3 x 4 window, channel 1 everything else. A
/// linear classifier on their spatial means makes logit 0 depend on the window only.
let private window = (2, 5), (6, 10) // rows 2..4, columns 6..9
let private windowFeatures () =
    let (r0, r1), (c0, c1) = window
    let inside i j = i >= r0 && i < r1 && j >= c0 && j < c1
    let a = Array.init 200 (fun k ->
        let ch, i, j = k / 100, (k % 100) / 10, k % 10
        if (ch = 0) = inside i j then 1.0f else 0.0f)
    torch.tensor(a, dimensions = ReadOnlySpan [| 1L; 2L; 10L; 10L |])

/// A region of the input lit, the rest exactly zero: in a freshly built network (convolutions without bias,
/// BatchNorm at its initial statistics) every feature that no lit pixel reaches is exactly zero, so a correct
/// map is zero there too; a transposed, flipped or misplaced map is not.
let private regionSize = 32
let private inputSide = 256

let private litCorner () =
    let x = torch.zeros (1L, 3L, int64 inputSide, int64 inputSide)
    let start = int64 (inputSide - regionSize)
    let corner = x.narrow(2L, start, int64 regionSize).narrow(3L, start, int64 regionSize)
    Runtime.Ops.scalar 1.0 (fun one -> corner.fill_ one) |> ignore
    x

[<Tests>]
let tests =
    testSequenced
    <| testList
        "visual"
        [ test "Grad-CAM of a logit that reads a known window peaks inside it" {
              use _ = torch.NewDisposeScope()
              let features = windowFeatures ()
              let logitsOf (a: torch.Tensor) = a.mean ([| 2L; 3L |]) // (1, 2): identity classifier on pooled features
              let (r0, r1), (c0, c1) = window
              let m0 = GradCam.ofFeatures features logitsOf 0
              let i, j = argmax2D m0
              Expect.isTrue (i >= r0 && i < r1 && j >= c0 && j < c1) (sprintf "class 0 peaks at (%d, %d), inside the window" i j)
              for i in 0 .. 9 do
                  for j in 0 .. 9 do
                      if not (i >= r0 && i < r1 && j >= c0 && j < c1) then
                          Expect.equal m0.[i, j] 0.0f "nothing outside the window"
              let m1 = GradCam.ofFeatures features logitsOf 1
              Expect.equal m1.[r0, c0] 0.0f "class 1 does not look at the window"
              Expect.isGreaterThan m1.[0, 0] 0.0f "class 1 looks outside it"
          }
          test "Grad-CAM reaches through ConvNeXt's and Swin's stages: a map per output, at input size, not flat" {
              for backbone, side in [ "convnext_tiny", 64; "swin_t", 224 ] do
                  use _ = torch.NewDisposeScope()
                  torch.manual_seed 0L |> ignore
                  use net = Pmg.create { Pmg.Config.Paper 3 with Backbone = backbone; Head = { Heads.Config.Paper with FeatureSize = 64; BlockChannels = 64 } }
                  let x = torch.rand ([| 1L; 3L; int64 side; int64 side |])
                  let e = GradCam.forNetwork net x None
                  let combined = (net.forward x).Combined.softmax(1L).[0L, int64 e.Class].item<float32> () |> float
                  Expect.floatClose Accuracy.medium e.Combined combined (sprintf "%s: combined score is the network's softmax" backbone)
                  Expect.equal (e.Maps |> List.map _.Head) [ "stage3"; "stage4"; "stage5"; "concat" ] (sprintf "%s: one map per output" backbone)
                  for m in e.Maps do
                      Expect.equal (Array2D.length1 m.Map, Array2D.length2 m.Map) (side, side) (sprintf "%s %s: map at input size" backbone m.Head)
                      let values = m.Map |> Seq.cast<float32> |> List.ofSeq
                      Expect.isTrue (values |> List.forall (fun v -> v >= 0.0f && v <= 1.0f)) (sprintf "%s %s: map in [0, 1]" backbone m.Head)
                  // Gradients reach the stage features of every head: at least the heads' maps are not all zero.
                  let nonFlat = e.Maps |> List.filter (fun m -> m.Map |> Seq.cast<float32> |> Seq.exists (fun v -> v > 0.0f))
                  Expect.isNonEmpty nonFlat (sprintf "%s: some map is not flat" backbone)
          }

          test "Grad-CAM of a PMG network stays where the input carries information" {
              use _ = torch.NewDisposeScope()
              torch.manual_seed 0L |> ignore
              use net = Pmg.create { Pmg.Config.Paper 3 with Backbone = "resnet18"; Head = { Heads.Config.Paper with FeatureSize = 64; BlockChannels = 64 } }
              let x = litCorner ()
              // The lit square is the bottom-right corner; the top-left quarter of the image is far from it.
              let far = inputSide / 4
              let explanations = [ for c in 0 .. 2 -> GradCam.forNetwork net x (Some c) ]
              let logits = net.forward x
              for e in explanations do
                  Expect.equal (e.Maps |> List.map _.Head) [ "stage3"; "stage4"; "stage5"; "concat" ] "one map per output"
                  let combined = (logits.Combined.softmax 1L).[0L, int64 e.Class].item<float32> () |> float
                  // The same fp32 forward computed twice (Grad-CAM's and this one): equal up to the order of
                  // reductions, a few fp32 ulps; Accuracy.medium (1e-5 relative, 1e-8 absolute) is far above that.
                  Expect.floatClose Accuracy.medium e.Combined combined "combined score is the network's softmax"
                  for m in e.Maps do
                      Expect.equal (Array2D.length1 m.Map, Array2D.length2 m.Map) (inputSide, inputSide) "map at input size"
                      Expect.isTrue (m.Map |> Seq.cast<float32> |> Seq.forall (fun v -> v >= 0.0f && v <= 1.0f)) "map in [0, 1]"
              // The two shallow heads' features do not reach the far quarter: their maps must be zero there, and not
              // all zero (some class has evidence near the lit corner).
              for head in [ "stage3"; "stage4" ] do
                  let maps = explanations |> List.map (fun e -> e.Maps |> List.find (fun m -> m.Head = head)) |> List.map _.Map
                  let nonFlat = maps |> List.filter (fun m -> m |> Seq.cast<float32> |> Seq.exists (fun v -> v > 0.0f))
                  Expect.isNonEmpty nonFlat (sprintf "%s has a non-empty map for some class" head)
                  for m in nonFlat do
                      let i, j = argmax2D m
                      Expect.isTrue (i >= inputSide / 2 && j >= inputSide / 2) (sprintf "%s peaks at (%d, %d), in the lit quarter" head i j)
                      for i in 0 .. far - 1 do
                          for j in 0 .. far - 1 do
                              if m.[i, j] <> 0.0f then failtestf "%s is %g at (%d, %d), where no lit pixel reaches" head m.[i, j] i j
          }
          test "a Grad-CAM montage is written with one tile per output plus the input" {
              use _ = torch.NewDisposeScope()
              torch.manual_seed 1L |> ignore
              use net = Pmg.create { Pmg.Config.Paper 3 with Backbone = "resnet18"; Head = { Heads.Config.Paper with FeatureSize = 64; BlockChannels = 64 } }
              let x = torch.randn (1L, 3L, 64L, 64L)
              let e = GradCam.forNetwork net x None
              use input = Render.ofInput [| 0.5f; 0.5f; 0.5f |] [| 0.5f; 0.5f; 0.5f |] x
              use dir = new TestKit.TempDir "visual"
              let path = dir.File "cam.png"
              Render.camMontage "test image" [| "a"; "b"; "c" |] input e path
              Expect.equal (pngSize path) (Render.montageSize 5 192 2) "input + 4 maps, 2 caption lines each"
          }
          test "the jigsaw montage shows every step's input side by side" {
              use _ = torch.NewDisposeScope()
              let x = torch.randn (1L, 3L, 64L, 64L)
              use dir = new TestKit.TempDir "visual"
              let path = dir.File "jigsaw.png"
              let steps = [ "stage3", 8; "stage4", 4; "stage5", 2; "concat", 1 ]
              Render.jigsawMontage "test" [| 0.5f; 0.5f; 0.5f |] [| 0.5f; 0.5f; 0.5f |] x steps 0L path
              Expect.equal (pngSize path) (Render.montageSize 4 192 2) "4 tiles"
          }
          test "a short run's directory holds plots, confusion matrix, per-class accuracy and a consistent report" {
              // Two checkpoints of the full-width heads are hundreds of megabytes: both folders go at the end.
              use runDir = new TestKit.TempDir "visual-run"
              use compareTemp = new TestKit.TempDir "visual-compare"
              let dir, compareDir = runDir.Path, compareTemp.Path
              let summary = Run.train TrainingTests.tiny dir false Trainer.Hooks.None
              let classes = File.ReadAllLines(Path.Combine(dir, "classes.txt")) |> Array.filter (fun l -> l <> "")
              let best = (summary.History |> List.find (fun r -> r.Epoch = summary.BestEpoch)).Test
              Report.writeRun dir classes best
              for f in [ "config.json"; "manifest.json"; "metrics.csv"; "last.ckpt"; "best.ckpt"; "classes.txt" ] @ Report.files do
                  Expect.isTrue (File.Exists(Path.Combine(dir, f))) (sprintf "%s exists" f)
              for png in [ Report.lossesPng; Report.accuracyPng; Report.confusionPng ] do
                  let w, h = pngSize (Path.Combine(dir, png))
                  Expect.isTrue (w > 100 && h > 100) (sprintf "%s is a real picture" png)
              // metrics.csv's last row is the trainer's final record.
              let m = Plots.readMetrics (Path.Combine(dir, "metrics.csv"))
              let last = List.last summary.History
              let row = m.Rows - 1
              Expect.equal m.Rows TrainingTests.tiny.Epochs "one row per epoch"
              // metrics.csv prints 6 decimals ("0.######"): the file differs from the record by at most 5e-7.
              let close what (a: float) (b: float) = Expect.floatClose { absolute = 1e-6; relative = 1e-5 } a b what
              close "combined" (m.Column "test_combined").[row] last.Test.Combined
              close "concat" (m.Column "test_concat").[row] last.Test.Concat
              close "top-5" (m.Column "test_combined_top5").[row] last.Test.CombinedTop5
              // Columns named as everywhere else: heads by the stage they read, losses by step (output and jigsaw).
              List.iter2 (fun name h -> close name (m.Column("test_" + name)).[row] h) (Model.Pmg.headNames TrainingTests.tiny.Model) last.Test.Heads
              List.iter2 (fun (step: Schedule.Step) l -> close (Schedule.stepName step) (m.Column(Run.lossColumn step)).[row] l) TrainingTests.tiny.Schedule last.StepLosses
              Expect.equal (m.Starting "loss_") [ "loss_stage3_8x8"; "loss_stage4_4x4"; "loss_stage5_2x2"; "loss_concat_whole" ] "loss columns say what each loss is"
              // The per-class CSV counts the best checkpoint's test images and its combined accuracy.
              let rows = File.ReadAllLines(Path.Combine(dir, Report.perClassCsv)) |> Array.skip 1 |> Array.map (fun l -> l.Split ',')
              Expect.equal rows.Length classes.Length "one row per class"
              Expect.equal (rows |> Array.sumBy (fun r -> int r.[2])) best.Images "images"
              Expect.equal (rows |> Array.sumBy (fun r -> int r.[3])) (int (Math.Round(best.Combined * float best.Images))) "correct"
              let md = File.ReadAllText(Path.Combine(dir, Report.reportMd))
              Expect.stringContains md (sprintf "Best epoch: %d" (summary.BestEpoch + 1)) "best epoch in report.md"
              for png in [ Report.lossesPng; Report.accuracyPng; Report.confusionPng ] do
                  Expect.stringContains md (sprintf "(%s)" png) (sprintf "report.md links %s" png)
              // Comparing runs.
              let out = Path.Combine(compareDir, "compare.md")
              Report.compare [ dir ] out
              Expect.isTrue (File.Exists(Path.Combine(Path.GetDirectoryName out, "compare-combined.png"))) "comparison plot"
              Expect.stringContains (File.ReadAllText out) (Path.GetFileName dir) "the run is listed"
              // The commands on this run's checkpoint and an image of its dataset.
              let image = Path.Combine(dir, "bird.png")
              use img = Data.Synthetic.renderClass 48 1 0
              img.SaveAsPng image
              let camArgs = ArgumentParser.Create<Pmg.Cli.Args.CamArgs>().ParseCommandLine [| "--checkpoint"; summary.BestCheckpoint; "--out"; dir; image |]
              Expect.equal (Pmg.Cli.VisualCommands.cam camArgs) 0 "pmg cam succeeds"
              Expect.isTrue (File.Exists(Path.Combine(dir, "bird-cam.png"))) "cam montage"
              let jigsawOut = Path.Combine(dir, "jigsaw.png")
              let jigsawArgs = ArgumentParser.Create<Pmg.Cli.Args.JigsawArgs>().ParseCommandLine [| image; "--heads"; "3"; "--image-size"; "64"; "--out"; jigsawOut |]
              Expect.equal (Pmg.Cli.VisualCommands.jigsaw jigsawArgs) 0 "pmg jigsaw succeeds"
              Expect.equal (pngSize jigsawOut) (Render.montageSize 4 192 2) "8, 4, 2 and the whole image"
          } ]
