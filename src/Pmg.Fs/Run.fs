/// A training run on disk: resolves the data, trains, and leaves a record in the run directory
/// (config.json, manifest.json, metrics.csv, last.ckpt, best.ckpt). The imperative shell around the Trainer.
module Pmg.Fs.Run

open System
open System.IO
open System.Globalization
open Pmg.Fs.Data
open Pmg.Fs.Experiment
open Pmg.Fs.Training

/// Dataset kind from the experiment (with FGVC-Aircraft's level).
let kindOf (d: Experiment.OnDisk) =
    match Dataset.parse d.Kind, d.Level with
    | Dataset.Kind.Aircraft _, Some level -> Dataset.Kind.Aircraft level
    | kind, _ -> kind

/// The images and class names an experiment trains on, and the dataset's unusable files.
let data (e: Experiment) : Trainer.Data * Problem list =
    match e.Data with
    | Embedded config ->
        let d = Synthetic.create config
        { Classes = d.Classes; Train = d.Train; Test = d.Test }, []
    | OnDisk d ->
        let index = Dataset.load (kindOf d) d.Root
        { Classes = index.Classes
          Train = Loader.fromSamples index.Train e.CropToBox
          Test = Loader.fromSamples index.Test e.CropToBox },
        index.Problems

let private inv (x: float) = x.ToString("0.######", CultureInfo.InvariantCulture)

/// metrics.csv's header for an experiment (one loss column per schedule step, one accuracy per head).
let metricsHeader (e: Experiment) =
    [ "epoch"
      yield! [ for i in 1 .. e.Schedule.Length -> sprintf "loss_step%d" i ]
      "train_acc"
      yield! [ for i in 1 .. e.Model.Heads -> sprintf "test_head%d" i ]
      "test_concat"; "test_combined"; "test_combined_top5"; "lr"; "backbone_lr"; "images_per_s"; "skipped"; "seconds" ]
    |> String.concat ","

let metricsRow (r: Trainer.EpochRecord) =
    [ string (r.Epoch + 1)
      yield! r.StepLosses |> List.map inv
      inv r.TrainAccuracy
      yield! r.Test.Heads |> List.map inv
      inv r.Test.Concat; inv r.Test.Combined; inv r.Test.CombinedTop5
      inv r.Lr; inv r.BackboneLr; inv r.ImagesPerSecond; string r.Skipped.Length; inv r.Seconds ]
    |> String.concat ","

let private gitCommit () =
    try
        let psi = Diagnostics.ProcessStartInfo("git", "rev-parse HEAD", RedirectStandardOutput = true, RedirectStandardError = true)
        use p = Diagnostics.Process.Start psi
        let out = p.StandardOutput.ReadToEnd().Trim()
        if p.WaitForExit 5000 && p.ExitCode = 0 then Some out else None
    with _ ->
        None

let private versionOf (t: Type) = t.Assembly.GetName().Version.ToString()

/// Trains `e` in `outDir` (created), continuing a killed run there when `resume`.
let train (e: Experiment) (outDir: string) (resume: bool) (hooks: Trainer.Hooks) : Trainer.Summary =
    let e = validate e
    Directory.CreateDirectory outDir |> ignore
    let native = Runtime.Native.init (if e.Device.StartsWith "cuda" then Runtime.Native.Cuda else Runtime.Native.Cpu)
    let d, problems = data e
    if d.Classes.Length <> e.Model.Classes then
        raise (InvalidExperiment [ sprintf "the dataset has %d classes but the model is built for %d" d.Classes.Length e.Model.Classes ])
    let started = DateTimeOffset.Now
    File.WriteAllText(Path.Combine(outDir, "config.json"), Json.serialize e)
    File.WriteAllText(Path.Combine(outDir, "classes.txt"), String.concat "\n" d.Classes + "\n")
    let manifest (ended: DateTimeOffset option) =
        Json.serialize
            {| seed = e.Seed
               project = versionOf typeof<Trainer.Session>
               torchsharp = versionOf typeof<TorchSharp.torch>
               // The libtorch actually loaded; TorchSharp's own figure is the version it was built against.
               libtorch = Runtime.Native.libTorchVersion ()
               torchsharpBuiltFor = TorchSharp.torch.__version__
               device = e.Device
               libtorchDir = native.LibTorchDir
               patchedGlibcxx = native.PatchedGlibcxx
               mkldnnDisabled = native.MkldnnDisabled
               gitCommit = gitCommit ()
               started = started
               ended = ended
               datasetProblems = problems.Length |}
    Checkpoint.writeTextAtomically (Path.Combine(outDir, "manifest.json")) (manifest None)
    let metrics = Path.Combine(outDir, "metrics.csv")
    // A resumed run keeps the rows of the epochs it already has; a fresh run starts the file.
    let keep =
        if resume && File.Exists metrics then
            File.ReadAllLines metrics |> Array.skip 1 |> Array.filter (fun l -> l <> "") |> List.ofArray
        else []
    let header = metricsHeader e
    let rows = ref keep
    let writeMetrics () =
        Checkpoint.writeTextAtomically metrics (String.concat "\n" (header :: rows.Value) + "\n")
    let epochHook (r: Trainer.EpochRecord) =
        // Drop rows of epochs that are being redone after a resume from an older checkpoint.
        rows.Value <- (rows.Value |> List.filter (fun l -> int (l.Split(',').[0]) <= r.Epoch)) @ [ metricsRow r ]
        writeMetrics ()
        hooks.Epoch r
    let summary = Trainer.run e d outDir resume { hooks with Epoch = epochHook }
    Checkpoint.writeTextAtomically (Path.Combine(outDir, "manifest.json")) (manifest (Some DateTimeOffset.Now))
    // Plots, confusion matrix and report.md for the best checkpoint.
    let bestEval =
        match summary.History |> List.tryFind (fun r -> r.Epoch = summary.BestEpoch) with
        | Some r -> Some r.Test
        | None when File.Exists summary.BestCheckpoint ->
            // Resumed after the best epoch: evaluate best.ckpt again.
            let s = Trainer.createSession e
            Trainer.restore s (Checkpoint.load summary.BestCheckpoint)
            Some(Trainer.evaluate s d.Classes.Length d.Test)
        | None -> None
    bestEval |> Option.iter (Visual.Report.writeRun outDir d.Classes)
    summary
