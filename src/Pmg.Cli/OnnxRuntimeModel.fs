/// An exported model (`pmg export --to onnx`) run by ONNX Runtime, with the preprocessing its metadata names:
/// what a deployment does, here so that `pmg predict --onnx` can be checked against `--checkpoint`.
module Pmg.Cli.OnnxRuntimeModel

open System
open System.Globalization
open Microsoft.ML.OnnxRuntime
open Microsoft.ML.OnnxRuntime.Tensors
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open Pmg.Fs
open Pmg.Fs.Data

type Model =
    { Session: InferenceSession
      Spec: Transforms.Spec
      /// Output names in order: the heads, concat, combined.
      Outputs: string list }

    interface IDisposable with
        member m.Dispose() = m.Session.Dispose()

let load (path: string) : Model =
    if not (IO.File.Exists path) then raise (Inference.LoadError(sprintf "ONNX model %s does not exist" path))
    let session =
        try
            new InferenceSession(path)
        with :? OnnxRuntimeException as e ->
            raise (Inference.LoadError(sprintf "%s cannot be loaded by ONNX Runtime: %s" path (e.Message.Split('\n').[0])))
    let meta = session.ModelMetadata.CustomMetadataMap
    let get key =
        match meta.TryGetValue key with
        | true, v -> v
        | _ -> raise (Inference.LoadError(sprintf "%s has no '%s' in its metadata: export it with `pmg export --to onnx`" path key))
    let floats (key: string) = (get key).Split(',') |> Array.map (fun v -> Single.Parse(v, CultureInfo.InvariantCulture))
    let spec = { Transforms.Spec.test (int (get "resize")) (int (get "crop")) with Mean = floats "mean"; Std = floats "std" }
    { Session = session; Spec = spec; Outputs = (get "outputs").Split(',') |> List.ofArray }

/// The same record a TorchSharp model gives (Inference.predict).
let predict (m: Model) (image: Image<Rgb24>) : Inference.Prediction =
    let pixels = Transforms.apply m.Spec (Random 0) image
    let crop = m.Spec.Crop
    let input = NamedOnnxValue.CreateFromTensor("image", DenseTensor<float32>(Memory pixels, ReadOnlySpan [| 1; 3; crop; crop |]))
    use results = m.Session.Run [ input ]
    let byName = results |> Seq.map (fun r -> r.Name, (r.AsEnumerable<float32>() |> Array.ofSeq)) |> Map.ofSeq
    let combined = byName.["combined"]
    let top = Array.max combined
    let e = combined |> Array.map (fun v -> exp (v - top))
    let sum = Array.sum e
    { Heads = m.Outputs |> List.filter (fun n -> n <> "concat" && n <> "combined") |> List.map (fun n -> n, byName.[n])
      Concat = byName.["concat"]
      Combined = combined
      Probabilities = e |> Array.map (fun v -> v / sum) }
