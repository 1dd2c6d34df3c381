/// Loading a trained model for evaluation, prediction and export: from our checkpoints or from a PyTorch
/// state_dict with the reference implementation's key names.
module Pmg.Fs.Inference

open System
open System.IO
open TorchSharp
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open Pmg.Fs.Model
open Pmg.Fs.Data
open Pmg.Fs.Training

/// Settings given on the command line; for our checkpoints they must agree with what it was trained with.
type Overrides =
    { /// Backbone name; None: the checkpoint's, or "resnet50" for a state_dict.
      Backbone: string option
      /// Number of classes; None: the checkpoint's, or read from a state_dict's concat classifier.
      Classes: int option
      /// Side of the centre crop in pixels; None: the checkpoint's, or 448 for a state_dict.
      ImageSize: int option
      /// Resize side in pixels, before the crop; None: the checkpoint's, or for a state_dict the crop when ImageSize is given, else 550.
      Resize: int option }

    /// No overrides: everything from the checkpoint or the defaults.
    static member None = { Backbone = None; Classes = None; ImageSize = None; Resize = None }

/// A loaded network in eval mode, with the input sizes it expects.
type Model =
    { /// The network, in eval mode on Device.
      Net: Pmg.Network
      /// Side of the centre crop the network sees, in pixels.
      Crop: int
      /// Side images are resized to before the crop, in pixels.
      Resize: int
      /// Where the network lives.
      Device: torch.Device }

/// A model that cannot be loaded, or that does not fit the given settings or data; the message says why.
exception LoadError of string

let private classesKey = "classifier_concat.4.weight"

/// Builds the network a checkpoint describes and loads its weights (strictly).
let load (path: string) (o: Overrides) (device: Pmg.Fs.Runtime.Device) : Model =
    if Directory.Exists path then
        raise (LoadError(sprintf "%s is a folder: give the checkpoint file in it (best.ckpt or last.ckpt)" path))
    if not (File.Exists path) then
        raise (LoadError(sprintf "checkpoint %s does not exist" path))
    let config, weights, input =
        // A .ckpt is ours even when damaged: Checkpoint.load says how.
        if Checkpoint.isCheckpoint path || Path.GetExtension(path).Equals(".ckpt", StringComparison.OrdinalIgnoreCase) then
            let c = Checkpoint.load path
            let m = c.Experiment.Model
            let clash what (given: 'a option) (has: 'a) =
                match given with
                | Some g when g <> has ->
                    raise (LoadError(sprintf "%s was trained with %s %A, not %A: drop the flag or pass the matching checkpoint" path what has g))
                | _ -> ()
            // The optimizer's state is not needed to predict: freed now, not left to the GC.
            for _, t in c.Optimizer do
                t.Dispose()
            clash "--classes" o.Classes m.Classes
            clash "--backbone" o.Backbone m.Backbone
            m, c.Model, (defaultArg o.ImageSize c.Experiment.Input.Crop, defaultArg o.Resize c.Experiment.Input.Resize)
        else
            let entries = Interop.StateDict.read path
            let inferred =
                entries |> List.tryFind (fun (k, _) -> k = classesKey) |> Option.map (fun (_, t) -> int t.shape.[0])
            let classes =
                match o.Classes, inferred with
                | Some c, _ -> c
                | None, Some c -> c
                | None, None -> raise (LoadError(sprintf "%s has no %s: pass --classes" path classesKey))
            let size = defaultArg o.ImageSize Transforms.Spec.paperCrop
            let config = { Pmg.Config.Paper classes with Backbone = defaultArg o.Backbone "resnet50" }
            config, entries, (size, defaultArg o.Resize (if o.ImageSize.IsSome then size else Transforms.Spec.paperResize))
    let net = Pmg.create config
    try
        Interop.StateDict.loadInto net weights true
    finally
        weights |> List.iter (fun (_, t) -> t.Dispose())
    let dev = Pmg.Fs.Runtime.Device.torch device
    net.``to`` dev |> ignore
    net.eval ()
    let crop, resize = input
    { Net = net; Crop = crop; Resize = resize; Device = dev }

/// Logits of every head, concat and combined for one image, as arrays.
type Prediction =
    { /// Logits of each granularity head, by head name ("stage3"...), finest first.
      Heads: (string * float32[]) list
      /// Logits of the classifier on the concatenated features.
      Concat: float32[]
      /// Sum of every head's and concat's logits (the paper's ensemble).
      Combined: float32[]
      /// Softmax of the combined logits.
      Probabilities: float32[] }

/// The logits of one image, after the test transform (resize, centre crop), computed on the model's device.
let predict (m: Model) (image: Image<Rgb24>) : Prediction =
    use _ = torch.NewDisposeScope()
    use _ = torch.no_grad ()
    let spec = Transforms.Spec.test m.Resize m.Crop
    let pixels = Transforms.apply spec (System.Random 0) image
    let x = torch.tensor(pixels, dimensions = ReadOnlySpan [| 1L; 3L; int64 m.Crop; int64 m.Crop |]).``to`` m.Device
    let out = m.Net.forward x
    let arr (t: torch.Tensor) = Pmg.Fs.Runtime.Ops.hostFloats (t.squeeze 0L)
    { Heads = List.zip (Pmg.headNames m.Net.Config) (out.Heads |> List.map arr)
      Concat = arr out.Concat
      Combined = arr out.Combined
      Probabilities = arr (out.Combined.softmax 1L) }

/// Class names of a checkpoint: the classes.txt its run wrote beside it, or numbers.
let classNames (checkpoint: string) (count: int) : string[] =
    let beside = Path.Combine(Path.GetDirectoryName(Path.GetFullPath checkpoint), Run.classesName)
    let names = if File.Exists beside then File.ReadAllLines beside |> Array.filter (fun l -> l.Trim() <> "") else [||]
    if names.Length = count then names else Array.init count string

/// The model as ONNX (Interop.OnnxExport) for its crop size, with its preprocessing and class names.
let toOnnx (m: Model) (classes: string[]) : Interop.Onnx.Model =
    let spec = Transforms.Spec.test m.Resize m.Crop
    Interop.OnnxExport.toOnnx m.Net m.Crop classes { Resize = m.Resize; Crop = m.Crop; Mean = spec.Mean; Std = spec.Std }

/// Writes the model as an ONNX file (see toOnnx).
let exportOnnx (m: Model) (classes: string[]) (path: string) : unit = Interop.OnnxExport.write path (toOnnx m classes)

/// Evaluates a loaded model on the test split of `data`, in batches of `batchSize`, with the model's own crop.
let evaluate (m: Model) (data: Experiment.Data) (batchSize: int) (device: Pmg.Fs.Runtime.Device) : Evaluate.Accuracy =
    let e =
        { Experiment.paper m.Net.Config.Classes data with
            Model = m.Net.Config
            BatchSize = batchSize
            Input = { Resize = m.Resize; Crop = m.Crop; Padding = 0 }
            Device = device }
    let d, _ = Run.openData data false
    if d.Classes.Length <> m.Net.Config.Classes then
        raise (LoadError(sprintf "the dataset has %d classes but the model has %d: evaluate it on the data it was trained for" d.Classes.Length m.Net.Config.Classes))
    Trainer.evaluateNet e m.Net m.Device d.Classes.Length d.Test
