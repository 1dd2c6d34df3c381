/// A training run on disk: resolves the data, trains, and leaves a record in the run directory (config.json,
/// manifest.json, classes.txt, metrics.csv, last.ckpt, best.ckpt, the report). The imperative shell around the
/// Trainer. A run folder is never overwritten: a new run needs an empty or new folder, and `resume` continues
/// only the run that folder holds, with the same experiment.
module Pmg.Fs.Run

open System
open System.IO
open System.Globalization
open Pmg.Fs.Data
open Pmg.Fs.Experiment
open Pmg.Fs.Runtime
open Pmg.Fs.Training

/// Something about the run folder or the data that stops a run before anything is written.
exception RunError of string

/// File name of the checkpoint written after every epoch.
let lastName = "last.ckpt"
/// File name of the checkpoint of the epoch with the best combined test accuracy.
let bestName = "best.ckpt"
/// File name of the experiment, written when a run starts.
let configName = "config.json"
/// File name of the run's provenance: seed, versions, device, git commit, start and end times.
let manifestName = "manifest.json"
/// File name of the per-epoch table (columns: `metricsHeader`).
let metricsName = "metrics.csv"
/// File name of the class names, one a line, in label order.
let classesName = "classes.txt"

/// The images and class names of a dataset, and its unusable files; the dataset is indexed once here (the class
/// count that builds the experiment comes from this). `cropToBox` crops each image to its bounding box where the
/// dataset has boxes. A split without images, or a class without training images, is an error naming the class.
let openData (data: Data) (cropToBox: bool) : Trainer.Data * Problem list =
    match data with
    | Embedded config ->
        let d = Synthetic.create config
        ({ Classes = d.Classes; Train = d.Train; Test = d.Test }: Trainer.Data), []
    | OnDisk d ->
        // The same verdict and the same refusal as `Inspect` gives the data command: what it accepts, training does.
        let index = Dataset.load d.Kind d.Root
        let report = Inspect.inspect index
        Inspect.validate index report
        { Classes = index.Classes
          Train = Loader.fromSamples index.Train cropToBox
          Test = Loader.fromSamples index.Test cropToBox },
        report.Problems

/// metrics.csv's header for an experiment (one loss column per schedule step, one accuracy per head).
let metricsHeader (e: Experiment) =
    [ "epoch"
      yield! [ for i in 1 .. e.Schedule.Length -> sprintf "loss_step%d" i ]
      "train_acc"
      yield! [ for i in 1 .. e.Model.Heads -> sprintf "test_head%d" i ]
      "test_concat"; "test_combined"; "test_combined_top5"; "lr"; "backbone_lr"; "images_per_s"; "skipped"; "seconds" ]
    |> String.concat ","

/// metrics.csv's row for an epoch (epoch 1-based), in the columns of `metricsHeader`.
let metricsRow (r: Trainer.EpochRecord) =
    [ string (r.Epoch + 1)
      yield! r.StepLosses |> List.map Format.number
      Format.number r.TrainAccuracy
      yield! r.Test.Heads |> List.map Format.number
      Format.number r.Test.Concat; Format.number r.Test.Combined; Format.number r.Test.CombinedTop5
      Format.number r.Lr; Format.number r.BackboneLr; Format.number r.ImagesPerSecond; string r.Skipped.Length; Format.number r.Seconds ]
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

/// What a training call leaves: its epochs, the best one, and the paths of the checkpoints.
type Summary =
    { /// Records of the epochs this call trained, in order (a resumed run: only the epochs after its checkpoint).
      History: Trainer.EpochRecord list
      /// The epoch (0-based) with the best combined test accuracy over the whole run.
      BestEpoch: int
      /// Combined top-1 on the test split at BestEpoch, in [0, 1].
      BestCombined: float
      /// Path of last.ckpt in the run folder.
      LastCheckpoint: string
      /// Path of best.ckpt in the run folder.
      BestCheckpoint: string }

/// Whether a folder holds results of a run (a folder where a run stopped before its first epoch holds none).
let private holdsRun (dir: string) =
    [ lastName; bestName; metricsName ] |> List.exists (fun f -> File.Exists(Path.Combine(dir, f)))

/// Where to start: a fresh run needs a folder without a run; a resumed one needs its last.ckpt, made by the same
/// experiment (speed-only settings aside). Checked before anything is written.
let private startOf (e: Experiment) (outDir: string) (resume: bool) : Checkpoint.Checkpoint option =
    let last = Path.Combine(outDir, lastName)
    match resume, holdsRun outDir with
    | false, false -> None
    | false, true ->
        raise (RunError(sprintf "%s already holds a run: continue it with --resume, or give a new --out folder" outDir))
    | true, _ when not (File.Exists last) ->
        raise (
            RunError(
                sprintf "--resume: %s has no %s to continue (%s); drop --resume to start a new run there, or give the run's folder"
                    outDir lastName (if Directory.Exists outDir then "no finished epoch" else "the folder does not exist")
            )
        )
    | true, _ ->
        let c = Checkpoint.load last
        match Experiment.differences c.Experiment e with
        | [] -> Some c
        | fields ->
            Checkpoint.dispose c
            raise (
                RunError(
                    sprintf "--resume: %s was trained with other settings (%s); resume with the same flags, or start a new run in another folder"
                        last (String.concat ", " fields)
                )
            )

/// Trains `e` on data opened by `openData`, in `outDir`, continuing the run there when `resume`.
let trainOn (data: Trainer.Data * Problem list) (e: Experiment) (outDir: string) (resume: bool) (hooks: Trainer.Hooks) : Summary =
    let e = validate e
    let d, problems = data
    if d.Classes.Length <> e.Model.Classes then
        raise (InvalidExperiment [ sprintf "the dataset has %d classes but the model is built for %d" d.Classes.Length e.Model.Classes ])
    let start = startOf e outDir resume
    let native = Native.ensure (Device.backend e.Device)
    let s = Trainer.createSession e
    let progress =
        match start with
        | Some c ->
            Checkpoint.restore s c
            Checkpoint.dispose c
            for f in Files.removeStaleTemps outDir do
                eprintfn "removed %s, left by an interrupted write" f
            c.Progress
        | None -> Trainer.Progress.Start
    let path name = Path.Combine(outDir, name)
    let started = DateTimeOffset.Now
    if start.IsNone then
        Files.writeTextAtomically (path configName) (Json.serialize e)
        Files.writeTextAtomically (path classesName) (String.concat "\n" d.Classes + "\n")
    let manifest (ended: DateTimeOffset option) =
        Files.writeTextAtomically (path manifestName) (
            Json.serialize
                {| seed = e.Seed
                   project = versionOf typeof<Trainer.Session>
                   torchsharp = versionOf typeof<TorchSharp.torch>
                   // The libtorch actually loaded; TorchSharp's own figure is the version it was built against.
                   libtorch = Native.libTorchVersion ()
                   torchsharpBuiltFor = TorchSharp.torch.__version__
                   device = Device.text e.Device
                   libtorchDir = native.LibTorchDir
                   patchedGlibcxx = native.PatchedGlibcxx
                   mkldnnDisabled = native.MkldnnDisabled
                   gitCommit = gitCommit ()
                   started = started
                   resumedAtEpoch = (if start.IsSome then Some progress.EpochsDone else None)
                   ended = ended
                   datasetProblems = problems.Length |}
        )
    manifest None
    // A resumed run keeps the rows of the epochs its checkpoint holds.
    let kept =
        if File.Exists(path metricsName) then
            File.ReadAllLines(path metricsName) |> Array.skip 1 |> Array.filter (fun l -> l <> "") |> List.ofArray
            |> List.filter (fun l -> int (l.Split(',').[0]) <= progress.EpochsDone)
        else []
    let rows = ref kept
    let header = metricsHeader e
    let epochHook (p: Trainer.Progress) (r: Trainer.EpochRecord) =
        rows.Value <- rows.Value @ [ metricsRow r ]
        Files.writeTextAtomically (path metricsName) (String.concat "\n" (header :: rows.Value) + "\n")
        let c = Checkpoint.ofSession s p
        Checkpoint.save (path lastName) c
        if p.BestEpoch = r.Epoch then Checkpoint.save (path bestName) c
        hooks.Epoch p r
    let final, history = Trainer.run s d progress { hooks with Epoch = epochHook }
    manifest (Some DateTimeOffset.Now)
    // Plots, confusion matrix and report.md for the best checkpoint.
    let bestEval =
        match history |> List.tryFind (fun r -> r.Epoch = final.BestEpoch) with
        | Some r -> Some r.Test
        | None when File.Exists(path bestName) ->
            // Resumed after the best epoch: evaluate best.ckpt again.
            let c = Checkpoint.load (path bestName)
            Checkpoint.restore s c
            Checkpoint.dispose c
            Some(Trainer.evaluate s d.Classes.Length d.Test)
        | None -> None
    bestEval |> Option.iter (Visual.Report.writeRun outDir d.Classes)
    { History = history
      BestEpoch = final.BestEpoch
      BestCombined = final.BestCombined
      LastCheckpoint = path lastName
      BestCheckpoint = path bestName }

/// Opens the experiment's data and trains it in `outDir` (see trainOn).
let train (e: Experiment) (outDir: string) (resume: bool) (hooks: Trainer.Hooks) : Summary =
    trainOn (openData e.Data e.CropToBox) e outDir resume hooks
