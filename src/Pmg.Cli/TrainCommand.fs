/// `pmg train`: flags to the library's settings, then the run (Pmg.Fs.App.Training holds every rule), with a
/// progress line per batch and a line per epoch.
module Pmg.Cli.TrainCommand

open System
open System.IO
open System.Diagnostics
open Argu
open Pmg.Fs
open Pmg.Fs.App
open Pmg.Fs.Training
open Pmg.Cli.Args
open Pmg.Cli.TrainSettings

let pct = Format.percent

let private plural (n: int) (word: string) = counted n word

/// The one-line description of an experiment the banner prints.
let banner (e: Experiment.Experiment) =
    sprintf "PMG %s (%s) on %s: %s, %s, batch %d, %dpx crops of %dpx, steps %s, device %s"
        e.Model.Backbone (Model.Backbone.Weights.describe e.Weights) (Experiment.dataName e)
        (counted e.Model.Classes "class") (plural e.Epochs "epoch") e.BatchSize e.Input.Crop e.Input.Resize
        (e.Schedule |> List.map (fun s -> sprintf "%s x%g" (Schedule.stepName s) s.LossWeight) |> String.concat ", ")
        (Runtime.Device.text e.Device)
    + (match e.Collective with
       | Some b -> sprintf ", %s over %s" (Runtime.Collective.name (Some b)) (counted (Runtime.Collective.connect e.Collective).Size "process")
       | None -> "")

let run (a: ParseResults<TrainArgs>) =
    let e, opened = Training.experiment (settingsOf a)
    let resume = a.Contains TrainArgs.Resume
    if resume && not (a.Contains TrainArgs.Out) then
        raise (BadFlag "--resume needs --out RUN_DIR: the folder of the run to continue")
    let options: Run.Options = { TensorBoard = not (a.Contains TrainArgs.No_Tensorboard) }
    // Under mpirun every process runs this command; rank 0 alone speaks (the others train their parts quietly).
    if (Runtime.Collective.connect e.Collective).Rank <> 0 then
        Training.trainWith options (e, opened) (a.TryGetResult TrainArgs.Out) resume Trainer.Hooks.None |> ignore
        0
    else
    printfn "%s" (banner e)
    match Interop.Hub.status (Model.Backbone.find e.Model.Backbone) e.Weights with
    | Interop.Hub.WillDownload _ as s -> printfn "%s" s.Text
    | _ -> ()
    let clock = Stopwatch.StartNew()
    let epochClock = Stopwatch()
    let mutable announced = false
    let folderShown = a.TryGetResult TrainArgs.Out |> Option.defaultWith (fun () -> Training.defaultFolder e DateTime.Now)
    let announce () =
        // Only once the run is accepted (the folder locked, the settings checked, the weights loaded).
        if not announced then
            announced <- true
            printfn "run folder: %s" (Path.GetFullPath folderShown)
    let hooks: Trainer.Hooks =
        { Batch =
            fun b ->
                announce ()
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
                    eprintfn "  warning: %s skipped this epoch, e.g. %s: %s" (plural r.Skipped.Length "unusable image") (fst r.Skipped.Head) (snd r.Skipped.Head) }
    let folder, summary = Training.trainWith options (e, opened) (Some folderShown) resume hooks
    match summary.History with
    | [] ->
        announce ()
        match summary.Completed with
        | [] -> printfn "nothing to do: %s holds all %s of the run" folder (plural e.Epochs "epoch")
        | pieces -> printfn "completed %s from the run's last checkpoint: %s holds all %s" (String.concat ", " pieces) folder (plural e.Epochs "epoch")
    | history ->
        let last = List.last history
        printfn ""
        printfn "final epoch %d, test set (%d images):" (last.Epoch + 1) last.Test.Images
        printfn "%s" (Evaluate.table (Model.Pmg.headNames e.Model) last.Test)
        printfn "best combined %s at epoch %d -> %s" (pct summary.BestCombined) (summary.BestEpoch + 1) (Path.GetRelativePath(Environment.CurrentDirectory, summary.BestCheckpoint))
        if e.Collective.IsSome then
            // Rank 0's view: its sums over the ranks, waiting for slower ranks included, against its training time.
            let waited = (Runtime.Collective.allReduceTime ()).TotalSeconds
            let training = history |> List.sumBy _.Seconds
            printfn "all-reduce: %.1f s of %.1f s training (%.1f%%)" waited training (100.0 * waited / max training 1e-9)
        printfn "elapsed %s" (clock.Elapsed.ToString @"mm\:ss")
    0
