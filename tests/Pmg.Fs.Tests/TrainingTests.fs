module Pmg.Fs.Tests.TrainingTests

open System
open System.IO
open Expecto
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Training
open Pmg.Fs.Tests.TestKit

/// A run small enough for a test: 3 classes of 32 px synthetic birds, ResNet18 from the seed, 2 epochs.
let tiny: Experiment.Experiment =
    let data: Data.Synthetic.Config = { Classes = 3; TrainPerClass = 4; TestPerClass = 2; ImageSize = 32; Seed = 1 }
    { Experiment.withBackbone "resnet18" Experiment.embedded with
        Weights = Backbone.Scratch
        // The whole batch per BatchNorm: these tests are about the trainer's mechanics (FaithfulnessTests checks
        // the reference's groups of 8).
        BatchNormGroup = None
        Data = Experiment.Embedded data
        Model = { Experiment.embedded.Model with Classes = 3 }
        Epochs = 2
        WarmupEpochs = 0
        BatchSize = 4
        Input = { Resize = 32; Crop = 28; Padding = 2 }
        Workers = 1 }

exception private Killed

[<Tests>]
let tests =
    // Sequenced: weight initialisation draws from libtorch's global generator, which parallel tests would share.
    testSequenced
    <| testList
        "training"
        [ test "one iteration updates the backbone with a tenth of the heads' learning rate (the paper's, from withLr)" {
              use _ = torch.NewDisposeScope()
              let e = { Experiment.withLr 0.002 tiny with Schedule = [ { Head = Pmg.Concat; Grid = 1; LossWeight = 2.0 } ] }
              let s = Trainer.createSession e
              s.Net.train ()
              let x = torch.randn (4L, 3L, 28L, 28L)
              let y = torch.tensor [| 0L; 1L; 2L; 1L |]
              let param (name: string) = s.Net.named_parameters () |> Seq.find (fun struct (n, _) -> n = name) |> fun struct (_, p) -> p
              let bb, head = param "features.layer4.1.conv2.weight", param "classifier_concat.4.weight"
              let before = bb.detach().clone (), head.detach().clone ()
              // The gradients of that step, from a session built from the same seed (identical weights).
              Sgd.zeroGrad s.Optimizer
              let loss = torch.nn.functional.cross_entropy ((s.Net.forward x).Concat, y) |> Runtime.Ops.scale 2.0
              loss.backward ()
              let gb, gh = bb.grad.clone (), head.grad.clone ()
              Sgd.zeroGrad s.Optimizer
              let s2 = Trainer.createSession e
              s2.Net.train ()
              Trainer.trainStep s2 (fun g -> g.BaseLr) e.Schedule.Head x y |> ignore
              let param2 (name: string) = s2.Net.named_parameters () |> Seq.find (fun struct (n, _) -> n = name) |> fun struct (_, p) -> p
              let expected (p0: torch.Tensor) (g: torch.Tensor) (lr: float) =
                  Runtime.Ops.add p0 (Runtime.Ops.scale -lr (Runtime.Ops.add g (Runtime.Ops.scale 5e-4 p0)))
              // The weights (~1e-2) move by lr x gradient (~1e-6): the test's fp32 formula and the optimizer's agree
              // to a few ulps of the weights, far inside 1e-4 relative, while the wrong rate moves an element by
              // 0.0018 x its gradient, outside it. The gradients come from two sessions built from the same seed; any
              // rounding difference between them is scaled by lr before it reaches the weights.
              Expect.isTrue ((param2 "features.layer4.1.conv2.weight").allclose (expected (fst before) gb 0.0002, rtol = 1e-4, atol = 1e-8)) "backbone step uses 0.0002"
              Expect.isTrue ((param2 "classifier_concat.4.weight").allclose (expected (snd before) gh 0.002, rtol = 1e-4, atol = 1e-8)) "head step uses 0.002"
              Expect.isFalse ((param2 "features.layer4.1.conv2.weight").allclose (expected (fst before) gb 0.002, rtol = 1e-4, atol = 1e-8)) "not the heads' rate"
          }
          test "a float64 session with given patch orders: the identity order trains exactly as whole images do" {
              use _ = torch.NewDisposeScope()
              let e = { tiny with Forward = Experiment.Full; JigsawDraw = Jigsaw.Uniform }
              let identity grid batch = torch.arange(int64 (grid * grid)).unsqueeze(0L)
              let options: Trainer.SessionOptions = { Engine = Engine.plain; Dtype = torch.float64; Permutations = Trainer.Given identity }
              let given = Trainer.createSessionFrom options e
              let whole = Trainer.createSessionFrom { options with Permutations = Trainer.Drawn } (Experiment.withGrids [ 1; 1; 1 ] e)
              Expect.isTrue (given.Net.parameters () |> Seq.forall (fun p -> p.dtype = torch.float64)) "float64 weights"
              given.Net.train ()
              whole.Net.train ()
              let x = torch.randn ([| 4L; 3L; 28L; 28L |], dtype = torch.float64)
              let y = torch.tensor [| 0L; 1L; 2L; 1L |]
              let lr (g: Sgd.Group) = g.BaseLr
              let a = Trainer.iteration given lr given.Experiment.Schedule x y |> List.map (fun (l, _) -> l.item<float> ())
              let b = Trainer.iteration whole lr whole.Experiment.Schedule x y |> List.map (fun (l, _) -> l.item<float> ())
              Expect.equal a b "the same four float64 losses: the given order is the one used"
              Expect.isTrue (a |> List.forall Double.IsFinite) "finite"
          }
          test "checkpoint round trip keeps model, optimizer, progress and experiment" {
              use _ = torch.NewDisposeScope()
              let s = Trainer.createSession tiny
              s.Net.train ()
              Trainer.iteration s (Trainer.lrAt tiny 0) tiny.Schedule (torch.randn (4L, 3L, 28L, 28L)) (torch.tensor [| 0L; 1L; 2L; 0L |]) |> ignore
              let c = checkpointOf s { progress 1 with BestCombined = 0.5 }
              use dir = new TempDir "checkpoint"
              let path = dir.File "x.ckpt"
              Checkpoint.save path c
              let back = Checkpoint.load path
              Expect.equal back.Experiment tiny "experiment"
              Expect.equal back.Progress c.Progress "progress"
              Expect.equal (back.Model |> List.map fst) (c.Model |> List.map fst) "model keys"
              for (_, a), (_, b) in List.zip c.Model back.Model do
                  Expect.isTrue (same a b) "model tensor"
              Expect.isNonEmpty back.Optimizer "momentum buffers saved"
              for (n, a), (m, b) in List.zip (List.sortBy fst c.Optimizer) (List.sortBy fst back.Optimizer) do
                  Expect.equal m n "buffer name"
                  Expect.isTrue (same a b) "buffer"
          }
          test "a write that fails midway leaves the previous checkpoint whole" {
              use dir = new TempDir "checkpoint"
              let path = dir.File "last.ckpt"
              File.WriteAllText(path, "previous")
              Expect.throws (fun () -> Runtime.Files.writeAtomically path (fun s -> s.WriteByte 1uy; failwith "killed")) "the write fails"
              Expect.equal (File.ReadAllText path) "previous" "old file intact"
              Expect.equal (Directory.GetFiles(Path.GetDirectoryName path).Length) 1 "no temp file left"
          }
          test "a killed run resumes and gives the same losses as an uninterrupted one" {
              use wholeDir = new TempDir "run"
              use killedDir = new TempDir "run"
              let whole = Run.train tiny wholeDir.Path false Trainer.Hooks.None
              let dir = killedDir.Path
              let kill = { Trainer.Hooks.None with Epoch = fun _ r -> if r.Epoch = 0 then raise Killed }
              Expect.throwsT<Killed> (fun () -> Run.train tiny dir false kill |> ignore) "killed after epoch 1"
              let resumed = Run.train tiny dir true Trainer.Hooks.None
              Expect.equal (resumed.History |> List.map _.Epoch) [ 1 ] "only epoch 2 ran"
              let a = (List.last whole.History).StepLosses
              let b = (List.last resumed.History).StepLosses
              for x, y in List.zip a b do
                  // Epoch 2 replayed from the checkpoint: the same computation on the same weights, batches and
                  // jigsaws, equal up to the order of multithreaded reductions (a few ulps over an epoch).
                  Expect.floatClose { absolute = 1e-6; relative = 1e-6 } y x "epoch 2 loss"
              Expect.equal (List.last resumed.History).Test.Combined (List.last whole.History).Test.Combined "test accuracy"
              let rows = File.ReadAllLines(Path.Combine(dir, "metrics.csv"))
              Expect.equal rows.Length 3 "header + two epochs"
          }
          test "warm-up epochs train only the concat step on whole images, then every step" {
              use dir = new TempDir "run"
              let e = { tiny with WarmupEpochs = 1 }
              let run = Run.train e dir.Path false Trainer.Hooks.None
              let first, second = run.History.[0].StepLosses, run.History.[1].StepLosses
              let concat = List.length e.Schedule - 1
              Expect.isTrue (first |> List.take concat |> List.forall Double.IsNaN) "no granularity step ran in epoch 1"
              Expect.isTrue (Double.IsFinite first.[concat]) "the concat step did"
              Expect.isTrue (second |> List.forall Double.IsFinite) "epoch 2 runs every step"
          } ]
