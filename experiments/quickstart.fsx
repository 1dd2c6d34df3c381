// The main job through the library: PMG fine-tuned from ImageNet weights on the embedded dataset, then the
// results table.
//   dotnet fsi experiments/quickstart.fsx [epochs]
#load "Pmg.fsx"

open System
open Pmg.Fs
open Pmg.Fs.Training

// The experiment is a record: change any field here, or use Experiment's functions for the settings that follow
// from others (withBackbone, withHeads, withGrids, withImageSize, withLr, withEpochs).
let experiment =
    match fsi.CommandLineArgs |> Array.tryItem 1 with
    | Some epochs -> Experiment.embedded |> Experiment.withEpochs (int epochs)
    | None -> Experiment.embedded

let runDir = App.Training.defaultFolder experiment DateTime.Now

let report (_: Trainer.Progress) (r: Trainer.EpochRecord) =
    printfn "epoch %d/%d  losses %s  test combined %.1f%%  (%.1f img/s)"
        (r.Epoch + 1) experiment.Epochs (r.StepLosses |> List.map (sprintf "%.3f") |> String.concat " ")
        (100.0 * r.Test.Combined) r.ImagesPerSecond

let summary = Run.train experiment runDir false { Trainer.Hooks.None with Epoch = report }
let last = List.last summary.History
printfn "\n%s" (Evaluate.table (Model.Pmg.headNames experiment.Model) last.Test)
printfn "run directory: %s" (IO.Path.GetFullPath runDir)
