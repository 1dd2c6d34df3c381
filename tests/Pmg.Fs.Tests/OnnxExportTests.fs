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

let private halfPrep size : Interop.OnnxExport.Preprocessing =
    { Resize = size; Crop = size; Mean = Array.create 3 0.5f; Std = Array.create 3 0.5f }

/// A tiny-headed PMG network on `backbone`, with random BatchNorm statistics (see network).
let private small (backbone: string) =
    torch.manual_seed 5L |> ignore
    let net = Pmg.create { Pmg.Config.Paper 4 with Backbone = backbone; Head = { Heads.Config.Paper with FeatureSize = 16; BlockChannels = 32 } }
    use _ = torch.no_grad ()
    for kv in net.state_dict () do
        if kv.Key.EndsWith "running_mean" then kv.Value.copy_(torch.randn(kv.Value.shape).mul(torch.tensor 0.1f)) |> ignore
        elif kv.Key.EndsWith "running_var" then kv.Value.copy_(torch.rand(kv.Value.shape).add(torch.tensor 0.5f)) |> ignore
    net.eval ()
    net

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
                      Interop.OnnxExport.write file (Interop.OnnxExport.toOnnx net size (Array.init 7 string) (halfPrep size))
                      // The batch is dynamic: two sizes through the same graph.
                      for batch in [ 2; 3 ] do
                          use _ = torch.NewDisposeScope()
                          let x = torch.randn([| int64 batch; 3L; int64 size; int64 size |])
                          for name, e in onnxErrors net file x do
                              // Two float32 implementations of the same arithmetic, summed in other orders: 1e-4 of the
                              // norm is far above their rounding (1e-6 here) and far below any wrong layer.
                              Expect.isLessThan e 1e-4 (sprintf "%s at %d px, batch %d: relative error %g" name size batch e)
              }

          // Every registered backbone, VGG16 included: the graph comes from the modules, so a new backbone is
          // checked here without a line of Interop. 32 px, batch 2, tiny heads: the deep ResNets cost their weights.
          for backbone in Backbone.registry.Keys do
              test (sprintf "%s exports to ONNX and ONNX Runtime's five outputs equal TorchSharp's" backbone) {
                  use net = small backbone
                  use dir = new TempDir "onnx-all"
                  let file = dir.File(backbone + ".onnx")
                  Interop.OnnxExport.write file (Interop.OnnxExport.toOnnx net 32 (Array.init 4 string) (halfPrep 32))
                  Interop.OnnxExport.verify file
                  use _ = torch.NewDisposeScope()
                  torch.manual_seed 9L |> ignore
                  for name, e in onnxErrors net file (torch.randn([| 2L; 3L; 32L; 32L |])) do
                      Expect.isLessThan e 1e-4 (sprintf "%s %s: relative error %g" backbone name e)
              }

          test "the class names, preprocessing and model description travel in the model's metadata" {
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
              Expect.equal meta.["backbone"] "resnet18" "backbone"
              Expect.equal meta.["outputs"] "stage3,stage4,stage5,concat,combined" "outputs"
              // The modules' own settings, read from their fields: BatchNorm's eps (too small for the outputs to show).
              let model = Interop.Onnx.read file
              let eps = [ for n in model.Graph.Node do if n.OpType = "BatchNormalization" then (Interop.Onnx.attribute n "epsilon").Value.F ]
              Expect.isNonEmpty eps "BatchNormalization nodes"
              Expect.allEqual eps 1e-5f "every BatchNorm's eps is the module's"
              let strides = [ for n in model.Graph.Node do if n.OpType = "Conv" then List.ofSeq (Interop.Onnx.attribute n "strides").Value.Ints ]
              Expect.equal (strides |> List.filter ((=) [ 2L; 2L ]) |> List.length) 7 "resnet18: the stem, then conv1 and the projection of layer2..4's first blocks (1 + 3 + 3)"
              let d = (Interop.OnnxExport.readDescription file).Value
              Expect.equal d.Network net.Config "the network's config"
              Expect.equal d.Classes [| "a"; "b/c"; "d e" |] "class names"
              Expect.equal (d.Input.Resize, d.Input.Crop, d.Input.Mean, d.Input.Std) (80, 64, prep.Mean, prep.Std) "input"
          }

          test "an exported model with flipped bytes is refused by name on load, with the fix" {
              use net = small "resnet18"
              use dir = new TempDir "onnx-damaged"
              let file = dir.File "m.onnx"
              Interop.OnnxExport.write file (Interop.OnnxExport.toOnnx net 32 (Array.init 4 string) (halfPrep 32))
              Interop.OnnxExport.verify file
              let bytes = File.ReadAllBytes file
              // 2000 bytes in the middle of the file, where the weights are (the issue's case), and one byte alone.
              let refused (damage: byte[] -> unit) =
                  let copy = Array.copy bytes
                  damage copy
                  let damaged = dir.File "damaged.onnx"
                  File.WriteAllBytes(damaged, copy)
                  try
                      Interop.OnnxExport.verify damaged
                      None
                  with :? PmgException as e ->
                      match e.Error with
                      | ModelFile(path, message) -> Some(path, message)
                      | other -> failtestf "another error: %A" other
              for name, damage in
                  [ "2000 bytes", (fun (b: byte[]) -> for i in 0..1999 do b.[b.Length / 2 + i] <- b.[b.Length / 2 + i] ^^^ 0xFFuy)
                    "one byte", (fun (b: byte[]) -> b.[b.Length / 3] <- b.[b.Length / 3] ^^^ 0x01uy) ] do
                  match refused damage with
                  | None -> failtestf "%s flipped: accepted" name
                  | Some(path, message) ->
                      Expect.stringContains path "damaged.onnx" (sprintf "%s: the error names the file" name)
                      Expect.stringContains message "damaged.onnx" (sprintf "%s: the message names the file" name)
                      Expect.stringContains message "export it again" (sprintf "%s: the fix: %s" name message)
          }

          test "a model whose weights are not finite is refused by name, and every kind of file describes itself" {
              use net = small "resnet18"
              use dir = new TempDir "onnx-nan"
              do
                  use _ = torch.no_grad ()
                  use _ = torch.NewDisposeScope()
                  let w = net.state_dict().["classifier2.1.weight"]
                  // x / 0 * 0: infinities times zero, NaN everywhere.
                  w.copy_(w.div(torch.tensor 0.0f).mul(torch.tensor 0.0f)) |> ignore
              let file = dir.File "nan.onnx"
              // A diverged network exported as it is: the checksum matches, the weights are not finite.
              Interop.OnnxExport.write file (Interop.OnnxExport.toOnnx net 32 (Array.init 4 string) (halfPrep 32))
              let message =
                  try
                      Interop.OnnxExport.verify file
                      failtest "accepted"
                  with :? PmgException as e -> e.Message
              Expect.stringContains message "nan.onnx" "names the file"
              Expect.stringContains message "classifier2.1.weight" "names the weight"
              Expect.stringContains message "not finite" message
              for ext in [ "onnx"; "pth"; "safetensors" ] do
                  let f = dir.File("m." + ext)
                  let d = Interop.Description.describe net [| "a"; "b"; "c"; "d" |] (Interop.Description.input 40 32)
                  if ext = "onnx" then Interop.OnnxExport.write f (Interop.OnnxExport.toOnnx net 32 d.Classes d.Input)
                  else Interop.StateDict.export net d f
                  let back = Interop.OnnxExport.describeFile f
                  Expect.equal (back |> Option.map (fun b -> b.Network, b.Classes, b.Input)) (Some(d.Network, d.Classes, d.Input)) ext
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
