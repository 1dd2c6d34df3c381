/// The speed machinery must not change the method: flat parameter storage, NHWC layouts, the joint update and
/// bf16 autocast, each checked against the plain computation.
module Pmg.Fs.Tests.EngineTests

open Expecto
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Training
open Pmg.Fs.Tests.TestKit
open Pmg.Fs.Tests.TrainingTests

let private param (net: Pmg.Network) (name: string) =
    net.named_parameters () |> Seq.find (fun struct (n, _) -> n = name) |> fun struct (_, p) -> p

let private close (tol: float) (a: torch.Tensor) (b: torch.Tensor) = a.allclose (b, rtol = tol, atol = tol * 1e-2)

/// The gradients of a few convolution weights for a fixed linear loss on every backbone stage's output
/// (BatchNorm2d over batch and space keeps this well conditioned, unlike the heads' BatchNorm1d on 8 pooled
/// vectors of a random net, where rounding differences grow without bound).
let private backboneGrads (s: Trainer.Session) (precision: Experiment.Precision) (x: torch.Tensor) =
    s.Net.train ()
    Sgd.zeroGrad s.Optimizer
    let stages =
        use _ = Evaluate.computeRegion precision s.Device
        s.Net.Backbone.ForwardStages(Engine.inputLayout s.Engine x)
    // A fixed projection of each stage (a squared norm would cancel through BatchNorm almost exactly).
    let project (t: torch.Tensor) =
        let r = torch.arange(t.numel (), dtype = torch.float32).mul(torch.tensor 0.37f).sin().view (t.shape)
        t.to_type(torch.float32).mul(r).mean ()
    let loss = stages |> List.map project |> List.reduce Runtime.Scalars.add
    loss.backward ()
    // Not the stem: its gradient sums 8x32x32 positions that mostly cancel, so any rounding shows hugely there.
    [ for name in [ "features.layer2.0.conv1.weight"; "features.layer3.1.conv2.weight"; "features.layer4.1.conv2.weight" ] ->
          name, (param s.Net name).grad.contiguous().clone () ]

/// |a - b| / |b| over the whole tensor.
let private relativeError (a: torch.Tensor) (b: torch.Tensor) =
    ((a - b).norm().item<float32> () / b.norm().item<float32> ()) |> float

let private cosine (a: torch.Tensor) (b: torch.Tensor) =
    (a.flatten().dot(b.flatten()).item<float32> () / (a.norm().item<float32> () * b.norm().item<float32> ())) |> float

let private bf16Classes = 4
let private bf16Iterations = 10

let private batch () =
    torch.randn (4L, 3L, 28L, 28L), torch.tensor [| 0L; 1L; 2L; 1L |]

[<Tests>]
let tests =
    testSequenced
    <| testList
        "engine"
        [ for storage in [ Sgd.PerParameter; Sgd.Flat ] do
              test (sprintf "SGD with %A storage matches torch.optim.SGD over three steps" storage) {
                  use _ = torch.NewDisposeScope()
                  torch.manual_seed 0L |> ignore
                  let a = torch.nn.Sequential(torch.nn.Conv2d(3L, 4L, 3L), torch.nn.Flatten(), torch.nn.Linear(16L, 3L))
                  let b = torch.nn.Sequential(torch.nn.Conv2d(3L, 4L, 3L), torch.nn.Flatten(), torch.nn.Linear(16L, 3L))
                  b.load_state_dict (a.state_dict ()) |> ignore
                  let ours =
                      Sgd.create storage { Momentum = 0.9; WeightDecay = 5e-4 }
                          [ { Name = "all"; Parameters = [ for struct (n, p) in a.named_parameters () -> n, p ]; BaseLr = 0.1; Lr = 0.1 } ]
                  let theirs = torch.optim.SGD(b.parameters (), 0.1, momentum = 0.9, weight_decay = 5e-4)
                  let x = torch.randn (5L, 3L, 4L, 4L)
                  for _ in 1..3 do
                      Sgd.zeroGrad ours
                      (a.forward x).square().sum().backward ()
                      Sgd.step ours
                      theirs.zero_grad ()
                      (b.forward x).square().sum().backward ()
                      theirs.step () |> ignore
                  for struct (n, p) in a.named_parameters () do
                      let q = b.named_parameters () |> Seq.find (fun struct (m, _) -> m = n) |> fun struct (_, q) -> q
                      Expect.isTrue (p.allclose (q, rtol = 1e-5, atol = 1e-7)) n
              }
          test "flat storage: .grad of every parameter is a view of the group's gradient tensor" {
              use _ = torch.NewDisposeScope()
              let s = Trainer.createSessionWith { Engine.plain with FlatParameters = true } tiny
              s.Net.train ()
              let x, y = batch ()
              torch.nn.functional.cross_entropy((s.Net.forward x).Concat, y).backward ()
              let w = param s.Net "classifier_concat.4.weight"
              Expect.isTrue (w.grad.abs().sum().item<float32> () > 0.0f) "backward wrote the gradient"
              let flatSum = s.Optimizer.Slabs |> List.sumBy (fun slab -> slab.Grads.abs().sum().item<float32> ())
              let paramSum = s.Net.parameters () |> Seq.sumBy (fun p -> p.grad.abs().sum().item<float32> ())
              Expect.floatClose Accuracy.medium (float flatSum) (float paramSum) "the flat tensors hold every gradient"
              Sgd.zeroGrad s.Optimizer
              Expect.equal (w.grad.abs().sum().item<float32> ()) 0.0f "zeroing the flat tensor zeroes .grad"
          }
          test "NHWC weights give the backbone the same outputs and gradients as NCHW" {
              use _ = torch.NewDisposeScope()
              let nchw = Trainer.createSessionWith Engine.plain tiny
              let nhwc = Trainer.createSessionWith { Engine.plain with FlatParameters = true; ChannelsLast = true } tiny
              let conv = param nhwc.Net "features.layer1.0.conv1.weight"
              Expect.equal (conv.stride ()) [| 576L; 1L; 192L; 64L |] "the conv weight has NHWC strides"
              let x = torch.randn (8L, 3L, 64L, 64L)
              let a = backboneGrads nchw Experiment.Fp32 x
              let b = backboneGrads nhwc Experiment.Fp32 x
              for (name, ga), (_, gb) in List.zip a b do
                  Expect.isLessThan (relativeError ga gb) 1e-3 name
          }
          test "a resumed flat optimizer continues exactly (momentum restored into the flat tensor)" {
              use _ = torch.NewDisposeScope()
              let x, y = batch ()
              let a = Trainer.createSession tiny
              a.Net.train ()
              Trainer.iteration a tiny.Schedule x y |> ignore
              let b = Trainer.createSession tiny
              b.Net.train ()
              Trainer.restore b (checkpointOf a { progress 1 with Seed = tiny.Seed })
              let step = [ List.last tiny.Schedule ]
              Trainer.iteration a step x y |> ignore
              Trainer.iteration b step x y |> ignore
              Expect.isTrue (close 1e-6 (param a.Net "classifier1.4.weight") (param b.Net "classifier1.4.weight")) "same update"
              Expect.throwsT<Sgd.StorageError> (fun () -> Sgd.restore b.Optimizer [ "features.conv1.weight", torch.zeros (64L, 3L, 7L, 7L) ]) "a partial state is refused"
          }
          test "joint update: one SGD step on the sum of the steps' weighted losses" {
              use _ = torch.NewDisposeScope()
              // Whole images for every step (no jigsaw randomness) so the sum can be rebuilt from one forward.
              let e = { tiny with Update = Experiment.Joint; Forward = Experiment.Full; Schedule = Schedule.withGrids [ 1; 1; 1 ] 2.0 }
              let x, y = batch ()
              let joint = Trainer.createSession e
              Sgd.setLr id joint.Optimizer
              joint.Net.train ()
              let results = Trainer.iteration joint e.Schedule x y
              Expect.equal results.Length 4 "a loss per step"
              let manual = Trainer.createSession e
              Sgd.setLr id manual.Optimizer
              manual.Net.train ()
              Sgd.zeroGrad manual.Optimizer
              let out = manual.Net.forward x
              let total =
                  e.Schedule
                  |> List.map (fun s -> torch.nn.functional.cross_entropy (out.Of s.Head, y) |> Runtime.Scalars.scale s.LossWeight)
                  |> List.reduce Runtime.Scalars.add
              total.backward ()
              Sgd.step manual.Optimizer
              for name in [ "features.layer2.0.conv2.weight"; "conv_block1.0.conv.weight"; "classifier_concat.1.weight" ] do
                  Expect.isTrue (close 1e-4 (param joint.Net name) (param manual.Net name)) name
              let progressive = Trainer.createSession { e with Update = Experiment.Progressive }
              Sgd.setLr id progressive.Optimizer
              progressive.Net.train ()
              Trainer.iteration progressive e.Schedule x y |> ignore
              Expect.isFalse (close 1e-4 (param joint.Net "features.layer2.0.conv2.weight") (param progressive.Net "features.layer2.0.conv2.weight")) "progressive differs"
          }
          test "bf16: the forward runs in bf16 under autocast; weights, gradients and loss stay fp32" {
              use _ = torch.NewDisposeScope()
              let x, y = batch ()
              let step: Schedule.Step = { Head = Pmg.Concat; Grid = 1; LossWeight = 1.0 }
              let lossWith precision =
                  let s = Trainer.createSession { tiny with Precision = precision }
                  s.Net.train ()
                  let loss, _ = Trainer.trainStep s step x y
                  let w = param s.Net "features.layer3.0.conv1.weight"
                  loss, w
              do
                  use _ = Evaluate.computeRegion Experiment.Bf16 (torch.Device "cpu")
                  let conv = torch.nn.functional.conv2d (x, torch.randn (2L, 3L, 3L, 3L))
                  Expect.equal conv.dtype torch.bfloat16 "a convolution inside the region runs in bf16"
              let after = torch.nn.functional.conv2d (x, torch.randn (2L, 3L, 3L, 3L))
              Expect.equal after.dtype torch.float32 "and fp32 after it"
              let l16, w16 = lossWith Experiment.Bf16
              let l32, _ = lossWith Experiment.Fp32
              Expect.equal l16.dtype torch.float32 "loss in fp32"
              Expect.equal w16.dtype torch.float32 "master weights in fp32"
              Expect.equal w16.grad.dtype torch.float32 "gradients in fp32"
              let a, b = l16.item<float32> (), l32.item<float32> ()
              Expect.notEqual a b "bf16 rounding shows in the loss"
              Expect.floatClose { absolute = 0.05; relative = 0.02 } (float a) (float b) "but only a little"
              let s = Trainer.createSession tiny
              let big = torch.randn (8L, 3L, 64L, 64L)
              for (name, g16), (_, g32) in List.zip (backboneGrads s Experiment.Bf16 big) (backboneGrads s Experiment.Fp32 big) do
                  Expect.isGreaterThan (relativeError g16 g32) 1e-5 (name + ": the bf16 gradient is not the fp32 one")
                  // Rounding in the forward grows through a random network's BatchNorms (17-36% relative error
                  // measured here), but the direction must hold.
                  Expect.isGreaterThan (cosine g16 g32) 0.9 (name + ": but points the same way")
          }
          test "bf16 mixed precision trains on embedded images to fp32's accuracy" {
              // bf16 on a CPU without bf16 instructions is about 20x slower than fp32 here, and this dataset needs
              // thousands of iterations to generalise from scratch (the main job: 3 minutes in fp32). So the test
              // trains the full progressive schedule on one fixed batch of embedded training images, in both
              // precisions from the same seed, and compares what each learned of it.
              let data = Data.Synthetic.create { Data.Synthetic.Config.Default with Classes = bf16Classes; TrainPerClass = 4; TestPerClass = 1 }
              let e =
                  { Experiment.embedded with
                      Model = { Experiment.embedded.Model with Classes = bf16Classes }
                      Input = { Resize = 36; Crop = 32; Padding = 0 }
                      WarmupEpochs = 0 }
              let b = Data.Loader.batches data.Train (Data.Transforms.Spec.test 36 32) 16 false 0 0 1 1 |> Seq.head
              let x = torch.tensor (b.Images, dimensions = System.ReadOnlySpan [| int64 b.Size; 3L; 32L; 32L |])
              let y = torch.tensor b.Labels
              let fitted precision =
                  let s = Trainer.createSession { e with Precision = precision }
                  s.Net.train ()
                  let concat = [ for _ in 1..bf16Iterations -> Trainer.iteration s e.Schedule x y |> List.last ]
                  let first, _ = List.head concat
                  let last, correct = List.last concat
                  // Accuracy of the last concat step, with the batch's own BatchNorm statistics: the running
                  // statistics of 10 iterations are far from converged, whatever the precision.
                  first.item<float32> (), last.item<float32> (), float (correct.item<int64> ()) / 16.0
              let first32, last32, acc32 = fitted Experiment.Fp32
              let first16, last16, acc16 = fitted Experiment.Bf16
              let report = sprintf "fp32: concat loss %.3f -> %.3f, accuracy %.3f; bf16: %.3f -> %.3f, %.3f" first32 last32 acc32 first16 last16 acc16
              printfn "bf16 vs fp32 on a fixed batch, %d iterations: %s" bf16Iterations report
              Expect.isLessThan last32 (0.25f * first32) ("fp32 learns the batch (else the comparison says nothing): " + report)
              Expect.isGreaterThanOrEqual acc32 0.9 ("fp32 fits: " + report)
              // One image of the 16 either way: bf16 rounding may move a borderline one.
              Expect.isLessThanOrEqual (abs (acc16 - acc32)) (1.0 / 16.0 + 1e-9) ("bf16 learns as much: " + report)
              Expect.isLessThan last16 (0.25f * first16) ("bf16 loss falls as far: " + report)
          } ]
