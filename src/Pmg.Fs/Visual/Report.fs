/// Reports of training runs: plots, the confusion matrix and per-class accuracy of the best checkpoint, and a
/// report.md that ties them together; and one Markdown report comparing several runs.
module Pmg.Fs.Visual.Report

open System
open System.Globalization
open System.IO
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Experiment
open Pmg.Fs.Training

/// The files `writeRun` leaves in a run directory.
let lossesPng = "losses.png"
/// Plot of every output's test top-1 per epoch.
let accuracyPng = "accuracy.png"
/// The best checkpoint's confusion matrix.
let confusionPng = "confusion.png"
/// The best checkpoint's accuracy per class: index, name, images, correct, accuracy.
let perClassCsv = "per_class_accuracy.csv"
/// The Markdown report that ties the run's files together.
let reportMd = "report.md"
/// Every file writeRun writes into a run directory.
let files = [ lossesPng; accuracyPng; confusionPng; perClassCsv; reportMd ]

let private configJson = "config.json"
let private metricsCsv = "metrics.csv"
/// Worst classes listed in report.md (all of them are in the CSV).
let private worstListed = 10

let private inv = Format.number
let private pct (x: float) = (Format.percent x).Trim()

/// Per class: name, test images, correct combined predictions, accuracy (NaN without images).
let perClass (classes: string[]) (confusion: int[,]) : (string * int * int * float) list =
    let n = Array2D.length1 confusion
    [ for i in 0 .. n - 1 ->
          let total = Seq.sum (seq { for j in 0 .. n - 1 -> confusion.[i, j] })
          let name = if i < classes.Length then classes.[i] else string i
          name, total, confusion.[i, i], (if total = 0 then nan else float confusion.[i, i] / float total) ]

let private csvField (s: string) =
    if s.IndexOfAny [| ','; '"'; '\n' |] >= 0 then "\"" + s.Replace("\"", "\"\"") + "\"" else s

let private stepText (s: Schedule.Step) =
    let input = if s.Grid <= 1 then "whole image" else sprintf "%dx%d jigsaw" s.Grid s.Grid
    sprintf "%s on %s, weight %g" (Pmg.outputName s.Head) input s.LossWeight

let private dataText (e: Experiment) =
    match e.Data with
    | Embedded d -> sprintf "embedded synthetic (%d classes, %d px)" d.Classes d.ImageSize
    | OnDisk d ->
        let level = match d.Kind with Data.Dataset.Kind.Aircraft l -> sprintf " (%s)" l | _ -> ""
        sprintf "%s%s at %s" (Data.Dataset.name d.Kind) level d.Root

let private settings (e: Experiment) : (string * string) list =
    let heads = Pmg.headNames e.Model
    [ "data", dataText e
      "classes", string e.Model.Classes
      "backbone", sprintf "%s (%s)" e.Model.Backbone (Backbone.Weights.describe e.Weights)
      "heads", sprintf "%d (%s)" e.Model.Heads (String.concat ", " heads)
      "schedule", e.Schedule |> List.map stepText |> String.concat "; "
      "jigsaw permutation", sprintf "%A" e.Permutation
      "forward", sprintf "%A" e.Forward
      "epochs", string e.Epochs
      "batch size", string e.BatchSize
      "learning rates", sprintf "%s (new layers), %s (backbone), cosine" (inv e.Optimizer.Lr) (inv e.Optimizer.BackboneLr)
      "momentum, weight decay", sprintf "%s, %s" (inv e.Optimizer.Momentum) (inv e.Optimizer.WeightDecay)
      "input", sprintf "resize %d, crop %d, padding %d" e.Input.Resize e.Input.Crop e.Input.Padding
      "seed", string e.Seed
      "device", Runtime.Device.text e.Device ]

let private table (header: string list) (rows: string list list) =
    let line (cells: string list) = "| " + String.concat " | " cells + " |"
    [ line header
      line (header |> List.map (fun _ -> "---"))
      yield! rows |> List.map line ]

let private readExperiment (runDir: string) : Experiment =
    let config = Path.Combine(runDir, configJson)
    if not (Directory.Exists runDir) then Errors.input runDir (sprintf "%s does not exist: give the folder of a run made by training" runDir)
    if not (File.Exists config) || not (File.Exists(Path.Combine(runDir, metricsCsv))) then
        Errors.input runDir (sprintf "%s is not a run folder (it has no %s and %s): give the folder of a run made by training" runDir configJson metricsCsv)
    try
        Json.deserialize<Experiment> (File.ReadAllText config)
    with :? Text.Json.JsonException as e ->
        Errors.input config (sprintf "%s cannot be read (%s): it was not written by this version, or is damaged" config e.Message)

/// Index (0-based row) of the epoch with the highest combined accuracy; the first one on ties, as the trainer
/// keeps the first best.
let private bestRow (m: Plots.Metrics) =
    let c = m.Column "test_combined"
    if c.Length = 0 then None else Some(c |> Array.indexed |> Array.maxBy (fun (i, v) -> v, -i) |> fst)

let private outputsOfRow (heads: string list) (m: Plots.Metrics) (row: int) =
    [ yield! heads |> List.map (fun h -> h, (m.Column("test_" + h)).[row])
      "concat", (m.Column "test_concat").[row]
      "combined", (m.Column "test_combined").[row] ]

/// Writes the plots, the best checkpoint's confusion matrix and per-class accuracy, and report.md into
/// `runDir`, which holds config.json and metrics.csv. `best` is the evaluation of the best checkpoint.
let writeRun (runDir: string) (classes: string[]) (best: Evaluate.Accuracy) : unit =
    let e = readExperiment runDir
    let m = Plots.readMetrics (Path.Combine(runDir, metricsCsv))
    let heads = Pmg.headNames e.Model
    let at (name: string) = Path.Combine(runDir, name)
    Plots.losses m (at lossesPng)
    Plots.accuracy heads m (at accuracyPng)
    Plots.confusion classes best.Confusion (at confusionPng)
    let rows = perClass classes best.Confusion
    Runtime.Files.writeTextAtomically
        (at perClassCsv)
        ("class,name,images,correct,accuracy"
         :: (rows |> List.mapi (fun i (name, total, correct, acc) -> sprintf "%d,%s,%d,%d,%s" i (csvField name) total correct (if Double.IsNaN acc then "" else inv acc)))
         |> List.map (fun l -> l + "\n") |> String.concat "")
    let last = m.Rows - 1
    let bestEpoch = bestRow m
    let lastTable =
        if last < 0 then [ "No epoch finished." ]
        else
            let top5 = (m.Column "test_combined_top5").[last]
            table [ "output"; "top-1" ] [ for name, acc in outputsOfRow heads m last -> [ name; pct acc ] ]
            @ [ ""; sprintf "Combined top-5: %s." (pct top5) ]
    let bestTable =
        table [ "output"; "top-1" ]
            [ yield! List.zip heads best.Heads |> List.map (fun (h, a) -> [ h; pct a ])
              [ "concat"; pct best.Concat ]
              [ "combined"; pct best.Combined ]
              [ "combined top-5"; pct best.CombinedTop5 ]
              [ "mean per-class (combined)"; pct (Evaluate.meanPerClass best) ] ]
    let worst =
        rows
        |> List.filter (fun (_, total, _, _) -> total > 0)
        |> List.sortBy (fun (_, _, _, acc) -> acc)
        |> List.truncate worstListed
        |> List.map (fun (name, total, correct, acc) -> [ name; sprintf "%d/%d" correct total; pct acc ])
    let md =
        [ sprintf "# PMG run %s" (Path.GetFileName(Path.GetFullPath(runDir).TrimEnd(Path.DirectorySeparatorChar)))
          ""
          "## Experiment"
          ""
          yield! table [ "setting"; "value" ] [ for k, v in settings e -> [ k; v ] ]
          ""
          sprintf "Full settings: [%s](%s); per-epoch numbers: [%s](%s)." configJson configJson metricsCsv metricsCsv
          ""
          "## Results"
          ""
          (if last < 0 then "" else sprintf "Final epoch %d of %d, test top-1:" (last + 1) e.Epochs)
          ""
          yield! lastTable
          ""
          (match bestEpoch with
           | Some r -> sprintf "Best epoch: %d (combined %s), saved as best.ckpt." (r + 1) (pct (m.Column "test_combined").[r])
           | None -> "Best epoch: none yet.")
          ""
          sprintf "The best checkpoint on the test set (%d images):" best.Images
          ""
          yield! bestTable
          ""
          "## Plots"
          ""
          sprintf "![training loss per schedule step](%s)" lossesPng
          ""
          sprintf "![test accuracy per output](%s)" accuracyPng
          ""
          sprintf "![confusion matrix of the best checkpoint](%s)" confusionPng
          ""
          "## Per-class accuracy (best checkpoint, combined)"
          ""
          sprintf "All classes: [%s](%s). The %d weakest:" perClassCsv perClassCsv (List.length worst)
          ""
          yield! table [ "class"; "correct"; "top-1" ] worst
          "" ]
    Runtime.Files.writeTextAtomically (at reportMd) (String.concat "\n" md)

/// One Markdown report comparing runs: key settings, final and best accuracies, and the combined accuracy per
/// epoch of every run in one plot (written beside `outFile` as <name>-combined.png).
let compare (runDirs: string list) (outFile: string) : unit =
    if runDirs.IsEmpty then Errors.setting Setting.Output "no run folders to compare: give one or more"
    let outDir = Path.GetDirectoryName(Path.GetFullPath outFile)
    Runtime.Files.createFolder outDir
    let runs =
        runDirs
        |> List.map (fun dir ->
            let full = Path.GetFullPath(dir).TrimEnd(Path.DirectorySeparatorChar)
            full, readExperiment full, Plots.readMetrics (Path.Combine(full, metricsCsv)))
    // Directory names label the runs; equal names fall back to the paths.
    let names =
        let short = runs |> List.map (fun (d, _, _) -> Path.GetFileName d)
        if List.distinct short = short then short else runs |> List.map (fun (d, _, _) -> Path.GetRelativePath(outDir, d))
    let plotName = Path.GetFileNameWithoutExtension outFile + "-combined.png"
    Plots.compareCombined (List.zip names (runs |> List.map (fun (_, _, m) -> m))) (Path.Combine(outDir, plotName))
    let final (m: Plots.Metrics) (col: string) = if m.Rows = 0 then nan else (m.Column col).[m.Rows - 1]
    let link (name: string) (dir: string) =
        let report = Path.Combine(dir, reportMd)
        if File.Exists report then sprintf "[%s](%s)" name (Path.GetRelativePath(outDir, report).Replace('\\', '/')) else name
    let settingsRows =
        List.zip names runs
        |> List.map (fun (name, (dir, e, _)) ->
            [ link name dir
              dataText e
              sprintf "%s (%s)" e.Model.Backbone (Backbone.Weights.describe e.Weights)
              e.Schedule |> List.map (fun s -> if s.Grid <= 1 then "1" else string s.Grid) |> String.concat "/"
              sprintf "%A" e.Forward
              string e.Epochs
              string e.BatchSize
              inv e.Optimizer.Lr
              sprintf "%d/%d" e.Input.Crop e.Input.Resize
              string e.Seed ])
    let resultRows =
        List.zip names runs
        |> List.map (fun (name, (_, e, m)) ->
            let heads = Pmg.headNames e.Model |> List.map (fun h -> final m ("test_" + h))
            let best =
                match bestRow m with
                | Some r -> sprintf "%s (epoch %d)" (pct (m.Column "test_combined").[r]) (r + 1)
                | None -> "-"
            [ name
              string m.Rows
              heads |> List.map pct |> String.concat " / "
              pct (final m "test_concat")
              pct (final m "test_combined")
              pct (final m "test_combined_top5")
              best ])
    let md =
        [ "# PMG runs compared"
          ""
          "## Settings"
          ""
          yield! table [ "run"; "data"; "backbone"; "grids"; "forward"; "epochs"; "batch"; "lr"; "crop/resize"; "seed" ] settingsRows
          ""
          "## Test top-1"
          ""
          yield! table [ "run"; "epochs done"; "heads (final)"; "concat (final)"; "combined (final)"; "combined top-5 (final)"; "best combined" ] resultRows
          ""
          sprintf "![combined top-1 per epoch](%s)" plotName
          "" ]
    Runtime.Files.writeTextAtomically outFile (String.concat "\n" md)
