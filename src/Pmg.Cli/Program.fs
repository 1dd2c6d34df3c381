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

/// The device a command line asks for, so that the native runtime for it loads before anything else.
let private deviceIn (argv: string[]) =
    match argv |> Array.tryFindIndex ((=) "--device") with
    | Some i when i + 1 < argv.Length -> (try Runtime.Device.parse argv.[i + 1] with _ -> Runtime.Cpu)
    | _ -> Runtime.Cpu

[<EntryPoint>]
let main argv =
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
    | :? ArguParseException as e ->
        (if e.ErrorCode = ErrorCode.HelpText then printfn "%s" e.Message else eprintfn "%s" e.Message)
        if e.ErrorCode = ErrorCode.HelpText then 0 else 2
    | BadFlag m ->
        eprintfn "pmg: %s" m
        2
    | e ->
        let line, code = describe e
        eprintfn "pmg: %s" line
        if Environment.GetEnvironmentVariable "PMG_DEBUG" = "1" then eprintfn "%O" e
        code
