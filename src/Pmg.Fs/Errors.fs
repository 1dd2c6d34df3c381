/// Errors as values. Every failure the library reports is a `PmgError`: a union the command line maps to a
/// message, a flag and an exit code, and that F# code can match. It travels as a `PmgException` (one base class,
/// one subclass per family, for C# `catch`), raised by `Errors.fail`. Messages name the input and the fix in the
/// library's words; they never spell a command-line flag (the CLI adds those from `Setting`).
namespace Pmg.Fs

open System

/// A setting of an experiment or of a use case, by the library's name for it; the command line maps each to its
/// flag, C# to its method.
[<RequireQualifiedAccess>]
type Setting =
    | Dataset
    | Root
    | Level
    | Backbone
    | Weights
    | Epochs
    | WarmupEpochs
    | BatchSize
    | ImageSize
    | Resize
    | Padding
    | LearningRate
    | BackboneLearningRate
    | Heads
    | Grids
    | BatchNormGroup
    | Workers
    | Seed
    | Device
    | Precision
    | Classes
    | TopK
    | Image
    | Checkpoint
    | ModelPath
    | Output
    | Resume
    | Format
    | Engine
    | Iterations
    | Init
    | PatchOrder
    | PartialBatches
    | Forward
    | Update
    | Distributed

    /// The words a message uses for the setting ("image size", "learning rate").
    member s.Words =
        match s with
        | Dataset -> "dataset"
        | Root -> "dataset folder"
        | Level -> "label level"
        | Backbone -> "backbone"
        | Weights -> "starting weights"
        | Epochs -> "epochs"
        | WarmupEpochs -> "warm-up epochs"
        | BatchSize -> "batch size"
        | ImageSize -> "image size"
        | Resize -> "resize"
        | Padding -> "padding"
        | LearningRate -> "learning rate"
        | BackboneLearningRate -> "backbone learning rate"
        | Heads -> "heads"
        | Grids -> "jigsaw grids"
        | BatchNormGroup -> "BatchNorm group"
        | Workers -> "workers"
        | Seed -> "seed"
        | Device -> "device"
        | Precision -> "precision"
        | Classes -> "classes"
        | TopK -> "top-k"
        | Image -> "image"
        | Checkpoint -> "checkpoint"
        | ModelPath -> "model"
        | Output -> "output"
        | Resume -> "resume"
        | Format -> "format"
        | Engine -> "engine"
        | Iterations -> "iterations"
        | Init -> "initial model"
        | PatchOrder -> "patch order"
        | PartialBatches -> "partial batches"
        | Forward -> "forward mode"
        | Update -> "update mode"
        | Distributed -> "distributed backend"

/// Everything that can go wrong, as a value. Each case carries a message that names the input and says the fix.
type PmgError =
    /// A setting with a value it cannot take, found before anything was written (the CLI exits 2).
    | InvalidSetting of setting: Setting * message: string
    /// An experiment that cannot run: every problem at once, each with the setting it concerns.
    | InvalidExperiment of problems: (Setting * string) list
    /// A file given as input (an image, a list, a weights file) that cannot be used.
    | UnusableInput of path: string * message: string
    /// A dataset whose layout or images cannot train or evaluate.
    | DatasetInvalid of root: string * message: string
    /// A run folder that cannot be written or continued: held by another process, not a run, already a run.
    | RunFolder of folder: string * message: string
    /// A model file (checkpoint, state_dict, ONNX model) that is missing, damaged, foreign or does not fit.
    | ModelFile of path: string * message: string
    /// Starting weights that cannot be had: offline, refused, or not the file they should be.
    | WeightsUnavailable of message: string
    /// Training stopped: a loss that is not finite, or an epoch without a usable image.
    | TrainingFailed of message: string
    /// The native runtime (libtorch, its CUDA build, ONNX Runtime) cannot be loaded or used.
    | NativeRuntime of message: string
    /// An output that cannot be written (disk full, read-only, a file in the way, the output is an input).
    | OutputFailed of path: string * message: string
    /// Stopped on request (a cancellation token, a signal).
    | Cancelled of message: string

    /// The message, in the library's words.
    member e.Message =
        match e with
        | InvalidSetting(_, m) -> m
        | InvalidExperiment ps -> "invalid settings: " + (ps |> List.map snd |> String.concat "; ")
        | UnusableInput(_, m)
        | DatasetInvalid(_, m)
        | RunFolder(_, m)
        | ModelFile(_, m)
        | OutputFailed(_, m) -> m
        | WeightsUnavailable m
        | TrainingFailed m
        | NativeRuntime m
        | Cancelled m -> m

/// The one exception the library raises; `Error` says what went wrong as a value. Subclasses group the cases for
/// C# `catch` clauses.
type PmgException(error: PmgError) =
    inherit Exception(error.Message)
    /// What went wrong.
    member _.Error = error

/// A setting, or an experiment, with a value it cannot take.
type InvalidSettingsException(error: PmgError) =
    inherit PmgException(error)

/// An input file, or a dataset, that cannot be used.
type InputException(error: PmgError) =
    inherit PmgException(error)

/// A run folder that cannot be written or continued.
type RunFolderException(error: PmgError) =
    inherit PmgException(error)

/// A model file that is missing, damaged, foreign or does not fit; or weights that cannot be had.
type ModelFileException(error: PmgError) =
    inherit PmgException(error)

/// Training that stopped: divergence, no usable image, or cancellation.
type TrainingException(error: PmgError) =
    inherit PmgException(error)

/// The native runtime cannot be loaded or used.
type NativeRuntimeException(error: PmgError) =
    inherit PmgException(error)

/// An output that cannot be written.
type OutputException(error: PmgError) =
    inherit PmgException(error)

/// Raising and reading errors.
[<RequireQualifiedAccess>]
module Errors =
    /// The exception that carries `e`, of its family's class.
    let toException (e: PmgError) : PmgException =
        match e with
        | InvalidSetting _
        | InvalidExperiment _ -> InvalidSettingsException e
        | UnusableInput _
        | DatasetInvalid _ -> InputException e
        | RunFolder _ -> RunFolderException e
        | ModelFile _
        | WeightsUnavailable _ -> ModelFileException e
        | TrainingFailed _
        | Cancelled _ -> TrainingException e
        | NativeRuntime _ -> NativeRuntimeException e
        | OutputFailed _ -> OutputException e

    /// Raises `e` as its PmgException.
    let fail (e: PmgError) : 'a = raise (toException e)

    /// Raises an InvalidSetting.
    let setting (s: Setting) (message: string) : 'a = fail (InvalidSetting(s, message))

    /// Raises a ModelFile error for `path`.
    let modelFile (path: string) (message: string) : 'a = fail (ModelFile(path, message))

    /// Raises an UnusableInput error for `path`.
    let input (path: string) (message: string) : 'a = fail (UnusableInput(path, message))

    /// The error a PmgException carries, if `e` is one.
    let tryOf (e: exn) : PmgError option =
        match e with
        | :? PmgException as p -> Some p.Error
        | _ -> None

/// A warning or notice of the library (a step skipped, a stale file removed, a fallback taken).
type NoticeEventArgs(text: string) =
    inherit EventArgs()
    /// The notice, one line.
    member _.Text = text

/// Where the library's warnings go. The library writes nothing to the console: a program that wants them
/// subscribes (the `pmg` command prints them on stderr).
[<AbstractClass; Sealed>]
type Notices private () =
    static let raised = Event<EventHandler<NoticeEventArgs>, NoticeEventArgs>()

    /// Raised for each notice, on the thread that made it.
    [<CLIEvent>]
    static member Raised = raised.Publish

    /// Raises a notice.
    static member Say(text: string) = raised.Trigger(null, NoticeEventArgs text)
