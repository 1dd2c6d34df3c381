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

type CamArgs =
    | [<Mandatory>] Checkpoint of file: string
    | [<Mandatory>] Out of dir: string
    | Class of k: int
    | Class_Names of file: string
    | Backbone of name: string
    | Classes of n: int
    | Image_Size of px: int
    | Device of device: string
    | [<MainCommand; Mandatory>] Images of image: string list

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "a Pmg.Fs checkpoint (.ckpt) or a PyTorch state_dict (.pth)."
            | Out _ -> "folder for the montages (<image>-cam.png)."
            | Class _ -> "class to explain (default: the class the combined logits predict)."
            | Class_Names _ -> "class names, one a line (default: classes.txt beside the checkpoint)."
            | Backbone _ -> "backbone of a .pth checkpoint (default resnet50)."
            | Classes _ -> "class count (checked against the checkpoint)."
            | Image_Size _ -> "crop size (default: the checkpoint's)."
            | Device _ -> "cpu (default) or cuda."
            | Images _ -> "image files."

type JigsawArgs =
    | [<MainCommand; Mandatory>] Image of image: string
    | [<Mandatory>] Out of file: string
    | N of n: int
    | Grids of list: string
    | Image_Size of px: int
    | Seed of n: int

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Image _ -> "image file."
            | Out _ -> "PNG to write."
            | N _ -> "finest jigsaw grid; the steps halve it down to 2, then the whole image (default 8: 8, 4, 2, 1)."
            | Grids _ -> "jigsaw grid per granularity step instead, finest first, e.g. 8,4,2 (the whole image is added)."
            | Image_Size _ -> "crop size (default 448)."
            | Seed _ -> "seed of the patch permutations (default 0)."

type ReportArgs =
    | [<MainCommand; Mandatory>] Runs of dir: string list
    | Out of file: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Runs _ -> "run directories (each with config.json and metrics.csv)."
            | Out _ -> "Markdown file to write (default report.md); the plot goes beside it."

let private backendOf (device: string) =
    if device.StartsWith "cuda" then Runtime.Native.Cuda else Runtime.Native.Cpu

let private classesTxt = "classes.txt"
let private defaultFinestGrid = 8
let private defaultReport = "report.md"

let private loadImage = Inputs.loadImage

/// The resize that keeps the paper's 550/448 ratio for a crop size.
let private resizeFor (crop: int) =
    int (Math.Round(float crop * float Transforms.Spec.paperResize / float Transforms.Spec.paperCrop))

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
    let beside = Path.Combine(Path.GetDirectoryName(Path.GetFullPath checkpoint), classesTxt)
    match a.TryGetResult Class_Names with
    | Some f -> File.ReadAllLines f
    | None when File.Exists beside -> File.ReadAllLines beside
    | None -> [||]
    |> Array.filter (fun l -> l.Trim() <> "")

let cam (a: ParseResults<CamArgs>) : int =
    let device = a.GetResult(CamArgs.Device, "cpu")
    Runtime.Native.init (backendOf device) |> ignore
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

/// The grids of the granularity steps: --grids, or --n halved down to 2.
let private gridsOf (a: ParseResults<JigsawArgs>) : int list =
    match a.TryGetResult Grids with
    | Some g -> g.Split(',', StringSplitOptions.RemoveEmptyEntries) |> Array.map (fun s -> int (s.Trim())) |> List.ofArray
    | None ->
        let n = a.GetResult(N, defaultFinestGrid)
        if n < 2 then failwithf "--n %d: the finest grid must be at least 2" n
        List.unfold (fun g -> if g >= 2 then Some(g, g / 2) else None) n

let jigsaw (a: ParseResults<JigsawArgs>) : int =
    Runtime.Native.init Runtime.Native.Cpu |> ignore
    let grids = gridsOf a
    let crop = a.GetResult(JigsawArgs.Image_Size, Transforms.Spec.paperCrop)
    let spec = Transforms.Spec.test (resizeFor crop) crop
    let heads =
        // Stage names of a ResNet with one head per grid, where that fits (at most 4 heads on 5 stages).
        let resnetStages = 5
        if grids.Length < resnetStages then Pmg.headNames { Pmg.Config.Paper 2 with Heads = grids.Length }
        else [ for i in 1 .. grids.Length -> sprintf "head%d" i ]
    let steps =
        (List.zip heads grids |> List.mapi (fun i (h, n) -> sprintf "step %d: %s" (i + 1) h, n))
        @ [ sprintf "step %d: concat" (grids.Length + 1), 1 ]
    let path = a.GetResult Image
    use _ = torch.NewDisposeScope()
    let x = inputOf spec torch.CPU path
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
