/// A training run on disk: resolves the data, trains, and leaves a record in the run directory (config.json,
/// manifest.json, classes.txt, metrics.csv, last.ckpt, best.ckpt, the report). The imperative shell around the
/// Trainer. A run folder is never overwritten: a new run needs an empty or new folder, and `resume` continues
/// only the run that folder holds, with the same experiment. One process writes a run at a time (RunFolder.acquire).
///
/// An epoch commits as a whole: last.ckpt, written atomically, is the commit point; it holds the weights, the
/// optimizer, the progress (best epoch so far) and every metrics row. best.ckpt, metrics.csv, the plots and the
/// report are derived from what is committed and written after it, so after a kill at any moment `resume` either
/// redoes the epoch (last.ckpt not yet replaced) or completes the missing pieces.
module Pmg.Fs.Run

open System
open System.IO
open System.Globalization
open Pmg.Fs.Data
open Pmg.Fs.Experiment
open Pmg.Fs.Runtime
open Pmg.Fs.Training

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

/// The name of a step's loss column: "loss_stage3_8x8", "loss_concat_whole".
let lossColumn (step: Schedule.Step) = "loss_" + Schedule.stepKey step

/// metrics.csv's header for an experiment: one loss column per schedule step and one accuracy column per head, named
/// as everywhere else (stage3.., concat, combined).
let metricsHeader (e: Experiment) =
    [ "epoch"
      yield! e.Schedule |> List.map lossColumn
      "train_acc"
      yield! Model.Pmg.headNames e.Model |> List.map (fun h -> "test_" + h)
      "test_concat"; "test_combined"; "test_combined_top5"; "lr_heads"; "lr_backbone"; "images_per_s"; "skipped"; "seconds" ]
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
      /// Epochs the run holds now (all of them once it is finished).
      EpochsDone: int
      /// The epoch (0-based) with the best combined test accuracy over the whole run.
      BestEpoch: int
      /// Combined top-1 on the test split at BestEpoch, in [0, 1].
      BestCombined: float
      /// Pieces a resume found missing and wrote from what was committed (best.ckpt, metrics.csv, the report).
      Completed: string list
      /// Path of last.ckpt in the run folder.
      LastCheckpoint: string
      /// Path of best.ckpt in the run folder.
      BestCheckpoint: string }

/// Where a call starts: a fresh run, or a run the folder holds (its committed checkpoint, if an epoch committed).
type private Start =
    | Fresh
    | Continue of Checkpoint.Checkpoint option

let private folderWords (names: string list) = names |> List.map (sprintf "'%s'") |> String.concat ", "

/// Where to start: a fresh run needs a new or empty folder; resume needs a run of ours made by the same experiment
/// (speed-only settings aside), checked against last.ckpt, or config.json when no epoch committed yet.
let private startOf (e: Experiment) (dir: string) (resume: bool) : Start =
    let last = Path.Combine(dir, lastName)
    match RunFolder.state dir, resume with
    | RunFolder.Foreign names, _ ->
        Errors.fail (
            RunFolder(dir, sprintf "%s holds files that are not a run of this program (%s): choose a new or empty folder" dir (folderWords names))
        )
    | (RunFolder.Missing | RunFolder.Empty), false -> Fresh
    | (RunFolder.Missing | RunFolder.Empty), true ->
        Errors.fail (RunFolder(dir, sprintf "%s holds no run to resume (%s): start a new run there without resuming, or give the run's folder" dir (if Directory.Exists dir then "it is empty" else "it does not exist")))
    | RunFolder.Run, false ->
        let epochs = if File.Exists last then "" else " (no epoch finished yet)"
        Errors.fail (RunFolder(dir, sprintf "%s already holds a run%s: resume it, or choose a new folder" dir epochs))
    | RunFolder.Run, true ->
        let recorded =
            if File.Exists last then
                let c = Checkpoint.loadResumable last
                Some c, c.Experiment, last
            else
                let config = Path.Combine(dir, configName)
                if not (File.Exists config) then
                    Errors.fail (RunFolder(dir, sprintf "%s holds neither %s nor %s: it cannot be resumed; start the run in a new folder" dir lastName configName))
                let e' =
                    try
                        Json.deserialize<Experiment> (File.ReadAllText config)
                    with ex ->
                        Errors.fail (RunFolder(dir, sprintf "%s cannot be read (%s): the run cannot be resumed; start it in a new folder" config ex.Message))
                None, e', config
        let c, recordedExperiment, source = recorded
        match Experiment.differences recordedExperiment e with
        | [] -> Continue c
        | fields ->
            c |> Option.iter Checkpoint.dispose
            let listed = fields |> List.map (fun (f, was, now) -> sprintf "%s: %s in the run, %s now" f was now) |> String.concat "; "
            Errors.fail (RunFolder(dir, sprintf "%s was made with other settings (%s): resume with the run's settings, or start a new run in another folder" source listed))

/// The epoch a checkpoint's weights are from (EpochsDone - 1), if it reads.
let private epochOf (path: string) =
    try
        let c = Checkpoint.load path
        Checkpoint.dispose c
        Some(c.Progress.EpochsDone - 1)
    with _ -> None

/// Every weight of a fresh session from a whole PMG model: our checkpoint (its model) or a state_dict with the
/// reference's key names, strictly (every key, every shape). The optimizer starts fresh.
let private initFrom (s: Trainer.Session) (path: string) =
    if not (File.Exists path) then
        Errors.fail (UnusableInput(path, sprintf "initial model %s does not exist: give a checkpoint (.ckpt) or a PMG state_dict (.pth)" path))
    let entries =
        if Checkpoint.isCheckpoint path then
            let c = Checkpoint.load path
            for _, t in c.Optimizer do
                t.Dispose()
            c.Model
        else
            Interop.StateDict.read path
    try
        let device = (s.Net.parameters () |> Seq.head).device
        let onDevice = entries |> List.map (fun (k, t: TorchSharp.torch.Tensor) -> k, t.``to`` device)
        try
            Interop.StateDict.loadInto s.Net onDevice true
        finally
            onDevice |> List.iter (fun (_, t) -> t.Dispose())
    finally
        entries |> List.iter (fun (_, t) -> t.Dispose())

/// How a run records itself, beside what it learns.
type Options =
    { /// TensorBoard event files in the run folder (per batch and per epoch).
      TensorBoard: bool }

    /// Everything on.
    static member Default = { TensorBoard = true }

/// The images TensorBoard shows at the end of a run: the jigsaw inputs of one iteration and Grad-CAM of every head,
/// for the first test image. Drawing them is not worth failing a finished run over: a failure is a notice.
let private endImages (s: Trainer.Session) (d: Trainer.Data) (dir: string) : (string * byte[]) list =
    let e = s.Experiment
    let draw (name: string) (render: string -> unit) =
        let file = Path.Combine(dir, sprintf ".%s.tmp-%d.png" name Environment.ProcessId)
        try
            try
                render file
                Some(name, File.ReadAllBytes file)
            with ex ->
                Notices.Say(sprintf "the %s image for TensorBoard could not be drawn: %s" name ex.Message)
                None
        finally
            if File.Exists file then File.Delete file
    if d.Test.Count = 0 then []
    else
        let spec = Transforms.Spec.test e.Input.Resize e.Input.Crop
        let input () =
            use image = d.Test.Load 0
            Visual.Render.toInput spec s.Device image
        let steps = Visual.Render.stepLabels e.Schedule
        [ draw "jigsaw" (fun file ->
              use _ = TorchSharp.torch.NewDisposeScope()
              Visual.Render.jigsawMontage "the inputs of one progressive iteration" spec.Mean spec.Std (input ()) steps (int64 e.Seed) file)
          draw "gradcam" (fun file ->
              use _ = TorchSharp.torch.NewDisposeScope()
              let x = input ()
              let explanation = Visual.GradCam.forNetwork s.Net x None
              use picture = Visual.Render.ofInput spec.Mean spec.Std x
              Visual.Render.camMontage "Grad-CAM of every head" d.Classes picture explanation file) ]
        |> List.choose id

/// Test hook: with `PMG_TEST_WEIGHTS_TO` set to a folder, every rank writes its weights and buffers there at the end
/// (rank-<r>.bin: every state_dict tensor as float64, in order), so a test can compare the ranks.
let private writeWeightsForTest (s: Trainer.Session) =
    match Environment.GetEnvironmentVariable "PMG_TEST_WEIGHTS_TO" with
    | null
    | "" -> ()
    | dir ->
        let values =
            [| for kv in s.Net.state_dict () do
                   use _ = TorchSharp.torch.NewDisposeScope()
                   yield! kv.Value.detach().cpu().to_type(TorchSharp.torch.float64).contiguous().data<float>().ToArray() |]
        let bytes = Array.zeroCreate<byte> (values.Length * 8)
        Buffer.BlockCopy(values, 0, bytes, 0, bytes.Length)
        Files.writeBytesAtomically (Path.Combine(dir, sprintf "rank-%d.bin" s.Collective.Rank)) bytes

/// A session for a run: float32, or float64 under the test hook `PMG_TEST_FLOAT64=1` (comparisons of two ways
/// of training that must agree to many digits, as a run of several processes and one process).
let private sessionFor (e: Experiment) : Trainer.Session =
    if Environment.GetEnvironmentVariable "PMG_TEST_FLOAT64" = "1" then
        Trainer.createSessionFrom { Engine = Training.Engine.forDevice (Device.torch e.Device); Dtype = TorchSharp.torch.float64; Permutations = Trainer.Drawn } e
    else Trainer.createSession e

/// A rank other than 0 of a distributed run: it writes nothing, takes rank 0's weights, momentum and progress, and
/// trains its part of every batch in step with the others. Rank 0 first says whether the run started.
let private follow (c: Collective.Communicator) (d: Trainer.Data) (e: Experiment) (outDir: string) : Summary =
    match Text.Encoding.UTF8.GetString(c.Broadcast [||]) with
    | "" -> ()
    | failure ->
        Errors.fail (TrainingFailed(sprintf "rank %d of %d: rank 0 could not start the run in %s (%s); see its message" c.Rank c.Size outDir failure))
    // The starting weights come from rank 0: this machine needs neither them nor the run folder.
    let s = sessionFor { e with Weights = Model.Backbone.Scratch; Init = None }
    use _ = { new IDisposable with member _.Dispose() = s.Net.Dispose() }
    let s = { s with Experiment = e }
    let committed = Trainer.synchronise s Trainer.Progress.Start
    let final, history =
        Trainer.runWith s d committed Trainer.Hooks.None (fun p r -> { p with Metrics = p.Metrics @ [ metricsRow r ] })
    writeWeightsForTest s
    { History = history
      EpochsDone = final.EpochsDone
      BestEpoch = final.BestEpoch
      BestCombined = final.BestCombined
      Completed = []
      LastCheckpoint = Path.Combine(outDir, lastName)
      BestCheckpoint = Path.Combine(outDir, bestName) }

/// Trains `e` on data opened by `openData`, in `outDir`, continuing the run there when `resume`. Everything that can
/// be checked is checked before anything is written; a start that fails leaves no folder it made. Under a
/// distributed backend every process calls this with the same arguments; rank 0 alone writes the run folder (its
/// path is rank 0's), and K, the number of processes, becomes part of the experiment.
let rec trainWith (options: Options) (data: Trainer.Data * Problem list) (e: Experiment) (outDir: string) (resume: bool) (hooks: Trainer.Hooks) : Summary =
    let e = validate e
    match e.Collective, Collective.launcherRanks () with
    | None, Some(_, n, _) when n > 1 ->
        Notices.Say(sprintf "this process is one of %d that a launcher started, but the experiment names no distributed backend: each trains the whole run alone; choose the mpi or nccl backend to train together" n)
    | _ -> ()
    let comm = Collective.connect e.Collective
    try
        trainIn comm options data e outDir resume hooks
    with _ ->
        // This rank stops here: at exit it must not wait for the others.
        comm.Abandon()
        reraise ()

and private trainIn (comm: Collective.Communicator) (options: Options) (data: Trainer.Data * Problem list) (e: Experiment) (outDir: string) (resume: bool) (hooks: Trainer.Hooks) : Summary =
    let e =
        validate
            { e with
                Ranks = (if comm.Size > 1 then Some comm.Size else None)
                // One process per GPU: the launcher's local rank picks it unless the device names one.
                Device =
                    match e.Collective, e.Device, Collective.localRank () with
                    | Some Collective.Nccl, Cuda None, Some local -> Cuda(Some local)
                    | _ -> e.Device }
    let d, problems = data
    if d.Classes.Length <> e.Model.Classes then
        Errors.setting Setting.Classes (sprintf "the dataset has %d classes but the model is built for %d" d.Classes.Length e.Model.Classes)
    if e.DropLast && d.Train.Count < e.BatchSize then
        Errors.setting
            Setting.BatchSize
            (sprintf "the training split has %d images, fewer than one batch of %d, and partial batches are skipped: lower the batch size to %d or less, or train partial batches"
                d.Train.Count e.BatchSize (max 2 d.Train.Count))
    if String.IsNullOrWhiteSpace outDir then Errors.setting Setting.Output "the run folder is empty text: give a folder"
    let outDir = Path.GetFullPath outDir
    // Rank 0's folder (a default one is named after the clock, which the ranks read at different moments).
    let outDir = if comm.Size > 1 then Text.Encoding.UTF8.GetString(comm.Broadcast(Text.Encoding.UTF8.GetBytes outDir)) else outDir
    if comm.Rank <> 0 then follow comm d e outDir else
    // Rank 0 tells the others whether the run started ("" when it did), so that a refused start stops them too.
    let announce (failure: string) = if comm.Size > 1 then comm.Broadcast(Text.Encoding.UTF8.GetBytes failure) |> ignore
    let existed = Directory.Exists outDir
    use folder =
        try
            RunFolder.acquire outDir "training"
        with ex ->
            announce ex.Message
            reraise ()
    let path name = Path.Combine(outDir, name)
    let cleanUpFailedStart () =
        // Only a folder this call made, holding nothing but its lock: a failed start leaves no trace.
        if not existed then
            (folder :> IDisposable).Dispose()
            try
                if Directory.Exists outDir && Seq.isEmpty (Directory.EnumerateFileSystemEntries outDir) then Directory.Delete outDir
            with _ -> ()
    let start, s =
        try
            let native = Native.ensure (Device.backend e.Device)
            let start = startOf e outDir resume
            // A continued run's weights come from its checkpoint: the starting weights are neither needed nor
            // fetched again (an offline machine resumes without them). A fresh run resolves them first, for the
            // manifest (the file, its SHA-256); loading then reads the same file.
            let s, weights =
                match start with
                | Continue(Some _) ->
                    let s = sessionFor { e with Weights = Model.Backbone.Scratch }
                    { s with Experiment = e }, None
                | _ ->
                    let weights = Interop.Hub.resolve (Model.Backbone.find e.Model.Backbone) e.Weights
                    sessionFor e, weights
            match start, e.Init with
            | Fresh, Some init ->
                try
                    initFrom s init
                with _ ->
                    s.Net.Dispose()
                    reraise ()
            | _ -> ()
            start, (native, s, weights)
        with ex ->
            cleanUpFailedStart ()
            announce ex.Message
            reraise ()
    announce ""
    let native, s, weights = s
    use _ = { new IDisposable with member _.Dispose() = s.Net.Dispose() }
    let committed =
        match start with
        | Continue(Some c) ->
            Checkpoint.restore s c
            Checkpoint.dispose c
            c.Progress
        | Continue None
        | Fresh -> Trainer.Progress.Start
    let committed = Trainer.synchronise s committed
    let started = DateTimeOffset.Now
    let header = metricsHeader e
    let writeMetrics (p: Trainer.Progress) =
        Files.writeTextAtomically (path metricsName) (String.concat "\n" (header :: p.Metrics) + "\n")
    match start with
    | Fresh ->
        Files.writeTextAtomically (path RunFolder.markerName) "a Pmg.Fs run folder: resume it with the same settings\n"
        Files.writeTextAtomically (path configName) (Json.serialize e)
        Files.writeTextAtomically (path classesName) (String.concat "\n" d.Classes + "\n")
    | Continue _ -> ()
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
                   resumedAtEpoch = (match start with Continue _ -> Some committed.EpochsDone | Fresh -> None)
                   weights =
                       weights
                       |> Option.map (fun (w: Interop.Hub.Resolved) -> {| path = w.Path; sha256 = w.Sha256; source = sprintf "%A" w.Source; url = w.Url |})
                   ended = ended
                   datasetProblems = problems.Length |}
        )
    manifest None
    // Complete what the commit point implies but the folder lacks: best.ckpt when the best epoch is the committed
    // one (its weights are last.ckpt's), and metrics.csv from the committed rows.
    let completed =
        [ if committed.EpochsDone > 0 then
              if committed.BestEpoch = committed.EpochsDone - 1 && epochOf (path bestName) <> Some committed.BestEpoch then
                  Checkpoint.saveModel (path bestName) (Checkpoint.ofSession s committed)
                  bestName
              elif not (File.Exists(path bestName)) then
                  Errors.fail (
                      RunFolder(outDir, sprintf "%s is missing, and its epoch %d is not the last committed one: it cannot be rebuilt; evaluate last.ckpt instead, or train a new run" (path bestName) (committed.BestEpoch + 1))
                  )
              let expected = String.concat "\n" (header :: committed.Metrics) + "\n"
              if not (File.Exists(path metricsName)) || File.ReadAllText(path metricsName) <> expected then
                  writeMetrics committed
                  metricsName ]
    // TensorBoard: a resume first drops what a killed run logged past its commit, so no step appears twice.
    if committed.EpochsDone > 0 then
        Visual.TensorBoard.truncateAfter outDir (Visual.TensorBoard.epochStep e d.Train.Count (committed.EpochsDone - 1))
    elif (match start with Continue _ -> true | Fresh -> false) then
        Visual.TensorBoard.truncateAfter outDir 0L
    use board = Visual.TensorBoard.openRun options.TensorBoard outDir e d.Train.Count
    Visual.TensorBoard.logExperiment board
    let hooks = { hooks with Batch = fun b -> Visual.TensorBoard.logBatch board b; hooks.Batch b }
    let epochHook (p: Trainer.Progress) (r: Trainer.EpochRecord) =
        let p = { p with Metrics = p.Metrics @ [ metricsRow r ] }
        // The commit point: everything after it is derived and rebuilt by a resume.
        let c = Checkpoint.ofSession s p
        Files.TestHooks.killAt (sprintf "epoch-%d-before-commit" (r.Epoch + 1))
        Checkpoint.save (path lastName) c
        Files.TestHooks.killAt (sprintf "epoch-%d-after-commit" (r.Epoch + 1))
        if p.BestEpoch = r.Epoch then Checkpoint.saveModel (path bestName) c
        writeMetrics p
        Visual.TensorBoard.logEpoch board r
        Visual.TensorBoard.flush board
        hooks.Epoch p r
        p
    let final, history =
        Trainer.runWith s d committed hooks epochHook
    writeWeightsForTest s
    manifest (Some DateTimeOffset.Now)
    // Plots, confusion matrix and report.md for the best checkpoint: after training, or when a resume found the
    // report missing.
    let reportMissing = not (File.Exists(path Visual.Report.reportMd))
    let bestEval =
        match history |> List.tryFind (fun r -> r.Epoch = final.BestEpoch) with
        | Some r -> Some r.Test
        | None when final.EpochsDone > 0 && (reportMissing || not completed.IsEmpty) && File.Exists(path bestName) ->
            let c = Checkpoint.load (path bestName)
            Checkpoint.restore s c
            Checkpoint.dispose c
            Some(Trainer.evaluate s d.Classes.Length d.Test)
        | None -> None
    bestEval |> Option.iter (Visual.Report.writeRun outDir d.Classes)
    if not history.IsEmpty then Visual.TensorBoard.logEnd board (if options.TensorBoard then endImages s d outDir else [])
    { History = history
      EpochsDone = final.EpochsDone
      BestEpoch = final.BestEpoch
      BestCombined = final.BestCombined
      Completed = completed @ (if history.IsEmpty && bestEval.IsSome then [ Visual.Report.reportMd ] else [])
      LastCheckpoint = path lastName
      BestCheckpoint = path bestName }

/// Trains with the default options (see trainWith).
let trainOn (data: Trainer.Data * Problem list) (e: Experiment) (outDir: string) (resume: bool) (hooks: Trainer.Hooks) : Summary =
    trainWith Options.Default data e outDir resume hooks

/// Opens the experiment's data and trains it in `outDir` (see trainOn).
let train (e: Experiment) (outDir: string) (resume: bool) (hooks: Trainer.Hooks) : Summary =
    trainOn (openData e.Data e.CropToBox) e outDir resume hooks
