// The paper's ablations (Du et al., ECCV 2020, Sec. 4.3) as data: each a named change of one base experiment,
// trained in turn into runs/ablation-<name>, then one Markdown table. The base is the main job's recipe on the
// embedded dataset (ImageNet weights, as the paper starts from), changed by any `pmg train` flag:
//   dotnet fsi experiments/ablation.fsx                                   7 runs of the main job's recipe
//   dotnet fsi experiments/ablation.fsx --quick                           a fast check (1 epoch, a small dataset)
//   dotnet fsi experiments/ablation.fsx --backbone convnext_tiny          the same ablations on another backbone
//   dotnet fsi experiments/ablation.fsx --dataset cub --root CUB_200_2011 --epochs 50 --device cuda
#load "Pmg.fsx"
#load "Common.fsx"

open System
open System.IO
open Pmg.Fs
open Pmg.Fs.Experiment
open Pmg.Fs.Training

let argv = fsi.CommandLineArgs |> Array.tail
let quick = argv |> Array.contains "--quick"

/// --quick: one epoch on 10 training and 5 test images a class (of the embedded dataset).
let quickEpochs = 1
let quickTrainPerClass, quickTestPerClass = 10, 5

let baseExperiment =
    let args = Common.parseTrainArgs "ablation" (argv |> Array.filter ((<>) "--quick"))
    // Each ablation has its own folder, named below.
    if args.Contains Pmg.Cli.Args.TrainArgs.Out || args.Contains Pmg.Cli.Args.TrainArgs.Resume then
        Common.fail "--out, --resume: the ablations write runs/ablation-<dataset>-<backbone>-<name>, one new folder each; leave these flags out" 2
    let settings = Pmg.Cli.TrainSettings.settingsOf args
    Common.guarded (fun () ->
        match settings.Dataset |> Option.map (fun d -> d.ToLowerInvariant()), embedded.Data with
        | (None | Some "embedded"), Embedded d ->
            let data = if quick then Embedded { d with TrainPerClass = quickTrainPerClass; TestPerClass = quickTestPerClass } else Embedded d
            let e = App.Training.experimentOn data d.Classes settings
            if quick && settings.Epochs.IsNone then withEpochs quickEpochs e else e
        | _ -> App.Training.experiment settings |> fst)

let ablations: (string * Experiment) list =
    let b = baseExperiment
    [ "PMG (progressive, 8/4/2 + concat)", b
      "all steps in one update (sum of losses)", { b with Update = Joint }
      "no jigsaw", withGrids [ 1; 1; 1 ] b
      "S = 1", withHeads 1 b
      "S = 2", withHeads 2 b
      "grids 4/2/1", withGrids [ 4; 2; 1 ] b
      "baseline: plain backbone + one classifier", plainBaseline b ]

/// A name usable as a folder: letters and digits, the rest collapsed to '-'.
let slug (name: string) =
    let mapped = name.ToLowerInvariant() |> String.map (fun c -> if Char.IsLetterOrDigit c then c else '-')
    mapped.Split('-', StringSplitOptions.RemoveEmptyEntries) |> String.concat "-"

type Result = { Name: string; Heads: string; Concat: float; Combined: float; Seconds: float }

let runOne (name: string, e: Experiment) : Result =
    let dir = Path.Combine("runs", sprintf "ablation-%s-%s" (runName e) (slug name))
    printfn "== %s -> %s" name dir
    let watch = Diagnostics.Stopwatch.StartNew()
    let summary =
        Run.train e dir false
            { Trainer.Hooks.None with
                Epoch = fun _ r -> printfn "   epoch %d/%d  test combined %.1f%%" (r.Epoch + 1) e.Epochs (100.0 * r.Test.Combined) }
    let last = (List.last summary.History).Test
    let heads =
        List.zip (Model.Pmg.headNames e.Model) last.Heads
        |> List.map (fun (n, a) -> sprintf "%s %.1f%%" n (100.0 * a))
        |> String.concat ", "
    { Name = name; Heads = heads; Concat = last.Concat; Combined = last.Combined; Seconds = watch.Elapsed.TotalSeconds }

let results = ablations |> List.map runOne

printfn "\n%s each, %s %s, %s dataset%s, last epoch's test accuracy:\n"
    (if baseExperiment.Epochs = 1 then "1 epoch" else sprintf "%d epochs" baseExperiment.Epochs)
    baseExperiment.Model.Backbone (Model.Backbone.Weights.describe baseExperiment.Weights) (dataName baseExperiment)
    (if quick then " (--quick: reduced)" else "")
printfn "| ablation | stage heads' top-1 | concat | combined | seconds |"
printfn "|----------|--------------------|--------|----------|---------|"
for r in results do
    printfn "| %s | %s | %.1f%% | %.1f%% | %.0f |" r.Name r.Heads (100.0 * r.Concat) (100.0 * r.Combined) r.Seconds
