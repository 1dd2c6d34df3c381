module Pmg.Fs.Tests.ImageNetTests

open System
open System.IO
open Expecto
open Microsoft.ML.OnnxRuntime
open Microsoft.ML.OnnxRuntime.Tensors
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open TorchSharp
open Pmg.Fs.Model
open Pmg.Fs.Interop
open Pmg.Fs.Data

let private spec = Backbone.find "resnet18-mlnet"
let private onnxFile () = ImageNet.packagedFile spec.ImageNet.Value
let private preprocessFile () =
    Path.Combine(Path.GetDirectoryName(Path.GetDirectoryName(onnxFile ())), "ResNetPrepOnnx", "ResNetPreprocess.onnx")

/// RGB planes of an image as floats (0-255), the layout both ONNX graphs and torch take.
let private planes (img: Image<Rgb24>) : float32[] =
    let h, w = img.Height, img.Width
    let out = Array.zeroCreate (3 * h * w)
    for y in 0 .. h - 1 do
        for x in 0 .. w - 1 do
            let p = img.[x, y]
            out.[y * w + x] <- float32 p.R
            out.[h * w + y * w + x] <- float32 p.G
            out.[2 * h * w + y * w + x] <- float32 p.B
    out

/// ML.NET's own pipeline in ONNX Runtime: the preprocessing graph, then the network; its pooled 512 features.
let private onnxRuntimeFeatures (pixels: float32[]) (size: int) : float32[] =
    use prep = new InferenceSession(preprocessFile ())
    use net = new InferenceSession(onnxFile ())
    let run (s: InferenceSession) (data: float32[]) =
        let name = Seq.head s.InputMetadata.Keys
        let input = NamedOnnxValue.CreateFromTensor(name, DenseTensor<float32>(Memory data, ReadOnlySpan [| 1; 3; size; size |]))
        use results = s.Run [ input ]
        (Seq.head results).AsEnumerable<float32>() |> Array.ofSeq
    run net (run prep pixels)

/// The converted backbone on the project's normalised input, average-pooled like the ONNX graph's end.
let private ourFeatures (net: Backbone.Features) (pixels: float32[]) (size: int) : float32[] =
    use _ = torch.NewDisposeScope()
    use _ = torch.no_grad ()
    let normalised = pixels |> Array.map (fun p -> (p / 255.0f - 0.5f) / 0.5f)
    let x = torch.tensor(normalised).reshape(1L, 3L, int64 size, int64 size)
    net.forward(x).data<float32>().ToArray()

let private cosine (a: float32[]) (b: float32[]) =
    let dot = Array.fold2 (fun s x y -> s + float x * float y) 0.0 a b
    let norm v = sqrt (Array.sumBy (fun x -> float x * float x) v)
    dot / (norm a * norm b)

let private convertedBackbone () =
    let net = Backbones.create spec
    let es = ImageNet.load spec (onnxFile ()) (Array.create 3 0.5f) (Array.create 3 0.5f)
    StateDict.loadInto net es true
    es |> List.iter (fun (_, t) -> t.Dispose())
    net.eval ()
    net

let private errorOf (f: unit -> unit) =
    try
        f ()
        failwith "expected an error"
    with :? Pmg.Fs.PmgException as e -> e.Message

[<Tests>]
let tests =
    testList
        "imagenet"
        [ test "the converted backbone's pooled features agree with ONNX Runtime running ML.NET's two graphs" {
              // The mean image varies over the image while the fold subtracts its per-channel average, and the
              // border pads differ: cosine >= 0.99 is the bound the conversion is designed to keep.
              use net = convertedBackbone ()
              let size = 224
              let bird = Synthetic.render { Synthetic.Config.Default with ImageSize = size } Synthetic.Test 3
              let rng = Random 7
              let noise = Array.init (3 * size * size) (fun _ -> float32 (rng.Next 256))
              for name, pixels in [ "embedded bird", planes bird; "uniform noise", noise ] do
                  let reference = onnxRuntimeFeatures pixels size
                  let ours = ourFeatures net pixels size
                  Expect.equal ours.Length 512 "pooled width"
                  let c = cosine ours reference
                  Expect.isGreaterThanOrEqual c 0.99 (sprintf "%s: cosine %.4f" name c)
          }

          test "the ONNX graph reads as torchvision's keys for blocks [2; 2; 2; 3], every backbone entry present" {
              let es = ImageNet.load spec (onnxFile ()) (Array.create 3 0.5f) (Array.create 3 0.5f)
              use net = Backbones.create spec
              let wanted =
                  net.state_dict ()
                  |> Seq.filter (fun kv -> not (kv.Key.EndsWith "num_batches_tracked"))
                  |> Seq.map (fun kv -> kv.Key, kv.Value.shape)
                  |> Map.ofSeq
              let got = es |> List.map (fun (k, t) -> k, t.shape) |> Map.ofList
              Expect.equal got wanted "keys and shapes"
              Expect.isTrue (got.ContainsKey "layer4.2.conv2.weight") "a third block in the last stage"
              Expect.isFalse (got.ContainsKey "layer1.0.downsample.0.weight") "layer1 keeps the identity shortcut"
              es |> List.iter (fun (_, t) -> t.Dispose())
          }

          test "a PMG network on resnet18-mlnet starts from the ImageNet weights" {
              use net = Pmg.create { Pmg.Config.Paper 5 with Backbone = "resnet18-mlnet" }
              let before = net.Backbone.state_dict().["layer3.1.conv2.weight"].clone ()
              ImageNet.loadBackbone net Backbone.ImageNet
              let after = net.Backbone.state_dict().["layer3.1.conv2.weight"]
              use reference = convertedBackbone ()
              Expect.isFalse (TestKit.same before after) "weights changed"
              Expect.isTrue (TestKit.same after (reference.state_dict().["layer3.1.conv2.weight"])) "the converted weights"
          }

          test "a corrupt, truncated, missing or foreign ONNX file is refused in one line naming it" {
              let dir = Directory.CreateTempSubdirectory "pmg-onnx-"
              try
                  let corrupt = Path.Combine(dir.FullName, "corrupt.onnx")
                  File.WriteAllBytes(corrupt, Array.init 4096 (fun i -> byte (i * 7919 % 251)))
                  let truncated = Path.Combine(dir.FullName, "truncated.onnx")
                  use src = File.OpenRead(onnxFile ())
                  let head = Array.zeroCreate 100_000
                  src.ReadExactly(head, 0, head.Length)
                  File.WriteAllBytes(truncated, head)
                  let missing = Path.Combine(dir.FullName, "missing.onnx")
                  // A real ONNX model that is no ResNet: ML.NET's preprocessing graph.
                  let foreign = preprocessFile ()
                  for file in [ corrupt; truncated; missing; foreign ] do
                      use net = Pmg.create { Pmg.Config.Paper 5 with Backbone = "resnet18-mlnet" }
                      let m = errorOf (fun () -> ImageNet.loadBackbone net (Backbone.File file))
                      Expect.stringContains m file "names the file"
                      Expect.isFalse (m.Contains "\n") (sprintf "one line: %s" m)
              finally
                  dir.Delete true
          } ]
