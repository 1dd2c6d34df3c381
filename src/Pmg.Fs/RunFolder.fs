/// A run folder's rules: what a folder holds (nothing, a run of ours, something else), the lock that gives one
/// process the right to write into a run, and where other commands may write outputs. Nothing overwrites a run.
module Pmg.Fs.RunFolder

open System
open System.IO
open Pmg.Fs
open Pmg.Fs.Runtime

/// The marker written first into every run folder: a folder holding it is a run of ours.
let markerName = ".pmg-run"
/// The lock file: held (an OS file lock, released by the kernel if the process dies) while a process writes.
let lockName = ".pmg-run.lock"
/// Who holds the lock: process id, host, start time and what it is doing, for the message of a refused writer.
let ownerName = ".pmg-run.owner"

/// What a folder holds.
type State =
    /// No such folder.
    | Missing
    /// A folder with nothing of note in it (lock files and temporary files of ours aside).
    | Empty
    /// A run of ours: its marker, or our config.json beside a checkpoint (runs made before the marker).
    | Run
    /// Something else: the names of (up to five of) its entries.
    | Foreign of string list

let private ours (name: string) =
    name = lockName || name = ownerName || (name.StartsWith "." && name.Contains ".tmp-")

/// What `dir` holds.
let state (dir: string) : State =
    if File.Exists dir then Foreign [ Path.GetFileName dir ]
    elif not (Directory.Exists dir) then Missing
    else
        let names = Directory.EnumerateFileSystemEntries dir |> Seq.map Path.GetFileName |> Seq.filter (ours >> not) |> List.ofSeq
        let has n = names |> List.contains n
        // Runs made before the marker: our config.json (it reads as an experiment) beside a checkpoint.
        let legacyRun () =
            (has "last.ckpt" || has "best.ckpt")
            && (try
                    Json.deserialize<Experiment.Experiment> (File.ReadAllText(Path.Combine(dir, "config.json"))) |> box |> isNull |> not
                with _ -> false)
        if has markerName || (has "config.json" && legacyRun ()) then Run
        elif names.IsEmpty then Empty
        else Foreign(names |> List.sort |> List.truncate 5)

/// True when `dir` holds a run of ours.
let isRun (dir: string) = state dir = Run

/// The run folder that holds `path` (a file or folder inside it, or the folder itself), if any.
let rec enclosingRun (path: string) : string option =
    if String.IsNullOrEmpty path then None
    elif Directory.Exists path && isRun path then Some path
    else
        let parent = Path.GetDirectoryName path
        if String.IsNullOrEmpty parent || parent = path then None else enclosingRun parent

/// The right to write into a run folder, until disposed.
type Lock internal (dir: string, stream: FileStream) =
    /// The folder held.
    member _.Folder = dir

    interface IDisposable with
        member _.Dispose() =
            // Remove the owner note first, then the lock: a writer that opens the lock after this holds a new one.
            (try File.Delete(Path.Combine(dir, ownerName)) with _ -> ())
            (try File.Delete(Path.Combine(dir, lockName)) with _ -> ())
            stream.Dispose()

let private processAlive (pid: int) =
    try
        use p = Diagnostics.Process.GetProcessById pid
        not p.HasExited
    with _ -> false

/// Takes the lock of `dir` for `what` (e.g. "training"), creating the folder if needed; fails with a RunFolder error
/// naming the process that holds it. A lock left by a process that no longer runs is taken over with a notice.
/// Temporary files that killed writers left in the folder are removed.
let acquire (dir: string) (what: string) : Lock =
    let dir = Path.GetFullPath dir
    Files.createFolder dir
    let lockPath = Path.Combine(dir, lockName)
    let ownerPath = Path.Combine(dir, ownerName)
    let previous = try (if File.Exists ownerPath then Some(File.ReadAllText ownerPath) else None) with _ -> None
    let stream =
        try
            new FileStream(lockPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None)
        with
        | :? IOException when File.Exists lockPath ->
            let who = previous |> Option.map (fun t -> t.Trim()) |> Option.defaultValue "another process"
            Errors.fail (RunFolder(dir, sprintf "%s is in use by %s: wait for it to finish, or choose another folder" dir who))
        | e -> Errors.fail (Files.outputError lockPath e)
    match previous with
    | Some text ->
        let pid = text.Split(' ') |> Array.tryItem 1 |> Option.bind (fun p -> match Int32.TryParse p with | true, v -> Some v | _ -> None)
        match pid with
        | Some p when p <> Environment.ProcessId && not (processAlive p) ->
            Notices.Say(sprintf "%s: took over the lock left by process %d, which no longer runs" dir p)
        | _ -> ()
    | None -> ()
    try
        Files.writeTextAtomically ownerPath (sprintf "process %d on %s since %s (%s)" Environment.ProcessId Environment.MachineName (DateTimeOffset.Now.ToString "yyyy-MM-dd HH:mm:ss") what)
        for f in Files.removeStaleTemps dir do
            Notices.Say(sprintf "removed %s, left by an interrupted write" f)
    with e ->
        stream.Dispose()
        reraise ()
    new Lock(dir, stream)

/// Checks that a command may write `outputs`: none is one of the command's `inputs`, and none overwrites a file that
/// belongs to a run folder (a new file inside a run is fine: the run's lock is taken, once per run, until the
/// returned value is disposed after writing).
let guardOutputs (inputs: string list) (outputs: string list) : IDisposable =
    let runs =
        outputs
        |> List.choose (fun output ->
            if String.IsNullOrWhiteSpace output then Errors.setting Setting.Output "the output path is empty: give a file name"
            Files.refuseOverwritingInput inputs output
            let full = Path.GetFullPath output
            if Directory.Exists full then
                Errors.fail (OutputFailed(full, sprintf "%s is a folder: give a file name for the output" full))
            match enclosingRun (Path.GetDirectoryName full) with
            | Some run when File.Exists full ->
                Errors.fail (
                    OutputFailed(full, sprintf "%s belongs to the run in %s: writing it would change that run; choose a file outside the run, or a new name" full run)
                )
            | found -> found)
        |> List.distinct
    let release (held: Lock list) =
        for l in held do
            (l :> IDisposable).Dispose()
    let locks =
        runs
        |> List.fold
            (fun held run ->
                try
                    acquire run "writing an output" :: held
                with _ ->
                    release held
                    reraise ())
            []
    { new IDisposable with
        member _.Dispose() = release locks }

/// guardOutputs for one output.
let guardOutput (inputs: string list) (output: string) : IDisposable = guardOutputs inputs [ output ]
