/// `pmg cam`, `pmg jigsaw` and `pmg report`: pictures of what the network sees and reports of runs.
module Pmg.Cli.VisualCommands

open System
open System.IO
open Argu
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Data
open Pmg.Fs.Visual
open Pmg.Cli.Args

let private defaultReport = "report.md"

let private loadImage = Inputs.loadImage

/// One preprocessed image (1, 3, crop, crop) on `device`.
let private inputOf (spec: Transforms.Spec) (device: torch.Device) (path: string) : torch.Tensor =
    use image = loadImage path
    let pixels = Transforms.apply spec (Random 0) image
    let x = torch.tensor (pixels, dimensions = ReadOnlySpan [| 1L; 3L; int64 spec.Crop; int64 spec.Crop |])
    x.``to`` device

let private warnWithoutFont () =
    if not (Render.textAvailable ()) then
        eprintfn "warning: no usable font found, so the montage has no captions (set PMG_FONT to a .ttf file)"

let private classNamesFor (a: ParseResults<CamArgs>) (checkpoint: string) : string[] =
    let beside = Path.Combine(Path.GetDirectoryName(Path.GetFullPath checkpoint), Run.classesName)
    match a.TryGetResult Class_Names with
    | Some f -> File.ReadAllLines f
    | None when File.Exists beside -> File.ReadAllLines beside
    | None -> [||]
    |> Array.filter (fun l -> l.Trim() <> "")

let cam (a: ParseResults<CamArgs>) : int =
    let device = a.GetResult(CamArgs.Device, "cpu") |> Args.device
    let checkpoint = a.GetResult CamArgs.Checkpoint
    let overrides: Inference.Overrides =
        { Backbone = a.TryGetResult CamArgs.Backbone
          Classes = a.TryGetResult CamArgs.Classes
          ImageSize = a.TryGetResult CamArgs.Image_Size
          Resize = None }
    let m = Inference.load checkpoint overrides device
    let names = classNamesFor a checkpoint
    let outDir = a.GetResult CamArgs.Out
    Directory.CreateDirectory outDir |> ignore
    let spec = Transforms.Spec.test m.Resize m.Crop
    for path in a.GetResult CamArgs.Images do
        use _ = torch.NewDisposeScope()
        let x = inputOf spec m.Device path
        let e = GradCam.forNetwork m.Net x (a.TryGetResult CamArgs.Class)
        use input = Render.ofInput spec.Mean spec.Std x
        let name = if e.Class < names.Length then names.[e.Class] else sprintf "class %d" e.Class
        let verb = if a.Contains CamArgs.Class then "explaining" else "predicted"
        let title = sprintf "%s: Grad-CAM, %s %s (class %d)" (Path.GetFileName path) verb name e.Class
        // "embedded:test:3" becomes "embedded-test-3": no colons in file names.
        let stem = (Path.GetFileNameWithoutExtension path).Replace(':', '-')
        let out = Path.Combine(outDir, stem + "-cam.png")
        Render.camMontage title names input e out
        printfn "%s: %s %s, combined p=%.3f -> %s" path verb name e.Combined out
    warnWithoutFont ()
    0

/// The schedule the picture shows: the paper's for --heads, or --grids; the crop size keeps the recipe's resize.
let jigsaw (a: ParseResults<JigsawArgs>) : int =
    let apply f v e = match v with Some x -> f x e | None -> e
    let e =
        Experiment.paper 2 Experiment.embedded.Data
        |> apply Experiment.withHeads (a.TryGetResult JigsawArgs.Heads)
        |> apply (fun (g: int list) -> Experiment.withHeads g.Length >> Experiment.withGrids g) (a.TryGetResult Grids |> Option.map (Args.positiveInts "--grids"))
        |> apply Experiment.withImageSize (a.TryGetResult JigsawArgs.Image_Size |> Option.map (Args.within "--image-size" 8 4096))
    let spec = Transforms.Spec.test e.Input.Resize e.Input.Crop
    let names = Pmg.headNames e.Model
    let steps =
        e.Schedule
        |> List.mapi (fun i s ->
            let head = match s.Head with Pmg.Granularity h -> names.[h] | Pmg.Concat -> "concat"
            sprintf "step %d: %s" (i + 1) head, s.Grid)
    let path = a.GetResult Image
    use _ = torch.NewDisposeScope()
    let x = inputOf spec (Runtime.Device.torch Runtime.Cpu) path
    let out = a.GetResult JigsawArgs.Out
    let title = sprintf "%s: the inputs of one progressive training iteration" (Path.GetFileName path)
    Render.jigsawMontage title spec.Mean spec.Std x steps (int64 (a.GetResult(Seed, 0))) out
    printfn "wrote %s (%s)" out (steps |> List.map (fun (_, n) -> if n <= 1 then "whole" else sprintf "%dx%d" n n) |> String.concat ", ")
    warnWithoutFont ()
    0

let report (a: ParseResults<ReportArgs>) : int =
    let runs = a.GetResult Runs
    let out = a.GetResult(ReportArgs.Out, defaultReport)
    Report.compare runs out
    printfn "wrote %s comparing %d run(s)" out runs.Length
    0
