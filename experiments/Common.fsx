// Shared by the dataset scripts (cub.fsx, cars.fsx, aircraft.fsx, dogs.fsx): reads the arguments, finds the
// dataset and the ImageNet weights, builds the experiment (the paper's recipe, or a miniature for --smoke), trains
// it with Run.train and prints the results beside the paper's number.
//   dotnet fsi experiments/<dataset>.fsx [--smoke] [--root DIR] [--pretrained FILE] [--epochs N]
//                                        [--device cpu|cuda] [--precision fp32|bf16] [--out DIR]
// A dataset script loads Pmg.fsx itself, then this file: `#load "Pmg.fsx"` here, nested under another script,
// fails in dotnet fsi 10 (FS0247: the script module `Pmg` of Pmg.fsx clashes with the library's namespace `Pmg`
// when the load is not at the top level).

open System
open System.IO
open Pmg.Fs
open Pmg.Fs.Training

/// What differs between the dataset scripts.
type DatasetSpec =
    { /// Dataset kind as Run/Dataset know it: cub, cars, aircraft, dogs.
      Kind: string
      /// Human name for messages.
      Name: string
      /// The official archive's folder name (also the test suite's generated miniature's).
      Fixture: string
      /// Environment variable that holds the dataset root when --root is not given.
      RootVariable: string
      /// The paper's ResNet50 top-1 (%), None where the paper does not report the dataset.
      PaperTop1: float option
      /// Where to get the dataset.
      Download: string }

/// Exit code for "cannot run: something to download or set first" (1 is left to crashes).
let missingInputExit = 2

/// Environment variable for the ImageNet weights when --pretrained is not given.
let pretrainedVariable = "PMG_PRETRAINED"

/// torchvision's ResNet50 ImageNet weights, the paper's starting point.
let pretrainedDownload = "https://download.pytorch.org/models/resnet50-19c8e357.pth"

type Args =
    { Smoke: bool
      Root: string option
      Pretrained: string option
      Epochs: int option
      Device: Runtime.Device
      /// fp32, or bf16 mixed precision (bf16 compute, fp32 weights and optimizer state: for GPUs).
      Precision: Experiment.Precision
      Out: string option }

/// `--flag value` pairs and the bare `--smoke`; anything else stops the script with the usage.
let parseArgs (argv: string list) : Args =
    let usage () =
        eprintfn "usage: dotnet fsi <script> [--smoke] [--root DIR] [--pretrained FILE] [--epochs N] [--device cpu|cuda] [--precision fp32|bf16] [--out DIR]"
        exit missingInputExit
    let rec go (a: Args) args =
        match args with
        | [] -> a
        | "--smoke" :: rest -> go { a with Smoke = true } rest
        | "--root" :: v :: rest -> go { a with Root = Some v } rest
        | "--pretrained" :: v :: rest -> go { a with Pretrained = Some v } rest
        | "--epochs" :: v :: rest ->
            match Int32.TryParse v with
            | true, n when n >= 1 -> go { a with Epochs = Some n } rest
            | _ -> usage ()
        | "--device" :: v :: rest ->
            match (try Some(Runtime.Device.parse v) with Runtime.DeviceError _ -> None) with
            | Some d -> go { a with Device = d } rest
            | None -> usage ()
        | "--precision" :: "fp32" :: rest -> go { a with Precision = Experiment.Fp32 } rest
        | "--precision" :: "bf16" :: rest -> go { a with Precision = Experiment.Bf16 } rest
        | "--out" :: v :: rest -> go { a with Out = Some v } rest
        | other :: _ ->
            eprintfn "unknown argument: %s" other
            usage ()
    go { Smoke = false; Root = None; Pretrained = None; Epochs = None; Device = Runtime.Cpu; Precision = Experiment.Fp32; Out = None } argv

/// A command-line value, else a non-empty environment variable.
let private orEnv (variable: string) (value: string option) =
    match value with
    | Some v -> Some v
    | None ->
        match Environment.GetEnvironmentVariable variable with
        | null | "" -> None
        | v -> Some v

/// Stops the script with a message that says what is missing, where to get it and what to set.
let private missing (lines: string list) : 'a =
    lines |> List.iter (eprintfn "%s")
    exit missingInputExit

let private resolveRoot (spec: DatasetSpec) (args: Args) : string =
    match orEnv spec.RootVariable args.Root with
    | Some root when Directory.Exists root -> root
    | Some root ->
        missing [ sprintf "%s: dataset root %s does not exist." spec.Name (Path.GetFullPath root)
                  sprintf "Download it from %s, extract it, and pass --root <folder %s> or set %s." spec.Download spec.Fixture spec.RootVariable ]
    | None when args.Smoke ->
        missing [ sprintf "--smoke needs --root <folder %s>: a dataset in the official layout, full or miniature." spec.Fixture
                  "(The test suite generates miniatures of all four datasets and passes them with --root.)" ]
    | None ->
        missing [ sprintf "%s: no dataset root given." spec.Name
                  sprintf "Download it from %s, extract it (folder %s), then pass --root <folder> or set %s." spec.Download spec.Fixture spec.RootVariable
                  "(--smoke --root <folder> runs a one-minute check of a small ResNet on it instead.)" ]

/// The backbone and its weights: --pretrained (or PMG_PRETRAINED) as given, else the ImageNet weights that ship
/// with the project, on their backbone (resnet18-mlnet), said aloud: the paper's numbers need ResNet50.
let private resolveWeights (args: Args) : (string * Model.Backbone.Weights) option =
    match orEnv pretrainedVariable args.Pretrained |> Option.map Model.Backbone.Weights.parse with
    | Some(Model.Backbone.File file) when not (File.Exists file) ->
        missing [ sprintf "ImageNet weights %s do not exist." (Path.GetFullPath file)
                  sprintf "Download %s and pass --pretrained <file> or set %s." pretrainedDownload pretrainedVariable ]
    | Some Model.Backbone.ImageNet
    | None ->
        eprintfn "no ResNet50 file given: starting from the ImageNet weights that ship (resnet18-mlnet); the paper's numbers need ResNet50 (download %s, pass --pretrained <file> or set %s)"
            pretrainedDownload pretrainedVariable
        Some("resnet18-mlnet", Model.Backbone.ImageNet)
    | Some w -> Some("resnet50", w)

/// The miniature that --smoke trains: the paper's method on a small ResNet with tiny images, so that the whole
/// pipeline (reading the official layout, jigsaws, every head, evaluation, run directory) runs in about a minute.
module Smoke =
    let backbone = "resnet18"
    let epochs = 1
    let batchSize = 4
    let input: Experiment.Input = { Resize = 36; Crop = 32; Padding = 2 }
    let workers = 1

let private smoke (e: Experiment.Experiment) : Experiment.Experiment =
    let e = e |> Experiment.withBackbone Smoke.backbone |> Experiment.withEpochs Smoke.epochs
    { e with
        // The narrow heads of the embedded recipe: the paper's 512/1024-wide heads only cost time here.
        Model = { e.Model with Head = Experiment.embedded.Model.Head }
        BatchSize = Smoke.batchSize
        Input = Smoke.input
        Workers = Smoke.workers
        Weights = Model.Backbone.Scratch }

/// The experiment for a dataset: the paper's recipe, shrunk for --smoke. The class count comes from the dataset
/// itself, so the fixture (a few classes) and the full dataset take the same path.
let experiment (spec: DatasetSpec) (args: Args) : Experiment.Experiment * (Trainer.Data * Data.Problem list) =
    let root = resolveRoot spec args
    let weights = if args.Smoke then None else resolveWeights args
    let data = Experiment.OnDisk { Kind = Data.Dataset.parse spec.Kind; Root = root }
    let opened = Run.openData data false
    let paper = { Experiment.paper (fst opened).Classes.Length data with Device = args.Device; Precision = args.Precision }
    let paper =
        match weights with
        | Some(backbone, w) -> { Experiment.withBackbone backbone paper with Weights = w }
        | None -> paper
    let e = if args.Smoke then smoke paper else paper
    (match args.Epochs with
     | Some n -> Experiment.withEpochs n e
     | None -> e),
    opened

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
    if e.Epochs < recipe.Epochs || e.Model.Backbone <> recipe.Model.Backbone || e.Weights = Model.Backbone.Scratch then
        printfn "(not the paper's recipe: %d epochs, %s, %s; not comparable to the paper's number)"
            e.Epochs e.Model.Backbone (Model.Backbone.Weights.describe e.Weights)

/// The whole script: arguments, experiment, training, results. Exits 2 when the dataset or weights are missing.
let run (spec: DatasetSpec) =
    let args = parseArgs (fsi.CommandLineArgs |> Array.toList |> List.tail)
    let e, opened = experiment spec args
    let outDir =
        args.Out
        |> Option.defaultWith (fun () ->
            Path.Combine("runs", sprintf "%s-%s%s" spec.Kind (if args.Smoke then "smoke-" else "") (DateTime.Now.ToString "yyyyMMdd-HHmmss")))
    printfn "PMG %s (%s) on %s (%s): %d classes, %d epochs, batch %d, %d px crops of %d px, device %s"
        e.Model.Backbone (Model.Backbone.Weights.describe e.Weights) spec.Name (match e.Data with Experiment.OnDisk d -> d.Root | _ -> "embedded")
        e.Model.Classes e.Epochs e.BatchSize e.Input.Crop e.Input.Resize (Runtime.Device.text e.Device)
    printfn "run directory: %s (config.json and manifest.json record the settings and seed)" (Path.GetFullPath outDir)
    let watch = Diagnostics.Stopwatch.StartNew()
    let summary = Run.trainOn opened e outDir false { Trainer.Hooks.None with Epoch = printEpoch e }
    printResults spec e summary
    printfn "elapsed %s" (watch.Elapsed.ToString @"hh\:mm\:ss")
