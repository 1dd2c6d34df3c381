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

let private errorText (e: exn) =
    match e with
    | Experiment.InvalidExperiment problems -> "invalid settings: " + String.concat "; " problems
    | :? PmgException as p -> p.Message
    | Runtime.Native.NativeLoadError m
    | Checkpoint.CheckpointError m
    | Inference.LoadError m
    | Interop.StateDict.StateDictError m
    | Interop.ImageNet.ImageNetError m
    | Interop.Onnx.OnnxError m
    | Inputs.ImageError m
    | Run.RunError m
    | Trainer.Diverged m
    | Trainer.NothingTrained m
    | Bench.BenchError m
    | Backbone.UnknownBackbone m
    | Backbone.HeadError m
    | Pmg.ConfigError m -> m
    | :? FileNotFoundException as f -> sprintf "file not found: %s" f.FileName
    | :? OutOfMemoryException -> "out of memory: lower --batch-size or --image-size"
    | e ->
        // Not one of ours: often libtorch's own error, so say which libtorch was loaded.
        match Runtime.Native.current () with
        | Some l -> sprintf "%s (libtorch %s from %s)" e.Message (Runtime.Native.libTorchVersion ()) l.LibTorchDir
        | None -> e.Message

/// The device a command line asks for, so that the native runtime for it loads before anything else.
let private deviceIn (argv: string[]) =
    match argv |> Array.tryFindIndex ((=) "--device") with
    | Some i when i + 1 < argv.Length -> (try Runtime.Device.parse argv.[i + 1] with _ -> Runtime.Cpu)
    | _ -> Runtime.Cpu

[<EntryPoint>]
let main argv =
    let parser = ArgumentParser.Create<Command>(programName = "pmg")
    // The library's warnings (e.g. test images left out of an evaluation), one line each on stderr.
    Notices.Raised.Add(fun n -> eprintfn "pmg: %s" n.Text)
    try
        let results = parser.ParseCommandLine(argv, raiseOnUsage = true)
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
        eprintfn "pmg: %s" (errorText e)
        if Environment.GetEnvironmentVariable "PMG_DEBUG" = "1" then eprintfn "%O" e
        1
