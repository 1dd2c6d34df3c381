// The paper's ablations (Du et al., ECCV 2020, Sec. 4.3) as data: each a named change of the embedded recipe,
// trained in turn into runs/ablation-<name>, then one Markdown table.
//   dotnet fsi experiments/ablation.fsx           about 14 minutes on 2 CPU cores (7 runs of 8 epochs)
//   dotnet fsi experiments/ablation.fsx --quick   a fast check (2 epochs, a small dataset)
#load "Pmg.fsx"

open System
open System.IO
open Pmg.Fs
open Pmg.Fs.Experiment
open Pmg.Fs.Training

Runtime.Native.init Runtime.Native.Cpu |> ignore

let quick = fsi.CommandLineArgs |> Array.contains "--quick"

/// ResNet's stage count, as Schedule.progressive wants it (L in the paper).
let resnetStages = 5

/// The paper's concat loss weight (concat is trained with twice the weight of a head).
let concatWeight = 2.0

/// Fewer epochs than the embedded recipe's 12 so seven runs fit in 15 minutes; warm-up shrunk in proportion.
let fullEpochs, fullWarmup = 8, 3

/// --quick: two epochs (one of them warm-up) on 10 training and 5 test images a class.
let quickEpochs, quickWarmup = 2, 1
let quickTrainPerClass, quickTestPerClass = 10, 5

let baseExperiment =
    if quick then
        let data = { Data.Synthetic.Config.Default with TrainPerClass = quickTrainPerClass; TestPerClass = quickTestPerClass }
        { embedded with Epochs = quickEpochs; WarmupEpochs = quickWarmup; Data = Embedded data }
    else
        { embedded with Epochs = fullEpochs; WarmupEpochs = fullWarmup }

/// S heads on the last S stages, with the paper's progressive grids for them.
let withHeads (s: int) (e: Experiment) =
    { e with Model = { e.Model with Heads = s }; Schedule = Schedule.progressive resnetStages s }

let ablations: (string * Experiment) list =
    let b = baseExperiment
    [ "PMG (progressive, 8/4/2 + concat)", b
      "all steps in one update (sum of losses)", { b with Update = Joint }
      "no jigsaw", { b with Schedule = Schedule.withGrids [ 1; 1; 1 ] concatWeight }
      "S = 1", withHeads 1 b
      "S = 2", withHeads 2 b
      "grids 4/2/1", { b with Schedule = Schedule.withGrids [ 4; 2; 1 ] concatWeight }
      "baseline: plain backbone + one classifier",
      { b with
          Model = { b.Model with Heads = 1 }
          Schedule = [ { Head = Model.Pmg.Concat; Grid = 1; LossWeight = 1.0 } ]
          WarmupEpochs = 0 } ]

/// A name usable as a folder: letters and digits, the rest collapsed to '-'.
let slug (name: string) =
    let mapped = name.ToLowerInvariant() |> String.map (fun c -> if Char.IsLetterOrDigit c then c else '-')
    mapped.Split('-', StringSplitOptions.RemoveEmptyEntries) |> String.concat "-"

type Result = { Name: string; Heads: string; Concat: float; Combined: float; Seconds: float }

let runOne (name: string, e: Experiment) : Result =
    let dir = Path.Combine("runs", "ablation-" + slug name)
    printfn "== %s -> %s" name dir
    let watch = Diagnostics.Stopwatch.StartNew()
    let summary =
        Run.train e dir false
            { Trainer.Hooks.None with
                Epoch = fun r -> printfn "   epoch %d/%d  test combined %.1f%%" (r.Epoch + 1) e.Epochs (100.0 * r.Test.Combined) }
    let last = (List.last summary.History).Test
    let heads =
        List.zip (Model.Pmg.headNames e.Model) last.Heads
        |> List.map (fun (n, a) -> sprintf "%s %.1f%%" n (100.0 * a))
        |> String.concat ", "
    { Name = name; Heads = heads; Concat = last.Concat; Combined = last.Combined; Seconds = watch.Elapsed.TotalSeconds }

let results = ablations |> List.map runOne

printfn "\n%d epochs each (%d warm-up), embedded dataset%s, last epoch's test accuracy:\n"
    baseExperiment.Epochs baseExperiment.WarmupEpochs (if quick then " (--quick: reduced)" else "")
printfn "| ablation | stage heads' top-1 | concat | combined | seconds |"
printfn "|----------|--------------------|--------|----------|---------|"
for r in results do
    printfn "| %s | %s | %.1f%% | %.1f%% | %.0f |" r.Name r.Heads (100.0 * r.Concat) (100.0 * r.Combined) r.Seconds
