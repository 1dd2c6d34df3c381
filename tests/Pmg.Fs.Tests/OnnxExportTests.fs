/// The ONNX export: ONNX Runtime runs the written graph with the outputs TorchSharp computes, and `pmg predict
/// --onnx` agrees with `--checkpoint`.
module Pmg.Fs.Tests.OnnxExportTests

open System
open System.IO
open Expecto
open Microsoft.ML.OnnxRuntime
open Microsoft.ML.OnnxRuntime.Tensors
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Tests.TestKit

/// A PMG network in eval mode whose BatchNorm statistics are not the identity (random running means and
/// variances), so the exported BatchNormalization nodes are exercised.
let private network (backbone: string) (classes: int) =
    torch.manual_seed 21L |> ignore
    let net = Pmg.create { Pmg.Config.Paper classes with Backbone = backbone; Head = { Heads.Config.Paper with FeatureSize = 64; BlockChannels = 128 } }
    use _ = torch.no_grad ()
    for kv in net.state_dict () do
        if kv.Key.EndsWith "running_mean" then kv.Value.copy_(torch.randn(kv.Value.shape).mul(torch.tensor 0.1f)) |> ignore
        elif kv.Key.EndsWith "running_var" then kv.Value.copy_(torch.rand(kv.Value.shape).add(torch.tensor 0.5f)) |> ignore
    net.eval ()
    net

let private relativeError (a: float32[]) (b: float32[]) =
    let diff = Array.fold2 (fun s (x: float32) (y: float32) -> s + float (x - y) ** 2.0) 0.0 a b
    let norm = b |> Array.sumBy (fun y -> float y ** 2.0)
    sqrt (diff / max norm 1e-30)

[<Tests>]
let tests =
    testList
        "onnx export"
        [ for backbone, sizes in [ "resnet18", [ 64; 96 ]; "resnet50", [ 64; 96 ] ] do
              test (sprintf "ONNX Runtime's five outputs equal TorchSharp's for %s at %A px, batch 2 and 3" backbone sizes) {
                  use net = network backbone 7
                  use dir = new TempDir "onnx"
                  for size in sizes do
                      let file = dir.File(sprintf "%s-%d.onnx" backbone size)
                      let prep: Interop.OnnxExport.Preprocessing = { Resize = size; Crop = size; Mean = Array.create 3 0.5f; Std = Array.create 3 0.5f }
                      Interop.OnnxExport.write file (Interop.OnnxExport.toOnnx net size (Array.init 7 string) prep)
                      use session = new InferenceSession(file)
                      // The batch is dynamic: two sizes through the same graph.
                      for batch in [ 2; 3 ] do
                          use _ = torch.NewDisposeScope()
                          let x = torch.randn([| int64 batch; 3L; int64 size; int64 size |])
                          let ours =
                              use _ = torch.no_grad ()
                              let o = net.forward x
                              List.zip (Pmg.headNames net.Config) o.Heads @ [ "concat", o.Concat; "combined", o.Combined ]
                          let pixels = x.data<float32>().ToArray()
                          let input = NamedOnnxValue.CreateFromTensor("image", DenseTensor<float32>(Memory pixels, ReadOnlySpan [| batch; 3; size; size |]))
                          use results = session.Run [ input ]
                          let theirs = results |> Seq.map (fun r -> r.Name, (r.AsEnumerable<float32>() |> Array.ofSeq)) |> Map.ofSeq
                          Expect.equal (theirs.Keys |> Set.ofSeq) (ours |> List.map fst |> Set.ofList) "output names"
                          for name, t in ours do
                              let e = relativeError theirs.[name] (t.data<float32>().ToArray())
                              // Two float32 implementations of the same arithmetic, summed in other orders: 1e-4 of the
                              // norm is far above their rounding (1e-6 here) and far below any wrong layer.
                              Expect.isLessThan e 1e-4 (sprintf "%s at %d px, batch %d: relative error %g" name size batch e)
              }

          test "the class names and preprocessing travel in the model's metadata" {
              use net = network "resnet18" 3
              use dir = new TempDir "onnx-meta"
              let file = dir.File "m.onnx"
              let prep: Interop.OnnxExport.Preprocessing = { Resize = 80; Crop = 64; Mean = [| 0.5f; 0.4f; 0.3f |]; Std = [| 0.2f; 0.25f; 0.5f |] }
              Interop.OnnxExport.write file (Interop.OnnxExport.toOnnx net 64 [| "a"; "b/c"; "d e" |] prep)
              use session = new InferenceSession(file)
              let meta = session.ModelMetadata.CustomMetadataMap
              Expect.equal meta.["classes"] "a\nb/c\nd e" "classes"
              Expect.equal (meta.["resize"], meta.["crop"]) ("80", "64") "sizes"
              Expect.equal meta.["mean"] "0.5,0.4,0.3" "mean"
              Expect.equal meta.["std"] "0.2,0.25,0.5" "std"
          }

          test "predict --onnx gives the same top-3 as predict --checkpoint on embedded test images" {
              use dir = new TempDir "onnx-predict"
              let checkpoint = trainedCheckpoint ()
              let onnx = dir.File "model.onnx"
              let export = pmg [ "export"; "--checkpoint"; checkpoint; "--to"; "onnx"; "--out"; onnx ]
              Expect.equal export.Code 0 export.Err
              let images = [ for i in 0..7 -> sprintf "embedded:test:%d" i ]
              let top (o: Outcome) =
                  o.Out.Split('\n', StringSplitOptions.RemoveEmptyEntries)
                  |> Array.map (fun l ->
                      use doc = Text.Json.JsonDocument.Parse l
                      [ for t in doc.RootElement.GetProperty("top").EnumerateArray() -> t.GetProperty("class").GetInt32() ])
              let viaOnnx = pmg ([ "predict"; "--onnx"; onnx; "--json"; "--top-k"; "3" ] @ images)
              let viaCheckpoint = pmg ([ "predict"; "--checkpoint"; checkpoint; "--json"; "--top-k"; "3" ] @ images)
              Expect.equal viaOnnx.Code 0 viaOnnx.Err
              Expect.equal viaCheckpoint.Code 0 viaCheckpoint.Err
              Expect.equal (top viaOnnx) (top viaCheckpoint) "top-3 classes of each image"
              Expect.equal (top viaOnnx).Length images.Length "every image"
          } ]
