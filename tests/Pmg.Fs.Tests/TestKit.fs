/// What several test files need: temporary folders, the repository root and the test data, child processes (the
/// `pmg` command, `dotnet fsi`, python), hand-built checkpoints and exact tensor comparison.
module Pmg.Fs.Tests.TestKit

open System
open System.Collections.Concurrent
open System.Diagnostics
open System.IO
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Training

// ---------------------------------------------------------------------------------------------------
// Temporary folders

/// A fresh folder under the system temp folder (named pmg-<prefix>-...), deleted with its contents on Dispose:
/// `use dir = new TempDir "name"`. Runs and checkpoints written there are tens to hundreds of MB.
type TempDir(prefix: string) =
    let path = Directory.CreateTempSubdirectory(sprintf "pmg-%s-" prefix).FullName
    member _.Path = path
    /// A path inside the folder.
    member _.File(name: string) = Path.Combine(path, name)
    override _.ToString() = path
    interface IDisposable with
        member _.Dispose() =
            try
                if Directory.Exists path then Directory.Delete(path, true)
            with _ -> ()

let private untilExit = ConcurrentBag<TempDir>()

do AppDomain.CurrentDomain.ProcessExit.Add(fun _ -> for d in untilExit do (d :> IDisposable).Dispose())

/// A temporary folder that lives until the test process ends: for fixtures built once and shared by several tests
/// (the miniature datasets, a checkpoint for the CLI tests).
let processTempDir (prefix: string) : string =
    let d = new TempDir(prefix)
    untilExit.Add d
    d.Path

// ---------------------------------------------------------------------------------------------------
// The repository and the test data

/// The repository root: the first folder holding Pmg.Fs.sln above the test binaries, or failing that above the
/// working directory.
let repoRoot () : string =
    let rec up (d: DirectoryInfo) =
        if isNull d then None
        elif File.Exists(Path.Combine(d.FullName, "Pmg.Fs.sln")) then Some d.FullName
        else up d.Parent
    [ AppContext.BaseDirectory; Environment.CurrentDirectory ]
    |> List.tryPick (DirectoryInfo >> up)
    |> Option.defaultWith (fun () ->
        failwithf "repository root (the folder holding Pmg.Fs.sln) not found above %s" AppContext.BaseDirectory)

/// A file of tests/Pmg.Fs.Tests/data, which the build copies beside the test binaries.
let dataFile (name: string) : string =
    let path = Path.Combine(AppContext.BaseDirectory, "data", name)
    if not (File.Exists path) then failwithf "test data %s missing: is it listed in Pmg.Fs.Tests.fsproj?" path
    path

// ---------------------------------------------------------------------------------------------------
// Child processes

/// Exit code and the two output streams of a finished child process.
type Outcome = { Code: int; Out: string; Err: string }

/// No child runs longer than this: a hung child fails its test instead of hanging the whole suite. The longest (a
/// dataset script's smoke run, the quickstart) take one to two minutes on two idle cores, but over 15 minutes on
/// the same cores shared with other heavy jobs; an hour fails only a hang.
let private childTimeout = TimeSpan.FromMinutes 60.0

/// Runs `file args` in `workDir` (None: the current folder) with the variables in `setEnv` set and those in
/// `removeEnv` unset, and waits.
let runWith (file: string) (args: string list) (workDir: string option) (setEnv: (string * string) list) (removeEnv: string list) : Outcome =
    let psi = ProcessStartInfo(file, RedirectStandardOutput = true, RedirectStandardError = true)
    workDir |> Option.iter (fun d -> psi.WorkingDirectory <- d)
    for a in args do
        psi.ArgumentList.Add a
    for k, v in setEnv do
        psi.Environment.[k] <- v
    for v in removeEnv do
        psi.Environment.Remove v |> ignore
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    if not (p.WaitForExit childTimeout) then
        p.Kill true
        failwithf "%s %s did not finish within %O" file (String.concat " " args) childTimeout
    p.WaitForExit()
    { Code = p.ExitCode; Out = out.Result; Err = err.Result }

/// Runs `file args` in `workDir` (None: the current folder) with the variables in `removeEnv` unset, and waits.
let run (file: string) (args: string list) (workDir: string option) (removeEnv: string list) : Outcome =
    runWith file args workDir [] removeEnv

/// The `pmg` command built beside the tests, as a user runs it.
let pmg (args: string list) : Outcome =
    run "dotnet" (Path.Combine(AppContext.BaseDirectory, "pmg.dll") :: args) None []

/// `pmg` with extra environment variables (the test hooks, an offline switch).
let pmgWith (env: (string * string) list) (args: string list) : Outcome =
    runWith "dotnet" (Path.Combine(AppContext.BaseDirectory, "pmg.dll") :: args) None env []

/// `dotnet fsi <repo>/experiments/<script> args` in `workDir`, with `removeEnv` unset.
let fsi (script: string) (args: string list) (workDir: string) (removeEnv: string list) : Outcome =
    run "dotnet" ([ "fsi"; Path.Combine(repoRoot (), "experiments", script) ] @ args) (Some workDir) removeEnv

/// A `folder` dataset under `root` (root/<split>/<class>/...): for each split and class, `count split` images, the
/// i-th (1-based) written into its folder by `write folder split class i`.
let folderDataset (root: string) (classes: string list) (count: string -> int) (write: string -> string -> string -> int -> unit) =
    for split in [ "train"; "test" ] do
        for c in classes do
            let dir = Path.Combine(root, split, c)
            Directory.CreateDirectory dir |> ignore
            for i in 1 .. count split do
                write dir split c i

/// A python3 that can import scipy (/usr/bin/python3 first: a pyenv shim on PATH may lack it), if any.
let pythonWithScipy: Lazy<string option> =
    lazy
        ([ "/usr/bin/python3"; "python3" ]
         |> List.tryFind (fun python ->
             try
                 (run python [ "-c"; "import scipy.io" ] None []).Code = 0
             with _ -> false))

// ---------------------------------------------------------------------------------------------------
// Tensors and checkpoints

/// Same shape and identical values.
let same (a: torch.Tensor) (b: torch.Tensor) =
    a.shape = b.shape && (a.eq b).all().item<bool> ()

/// A checkpoint of a session as the trainer writes it: the session's weights and momentum buffers, with the given
/// progress. The tensors are copies: state_dict hands out the network's own parameters, which are invalidated once
/// the session is garbage collected ("Tensor invalid -- empty handle" in Checkpoint.save of a test that no longer
/// used its session).
let checkpointOf (s: Trainer.Session) (progress: Trainer.Progress) : Checkpoint.Checkpoint =
    let copy (name: string, t: torch.Tensor) = name, t.detach().clone ()
    { Experiment = s.Experiment
      Progress = progress
      Model = [ for kv in s.Net.state_dict () -> copy (kv.Key, kv.Value) ]
      Optimizer = Sgd.state s.Optimizer |> List.map copy }

/// Progress after `epochsDone` epochs, nothing best yet.
let progress (epochsDone: int) : Trainer.Progress =
    { EpochsDone = epochsDone; BestCombined = 0.0; BestEpoch = 0; Metrics = [] }

/// A small trained run of the embedded dataset (one epoch of ResNet18 at 24 px, from random weights), made once
/// per test process through the CLI; its best.ckpt for the commands that read checkpoints.
let private trainedRun =
    lazy
        (let dir = Path.Combine(processTempDir "trained", "run")
         let o =
             pmg [ "train"; "--epochs"; "1"; "--image-size"; "24"; "--batch-size"; "32"; "--backbone"; "resnet18"; "--pretrained"; "none"
                   "--workers"; "1"; "--out"; dir ]
         if o.Code <> 0 then failwithf "training the shared test run failed (%d): %s" o.Code o.Err
         dir)

/// The run folder of the shared trained run.
let trainedRunDir () = trainedRun.Force()

/// The shared trained run's best.ckpt.
let trainedCheckpoint () = Path.Combine(trainedRun.Force(), "best.ckpt")

// ---------------------------------------------------------------------------------------------------
// Comparing two computations of the same values

/// The largest absolute difference of two tensors of one shape, on the host.
let maxAbs (a: torch.Tensor) (b: torch.Tensor) : float =
    Array.fold2 (fun m (x: float32) (y: float32) -> max m (abs (float x - float y))) 0.0 (Runtime.Ops.hostFloats a) (Runtime.Ops.hostFloats b)

/// ||a - b|| / ||b||, the norm's floor keeping an all-zero b finite.
let relativeError (a: float32[]) (b: float32[]) =
    let diff = Array.fold2 (fun s (x: float32) (y: float32) -> s + float (x - y) ** 2.0) 0.0 a b
    let norm = b |> Array.sumBy (fun y -> float y ** 2.0)
    sqrt (diff / max norm 1e-30)

/// ONNX Runtime's outputs of the exported `file` for `x` beside TorchSharp's (`net` in eval mode): every output's
/// relative error, by name; the two must name the same outputs.
let onnxErrors (net: Model.Pmg.Network) (file: string) (x: torch.Tensor) : (string * float) list =
    use session = new Microsoft.ML.OnnxRuntime.InferenceSession(file)
    let ours =
        use _ = torch.no_grad ()
        let o = net.forward x
        List.zip (Model.Pmg.headNames net.Config) o.Heads @ [ "concat", o.Concat; "combined", o.Combined ]
    let shape = x.shape |> Array.map int
    let input =
        Microsoft.ML.OnnxRuntime.NamedOnnxValue.CreateFromTensor(
            "image",
            Microsoft.ML.OnnxRuntime.Tensors.DenseTensor<float32>(Memory(Runtime.Ops.hostFloats x), ReadOnlySpan shape)
        )
    use results = session.Run [ input ]
    let theirs = results |> Seq.map (fun r -> r.Name, (r.AsEnumerable<float32>() |> Array.ofSeq)) |> Map.ofSeq
    Expecto.Expect.equal (theirs.Keys |> Set.ofSeq) (ours |> List.map fst |> Set.ofList) "output names"
    [ for name, t in ours -> name, relativeError theirs.[name] (Runtime.Ops.hostFloats t) ]

// ---------------------------------------------------------------------------------------------------
// RELIABILITY.md's table of cases

/// The rows of RELIABILITY.md's table. A case file (e.g. ReliabilityTests.fs) records a row per case with a number
/// that orders the table; ReliabilityTests runs every case file's list in sequence, then checks the file.
module Reliability =
    open Expecto

    /// One row of the table: what was tried, the exit code, the message's start, what was kept.
    type Row = { Case: string; Exit: int; Says: string; Kept: string }

    /// The first line of stderr with the test's temporary folder shown as <dir> (and a lock holder as <pid>).
    let says (dir: string) (err: string) =
        let line = err.Split('\n', StringSplitOptions.RemoveEmptyEntries) |> Array.tryHead |> Option.defaultValue ""
        let line = line.Replace(dir, "<dir>").Trim()
        // What changes from run to run (process ids, a lock holder's host and start time, speeds and clock times) is
        // shown by its kind, so the table is the same on every run.
        let line =
            [ @"process \d+ on \S+ since [0-9-]+ [0-9:]+", "process <pid> on <host> since <time>"
              @"process \d+", "process <pid>"
              @"[0-9.]+ img/s", "<n> img/s"
              @"\d+:\d\d<\d+:\d\d", "<time>" ]
            |> List.fold (fun (l: string) (pattern, shown) -> Text.RegularExpressions.Regex.Replace(l, pattern, (shown: string))) line
        if line.Length > 110 then line.Substring(0, 107) + "..." else line

    /// Rows by case number.
    let rows = ConcurrentDictionary<int, Row>()

    /// Records a row that a test checked by other means than `tryCase`.
    let record (n: int) (row: Row) = rows.[n] <- row

    /// Runs `pmg args`, checks the exit code and that stderr names each of `mentions` without a stack trace,
    /// records the row.
    let tryCase (n: int) (case: string) (dir: string) (args: string list) (exit: int) (mentions: string list) (kept: string) =
        let o = pmg args
        Expect.equal o.Code exit (sprintf "%s: exit code (stderr: %s)" case o.Err)
        for m in mentions do
            Expect.stringContains o.Err m (sprintf "%s: the message names %s" case m)
        Expect.isFalse (o.Err.Contains "   at ") (sprintf "%s: no stack trace: %s" case o.Err)
        rows.[n] <- { Case = case; Exit = o.Code; Says = says dir o.Err; Kept = kept }
        o
