/// The Swin Transformer backbone against torchvision 0.14: a tiny network's stage outputs and logits, and the
/// registry networks' state_dict keys (fixtures written by scripts/fixtures_swin.py, see data/swin/README.md);
/// one training iteration of swin_t; stochastic depth drawn from the backbone's own reseeded generator; the ONNX
/// export run by ONNX Runtime.
module Pmg.Fs.Tests.SwinTests

open System
open System.IO
open Expecto
open Microsoft.ML.OnnxRuntime
open Microsoft.ML.OnnxRuntime.Tensors
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Interop
open Pmg.Fs.Training
open Pmg.Fs.Tests.TestKit

/// The fixtures' tiny torchvision SwinTransformer (patch 4, embed 8, depths 2 2 2 1, heads 1 2 2 4, window 4).
let private tinyConfig: Backbone.SwinConfig =
    { EmbedDim = 8; Depths = [ 2; 2; 2; 1 ]; Heads = [ 1; 2; 2; 4 ]; Window = 4; StochasticDepth = 0.2 }

let private tinySpec (config: Backbone.SwinConfig) : Backbone.Spec =
    { Name = "swin-tiny-test"; Family = Backbone.Swin config; ImageNetClassifier = Some 10; ImageNet = None; Torchvision = None }

let private stageNames = [ "stem"; "stage1"; "stage2"; "stage3"; "stage4" ]

/// torchvision's spelling of a dtype and a shape, as keys.txt holds them.
let private dtypeName (t: torch.Tensor) =
    match t.dtype with
    | torch.ScalarType.Float32 -> "float32"
    | torch.ScalarType.Int64 -> "int64"
    | d -> string d

let private shapeText (t: torch.Tensor) = t.shape |> Array.map string |> String.concat "x"

/// A one-epoch run of swin_t on 64 px crops of synthetic birds, batch 2, from scratch.
let private swinRun: Experiment.Experiment =
    let data: Data.Synthetic.Config = { Classes = 3; TrainPerClass = 2; TestPerClass = 1; ImageSize = 72; Seed = 1 }
    let e = Experiment.withBackbone "swin_t" Experiment.embedded
    { e with
        Weights = Backbone.Scratch
        BatchNormGroup = None
        Data = Experiment.Embedded data
        Model = { e.Model with Classes = 3; Head = { e.Model.Head with FeatureSize = 16; BlockChannels = 32 } }
        Epochs = 1
        WarmupEpochs = 0
        BatchSize = 2
        Input = { Resize = 72; Crop = 64; Padding = 0 }
        Workers = 1 }

[<Tests>]
let tests =
    // Sequenced: weight initialisation draws from libtorch's global generator, which parallel tests would share.
    testSequenced
    <| testList
        "swin"
        [ test "a tiny Swin gives torchvision 0.14's stage outputs and logits (shifted windows, no shift where the map is no larger than the window, padding, odd merging)" {
              use _ = torch.NewDisposeScope()
              use net = Swin.create (tinySpec tinyConfig) tinyConfig
              StateDict.loadInto net (StateDict.read (dataFile "swin/tiny-state.pth")) true
              net.eval ()
              let io = StateDict.read (dataFile "swin/tiny-io.pth") |> Map.ofList
              use _ = torch.no_grad ()
              let diffs =
                  [ for size in [ "64"; "80" ] do
                        let x = io.[size + ".input"].to_type torch.float32
                        let outs = net.ForwardStages x
                        Expect.equal outs.Length 5 "five stages"
                        for name, out in List.zip stageNames outs do
                            let want = io.[sprintf "%s.%s" size name]
                            Expect.equal out.shape want.shape (sprintf "%s px %s shape" size name)
                            size + " " + name, maxAbs out want
                        size + " logits", maxAbs (net.forward x) io.[size + ".logits"] ]
              let name, worst = diffs |> List.maxBy snd
              Expect.isLessThan worst 1e-4 (sprintf "largest difference %g at %s (all: %A)" worst name diffs)
          }

          test "the stages PMG reads have the declared channels and strides" {
              use _ = torch.NewDisposeScope()
              use net = Swin.create (tinySpec tinyConfig) tinyConfig
              net.eval ()
              use _ = torch.no_grad ()
              let outs = net.ForwardStages(torch.randn (1L, 3L, 64L, 64L))
              for st, out in List.zip net.Stages outs do
                  Expect.equal out.shape [| 1L; int64 st.Channels; int64 (64 / st.Reduction); int64 (64 / st.Reduction) |] st.Name
                  Expect.isTrue (out.is_contiguous ()) (st.Name + " is contiguous NCHW")
              Expect.equal (net.ForwardStages(torch.randn (1L, 3L, 64L, 64L), 2) |> List.length) 2 "stopping early"
          }

          test "swin_t, swin_s and swin_b hold exactly torchvision's state_dict keys, dtypes and shapes, initialised as torchvision" {
              use _ = torch.NewDisposeScope()
              let lines = File.ReadAllLines(dataFile "swin/keys.txt") |> Array.map (fun l -> l.Split ' ')
              for name in [ "swin_t"; "swin_s"; "swin_b" ] do
                  let want = lines |> Array.filter (fun p -> p.[0] = name) |> Array.map (fun p -> p.[1], p.[2], p.[3]) |> Set.ofArray
                  use net = Backbones.create (Backbone.find name)
                  let sd = net.state_dict ()
                  let have = [ for kv in sd -> kv.Key, dtypeName kv.Value, shapeText kv.Value ] |> Set.ofList
                  Expect.isGreaterThan want.Count 100 (name + " in the fixture")
                  Expect.equal (Set.difference have want) Set.empty (name + ": entries torchvision lacks")
                  Expect.equal (Set.difference want have) Set.empty (name + ": torchvision's entries we lack")
                  if name = "swin_t" then
                      // Inside PMG's network the backbone keeps its keys, under "features.".
                      use pmg = Pmg.create { Pmg.Config.Paper 4 with Backbone = name; Head = { Heads.Config.Paper with FeatureSize = 16; BlockChannels = 32 } }
                      let inside = [ for kv in pmg.state_dict () do if kv.Key.StartsWith "features." then kv.Key.Substring 9 ] |> Set.ofList
                      Expect.equal inside (want |> Set.map (fun (k, _, _) -> k)) "the PMG network's backbone keys"
                      let std (t: torch.Tensor) = t.std().item<float32> () |> float
                      let w, table = sd.["features.5.3.attn.qkv.weight"], sd.["features.5.3.attn.relative_position_bias_table"]
                      Expect.floatClose { absolute = 0.001; relative = 0.0 } (std w) 0.02 "Linear weights: std 0.02"
                      Expect.floatClose { absolute = 0.002; relative = 0.0 } (std table) 0.02 "bias table: std 0.02"
                      Expect.equal (sd.["features.5.3.mlp.0.bias"].abs().max().item<float32> ()) 0.0f "Linear biases zero"
                      Expect.equal (sd.["features.0.2.weight"].min().item<float32> ()) 1.0f "LayerNorm weights one"
          }

          test "one training iteration of swin_t at 64 px gives finite losses; stochastic depth follows Reseed" {
              use _ = torch.NewDisposeScope()
              torch.manual_seed 3L |> ignore
              let s = Trainer.createSession swinRun
              s.Net.train ()
              let x = torch.randn (2L, 3L, 64L, 64L)
              let y = torch.tensor [| 0L; 2L |]
              let losses = Trainer.iteration s (Trainer.lrAt swinRun 0) swinRun.Schedule x y |> List.map (fun (l, _) -> l.item<float32> ())
              Expect.equal losses.Length swinRun.Schedule.Length "one loss per step"
              Expect.isTrue (losses |> List.forall Single.IsFinite) (sprintf "finite losses %A" losses)
              let backbone = s.Net.Backbone
              let forwardWith (seed: int64) =
                  backbone.Reseed seed
                  use _ = torch.no_grad ()
                  backbone.ForwardStages x |> List.last |> Runtime.Ops.hostFloats
              let a, b, c = forwardWith 7L, forwardWith 7L, forwardWith 8L
              Expect.equal a b "the same seed draws the same drops"
              Expect.notEqual a c "another seed draws other drops"
              backbone.eval ()
              Expect.equal (forwardWith 7L) (forwardWith 8L) "no drops in eval mode"
          }

          test "ONNX Runtime runs the exported swin_t as TorchSharp does at 64 and 80 px (shifted windows, masks, padding, odd merging)" {
              torch.manual_seed 11L |> ignore
              use net = Pmg.create { Pmg.Config.Paper 4 with Backbone = "swin_t"; Head = { Heads.Config.Paper with FeatureSize = 16; BlockChannels = 32 } }
              net.eval ()
              use dir = new TempDir "swin-onnx"
              for size in [ 64; 80 ] do
                  use _ = torch.NewDisposeScope()
                  let prep: OnnxExport.Preprocessing = { Resize = size; Crop = size; Mean = Array.create 3 0.5f; Std = Array.create 3 0.5f }
                  let file = dir.File(sprintf "swin_t-%d.onnx" size)
                  OnnxExport.write file (OnnxExport.toOnnx net size (Array.init 4 string) prep)
                  let x = torch.randn (2L, 3L, int64 size, int64 size)
                  for name, e in onnxErrors net file x do
                      // Two float32 implementations of one computation: rounding is near 1e-6; a wrong window is far above 1e-4.
                      Expect.isLessThan e 1e-4 (sprintf "%s at %d px: relative error %g" name size e)
          } ]
