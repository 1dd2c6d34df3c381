/// Writing files so that a reader never sees half of one: the one atomic writer of the project (checkpoints,
/// run files, exported weights, the patched native library), and the checks on where outputs may go.
module Pmg.Fs.Runtime.Files

open System
open System.Collections.Concurrent
open System.IO
open System.Runtime.InteropServices
open System.Text
open Pmg.Fs

/// The temporary name beside `path` while it is written: hidden, and marked with the writer's process id so
/// that a stale one (a killed writer) is recognisable.
let private tempFor (full: string) =
    Path.Combine(Path.GetDirectoryName full, sprintf ".%s.tmp-%d-%s" (Path.GetFileName full) Environment.ProcessId (Guid.NewGuid().ToString "N").[..7])

/// Temporary files being written now, removed by the termination handler if the process is stopped mid-write.
let private inFlight = ConcurrentDictionary<string, unit>()

let private removeInFlight () =
    for KeyValue(f, ()) in inFlight do
        try
            File.Delete f
        with _ -> ()

/// SIGTERM, SIGINT and SIGHUP end the process as usual, after removing the temporary files being written (kill -9
/// cannot be caught: those are removed by the next command on the folder, see `removeStaleTemps`).
let private handlers =
    lazy
        (AppDomain.CurrentDomain.ProcessExit.Add(fun _ -> removeInFlight ())
         [ PosixSignal.SIGTERM; PosixSignal.SIGINT; PosixSignal.SIGHUP ]
         |> List.map (fun s -> PosixSignalRegistration.Create(s, fun _ -> removeInFlight ())))

/// Test hooks: the suite stops a real process at a named point of the real writer path, as a kill or a signal
/// would. `PMG_TEST_KILL_AT=<point>` kills the process (SIGKILL) when it reaches that point;
/// `PMG_TEST_TERM_WRITING=<file name>` sends it SIGTERM while that file's temporary copy is half written.
module TestHooks =
    [<DllImport("libc", EntryPoint = "kill", SetLastError = true)>]
    extern int private sendSignal(int pid, int signal)

    /// Kills this process (as kill -9 would) when `PMG_TEST_KILL_AT` names `point`; with `PMG_TEST_KILL_RANK`
    /// only the process of that rank (mpirun's OMPI_COMM_WORLD_RANK), and with `PMG_TEST_KILL_HOW=stop` it is
    /// frozen (SIGSTOP) instead: a rank that hangs rather than dies.
    let killAt (point: string) =
        // PMG_TEST_KILL_RANK limits the kill to one rank of an mpirun launch.
        let thisRank () =
            match Environment.GetEnvironmentVariable "PMG_TEST_KILL_RANK" with
            | null -> true
            | r -> Environment.GetEnvironmentVariable "OMPI_COMM_WORLD_RANK" = r
        if Environment.GetEnvironmentVariable "PMG_TEST_KILL_AT" = point && thisRank () then
            if Environment.GetEnvironmentVariable "PMG_TEST_KILL_HOW" = "stop" then sendSignal (Environment.ProcessId, 19) |> ignore
            else Diagnostics.Process.GetCurrentProcess().Kill()
            Threading.Thread.Sleep Threading.Timeout.Infinite

    /// Sends SIGTERM to this process while `name` is being written, when `PMG_TEST_TERM_WRITING` names it.
    let termWriting (name: string) =
        if Environment.GetEnvironmentVariable "PMG_TEST_TERM_WRITING" = name then
            sendSignal (Environment.ProcessId, 15) |> ignore
            Threading.Thread.Sleep Threading.Timeout.Infinite

/// Why an output cannot be written, in words that name it and the fix.
let outputError (path: string) (e: exn) : PmgError =
    let full = try Path.GetFullPath path with _ -> path
    match e with
    | :? UnauthorizedAccessException ->
        OutputFailed(full, sprintf "%s cannot be written (no permission, or a read-only file system): choose a writable folder" full)
    | :? PathTooLongException -> OutputFailed(full, sprintf "%s: the path is too long: choose a shorter one" full)
    | :? DirectoryNotFoundException ->
        OutputFailed(full, sprintf "%s cannot be written: a folder on its path is missing or is a file: choose another output" full)
    | :? IOException as io when io.HResult = 28 || io.Message.Contains "No space left" ->
        OutputFailed(full, sprintf "%s cannot be written: the disk is full; free space or choose another folder (the previous file, if any, is kept)" full)
    | :? IOException as io -> OutputFailed(full, sprintf "%s cannot be written: %s" full io.Message)
    | e -> OutputFailed(full, sprintf "%s cannot be written: %s" full e.Message)

/// Creates `dir` (and its parents), or fails with an OutputFailed that names the part of the path in the way.
let createFolder (dir: string) : unit =
    let full = Path.GetFullPath dir
    // A file where a folder is needed: name it rather than report the OS's generic error.
    let rec fileInTheWay (d: string) =
        if String.IsNullOrEmpty d then None
        elif File.Exists d then Some d
        elif Directory.Exists d then None
        else fileInTheWay (Path.GetDirectoryName d)
    match fileInTheWay full with
    | Some f -> Errors.fail (OutputFailed(full, sprintf "%s cannot be a folder: %s is a file; choose another output folder" full f))
    | None ->
        try
            Directory.CreateDirectory full |> ignore
        with e ->
            Errors.fail (outputError full e)

/// Writes `path` through a temporary file in the same folder, flushed to disk, then renamed over it: a kill or
/// a full disk during the write leaves the previous file whole, and no temporary file is left behind (except by
/// kill -9, see `removeStaleTemps`). Failures to write are OutputFailed errors naming the file.
let writeAtomically (path: string) (write: Stream -> unit) : unit =
    handlers.Force() |> ignore
    let full = Path.GetFullPath path
    createFolder (Path.GetDirectoryName full)
    let tmp = tempFor full
    inFlight.[tmp] <- ()
    try
        try
            (use fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None)
             write fs
             TestHooks.termWriting (Path.GetFileName full)
             fs.Flush true)
            File.Move(tmp, full, true)
        with e ->
            if File.Exists tmp then File.Delete tmp
            match e with
            | :? PmgException -> reraise ()
            | :? IOException
            | :? UnauthorizedAccessException -> Errors.fail (outputError full e)
            | _ -> reraise ()
    finally
        inFlight.TryRemove tmp |> ignore

/// Writes `text` to `path` as UTF-8 (no byte-order mark), atomically as `writeAtomically` does.
let writeTextAtomically (path: string) (text: string) : unit =
    writeAtomically path (fun s -> s.Write(ReadOnlySpan(Encoding.UTF8.GetBytes text)))

/// Writes `bytes` to `path`, atomically as `writeAtomically` does.
let writeBytesAtomically (path: string) (bytes: byte[]) : unit =
    writeAtomically path (fun s -> s.Write(ReadOnlySpan bytes))

/// Temporary files a killed writer left in `dir`; removes them and returns their names.
let removeStaleTemps (dir: string) : string list =
    if not (Directory.Exists dir) then []
    else
        [ for f in Directory.GetFiles(dir, ".*.tmp-*") do
              if not (inFlight.ContainsKey f) then
                  File.Delete f
                  Path.GetFileName f ]

/// The path with `.`/`..` removed, symbolic links resolved and no trailing separator: two spellings of one file
/// (relative, absolute, through a link, with a trailing slash) give the same text.
let resolve (path: string) : string =
    let full = Path.TrimEndingDirectorySeparator(Path.GetFullPath path)
    // Resolve the longest existing prefix through its links; the rest is appended as it is.
    let rec go (p: string) (rest: string list) =
        if String.IsNullOrEmpty p then full
        elif File.Exists p || Directory.Exists p then
            let info: FileSystemInfo = if Directory.Exists p then DirectoryInfo p else FileInfo p
            let real =
                try
                    match info.ResolveLinkTarget true with
                    | null ->
                        let parent = Path.GetDirectoryName p
                        if String.IsNullOrEmpty parent then p
                        else Path.Combine(go parent [], Path.GetFileName p)
                    | target -> target.FullName
                with _ -> p
            List.fold (fun acc (part: string) -> Path.Combine(acc, part)) real rest
        else
            go (Path.GetDirectoryName p) (Path.GetFileName p :: rest)
    Path.TrimEndingDirectorySeparator(go full [])

/// Refuses an output that is one of the command's inputs (after resolving both): a command never writes onto
/// what it reads.
let refuseOverwritingInput (inputs: string list) (output: string) : unit =
    let out = resolve output
    for i in inputs do
        if resolve i = out then
            Errors.fail (OutputFailed(out, sprintf "%s is also an input of this command: writing it would destroy it; choose another output file" out))
