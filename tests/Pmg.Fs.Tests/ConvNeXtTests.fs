/// torchvision's ConvNeXt as a PMG backbone: the same stage outputs as torchvision for the same weights (fixtures
/// written by scripts/fixtures_convnext.py), torchvision's keys and shapes for the registry's entries, stochastic
/// depth by torchvision's rule from a reseedable generator, one training iteration, and the ONNX graph.
module Pmg.Fs.Tests.ConvNeXtTests

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

/// The fixture's network: torchvision's `ConvNeXt` with CNBlockConfig dims 8, 16, 32, 64 and depths 1, 1, 2, 1, ten
/// classes (scripts/fixtures_convnext.py).
let private tinySpec (p: float) : Backbone.Spec =
    { Name = "convnext-fixture"
      Family = Backbone.ConvNeXt { Depths = [ 1; 1; 2; 1 ]; Dims = [ 8; 16; 32; 64 ]; StochasticDepth = p }
      ImageNetClassifier = Some 10
      ImageNet = None
      Torchvision = None }

/// The fixture network with torchvision's weights loaded strictly.
let private fixtureNet (p: float) : Backbone.Features =
    let net = Backbones.create (tinySpec p)
    let entries = StateDict.read (dataFile "convnext/tiny-state-dict.pth")
    try
        StateDict.loadInto net entries true
    finally
        entries |> List.iter (fun (_, t) -> t.Dispose())
    net

/// The fixture's input and torchvision's outputs, by name (input, stem, stage1..stage4, logits).
let private fixtureIo () : Map<string, torch.Tensor> = StateDict.read (dataFile "convnext/tiny-io.pth") |> Map.ofList

/// a - b without TorchSharp's temporary Scalar (see Runtime.Ops).
let private minus (a: torch.Tensor) (b: torch.Tensor) = Runtime.Ops.add a (Runtime.Ops.scale -1.0 b)

/// "model key shape" lines of torchvision's state_dicts (convnext_tiny/small/base, swin_t/s/b).
let private torchvisionKeys: Lazy<Map<string, (string * int64[]) list>> =
    lazy
        (File.ReadAllLines(dataFile "convnext/torchvision-keys.txt")
         |> Array.filter (fun l -> l <> "" && not (l.StartsWith "#"))
         |> Array.map (fun l ->
             match l.Split ' ' with
             | [| model; key; shape |] ->
                 model, (key, (if shape = "scalar" then [||] else shape.Split 'x' |> Array.map int64))
             | _ -> failwithf "bad fixture line %s" l)
         |> Array.groupBy fst
         |> Array.map (fun (m, rows) -> m, rows |> Array.map snd |> List.ofArray)
         |> Map.ofArray)

/// Zeros of a shape without memory of their own (a stride-0 view): only the shape is read.
let private shapeOnly (shape: int64[]) : torch.Tensor =
    use one = torch.zeros [| 1L |]
    if shape.Length = 0 then one.reshape [||] else one.expand shape

[<Tests>]
let tests =
    // Sequenced: weight initialisation draws from libtorch's global generator, which parallel tests would share.
    testSequenced
    <| testList
        "convnext"
        [ test "the tiny ConvNeXt's five stage outputs and logits equal torchvision's for torchvision's weights" {
              use _ = torch.NewDisposeScope()
              use net = fixtureNet 0.3
              net.eval ()
              let io = fixtureIo ()
              use _ = torch.no_grad ()
              let ours = net.ForwardStages io.["input"]
              let names = [ "stem"; "stage1"; "stage2"; "stage3"; "stage4" ]
              Expect.equal (net.Stages |> List.map _.Name) names "stage names"
              Expect.equal
                  (ours |> List.map (fun t -> t.shape.[1], t.shape.[2], t.shape.[3]))
                  [ 8L, 10L, 14L; 8L, 10L, 14L; 16L, 5L, 7L; 32L, 2L, 3L; 64L, 1L, 1L ]
                  "channels and sides of a 40x56 input (strided convolutions floor as torchvision's)"
              for name, t in List.zip names ours @ [ "logits", net.forward io.["input"] ] do
                  let theirs = io.[name]
                  Expect.sequenceEqual t.shape theirs.shape (name + " shape")
                  // One float32 computation in two libtorch builds (1.13 there, 2.10 here): the kernels sum in other
                  // orders, a few ulps of values of size ~1-10 through 5 blocks (measured: 1.05e-5 at stage4, whose values reach 14);
                  // 1e-4 is far below any wrong layer, whose outputs differ by O(1).
                  let d = maxAbs t theirs
                  Expect.isTrue (t.allclose (theirs, rtol = 1e-4, atol = 1e-4)) (sprintf "%s: max |difference| %g" name d)
          }

          test "every registered ConvNeXt has torchvision's keys and shapes, and torchvision's file layout loads into PMG strictly" {
              let expected = torchvisionKeys.Force()
              for name in [ "convnext_tiny"; "convnext_small"; "convnext_base" ] do
                  use _ = torch.NewDisposeScope()
                  let spec = Backbone.find name
                  use net = Backbones.create spec
                  let ours = [ for kv in net.state_dict () -> kv.Key, kv.Value.shape ] |> List.sortBy fst
                  let theirs = expected.[name] |> List.sortBy fst
                  Expect.equal (List.map fst ours) (List.map fst theirs) (name + ": keys")
                  for (k, a), (_, b) in List.zip ours theirs do
                      Expect.sequenceEqual a b (sprintf "%s %s: shape" name k)
                  Expect.equal
                      (net.Stages |> List.map (fun s -> s.Name, s.Channels, s.Reduction))
                      (match spec.Family with
                       | Backbone.ConvNeXt c ->
                           let d = c.Dims
                           [ "stem", d.[0], 4; "stage1", d.[0], 4; "stage2", d.[1], 8; "stage3", d.[2], 16; "stage4", d.[3], 32 ]
                       | _ -> [])
                      (name + ": stages")
              // The ImageNet path: a file with torchvision's keys (here zeros of its shapes) goes into a PMG network
              // as it is, strictly.
              use _ = torch.NewDisposeScope()
              use pmg = Pmg.create { Pmg.Config.Paper 5 with Backbone = "convnext_tiny"; Head = { Heads.Config.Paper with FeatureSize = 8; BlockChannels = 8 } }
              let file = expected.["convnext_tiny"] |> List.map (fun (k, s) -> k, shapeOnly s)
              StateDict.loadBackboneEntries pmg "convnext_tiny-983f1562.pth" file
              let ln = pmg.Backbone.state_dict().["features.1.0.layer_scale"]
              Expect.equal (ln.abs().max().item<float32> ()) 0.0f "the file's values were copied in"
              // Another size's file is refused, and the error names the size it is (from its keys and shapes).
              let small = expected.["convnext_small"] |> List.map (fun (k, s) -> k, shapeOnly s)
              let msg =
                  try
                      StateDict.loadBackboneEntries pmg "convnext_small-0c510722.pth" small
                      ""
                  with :? PmgException as e -> e.Message
              Expect.stringContains msg "the file looks like convnext_small, the model is convnext_tiny" msg
          }

          test "torchvision's initialisation from the global generator: weights N(0, 0.02) cut at 2, zero biases, layer scale 1e-6" {
              use _ = torch.NewDisposeScope()
              let build () =
                  torch.manual_seed 7L |> ignore
                  Backbones.create (Backbone.find "convnext_tiny")
              use a = build ()
              use b = build ()
              let sa, sb = a.state_dict (), b.state_dict ()
              Expect.isTrue (sa.Keys |> Seq.forall (fun k -> TestKit.same sa.[k] sb.[k])) "the same seed, the same weights"
              // Convolutions and linear layers: weights of 4 or 2 dimensions (the layer scale has 3).
              let weights = [ for kv in sa do if kv.Key.EndsWith "weight" && (kv.Value.dim () = 4L || kv.Value.dim () = 2L) then kv.Value.flatten () ]
              let all = torch.cat (Array.ofList weights, 0L)
              Expect.isTrue (all.isfinite().all().item<bool> ()) "every weight finite"
              Expect.isLessThanOrEqual (all.abs().max().item<float32> ()) 2.0f "cut at 2"
              // 28 million draws: the sample's deviation is 0.02 to far better than 1%.
              let std = all.std().item<float32> ()
              Expect.isTrue (abs (std - 0.02f) < 2e-4f) (sprintf "standard deviation %g" std)
              for kv in sa do
                  let k, t = kv.Key, kv.Value
                  let values = t.flatten () |> Runtime.Ops.hostFloats |> Array.distinct
                  if k.EndsWith "bias" then Expect.equal values [| 0.0f |] (k + ": zero")
                  elif k.EndsWith "layer_scale" then Expect.equal values [| 1e-6f |] (k + ": 1e-6")
                  elif t.dim () = 1L then Expect.equal values [| 1.0f |] (k + ": a LayerNorm's weight starts at 1")
          }

          test "a PMG state_dict of each ConvNeXt and Swin entry gives its backbone back from keys and shapes (torchvision's layout)" {
              let expected = torchvisionKeys.Force()
              for name in [ "convnext_tiny"; "convnext_small"; "convnext_base"; "swin_t"; "swin_s"; "swin_b" ] do
                  use _ = torch.NewDisposeScope()
                  let config: Pmg.Config = { Backbone = name; Classes = 6; Heads = 3; Head = { Heads.Config.Paper with FeatureSize = 24; BlockChannels = 40 } }
                  // The backbone's entries under "features." as the network registers it, then the heads' (the keys and
                  // shapes inferConfig reads); only shapes matter, so the tensors are broadcast zeros.
                  let heads =
                      Pmg.headStages config
                      |> List.mapi (fun i (_, stage) ->
                          [ sprintf "conv_block%d.0.conv.weight" (i + 1), [| 24L; int64 stage.Channels; 1L; 1L |]
                            sprintf "conv_block%d.1.conv.weight" (i + 1), [| 40L; 24L; 3L; 3L |] ])
                      |> List.concat
                  let entries =
                      [ for k, s in expected.[name] -> "features." + k, s ]
                      @ heads
                      @ [ "classifier_concat.4.weight", [| 6L; 24L |] ]
                      |> List.map (fun (k, s) -> k, shapeOnly s)
                  let inferred = StateDict.inferConfig "mem.pth" entries
                  Expect.equal inferred.Backbone name name
          }

          test "stochastic depth: block k of n drops rows with probability p k / (n - 1), survivors scaled by 1 / (1 - p); eval is the identity" {
              use _ = torch.NewDisposeScope()
              // p = 0.8 over 5 blocks: stage1's block (k = 0) never drops, stage2's (k = 1) drops with 0.2.
              use net = fixtureNet 0.8
              let io = fixtureIo ()
              use _ = torch.no_grad ()
              let rows = 4000
              let x = io.["input"].narrow(0L, 0L, 1L).expand(int64 rows, -1L, -1L, -1L).contiguous ()
              net.eval ()
              let evalOut = net.ForwardStages(x, 3)
              net.train ()
              net.Reseed 11L
              let trainOut = net.ForwardStages(x, 3)
              Expect.isTrue (TestKit.same trainOut.[1] evalOut.[1]) "the first block never drops"
              // Stage 2 is d + m * branch / 0.8 in training (m = 0 or 1 per row), d + branch in eval: the difference
              // is branch / 4 for kept rows and -branch for dropped ones.
              let diff = (minus trainOut.[2] evalOut.[2]).flatten 1L
              let first = diff.narrow (0L, 0L, 1L)
              // Each row's multiple of the first row: 1 for its kind, -4 (first kept) or -1/4 (first dropped) for the other.
              let norm = (first * first).sum().item<float32> () |> float
              let ratios = Runtime.Ops.hostFloats (diff.matmul (first.t ())) |> Array.map (fun v -> float v / norm)
              let near (v: float) (r: float) = abs (r - v) < 1e-3 * max 1.0 (abs v)
              let odd = ratios |> Array.filter (fun r -> not (near 1.0 r || near -4.0 r || near -0.25 r))
              Expect.isEmpty odd "every row is kept (scaled by 1/0.8) or dropped"
              let firstKept = ratios |> Array.exists (near -4.0)
              Expect.isTrue (firstKept || ratios |> Array.exists (near -0.25)) "both kinds occur"
              let sameKind = ratios |> Array.filter (near 1.0) |> Array.length
              let dropped = if firstKept then rows - sameKind else sameKind
              // Drop probability 0.2 = 0.8 x 1 / (5 - 1): 800 of 4000 expected, standard deviation 25; 710..890 is 3.5 of
              // them, and leaves out 0.16 (p k / n: 640) and 0.32 (p (k + 1) / n: 1280).
              Expect.isTrue (dropped >= 710 && dropped <= 890) (sprintf "%d of %d rows dropped; 800 expected" dropped rows)
              // The same seed draws the same rows; another seed others; eval ignores the seed.
              net.Reseed 11L
              let again = net.ForwardStages(x, 5)
              net.Reseed 11L
              let again2 = net.ForwardStages(x, 5)
              net.Reseed 12L
              let other = net.ForwardStages(x, 5)
              Expect.isTrue (TestKit.same (List.last again) (List.last again2)) "same seed, same output"
              Expect.isFalse (TestKit.same (List.last again) (List.last other)) "another seed, another output"
              net.eval ()
              net.Reseed 12L
              let e1 = net.ForwardStages x |> List.last
              net.Reseed 13L
              let e2 = net.ForwardStages x |> List.last
              Expect.isTrue (TestKit.same e1 e2) "eval mode draws nothing"
          }

          test "training and eval forwards leave no tensor behind (every per-forward tensor is disposed)" {
              use net = fixtureNet 0.5
              use x = torch.randn [| 4L; 3L; 40L; 56L |]
              let live () = DisposeScopeManager.Statistics.ThreadTotalLiveCount
              // No dispose scope around the calls: only the stage outputs and logits come out, and are disposed here.
              let trainOnce () =
                  let outs = net.ForwardStages x
                  use loss = (List.last outs).sum ()
                  loss.backward ()
                  outs |> List.iter _.Dispose()
              let evalOnce () =
                  use _ = torch.no_grad ()
                  net.ForwardStages x |> List.iter _.Dispose()
                  (net.forward x).Dispose()
              net.train ()
              trainOnce ()
              let before = live ()
              for _ in 1..5 do
                  trainOnce ()
              net.eval ()
              for _ in 1..5 do
                  evalOnce ()
              // Counted on this thread only: a tensor the backbone creates and does not dispose would stay live.
              Expect.equal (live ()) before "live tensors after ten forwards"
          }

          test "one PMG training iteration on convnext_tiny at 64 px: finite losses, and the epoch's seed fixes stochastic depth" {
              use _ = torch.NewDisposeScope()
              let e =
                  { Experiment.withBackbone "convnext_tiny" TrainingTests.tiny with
                      Input = { Resize = 64; Crop = 64; Padding = 0 }
                      Model = { TrainingTests.tiny.Model with Backbone = "convnext_tiny"; Head = { Heads.Config.Paper with FeatureSize = 16; BlockChannels = 32 } } }
              let s = Trainer.createSession e
              s.Net.train ()
              torch.manual_seed 4L |> ignore
              let x = torch.randn (2L, 3L, 64L, 64L)
              let y = torch.tensor [| 0L; 2L |]
              s.Net.Backbone.Reseed 1L
              let results = Trainer.iteration s (fun g -> g.BaseLr) e.Schedule x y
              Expect.equal results.Length e.Schedule.Length "a loss per step"
              for loss, _ in results do
                  let v = loss.item<float32> ()
                  Expect.isTrue (Single.IsFinite v && v > 0.0f) (sprintf "loss %g" v)
              use _ = torch.no_grad ()
              let forward seed =
                  s.Net.Backbone.Reseed seed
                  (s.Net.forward x).Concat.clone ()
              let a, b = forward 5L, forward 5L
              Expect.isTrue (TestKit.same a b) "the same seed gives the same training forward"
              // convnext_tiny drops its blocks with probability up to 0.1: some of four seeds draw other rows.
              let others = [ 6L; 7L; 8L; 9L ] |> List.map forward
              Expect.isTrue (others |> List.exists (fun o -> not (TestKit.same a o))) "other seeds, other outputs"
          }

          test "a killed convnext_tiny run resumes with the stochastic depth draws of an uninterrupted one" {
              use dir = new TempDir "convnext-resume"
              // Starting weights whose blocks matter: torchvision's initial layer scale (1e-6) would hide a dropped
              // block from the losses.
              let weights = dir.File "start.pth"
              do
                  use _ = torch.NewDisposeScope()
                  torch.manual_seed 3L |> ignore
                  use backbone = Backbones.create (Backbone.find "convnext_tiny")
                  let entries = [ for kv in backbone.state_dict () -> kv.Key, (if kv.Key.EndsWith "layer_scale" then torch.ones_like kv.Value else kv.Value) ]
                  StateDict.write weights entries
              let data: Data.Synthetic.Config = { Classes = 3; TrainPerClass = 2; TestPerClass = 1; ImageSize = 64; Seed = 1 }
              let e =
                  { Experiment.withBackbone "convnext_tiny" TrainingTests.tiny with
                      Weights = Backbone.File weights
                      Data = Experiment.Embedded data
                      Input = { Resize = 64; Crop = 64; Padding = 4 }
                      BatchSize = 3
                      Model = { TrainingTests.tiny.Model with Backbone = "convnext_tiny"; Head = { Heads.Config.Paper with FeatureSize = 16; BlockChannels = 32 } } }
              let whole = Run.train e (dir.File "whole") false Trainer.Hooks.None
              let killed = dir.File "killed"
              let kill = { Trainer.Hooks.None with Epoch = fun _ r -> if r.Epoch = 0 then failwith "killed" }
              Expect.throws (fun () -> Run.train e killed false kill |> ignore) "killed after epoch 1"
              let resumed = Run.train e killed true Trainer.Hooks.None
              Expect.equal (resumed.History |> List.map _.Epoch) [ 1 ] "only epoch 2 ran"
              for x, y in List.zip (List.last whole.History).StepLosses (List.last resumed.History).StepLosses do
                  // The same computation on the same weights, batches, jigsaws and dropped blocks: equal up to the order
                  // of multithreaded reductions.
                  Expect.floatClose { absolute = 1e-6; relative = 1e-6 } y x "epoch 2 loss"
          }

          test "ONNX Runtime runs the exported convnext_tiny PMG network as TorchSharp does, blocks made visible" {
              use _ = torch.NewDisposeScope()
              torch.manual_seed 5L |> ignore
              use net = Pmg.create { Pmg.Config.Paper 4 with Backbone = "convnext_tiny"; Head = { Heads.Config.Paper with FeatureSize = 16; BlockChannels = 32 } }
              do
                  // torchvision's layer scale starts at 1e-6, which would hide a wrong block from the comparison:
                  // scales near 1, LayerNorms off the identity.
                  use _ = torch.no_grad ()
                  for kv in net.state_dict () do
                      let k, t = kv.Key, kv.Value
                      if k.EndsWith "layer_scale" then t.uniform_ (0.5, 1.5) |> ignore
                      elif k.StartsWith "features." && t.dim () = 1L && k.EndsWith "weight" then t.uniform_ (0.8, 1.2) |> ignore
                      elif k.StartsWith "features." && k.EndsWith "bias" then t.uniform_ (-0.1, 0.1) |> ignore
                      elif k.EndsWith "running_mean" then t.uniform_ (-0.1, 0.1) |> ignore
                      elif k.EndsWith "running_var" then t.uniform_ (0.5, 1.5) |> ignore
              net.eval ()
              use dir = new TempDir "onnx-convnext"
              let file = dir.File "convnext.onnx"
              let prep: OnnxExport.Preprocessing = { Resize = 64; Crop = 64; Mean = Array.create 3 0.5f; Std = Array.create 3 0.5f }
              OnnxExport.write file (OnnxExport.toOnnx net 64 (Array.init 4 string) prep)
              OnnxExport.verify file
              let model = Onnx.read file
              let ops = [ for n in model.Graph.Node -> n.OpType ] |> Set.ofList
              for op in [ "LayerNormalization"; "Erf"; "Transpose"; "MatMul" ] do
                  Expect.isTrue (ops.Contains op) (op + " nodes")
              let groups = [ for n in model.Graph.Node do if n.OpType = "Conv" then Onnx.attribute n "group" |> Option.map _.I |> Option.defaultValue 1L ]
              Expect.equal (groups |> List.filter ((<>) 1L) |> List.length) 18 "a depthwise convolution per block (3 + 3 + 9 + 3)"
              torch.manual_seed 9L |> ignore
              use x = torch.randn [| 2L; 3L; 64L; 64L |]
              for name, e in onnxErrors net file x do
                  // Two float32 implementations of the same arithmetic: rounding is ~1e-6 of the norm.
                  Expect.isLessThan e 1e-4 (sprintf "%s: relative error %g" name e)
          } ]
