/// Classifying images with a trained model, one interface and two engines: TorchSharp (a checkpoint or state_dict,
/// on any device) and ONNX Runtime (an exported .onnx model, with no libtorch at all). Both read the preprocessing
/// and the class names from the model file, so a caller gives images and gets classes.
module Pmg.Fs.App.Predictor

open System
open System.Globalization
open System.IO
open Microsoft.ML.OnnxRuntime
open Microsoft.ML.OnnxRuntime.Tensors
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Data
open Pmg.Fs.Runtime

/// Every output's logits for one image, and the combined prediction's probabilities.
type Prediction =
    { /// Logits of each granularity head, by output name ("stage3"...), finest first.
      Heads: (string * float32[]) list
      /// Logits of the classifier on the concatenated features.
      Concat: float32[]
      /// Sum of every head's and concat's logits (the paper's ensemble).
      Combined: float32[]
      /// Softmax of the combined logits.
      Probabilities: float32[] }

    /// Every output's logits by name: the heads, "concat", "combined".
    member p.Outputs = p.Heads @ [ "concat", p.Concat; "combined", p.Combined ]

/// A class and its probability under the combined prediction.
type Scored =
    { /// The class index.
      Class: int
      /// Its name (the index as text where the model has no names).
      Name: string
      /// Its probability.
      Score: float32 }

/// A trained model that classifies images.
type IPredictor =
    inherit IDisposable
    /// Class names in label order.
    abstract ClassNames: string[]
    /// Test-time preprocessing (resize, centre crop, normalisation), read from the model.
    abstract Input: Transforms.Spec
    /// Predictions for a batch of images, in order.
    abstract Predict: images: Image<Rgb24> list -> Prediction list

/// The `k` most likely classes of a prediction, most likely first; `k` beyond the class count is an InvalidSetting.
let top (names: string[]) (k: int) (p: Prediction) : Scored list =
    if k < 1 || k > p.Probabilities.Length then
        Errors.setting Setting.TopK (sprintf "top-k %d: the model has %d classes; give 1..%d" k p.Probabilities.Length p.Probabilities.Length)
    p.Probabilities
    |> Array.mapi (fun i s -> { Class = i; Name = (if i < names.Length then names.[i] else string i); Score = s })
    |> Array.sortByDescending _.Score
    |> Array.truncate k
    |> List.ofArray

let private softmax (logits: float32[]) =
    let top = Array.max logits
    let e = logits |> Array.map (fun v -> exp (float (v - top)))
    let sum = Array.sum e
    e |> Array.map (fun v -> float32 (v / sum))

/// Pixels of a batch after the test transform, NCHW, one image after another.
let private pixels (spec: Transforms.Spec) (images: Image<Rgb24> list) : float32[] =
    let len = Transforms.Spec.sampleLength spec
    let out = Array.zeroCreate (len * images.Length)
    images |> List.iteri (fun i img -> Transforms.applyInto spec (Random 0) img out (i * len))
    out

/// A loaded TorchSharp network as a predictor (it disposes the network).
let ofLoaded (m: ModelFiles.Loaded) : IPredictor =
    let spec = ModelFiles.spec m.Description
    let names = Model.Pmg.headNames m.Net.Config
    { new IPredictor with
        member _.ClassNames = m.Description.Classes
        member _.Input = spec
        member _.Predict images =
            if images.IsEmpty then []
            else
                use _ = torch.NewDisposeScope()
                use _ = torch.no_grad ()
                let n = int64 images.Length
                let x = torch.tensor(pixels spec images, dimensions = ReadOnlySpan [| n; 3L; int64 spec.Crop; int64 spec.Crop |]).``to`` m.Device
                let out = m.Net.forward x
                let host (t: torch.Tensor) = Ops.hostFloats t |> Array.chunkBySize (int t.shape.[1])
                let heads = out.Heads |> List.map host
                let concat = host out.Concat
                let combined = host out.Combined
                [ for i in 0 .. images.Length - 1 ->
                      { Heads = List.zip names (heads |> List.map (fun h -> h.[i]))
                        Concat = concat.[i]
                        Combined = combined.[i]
                        Probabilities = softmax combined.[i] } ]
        member _.Dispose() = m.Net.Dispose() }

/// An exported ONNX model (ModelFiles.exportOnnx) run by ONNX Runtime, verified first (checksum, finite weights),
/// with the preprocessing, outputs and class names its metadata holds. Never loads libtorch.
let onnx (path: string) : IPredictor =
    if Directory.Exists path then Errors.modelFile path (sprintf "%s is a folder: give the .onnx file" path)
    if not (File.Exists path) then Errors.modelFile path (sprintf "ONNX model %s does not exist" path)
    Interop.OnnxExport.verify path
    let session =
        try
            new InferenceSession(path)
        with :? OnnxRuntimeException as e ->
            Errors.modelFile path (sprintf "%s cannot be loaded by ONNX Runtime (%s): export it again from its checkpoint" path (e.Message.Split('\n').[0]))
    try
        let meta = session.ModelMetadata.CustomMetadataMap
        let get key =
            match meta.TryGetValue key with
            | true, v -> v
            | _ -> Errors.modelFile path (sprintf "%s has no '%s' in its metadata: it was not exported by this program; export it from its checkpoint" path key)
        let floats (key: string) = (get key).Split(',') |> Array.map (fun v -> Single.Parse(v, CultureInfo.InvariantCulture))
        let spec = { Transforms.Spec.test (int (get "resize")) (int (get "crop")) with Mean = floats "mean"; Std = floats "std" }
        let outputs = (get "outputs").Split(',') |> List.ofArray
        let heads = outputs |> List.filter (fun n -> n <> "concat" && n <> "combined")
        let classes = get "classes" |> fun c -> c.Split('\n')
        { new IPredictor with
            member _.ClassNames = classes
            member _.Input = spec
            member _.Predict images =
                if images.IsEmpty then []
                else
                    let n = images.Length
                    let input =
                        NamedOnnxValue.CreateFromTensor("image", DenseTensor<float32>(Memory(pixels spec images), ReadOnlySpan [| n; 3; spec.Crop; spec.Crop |]))
                    use results = session.Run [ input ]
                    let byName =
                        results |> Seq.map (fun r -> r.Name, (r.AsEnumerable<float32>() |> Array.ofSeq |> Array.chunkBySize (Array.length classes))) |> Map.ofSeq
                    [ for i in 0 .. n - 1 ->
                          let combined = byName.["combined"].[i]
                          if combined |> Array.exists (fun v -> not (Single.IsFinite v)) then
                              Errors.modelFile path (sprintf "%s gives scores that are not finite numbers: the model is damaged; export it again from its checkpoint" path)
                          { Heads = heads |> List.map (fun h -> h, byName.[h].[i])
                            Concat = byName.["concat"].[i]
                            Combined = combined
                            Probabilities = softmax combined } ]
            member _.Dispose() = session.Dispose() }
    with _ ->
        session.Dispose()
        reraise ()

/// A predictor for a model file: ONNX Runtime for .onnx, TorchSharp on `device` for checkpoints and state_dicts.
let openFile (path: string) (o: ModelFiles.Overrides) (device: Device) : IPredictor =
    if Path.GetExtension(path).Equals(".onnx", StringComparison.OrdinalIgnoreCase) then onnx path
    else ofLoaded (ModelFiles.load path o device)
