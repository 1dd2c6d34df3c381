// Shared by the dataset scripts (cub.fsx, cars.fsx, aircraft.fsx, dogs.fsx): the paper's recipe on one dataset,
// trained through the library's application layer, with the results printed beside the paper's number. The
// ablation script reads the same flags (parseTrainArgs) for its base experiment.
//   dotnet fsi experiments/<dataset>.fsx --root DIR [any `pmg train` flag: --device cuda, --epochs N, --out DIR, ...]
// The flags are `pmg train`'s, read by the command's own definitions (src/Pmg.Cli/Args.fs, TrainSettings.fs) and
// turned into an experiment by the library's rules (Pmg.Fs.App.Training): no second parser, no second recipe, and
// the same weights policy as the command (`--pretrained imagenet` by default: the reference's torchvision file).
// A dataset script loads Pmg.fsx itself, then this file: `#load "Pmg.fsx"` here, nested under another script,
// fails in dotnet fsi 10 (FS0247: the script module `Pmg` of Pmg.fsx clashes with the library's namespace `Pmg`
// when the load is not at the top level).
#r "nuget: Argu, 6.1.1"
#load "../src/Pmg.Cli/Args.fs" "../src/Pmg.Cli/TrainSettings.fs"

open System
open Argu
open Pmg.Fs
open Pmg.Fs.App
open Pmg.Fs.Training

/// What differs between the dataset scripts.
type DatasetSpec =
    { /// The dataset's name as `pmg train --dataset` takes it.
      Kind: string
      /// Human name for messages.
      Name: string
      /// The official archive's folder name.
      Fixture: string
      /// The paper's ResNet50 top-1 (%), None where the paper does not report the dataset.
      PaperTop1: float option
      /// Where to get the dataset.
      Download: string }

/// Exit code of a bad or missing input (as `pmg`'s for a flag), 1 for anything else.
let private badInput = 2

let private printEpoch (e: Experiment.Experiment) (_: Trainer.Progress) (r: Trainer.EpochRecord) =
    printfn "epoch %d/%d  losses %s  train %.1f%%  test combined %.1f%%  concat %.1f%%  (%.1f img/s)"
        (r.Epoch + 1) e.Epochs (r.StepLosses |> List.map (sprintf "%.3f") |> String.concat " ")
        (100.0 * r.TrainAccuracy) (100.0 * r.Test.Combined) (100.0 * r.Test.Concat) r.ImagesPerSecond

let private printResults (spec: DatasetSpec) (e: Experiment.Experiment) (summary: Run.Summary) =
    let last = List.last summary.History
    printfn "\nfinal epoch %d, test set (%d images):" (last.Epoch + 1) last.Test.Images
    printfn "%s" (Evaluate.table (Model.Pmg.headNames e.Model) last.Test)
    printfn "mean per-class accuracy (combined): %.1f%%" (100.0 * Evaluate.meanPerClass last.Test)
    let paper =
        match spec.PaperTop1 with
        | Some p -> sprintf "%.1f%% (ResNet50, combined)" p
        | None -> "not reported in the paper"
    // The reference reports the best epoch's test accuracy; both are printed so that like is compared with like.
    printfn "top-1 combined: last epoch %.1f%%, best epoch %.1f%% (epoch %d)   paper: %s"
        (100.0 * last.Test.Combined) (100.0 * summary.BestCombined) (summary.BestEpoch + 1) paper
    let recipe = Experiment.paper e.Model.Classes e.Data
    if e.Epochs < recipe.Epochs || e.Model.Backbone <> recipe.Model.Backbone || e.Weights <> recipe.Weights then
        printfn "(not the paper's recipe: %d epochs, %s, %s; not comparable to the paper's number)"
            e.Epochs e.Model.Backbone (Model.Backbone.Weights.describe e.Weights)

/// Prints a message and ends the script with `code`.
let fail (message: string) (code: int) : 'a =
    eprintfn "%s" message
    exit code

/// A failure as one line naming the flag to change, and its exit code (2 for a setting, 1 for the rest).
let described (e: exn) =
    match e with
    | :? PmgException as p ->
        match p.Error with
        | InvalidSetting(s, m) -> sprintf "%s: %s" (Pmg.Cli.Args.flagOf s) m, badInput
        | InvalidExperiment ps -> ps |> List.map (fun (s, m) -> sprintf "%s: %s" (Pmg.Cli.Args.flagOf s) m) |> String.concat "; ", badInput
        | error -> error.Message, 1
    | e -> e.Message, 1

/// `pmg train`'s flags, read by the command's own definitions; a bad flag ends the script with its usage line.
let parseTrainArgs (script: string) (argv: string[]) : ParseResults<Pmg.Cli.Args.TrainArgs> =
    let parser = ArgumentParser.Create<Pmg.Cli.Args.TrainArgs>(programName = sprintf "dotnet fsi experiments/%s.fsx" script)
    try
        parser.ParseCommandLine(argv, raiseOnUsage = true)
    with :? ArguParseException as e ->
        fail e.Message (if e.ErrorCode = ErrorCode.HelpText then 0 else badInput)

/// Runs `f`, ending the script with one line and its exit code when it fails.
let guarded (f: unit -> 'a) : 'a =
    try
        f ()
    with e ->
        let line, code = described e
        fail line code

/// The whole script: `pmg train`'s flags for this dataset, the experiment, training, results.
let run (spec: DatasetSpec) =
    let args = parseTrainArgs spec.Kind (fsi.CommandLineArgs |> Array.tail)
    let settings = { Pmg.Cli.TrainSettings.settingsOf args with Dataset = Some spec.Kind }
    if settings.Root.IsNone then
        fail (sprintf "%s: no dataset folder given. Download it from %s, extract it (folder %s), then pass --root <folder>." spec.Name spec.Download spec.Fixture) badInput
    guarded (fun () ->
        let e, opened = Training.experiment settings
        printfn "PMG %s (%s) on %s (%s): %d classes, %s, batch %d, %d px crops of %d px, device %s"
            e.Model.Backbone (Model.Backbone.Weights.describe e.Weights) spec.Name (match e.Data with Experiment.OnDisk d -> d.Root | _ -> "embedded")
            e.Model.Classes (if e.Epochs = 1 then "1 epoch" else sprintf "%d epochs" e.Epochs) e.BatchSize e.Input.Crop e.Input.Resize (Runtime.Device.text e.Device)
        let watch = Diagnostics.Stopwatch.StartNew()
        let folder, summary = Training.train (e, opened) (args.TryGetResult Pmg.Cli.Args.TrainArgs.Out) (args.Contains Pmg.Cli.Args.TrainArgs.Resume) { Trainer.Hooks.None with Epoch = printEpoch e }
        printfn "run folder: %s (config.json and manifest.json record the settings and seed)" (IO.Path.GetFullPath folder)
        if not summary.History.IsEmpty then printResults spec e summary
        printfn "elapsed %s" (watch.Elapsed.ToString @"hh\:mm\:ss"))
