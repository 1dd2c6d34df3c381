/// `pmg eval`, `pmg predict`, `pmg export` and `pmg data`: trained models and datasets, looked at. Each parses its
/// flags, calls the application layer once, and prints.
module Pmg.Cli.ModelCommands

open System
open System.IO
open Argu
open Pmg.Fs
open Pmg.Fs.App
open Pmg.Fs.Data
open Pmg.Fs.Training
open Pmg.Cli.Args

let private pct = Format.percent

let private overrides backbone classes size resize : ModelFiles.Overrides =
    { Backbone = backbone
      Classes = classes |> Option.map (within "--classes" 2 100000)
      ImageSize = size |> Option.map (within "--image-size" 1 4096)
      Resize = resize |> Option.map (within "--resize" 1 4096) }

let eval (a: ParseResults<EvalArgs>) =
    let device = a.GetResult(EvalArgs.Device, "cpu") |> device
    let path = a.GetResult EvalArgs.Checkpoint
    let batch = a.GetResult(EvalArgs.Batch_Size, 16) |> within "--batch-size" 1 4096
    let o = overrides (a.TryGetResult EvalArgs.Backbone) (a.TryGetResult EvalArgs.Classes) (a.TryGetResult EvalArgs.Image_Size) (a.TryGetResult EvalArgs.Resize)
    // The model first: a file that is no checkpoint (an ONNX model, a damaged file) is named before the data is.
    let m = ModelFiles.load path o device
    use _ = m.Net
    let data =
        match a.TryGetResult EvalArgs.Dataset with
        | Some _ as name ->
            Training.dataOf { Training.Settings.None with Dataset = name; Root = a.TryGetResult EvalArgs.Root; Level = a.TryGetResult EvalArgs.Level }
        | None when m.TrainedOn.IsSome -> m.TrainedOn.Value
        | None -> raise (BadFlag(sprintf "%s is a PyTorch state_dict, which says nothing about its data: pass --dataset and --root" path))
    let acc = ModelFiles.evaluate m data batch
    printfn "%s: %d test images" path acc.Images
    printfn "%s" (Evaluate.table (Model.Pmg.headNames m.Net.Config) acc)
    printfn "mean per-class accuracy (combined): %s" (pct (Evaluate.meanPerClass acc))
    0

/// Prints each image's prediction from a checkpoint (TorchSharp) or an exported ONNX model (ONNX Runtime), in the
/// same format; an image that cannot be read is reported and the others still classified (exit 1 at the end).
let predict (a: ParseResults<PredictArgs>) =
    let model =
        match a.TryGetResult PredictArgs.Onnx, a.TryGetResult PredictArgs.Checkpoint with
        | Some onnx, None ->
            for flag, given in [ "--backbone", a.Contains PredictArgs.Backbone; "--classes", a.Contains PredictArgs.Classes; "--image-size", a.Contains PredictArgs.Image_Size; "--resize", a.Contains PredictArgs.Resize ] do
                if given then raise (BadFlag(sprintf "%s does not apply to --onnx: an exported model carries its own" flag))
            Predictor.onnx onnx
        | None, Some checkpoint ->
            let device = a.GetResult(PredictArgs.Device, "cpu") |> device
            let o = overrides (a.TryGetResult PredictArgs.Backbone) (a.TryGetResult PredictArgs.Classes) (a.TryGetResult PredictArgs.Image_Size) (a.TryGetResult PredictArgs.Resize)
            Predictor.openFile checkpoint o device
        | Some _, Some _ -> raise (BadFlag "give --checkpoint or --onnx, not both")
        | None, None -> raise (BadFlag "give the model: --checkpoint FILE (.ckpt, .pth) or --onnx FILE")
    use model = model
    let classes = model.ClassNames.Length
    let k = a.TryGetResult PredictArgs.Top_K |> Option.map (within "--top-k" 1 classes) |> Option.defaultValue (min 5 classes)
    let failures =
        [ for path in a.GetResult PredictArgs.Images do
              match (try Ok(Embedded.load path) with :? PmgException as e -> Error e) with
              | Error e ->
                  eprintfn "pmg: %s" e.Message
                  yield path
              | Ok image ->
                  use image = image
                  let p = model.Predict [ image ] |> List.head
                  let top = Predictor.top model.ClassNames k p
                  if a.Contains PredictArgs.Json then
                      let topJson = [ for s in top -> {| ``class`` = s.Class; name = s.Name; score = float s.Score |} ]
                      if a.Contains PredictArgs.Logits then printfn "%s" (Json.line {| image = path; top = topJson; logits = dict p.Outputs |})
                      else printfn "%s" (Json.line {| image = path; top = topJson |})
                  else
                      printfn "%s" path
                      let width = top |> List.map (fun s -> s.Name.Length) |> List.max
                      for s in top do
                          printfn "  %s  %.4f  (class %d)" (s.Name.PadRight width) s.Score s.Class
                      if a.Contains PredictArgs.Logits then
                          for name, l in p.Outputs do
                              printfn "  %-8s %s" name (l |> Array.map (sprintf "%.3f") |> String.concat " ") ]
    if failures.IsEmpty then 0
    else
        eprintfn "pmg: %d of %d images could not be classified" failures.Length (a.GetResult PredictArgs.Images).Length
        1

let export (a: ParseResults<ExportArgs>) =
    let path = a.GetResult ExportArgs.Checkpoint
    if File.Exists path && not (Checkpoint.isCheckpoint path) then
        raise (BadFlag(sprintf "--checkpoint %s: export takes a Pmg.Fs checkpoint (.ckpt), not a PyTorch state_dict or ONNX model" path))
    let format = a.GetResult ExportArgs.To |> choose "--to" [ "pytorch", "pytorch"; "onnx", "onnx" ]
    let size = a.TryGetResult ExportArgs.Image_Size |> Option.map (within "--image-size" 8 4096)
    let out = a.GetResult ExportArgs.Out
    let m = ModelFiles.load path { ModelFiles.Overrides.None with ImageSize = size } Runtime.Cpu
    use _ = m.Net
    match format with
    | "onnx" ->
        let model = ModelFiles.exportOnnx m out
        let i = m.Description.Input
        printfn "wrote %s (%d nodes, input 1x3x%dx%d with a dynamic batch, outputs %s)"
            out model.Graph.Node.Count i.Crop i.Crop (model.Graph.Output |> Seq.map _.Name |> String.concat ", ")
    | _ ->
        ModelFiles.exportPyTorch m out
        printfn "wrote %s (%d entries, reference PMG key names, described inside)" out (m.Net.state_dict().Count)
    0

let data (a: ParseResults<DataArgs>) =
    let root = a.GetResult DataArgs.Root
    let kind = Dataset.parseWithLevel (a.GetResult DataArgs.Dataset) (a.TryGetResult DataArgs.Level)
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
