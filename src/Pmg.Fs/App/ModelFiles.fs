/// Trained model files in and out: our checkpoints (.ckpt), PyTorch state_dicts (.pth, .safetensors) with the
/// reference implementation's key names, and their self-description (the network, the class names, the input
/// sizes), so a model file is all a program needs to rebuild and run the network.
module Pmg.Fs.App.ModelFiles

open System
open System.IO
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Data
open Pmg.Fs.Runtime
open Pmg.Fs.Training

/// Settings a caller gives for files that do not describe themselves (foreign reference .pth files); for our
/// files they must agree with the description.
type Overrides =
    { /// Backbone name; None: the file's.
      Backbone: string option
      /// Number of classes; None: the file's.
      Classes: int option
      /// Side of the centre crop in pixels; None: the file's, or 448 for a foreign state_dict.
      ImageSize: int option
      /// Resize side in pixels, before the crop; None: the file's, or for a foreign state_dict the crop when
      /// ImageSize is given, else 550.
      Resize: int option }

    /// Everything from the file.
    static member None = { Backbone = None; Classes = None; ImageSize = None; Resize = None }

/// Everything needed to rebuild a network and feed it (Interop.Description): read from a checkpoint's experiment,
/// an export's own description, or a state_dict's shapes.
type Description = Interop.Description.ModelDescription

/// The test transform a description's input names.
let spec (d: Description) : Transforms.Spec =
    { Transforms.Spec.test d.Input.Resize d.Input.Crop with Mean = d.Input.Mean; Std = d.Input.Std }

/// A loaded network in eval mode, with what describes it.
type Loaded =
    { /// The file it came from (full path).
      Path: string
      /// The network, in eval mode on Device.
      Net: Pmg.Network
      /// The network, class names and preprocessing.
      Description: Description
      /// Where the network lives.
      Device: torch.Device
      /// The data a Pmg.Fs checkpoint was trained on (what `eval` evaluates by default); None for other files.
      TrainedOn: Experiment.Data option }

let private classesBeside (path: string) (count: int) =
    let beside = Path.Combine(Path.GetDirectoryName(Path.GetFullPath path), "classes.txt")
    let names = if File.Exists beside then File.ReadAllLines beside |> Array.filter (fun l -> l.Trim() <> "") else [||]
    if names.Length = count then names else Array.init count string

let private clash (path: string) (what: Setting) (given: 'a option) (has: 'a) =
    match given with
    | Some g when g <> has ->
        Errors.setting what (sprintf "%s was trained with %s %A, not %A: leave the %s out, or give the matching model" path what.Words has g what.Words)
    | _ -> ()

/// Checks a model path before anything reads it.
let private checkPath (path: string) =
    if Directory.Exists path then
        Errors.modelFile path (sprintf "%s is a folder: give the model file in it (best.ckpt or last.ckpt)" path)
    if not (File.Exists path) then Errors.modelFile path (sprintf "model file %s does not exist" path)
    if Path.GetExtension(path).Equals(".onnx", StringComparison.OrdinalIgnoreCase) then
        Errors.modelFile path (sprintf "%s is an ONNX model: it runs in ONNX Runtime (predict with the ONNX model), not as a checkpoint" path)

/// The input sizes (resize, crop): the given ones, else the file's `recorded` ones, where a given crop alone keeps
/// the file's resize ratio (as Experiment.withImageSize does); a file that records none gets the paper's, or for a
/// given crop alone, a resize to the crop itself.
let private sizes (o: Overrides) (recorded: (int * int) option) : int * int =
    match recorded with
    | Some(resize, crop) ->
        let c = defaultArg o.ImageSize crop
        defaultArg o.Resize (if o.ImageSize.IsSome then int (Math.Round(float c * float resize / float crop)) else resize), c
    | None ->
        let c = defaultArg o.ImageSize Transforms.Spec.paperCrop
        defaultArg o.Resize (if o.ImageSize.IsSome then c else Transforms.Spec.paperResize), c

/// The description and weights of a file, and for our checkpoints the data they were trained on, without building
/// the network.
let read (path: string) (o: Overrides) : Description * Interop.StateDict.Entries * Experiment.Data option =
    checkPath path
    Native.ensure Native.Cpu |> ignore
    if Checkpoint.isCheckpoint path || Path.GetExtension(path).Equals(".ckpt", StringComparison.OrdinalIgnoreCase) then
        let c = Checkpoint.load path
        // The optimizer's state is not needed to predict: freed now, not left to the GC.
        for _, t in c.Optimizer do
            t.Dispose()
        let m = c.Experiment.Model
        clash path Setting.Classes o.Classes m.Classes
        clash path Setting.Backbone o.Backbone m.Backbone
        let resize, crop = sizes o (Some(c.Experiment.Input.Resize, c.Experiment.Input.Crop))
        { Network = m; Classes = classesBeside path m.Classes; Input = Interop.Description.input resize crop }, c.Model, Some c.Experiment.Data
    else
        let entries = Interop.StateDict.read path
        try
            match Interop.StateDict.readDescription path with
            | Some d ->
                // Our own export: it says everything; a given setting must agree with it.
                clash path Setting.Classes o.Classes d.Network.Classes
                clash path Setting.Backbone o.Backbone d.Network.Backbone
                let resize, crop = sizes o (Some(d.Input.Resize, d.Input.Crop))
                { d with Input = { d.Input with Resize = resize; Crop = crop } }, entries, None
            | None ->
                // A foreign state_dict (the reference's): the network from its shapes, the rest from the settings.
                let inferred = Interop.StateDict.inferConfig path entries
                let network = { inferred with Classes = defaultArg o.Classes inferred.Classes; Backbone = defaultArg o.Backbone inferred.Backbone }
                let resize, crop = sizes o None
                { Network = network; Classes = classesBeside path network.Classes; Input = Interop.Description.input resize crop }, entries, None
        with _ ->
            entries |> List.iter (fun (_, t) -> t.Dispose())
            reraise ()

/// Builds the network a model file describes, loads its weights strictly and puts it in eval mode on `device`.
let load (path: string) (o: Overrides) (device: Device) : Loaded =
    let dev = Device.torch device
    let description, weights, trainedOn = read path o
    let net = Pmg.create description.Network
    try
        try
            Interop.StateDict.loadFrom path net weights true
        finally
            weights |> List.iter (fun (_, t) -> t.Dispose())
    with _ ->
        net.Dispose()
        reraise ()
    net.``to`` dev |> ignore
    net.eval ()
    { Path = Path.GetFullPath path; Net = net; Description = description; Device = dev; TrainedOn = trainedOn }

/// Writes the network as a PyTorch state_dict with the reference's key names (.pth, or .safetensors by extension),
/// its description inside; never over the model file itself or a file of a run.
let exportPyTorch (m: Loaded) (out: string) : unit =
    use _ = RunFolder.guardOutput [ m.Path ] out
    Interop.StateDict.export m.Net m.Description out

/// The ONNX model of a loaded network (Interop.OnnxExport), with its preprocessing and class names.
let toOnnx (m: Loaded) : Interop.Onnx.Model =
    let i = m.Description.Input
    Interop.OnnxExport.toOnnx m.Net i.Crop m.Description.Classes i

/// Writes the network as an ONNX model; never over the model file itself or a file of a run.
let exportOnnx (m: Loaded) (out: string) : Interop.Onnx.Model =
    use _ = RunFolder.guardOutput [ m.Path ] out
    let model = toOnnx m
    Interop.OnnxExport.write out model
    model

/// Evaluates a loaded model on the test split of `data`, in batches of `batchSize`, with the model's own input.
let evaluate (m: Loaded) (data: Experiment.Data) (batchSize: int) : Evaluate.Accuracy =
    if batchSize < 1 then Errors.setting Setting.BatchSize (sprintf "batch size %d: must be at least 1" batchSize)
    let i = m.Description.Input
    let e =
        { Experiment.paper m.Net.Config.Classes data with
            Model = m.Net.Config
            BatchSize = batchSize
            Input = { Resize = i.Resize; Crop = i.Crop; Padding = 0 } }
    let d, _ = Run.openData data false
    if d.Classes.Length <> m.Net.Config.Classes then
        Errors.setting
            Setting.Dataset
            (sprintf "the dataset has %d classes but the model has %d: evaluate it on the data it was trained for" d.Classes.Length m.Net.Config.Classes)
    Trainer.evaluateNet e m.Net m.Device d.Classes.Length d.Test
