/// `pmg cam`, `pmg jigsaw` and `pmg report`: pictures of what the network sees and reports of runs.
module Pmg.Cli.VisualCommands

open System.IO
open Argu
open Pmg.Fs
open Pmg.Fs.App
open Pmg.Fs.Visual
open Pmg.Cli.Args

let private warnWithoutFont () =
    if not (Render.textAvailable ()) then
        eprintfn "warning: no usable font found, so the montage has no captions (set PMG_FONT to a .ttf file)"

let cam (a: ParseResults<CamArgs>) : int =
    let device = a.GetResult(CamArgs.Device, "cpu") |> Args.device
    let checkpoint = a.GetResult CamArgs.Checkpoint
    let overrides: ModelFiles.Overrides =
        { Backbone = a.TryGetResult CamArgs.Backbone
          Classes = a.TryGetResult CamArgs.Classes
          ImageSize = a.TryGetResult CamArgs.Image_Size
          Resize = None }
    let m = ModelFiles.load checkpoint overrides device
    use _ = m.Net
    let names =
        match a.TryGetResult Class_Names with
        | Some f -> File.ReadAllLines f |> Array.filter (fun l -> l.Trim() <> "")
        | None -> m.Description.Classes
    let cls = a.TryGetResult CamArgs.Class |> Option.map (within "--class" 0 (m.Net.Config.Classes - 1))
    let outDir = a.GetResult CamArgs.Out
    for image in a.GetResult CamArgs.Images do
        let c = Views.cam m names image cls outDir
        printfn "%s: %s %s, combined p=%.3f -> %s" image (if c.Chosen then "explaining" else "predicted") c.Name c.Probability c.File
    warnWithoutFont ()
    0

/// The schedule the picture shows: the paper's for --heads, or --grids; the crop size keeps the recipe's resize.
let jigsaw (a: ParseResults<JigsawArgs>) : int =
    let apply f v e = match v with Some x -> f x e | None -> e
    let e =
        Experiment.paper 2 Experiment.embedded.Data
        |> apply Experiment.withHeads (a.TryGetResult JigsawArgs.Heads |> Option.map (within "--heads" 1 4))
        |> apply (fun (g: int list) -> Experiment.withHeads g.Length >> Experiment.withGrids g) (a.TryGetResult Grids |> Option.map (Args.positiveInts "--grids"))
        |> apply Experiment.withImageSize (a.TryGetResult JigsawArgs.Image_Size |> Option.map (within "--image-size" 8 4096))
    let out = a.GetResult JigsawArgs.Out
    let steps = Views.jigsaw e (a.GetResult Image) (a.GetResult(Seed, 0)) out
    printfn "wrote %s (%s)" out (steps |> List.map (fun (_, n) -> if n <= 1 then "whole" else sprintf "%dx%d" n n) |> String.concat ", ")
    warnWithoutFont ()
    0

let report (a: ParseResults<ReportArgs>) : int =
    let runs = a.GetResult Runs
    let out = a.GetResult(ReportArgs.Out, "report.md")
    Views.report runs out
    printfn "wrote %s comparing %d run%s" out runs.Length (if runs.Length = 1 then "" else "s")
    0
