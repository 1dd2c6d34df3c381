/// `pmg eval`, `pmg predict`, `pmg export` and `pmg data`: trained models and datasets, looked at.
module Pmg.Cli.ModelCommands

open System
open System.IO
open Argu
open Pmg.Fs
open Pmg.Fs.Data
open Pmg.Fs.Model
open Pmg.Fs.Training
open Pmg.Cli.Args
open Pmg.Cli.TrainCommand

let private overrides backbone classes size resize : Inference.Overrides =
    { Backbone = backbone
      Classes = classes |> Option.map (within "--classes" 2 100000)
      ImageSize = size |> Option.map (within "--image-size" 1 4096)
      Resize = resize |> Option.map (within "--resize" 1 4096) }

let eval (a: ParseResults<EvalArgs>) =
    let device = a.GetResult(EvalArgs.Device, "cpu") |> device
    let path = a.GetResult EvalArgs.Checkpoint
    let batch = a.GetResult(EvalArgs.Batch_Size, 16) |> within "--batch-size" 2 4096
    let o = overrides (a.TryGetResult EvalArgs.Backbone) (a.TryGetResult EvalArgs.Classes) (a.TryGetResult EvalArgs.Image_Size) (a.TryGetResult EvalArgs.Resize)
    let m = Inference.load path o device
    let data =
        match a.TryGetResult EvalArgs.Dataset with
        | Some _ as name -> dataOf name (a.TryGetResult EvalArgs.Root) (a.TryGetResult EvalArgs.Level)
        | None when Checkpoint.isCheckpoint path -> (Checkpoint.load path).Experiment.Data
        | None -> raise (BadFlag(sprintf "%s is a PyTorch state_dict, which says nothing about its data: pass --dataset and --root" path))
    let acc = Inference.evaluate m data batch device
    printfn "%s: %d test images" path acc.Images
    printfn "%s" (Evaluate.table (Pmg.headNames m.Net.Config) acc)
    printfn "mean per-class accuracy (combined): %s" (pct (Evaluate.meanPerClass acc))
    0

/// Prints each image's prediction from a checkpoint (TorchSharp) or an exported ONNX model (ONNX Runtime), in the
/// same format; an image that cannot be read is reported and the others still classified.
let predict (a: ParseResults<PredictArgs>) =
    let predictor, classes, release =
        match a.TryGetResult PredictArgs.Onnx, a.TryGetResult PredictArgs.Checkpoint with
        | Some onnx, None ->
            let m = OnnxRuntimeModel.load onnx
            OnnxRuntimeModel.predict m, None, (fun () -> (m :> IDisposable).Dispose())
        | None, Some checkpoint ->
            let device = a.GetResult(PredictArgs.Device, "cpu") |> device
            let o = overrides (a.TryGetResult PredictArgs.Backbone) (a.TryGetResult PredictArgs.Classes) (a.TryGetResult PredictArgs.Image_Size) (a.TryGetResult PredictArgs.Resize)
            let m = Inference.load checkpoint o device
            Inference.predict m, Some m.Net.Config.Classes, ignore
        | Some _, Some _ -> raise (BadFlag "give --checkpoint or --onnx, not both")
        | None, None -> raise (BadFlag "give the model: --checkpoint FILE (.ckpt, .pth) or --onnx FILE")
    try
        // The default lists up to five classes; an explicit --top-k must be one the model has.
        let k = a.TryGetResult PredictArgs.Top_K |> Option.map (within "--top-k" 1 (defaultArg classes Int32.MaxValue)) |> Option.defaultValue 5
        let failures =
            [ for path in a.GetResult PredictArgs.Images do
                  match (try Ok(Inputs.loadImage path) with Inputs.ImageError msg -> Error msg) with
                  | Error msg ->
                      eprintfn "pmg: %s" msg
                      yield path
                  | Ok image ->
                      use image = image
                      let p = predictor image
                      let top = p.Probabilities |> Array.mapi (fun i s -> i, s) |> Array.sortByDescending snd |> Array.truncate k
                      let logits = p.Heads @ [ "concat", p.Concat; "combined", p.Combined ]
                      if a.Contains PredictArgs.Json then
                          let topJson = [ for i, s in top -> {| ``class`` = i; score = float s |} ]
                          if a.Contains PredictArgs.Logits then printfn "%s" (Json.line {| image = path; top = topJson; logits = dict logits |})
                          else printfn "%s" (Json.line {| image = path; top = topJson |})
                      else
                          printfn "%s" path
                          for i, s in top do
                              printfn "  class %d  %.4f" i s
                          if a.Contains PredictArgs.Logits then
                              for name, l in logits do
                                  printfn "  %-8s %s" name (l |> Array.map (sprintf "%.3f") |> String.concat " ") ]
        if failures.IsEmpty then 0 else 1
    finally
        release ()

let export (a: ParseResults<ExportArgs>) =
    let path = a.GetResult ExportArgs.Checkpoint
    if File.Exists path && not (Checkpoint.isCheckpoint path) then
        raise (BadFlag(sprintf "--checkpoint %s: export takes a Pmg.Fs checkpoint (.ckpt), not a PyTorch state_dict" path))
    let format = a.GetResult ExportArgs.To |> choose "--to" [ "pytorch", "pytorch"; "onnx", "onnx" ]
    let size = a.TryGetResult ExportArgs.Image_Size |> Option.map (within "--image-size" 8 4096)
    let m = Inference.load path { Inference.Overrides.None with ImageSize = size } Runtime.Cpu
    let out = a.GetResult ExportArgs.Out
    match format with
    | "onnx" ->
        let model = Inference.toOnnx m (Inference.classNames path m.Net.Config.Classes)
        Interop.OnnxExport.write out model
        printfn "wrote %s (%d nodes, input 1x3x%dx%d with a dynamic batch, outputs %s)"
            out model.Graph.Nodes.Length m.Crop m.Crop (model.Graph.Outputs |> List.map _.Name |> String.concat ", ")
    | _ ->
        Interop.StateDict.export m.Net out
        printfn "wrote %s (%d entries, reference PMG key names)" out (m.Net.state_dict().Count)
    0

let data (a: ParseResults<DataArgs>) =
    let root = a.GetResult DataArgs.Root
    let kind =
        try
            Dataset.parseWithLevel (a.GetResult DataArgs.Dataset) (a.TryGetResult DataArgs.Level)
        with :? PmgException as e ->
            raise (BadFlag("--dataset: " + e.Message))
    let index = Dataset.load kind root
    let report = Inspect.inspect index
    if a.Contains DataArgs.Json then
        printfn "%s" (Inspect.toJson report)
    else
        printfn "%s at %s" index.Name index.Root
        printfn "classes %d, train %d, test %d usable images (grayscale %d, CMYK %d: converted to RGB)"
            report.Classes report.Train report.Test report.Grayscale report.Cmyk
        printfn "%d unusable:" report.Problems.Length
        for p in report.Problems do
            printfn "  %s: %s" p.File p.Problem
    // Exactly what training refuses (the same function decides), and nothing else.
    match Inspect.refusal index report with
    | Some message ->
        eprintfn "pmg: %s" message
        1
    | None -> 0
