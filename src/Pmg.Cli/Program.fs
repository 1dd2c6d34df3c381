/// The `pmg` command: parses the command line and hands each subcommand to its module. Errors become one line
/// naming the input and the fix: exit code 2 for a bad flag, 1 for anything else (`PMG_DEBUG=1` adds the trace).
module Pmg.Cli.Program

open System
open System.IO
open Argu
open Pmg.Fs
open Pmg.Fs.Data
open Pmg.Fs.Model
open Pmg.Fs.Training
open Pmg.Cli.Args

/// The line a failure prints, with the flags that fix it, and the exit code: 2 for a value a flag cannot take,
/// 1 for anything else.
let private describe (e: exn) : string * int =
    match e with
    | :? PmgException as p ->
        match p.Error with
        | InvalidSetting(s, m) -> sprintf "%s: %s" (flagOf s) m, 2
        | InvalidExperiment problems ->
            "invalid settings: " + (problems |> List.map (fun (s, m) -> sprintf "%s: %s" (flagOf s) m) |> String.concat "; "), 2
        | RunFolder(_, m) when m.Contains "resume" -> sprintf "%s (--resume continues a run; --out chooses another folder)" m, 1
        | RunFolder(_, m) -> sprintf "%s (--out)" m, 1
        | WeightsUnavailable m -> sprintf "%s (--pretrained FILE, or --pretrained none)" m, 1
        | TrainingFailed m when m.Contains "learning rate" -> sprintf "%s (--lr)" m, 1
        | TrainingFailed m when m.Contains "batch size" -> sprintf "%s (--batch-size, --partial-batches train)" m, 1
        | ModelFile(_, m) when m.Contains "ONNX model" -> sprintf "%s (--onnx FILE)" m, 1
        | e -> e.Message, 1
    | :? FileNotFoundException as f -> sprintf "file not found: %s" f.FileName, 1
    | :? OutOfMemoryException -> "out of memory: lower --batch-size or --image-size", 1
    | :? System.Runtime.InteropServices.ExternalException as x ->
        // libtorch's own error: say which libtorch was loaded.
        match Runtime.Native.current () with
        | Some l -> sprintf "%s (libtorch %s from %s)" (x.Message.Split('\n').[0]) (Runtime.Native.libTorchVersion ()) l.LibTorchDir, 1
        | None -> x.Message, 1
    | e -> e.Message, 1

/// The subcommands' names (train, eval, ...), from the Command union so that they cannot drift.
let private commandNames =
    Reflection.FSharpType.GetUnionCases typeof<Command> |> Array.map (fun c -> c.Name.ToLowerInvariant())

/// The command line as Argu takes it: `-h` is `--help`, and `--flag=value` is `--flag value` (both spellings are
/// common habits; Argu takes neither for a flag declared with a separate value).
let normalise (argv: string[]) : string[] =
    argv
    |> Array.collect (fun a ->
        if a = "-h" then [| "--help" |]
        elif a.StartsWith "--" && a.Length > 2 && a.IndexOf '=' > 2 then
            let i = a.IndexOf '='
            [| a.Substring(0, i); a.Substring(i + 1) |]
        else [| a |])

/// A usage error as one line (Argu's own text is the error followed by the whole usage), with where to read more.
let usageError (argv: string[]) (message: string) : string =
    let first =
        message.Split('\n', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
        |> Array.tryHead
        |> Option.defaultValue message
    let first = if first.StartsWith "ERROR: " then first.Substring 7 else first
    let help =
        match argv |> Array.tryFind (fun a -> Array.contains a commandNames) with
        | Some c -> sprintf "pmg %s --help" c
        | None -> "pmg --help"
    sprintf "%s (see `%s`)" (first.TrimEnd '.') help

/// `pmg --version`: this build (its version and the commit it was built from, where git was there to say), the
/// library's, TorchSharp's and the libtorch that loads here.
let private printVersion () : int =
    let informational (a: Reflection.Assembly) =
        match Attribute.GetCustomAttribute(a, typeof<Reflection.AssemblyInformationalVersionAttribute>) with
        | :? Reflection.AssemblyInformationalVersionAttribute as v -> v.InformationalVersion
        | _ -> string (a.GetName().Version)
    let split (v: string) =
        match v.IndexOf '+' with
        | -1 -> v, "unknown"
        | i -> v.Substring(0, i), v.Substring(i + 1)
    let cli, commit = split (informational (Reflection.Assembly.GetExecutingAssembly()))
    let library, _ = split (informational typeof<Runtime.Native.Loaded>.Assembly)
    let torchSharp = typeof<TorchSharp.torch>.Assembly.GetName().Version
    printfn "pmg %s (commit %s)" cli commit
    printfn "Pmg.Fs %s, TorchSharp %d.%d.%d" library torchSharp.Major torchSharp.Minor torchSharp.Build
    try
        let l = Runtime.Native.ensure Runtime.Native.Cpu
        printfn "libtorch %s from %s" (Runtime.Native.libTorchVersion ()) l.LibTorchDir
    with e ->
        printfn "libtorch: not loaded here (%s)" (fst (describe e))
    0

/// The device a command line asks for, so that the native runtime for it loads before anything else.
let private deviceIn (argv: string[]) =
    match argv |> Array.tryFindIndex ((=) "--device") with
    | Some i when i + 1 < argv.Length -> (try Runtime.Device.parse argv.[i + 1] with _ -> Runtime.Cpu)
    | _ -> Runtime.Cpu

[<EntryPoint>]
let main argv =
    let argv = normalise argv
    if argv = [| "--version" |] then printVersion () else
    let parser = ArgumentParser.Create<Command>(programName = "pmg")
    try
        let results = parser.ParseCommandLine(argv, raiseOnUsage = true)
        // The library's warnings, on stderr: the one console sink.
        Notices.Raised.Add(fun n -> eprintfn "warning: %s" n.Text)
        Runtime.Native.ensure (Runtime.Device.backend (deviceIn argv)) |> ignore
        match results.GetSubCommand() with
        | Train a -> TrainCommand.run a
        | Eval a -> ModelCommands.eval a
        | Predict a -> ModelCommands.predict a
        | Export a -> ModelCommands.export a
        | Bench a -> BenchCommand.run argv a
        | Data a -> ModelCommands.data a
        | Cam a -> VisualCommands.cam a
        | Jigsaw a -> VisualCommands.jigsaw a
        | Report a -> VisualCommands.report a
    with
    | :? ArguParseException as e when e.ErrorCode = ErrorCode.HelpText ->
        printfn "%s" e.Message
        if argv = [| "--help" |] then
            printfn "`pmg --version` prints the version, the commit and the libtorch that loads; -h is --help; --flag=value is --flag value."
        0
    | :? ArguParseException as e ->
        eprintfn "pmg: %s" (usageError argv e.Message)
        2
    | BadFlag m ->
        eprintfn "pmg: %s" m
        2
    | e ->
        let line, code = describe e
        eprintfn "pmg: %s" line
        if Environment.GetEnvironmentVariable "PMG_DEBUG" = "1" then eprintfn "%O" e
        code
