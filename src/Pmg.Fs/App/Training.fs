/// Starting or continuing a run from settings: the one place where a door's values (command-line flags, a script's
/// arguments, C# calls) become an experiment, by the library's rules, and the run folder is chosen. The CLI and the
/// scripts parse and print; everything in between is here.
module Pmg.Fs.App.Training

open System
open System.IO
open Pmg.Fs
open Pmg.Fs.Data
open Pmg.Fs.Model
open Pmg.Fs.Training

/// The settings a door may give; None keeps the recipe's value (the paper's for a dataset on disk, the main job's
/// for the embedded dataset). Values are plain text or numbers, as a user types them.
type Settings =
    { /// embedded (default), cub, cars, aircraft, dogs or folder.
      Dataset: string option
      /// The dataset's folder in its official layout.
      Root: string option
      /// FGVC-Aircraft's label level: variant, family or manufacturer.
      Level: string option
      Backbone: string option
      Epochs: int option
      WarmupEpochs: int option
      BatchSize: int option
      ImageSize: int option
      Resize: int option
      LearningRate: float option
      BackboneLearningRate: float option
      Heads: int option
      /// Jigsaw grid per head, finest first.
      Grids: int list option
      PerSampleJigsaw: bool
      /// cycle or uniform.
      PatchOrder: string option
      /// A number of images, or none.
      BatchNormGroup: string option
      /// skip or train.
      PartialBatches: string option
      /// full or truncated.
      Forward: string option
      /// progressive or joint.
      Update: string option
      /// fp32 or bf16.
      Precision: string option
      Seed: int option
      /// cpu, cuda or cuda:N.
      Device: string option
      /// imagenet, none, or a file.
      Weights: string option
      /// A full PMG model (ours or the reference's state_dict) to start from instead.
      Init: string option
      CropToBox: bool
      Workers: int option
      /// mpi, nccl or none: the engine between the processes mpirun starts (each runs the same settings).
      Distributed: string option }

    /// No settings: the recipe as it is.
    static member None =
        { Dataset = None; Root = None; Level = None; Backbone = None; Epochs = None; WarmupEpochs = None; BatchSize = None
          ImageSize = None; Resize = None; LearningRate = None; BackboneLearningRate = None; Heads = None; Grids = None
          PerSampleJigsaw = false; PatchOrder = None; BatchNormGroup = None; PartialBatches = None; Forward = None
          Update = None; Precision = None; Seed = None; Device = None; Weights = None; Init = None; CropToBox = false
          Workers = None
          Distributed = None }

/// A named choice (case-insensitive), or an InvalidSetting listing the choices.
let choose (setting: Setting) (choices: (string * 'T) list) (value: string) : 'T =
    match choices |> List.tryFind (fun (name, _) -> name = value.Trim().ToLowerInvariant()) with
    | Some(_, x) -> x
    | None -> Errors.setting setting (sprintf "%s '%s': use %s" setting.Words value (choices |> List.map fst |> String.concat " or "))

let private within (setting: Setting) (lo: int) (hi: int) (value: int) =
    if value < lo || value > hi then Errors.setting setting (sprintf "%s %d: must be %d..%d" setting.Words value lo hi)
    value

let private finite (setting: Setting) (value: float) =
    if not (Double.IsFinite value) || value <= 0.0 then
        Errors.setting setting (sprintf "%s %g: must be a positive number" setting.Words value)
    value

/// The data the settings name: the embedded dataset, or a dataset on disk (its folder resolved). Options that do
/// not apply to it are refused.
let dataOf (s: Settings) : Experiment.Data =
    match s.Dataset |> Option.map (fun d -> d.Trim().ToLowerInvariant()) with
    | None
    | Some "embedded" ->
        if s.Root.IsSome then Errors.setting Setting.Root "a dataset folder was given without a dataset: name the dataset (cub, cars, aircraft, dogs or folder)"
        if s.Level.IsSome then Errors.setting Setting.Level "the label level applies to the aircraft dataset only"
        if s.CropToBox then Errors.setting Setting.Dataset "cropping to the object box needs a dataset with boxes (cub, cars, aircraft, dogs)"
        Experiment.embedded.Data
    | Some name ->
        let kind = Dataset.parseWithLevel name s.Level
        match kind with
        | Dataset.Kind.Aircraft _ -> ()
        | _ when s.Level.IsSome -> Errors.setting Setting.Level (sprintf "the label level applies to the aircraft dataset only, not %s" name)
        | _ -> ()
        if s.CropToBox && kind = Dataset.Kind.Folder then
            Errors.setting Setting.Dataset "cropping to the object box needs a dataset with boxes; a folder dataset has none"
        match s.Root with
        | Some r when String.IsNullOrWhiteSpace r -> Errors.setting Setting.Root "the dataset folder is empty text: give its path"
        | Some r -> Experiment.OnDisk { Kind = kind; Root = Runtime.Files.resolve r }
        | None -> Errors.setting Setting.Root (sprintf "the %s dataset needs its folder (in its official layout)" name)

let private apply (f: 'a -> Experiment.Experiment -> Experiment.Experiment) (value: 'a option) (e: Experiment.Experiment) =
    match value with
    | Some v -> f v e
    | None -> e

/// The experiment the settings describe on opened data (its class count), by the recipe's rules, then validated.
let experimentOn (data: Experiment.Data) (classes: int) (s: Settings) : Experiment.Experiment =
    let pixels setting v = within setting 1 4096 v
    let e =
        Experiment.forData data classes
        |> apply Experiment.withBackbone s.Backbone
        |> apply Experiment.withHeads (s.Heads |> Option.map (within Setting.Heads 1 64))
        |> apply Experiment.withGrids (s.Grids |> Option.map (List.map (within Setting.Grids 1 4096)))
        |> apply Experiment.withImageSize (s.ImageSize |> Option.map (pixels Setting.ImageSize))
        |> apply Experiment.withResize (s.Resize |> Option.map (pixels Setting.Resize))
        |> apply Experiment.withLr (s.LearningRate |> Option.map (finite Setting.LearningRate))
        |> apply Experiment.withBackboneLr (s.BackboneLearningRate |> Option.map (fun v -> if Double.IsFinite v && v >= 0.0 then v else Errors.setting Setting.BackboneLearningRate (sprintf "backbone learning rate %g: must be a number, 0 or more" v)))
        |> apply Experiment.withEpochs (s.Epochs |> Option.map (within Setting.Epochs 1 100000))
    let e =
        { e with
            Permutation = (if s.PerSampleJigsaw then Jigsaw.PerSample else e.Permutation)
            JigsawDraw = s.PatchOrder |> Option.map (choose Setting.PatchOrder [ "cycle", Jigsaw.Cycle; "uniform", Jigsaw.Uniform ]) |> Option.defaultValue e.JigsawDraw
            BatchNormGroup =
                match s.BatchNormGroup |> Option.map (fun v -> v.Trim().ToLowerInvariant()) with
                | None -> e.BatchNormGroup
                | Some "none" -> None
                | Some v ->
                    match Int32.TryParse v with
                    | true, k when k >= 2 -> Some k
                    | _ -> Errors.setting Setting.BatchNormGroup (sprintf "BatchNorm group '%s': give a number of images, 2 or more, or none" v)
            DropLast = s.PartialBatches |> Option.map (choose Setting.PartialBatches [ "skip", true; "train", false ]) |> Option.defaultValue e.DropLast
            Forward = s.Forward |> Option.map (choose Setting.Forward [ "full", Experiment.Full; "truncated", Experiment.Truncated ]) |> Option.defaultValue e.Forward
            Update = s.Update |> Option.map (choose Setting.Update [ "progressive", Experiment.Progressive; "joint", Experiment.Joint ]) |> Option.defaultValue e.Update
            Precision = s.Precision |> Option.map (choose Setting.Precision [ "fp32", Experiment.Fp32; "bf16", Experiment.Bf16 ]) |> Option.defaultValue e.Precision
            WarmupEpochs = s.WarmupEpochs |> Option.map (within Setting.WarmupEpochs 0 100000) |> Option.defaultValue e.WarmupEpochs
            BatchSize = s.BatchSize |> Option.map (within Setting.BatchSize 2 4096) |> Option.defaultValue e.BatchSize
            Seed = s.Seed |> Option.defaultValue e.Seed
            Device =
                s.Device
                |> Option.map Runtime.Device.parse
                |> Option.defaultValue e.Device
            CropToBox = s.CropToBox
            Weights = s.Weights |> Option.map Backbone.Weights.parse |> Option.defaultValue e.Weights
            Init = s.Init |> Option.map Runtime.Files.resolve
            Workers = s.Workers |> Option.map (within Setting.Workers 1 1024) |> Option.defaultValue e.Workers
            Collective = match s.Distributed with Some v -> Runtime.Collective.parse v | None -> e.Collective }
    Experiment.validate e

/// The experiment the settings describe and its data, opened once (the class count comes from it).
let experiment (s: Settings) : Experiment.Experiment * (Trainer.Data * Problem list) =
    let data = dataOf s
    // Values that need no data are checked before the data is read (a bad flag is cheaper to hear first).
    experimentOn data 2 s |> ignore
    let opened = Run.openData data s.CropToBox
    experimentOn data (fst opened).Classes.Length s, opened

/// The folder a new run goes to unless one is given: runs/<dataset>-<backbone>-<time>.
let defaultFolder (e: Experiment.Experiment) (now: DateTime) : string =
    Path.Combine("runs", sprintf "%s-%s" (Experiment.runName e) (now.ToString "yyyyMMdd-HHmmss"))

/// Trains the experiment on its opened data in `folder` (a new one under runs/ when None), continuing the run there
/// when `resume` (which needs the folder), recording it as `options` say (TensorBoard on or off).
let trainWith (options: Run.Options) (e: Experiment.Experiment, opened: Trainer.Data * Problem list) (folder: string option) (resume: bool) (hooks: Trainer.Hooks) : string * Run.Summary =
    let folder =
        match folder, resume with
        | Some f, _ -> f
        | None, true -> Errors.setting Setting.Resume "resuming needs the run's folder"
        | None, false -> defaultFolder e DateTime.Now
    folder, Run.trainWith options opened e folder resume hooks

/// trainWith the default options (TensorBoard event files on).
let train (experiment: Experiment.Experiment * (Trainer.Data * Problem list)) (folder: string option) (resume: bool) (hooks: Trainer.Hooks) : string * Run.Summary =
    trainWith Run.Options.Default experiment folder resume hooks
