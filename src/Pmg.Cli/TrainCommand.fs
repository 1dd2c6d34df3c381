/// `pmg train`: flags to an experiment (through Experiment's functions, which hold every rule), then the run, with
/// a progress line per batch and a line per epoch.
module Pmg.Cli.TrainCommand

open System
open System.IO
open System.Diagnostics
open Argu
open Pmg.Fs
open Pmg.Fs.Data
open Pmg.Fs.Model
open Pmg.Fs.Training
open Pmg.Cli.Args

let pct = Format.percent

/// The data a --dataset / --root / --level triple names; the embedded dataset without --dataset.
let dataOf (dataset: string option) (root: string option) (level: string option) : Experiment.Data =
    match dataset |> Option.map (fun d -> d.Trim().ToLowerInvariant()) with
    | None
    | Some "embedded" -> Experiment.embedded.Data
    | Some name ->
        let kind =
            try
                Dataset.parseWithLevel name level
            with :? PmgException as e ->
                raise (BadFlag("--dataset: " + e.Message))
        match root with
        | Some r -> Experiment.OnDisk { Kind = kind; Root = r }
        | None -> raise (BadFlag(sprintf "--dataset %s needs --root DIR (the dataset's folder in its official layout)" name))

let private apply (f: 'a -> Experiment.Experiment -> Experiment.Experiment) (value: 'a option) (e: Experiment.Experiment) =
    match value with
    | Some v -> f v e
    | None -> e

/// The experiment the flags describe, and its data (indexed once).
let experimentOf (a: ParseResults<TrainArgs>) =
    let data = dataOf (a.TryGetResult TrainArgs.Dataset) (a.TryGetResult TrainArgs.Root) (a.TryGetResult TrainArgs.Level)
    let cropToBox = a.Contains TrainArgs.Crop_To_Box
    let opened = Run.openData data cropToBox
    let classes = (fst opened).Classes.Length
    let positive flag (v: int) = within flag 1 Int32.MaxValue v
    let pixels flag (v: int) = within flag 1 4096 v
    let e =
        Experiment.forData data classes
        |> apply Experiment.withBackbone (a.TryGetResult TrainArgs.Backbone)
        |> apply Experiment.withHeads (a.TryGetResult TrainArgs.Heads)
        |> apply Experiment.withGrids (a.TryGetResult TrainArgs.Grids |> Option.map (positiveInts "--grids"))
        |> apply Experiment.withImageSize (a.TryGetResult TrainArgs.Image_Size |> Option.map (pixels "--image-size"))
        |> apply Experiment.withResize (a.TryGetResult TrainArgs.Resize |> Option.map (pixels "--resize"))
        |> apply Experiment.withLr (a.TryGetResult TrainArgs.Lr)
        |> apply Experiment.withBackboneLr (a.TryGetResult TrainArgs.Backbone_Lr)
        |> apply Experiment.withEpochs (a.TryGetResult TrainArgs.Epochs |> Option.map (positive "--epochs"))
    let e =
        { e with
            Permutation = (if a.Contains TrainArgs.Per_Sample_Jigsaw then Jigsaw.PerSample else e.Permutation)
            JigsawDraw = a.TryGetResult TrainArgs.Patch_Order |> Option.map (choose "--patch-order" [ "cycle", Jigsaw.Cycle; "uniform", Jigsaw.Uniform ]) |> Option.defaultValue e.JigsawDraw
            BatchNormGroup =
                match a.TryGetResult TrainArgs.Bn_Group with
                | None -> e.BatchNormGroup
                | Some "none" -> None
                | Some v ->
                    match Int32.TryParse v with
                    | true, k when k >= 2 -> Some k
                    | _ -> raise (BadFlag(sprintf "--bn-group %s: give a number of images, 2 or more, or none" v))
            DropLast = a.TryGetResult TrainArgs.Partial_Batches |> Option.map (choose "--partial-batches" [ "skip", true; "train", false ]) |> Option.defaultValue e.DropLast
            Forward = a.TryGetResult TrainArgs.Forward |> Option.map (choose "--forward" [ "full", Experiment.Full; "truncated", Experiment.Truncated ]) |> Option.defaultValue e.Forward
            Update = a.TryGetResult TrainArgs.Update |> Option.map (choose "--update" [ "progressive", Experiment.Progressive; "joint", Experiment.Joint ]) |> Option.defaultValue e.Update
            Precision = a.TryGetResult TrainArgs.Precision |> Option.map (choose "--precision" [ "fp32", Experiment.Fp32; "bf16", Experiment.Bf16 ]) |> Option.defaultValue e.Precision
            WarmupEpochs = a.GetResult(TrainArgs.Warmup_Epochs, e.WarmupEpochs)
            BatchSize = a.TryGetResult TrainArgs.Batch_Size |> Option.map (within "--batch-size" 2 4096) |> Option.defaultValue e.BatchSize
            Seed = a.GetResult(TrainArgs.Seed, e.Seed)
            Device = a.TryGetResult TrainArgs.Device |> Option.map device |> Option.defaultValue e.Device
            CropToBox = cropToBox
            Weights = a.TryGetResult TrainArgs.Pretrained |> Option.map Backbone.Weights.parse |> Option.defaultValue e.Weights
            Workers = a.TryGetResult TrainArgs.Workers |> Option.map (within "--workers" 1 1024) |> Option.defaultValue e.Workers }
    e, opened

let run (a: ParseResults<TrainArgs>) =
    let e, opened = experimentOf a
    let e = Experiment.validate e
    let out = a.GetResult(TrainArgs.Out, Path.Combine("runs", sprintf "%s-%s" (Experiment.runName e) (DateTime.Now.ToString "yyyyMMdd-HHmmss")))
    if a.Contains TrainArgs.Resume && not (a.Contains TrainArgs.Out) then
        raise (BadFlag "--resume needs --out RUN_DIR: the folder of the run to continue")
    printfn "PMG %s (%s) on %s: %d classes, %d epochs, batch %d, %dpx crops of %dpx, steps %s, device %s"
        e.Model.Backbone (Backbone.Weights.describe e.Weights) (Experiment.dataName e)
        e.Model.Classes e.Epochs e.BatchSize e.Input.Crop e.Input.Resize
        (e.Schedule |> List.map (fun s -> sprintf "%A n=%d w=%g" s.Head s.Grid s.LossWeight) |> String.concat "; ")
        (Runtime.Device.text e.Device)
    printfn "run directory: %s" (Path.GetFullPath out)
    let clock = Stopwatch.StartNew()
    let epochClock = Stopwatch()
    let hooks: Trainer.Hooks =
        { Batch =
            fun b ->
                if b.Batch = 1 then epochClock.Restart()
                let line = Progress.render (sprintf "epoch %d/%d" (b.Epoch + 1) e.Epochs) (float b.Batch / float b.Batches) (sprintf "%d/%d" b.Batch b.Batches) epochClock.Elapsed
                Progress.show line false
          Evaluating = fun _ -> ()
          Epoch =
            fun _ r ->
                // "-" for steps that did not run (warm-up epochs).
                let losses = r.StepLosses |> List.map (fun l -> if Double.IsNaN l then "-" else sprintf "%.3f" l) |> String.concat " "
                let line =
                    sprintf "epoch %d/%d  loss %s  train %s  test combined %s concat %s  %.1f img/s  %s"
                        (r.Epoch + 1) e.Epochs losses (pct r.TrainAccuracy) (pct r.Test.Combined) (pct r.Test.Concat)
                        r.ImagesPerSecond (Progress.render "" (float (r.Epoch + 1) / float e.Epochs) "" clock.Elapsed)
                Progress.show line true
                if not r.Skipped.IsEmpty then
                    eprintfn "  warning: %d unusable images skipped this epoch, e.g. %s: %s" r.Skipped.Length (fst r.Skipped.Head) (snd r.Skipped.Head) }
    let summary = Run.trainOn opened e out (a.Contains TrainArgs.Resume) hooks
    match summary.History with
    | [] -> printfn "nothing to do: %s already holds %d epochs" out e.Epochs
    | history ->
        let last = List.last history
        printfn ""
        printfn "final epoch %d, test set (%d images):" (last.Epoch + 1) last.Test.Images
        printfn "%s" (Evaluate.table (Pmg.headNames e.Model) last.Test)
        printfn "best combined %s at epoch %d -> %s" (pct summary.BestCombined) (summary.BestEpoch + 1) summary.BestCheckpoint
        printfn "elapsed %s" (clock.Elapsed.ToString @"mm\:ss")
    0
