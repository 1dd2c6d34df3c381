/// The progressive trainer. An iteration folds over the schedule's steps; each step is one jigsaw, forward, loss,
/// backward and optimizer step. Epochs fold over iterations. Files and console are reached only through hooks
/// and the checkpoint calls at the epoch boundary.
module Pmg.Fs.Training.Trainer

open System
open System.IO
open System.Diagnostics
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Data
open Pmg.Fs.Experiment

/// Images and class names of a run.
type Data =
    { Classes: string[]
      Train: Loader.Source
      Test: Loader.Source }

type EpochRecord =
    { Epoch: int
      /// Mean loss of each schedule step (weighted as trained).
      StepLosses: float list
      /// Top-1 of the concat step on the (unshuffled) training images.
      TrainAccuracy: float
      Test: Evaluate.Accuracy
      Lr: float
      BackboneLr: float
      ImagesPerSecond: float
      Skipped: (string * string) list
      Seconds: float }

type Hooks =
    { /// epoch, batches done, batches in the epoch.
      Batch: int -> int -> int -> unit
      /// Start of evaluation after an epoch.
      Evaluating: int -> unit
      Epoch: EpochRecord -> unit }

    static member None = { Batch = (fun _ _ _ -> ()); Evaluating = ignore; Epoch = ignore }

type Summary =
    { History: EpochRecord list
      BestEpoch: int
      BestCombined: float
      LastCheckpoint: string
      BestCheckpoint: string }

/// The live objects of a run.
type Session =
    { Experiment: Experiment
      Net: Pmg.Network
      Optimizer: Sgd.Optimizer
      Jigsaw: torch.Generator
      Device: torch.Device
      Engine: Engine.Engine }

let lastName = "last.ckpt"
let bestName = "best.ckpt"

/// The jigsaw generator's seed for an epoch: the data order and crops use (seed, epoch) too, so an epoch's
/// randomness does not depend on how the run got there (resume gives the same numbers).
let private epochSeed (seed: int) (epoch: int) = int64 seed * 1_000_003L + int64 epoch

let private groups (e: Experiment) (net: Pmg.Network) : Sgd.Group list =
    let named (prefix: string) = net.named_parameters () |> Seq.filter (fun struct (n, _) -> n.StartsWith prefix) |> Seq.map (fun struct (n, p) -> n, p) |> List.ofSeq
    let backbone = named "features."
    let heads =
        net.named_parameters ()
        |> Seq.filter (fun struct (n, _) -> not (n.StartsWith "features."))
        |> Seq.map (fun struct (n, p) -> n, p)
        |> List.ofSeq
    [ { Name = "heads"; Parameters = heads; BaseLr = e.Optimizer.Lr; Lr = e.Optimizer.Lr }
      { Name = "backbone"; Parameters = backbone; BaseLr = e.Optimizer.BackboneLr; Lr = e.Optimizer.BackboneLr } ]

let private initLock = obj ()

/// Builds the network, optimizer and generator of an experiment (weights from the seed, or ImageNet weights),
/// laid out and stepped as `engine` says.
let createSessionWith (engine: Engine.Engine) (e: Experiment) : Session =
    let e = validate e
    let device = torch.Device e.Device
    // Seeding and drawing the initial weights from libtorch's global generator must not interleave with
    // another session's.
    let net =
        lock initLock (fun () ->
            torch.manual_seed (int64 e.Seed) |> ignore
            Pmg.create e.Model)
    Interop.ImageNet.loadBackbone net e.Weights
    net.``to`` device |> ignore
    for missing in Engine.applySwitches engine device do
        // A speed option only: say so and go on.
        eprintfn "warning: this libtorch cannot switch on %s; training goes on without it" missing
    // Before the optimizer: flat storage keeps the strides it finds.
    if engine.ChannelsLast then Engine.toChannelsLast net
    let storage = if engine.FlatParameters then Sgd.Flat else Sgd.PerParameter
    let opt = Sgd.create storage { Momentum = e.Optimizer.Momentum; WeightDecay = e.Optimizer.WeightDecay } (groups e net)
    { Experiment = e
      Net = net
      Optimizer = opt
      Jigsaw = new torch.Generator(uint64 e.Seed)
      Device = device
      Engine = engine }

/// A session with the engine chosen for the experiment's device (Engine.forDevice).
let createSession (e: Experiment) : Session =
    createSessionWith (Engine.forDevice (torch.Device (validate e).Device)) e

/// The logits (fp32) of one step's output on its jigsaw of x; the forward runs in bf16 under autocast when the
/// experiment says so, the loss after it in fp32.
let private stepLogits (s: Session) (step: Schedule.Step) (x: torch.Tensor) : torch.Tensor =
    let input = Jigsaw.shuffle s.Jigsaw s.Experiment.Permutation step.Grid x |> Engine.inputLayout s.Engine
    let logits =
        use _ = Evaluate.computeRegion s.Experiment.Precision s.Device
        match s.Experiment.Forward, step.Head with
        | Truncated, Pmg.Granularity i -> s.Net.ForwardHead(input, i)
        | _ -> (s.Net.forward input).Of step.Head
    logits.to_type torch.float32

let private lossOf (step: Schedule.Step) (logits: torch.Tensor) (y: torch.Tensor) =
    torch.nn.functional.cross_entropy (logits, y) |> Runtime.Scalars.scale step.LossWeight

/// One progressive step: jigsaw, forward, weighted cross-entropy, backward, SGD step. Returns the loss and the
/// number of correct top-1 predictions, both still on the device.
let trainStep (s: Session) (step: Schedule.Step) (x: torch.Tensor) (y: torch.Tensor) : torch.Tensor * torch.Tensor =
    Sgd.zeroGrad s.Optimizer
    let logits = stepLogits s step x
    let loss = lossOf step logits y
    loss.backward ()
    Sgd.step s.Optimizer
    loss.detach (), Evaluate.correctTopK 1 logits y

/// One iteration on one batch: the given steps in order, each with its own update (Progressive), or all their
/// weighted losses summed into one backward and one update (Joint). Returns each step's loss and correct count.
let iteration (s: Session) (steps: Schedule.Step list) (x: torch.Tensor) (y: torch.Tensor) : (torch.Tensor * torch.Tensor) list =
    match s.Experiment.Update with
    | Progressive -> steps |> List.map (fun step -> trainStep s step x y)
    | Joint ->
        Sgd.zeroGrad s.Optimizer
        let outputs = steps |> List.map (fun step -> let logits = stepLogits s step x in lossOf step logits y, logits)
        let total = outputs |> List.map fst |> List.reduce Runtime.Scalars.add
        total.backward ()
        Sgd.step s.Optimizer
        outputs |> List.map (fun (loss, logits) -> loss.detach (), Evaluate.correctTopK 1 logits y)

/// A loader batch on the device; the host copies are freed here.
let private toDevice (engine: Engine.Engine) (device: torch.Device) (b: Loader.Batch) =
    use x = torch.tensor (b.Images, dimensions = ReadOnlySpan [| int64 b.Size; 3L; int64 b.Height; int64 b.Width |])
    use y = torch.tensor (b.Labels)
    Engine.upload engine device x, Engine.upload engine device y

let private batchesOf (e: Experiment) (source: Loader.Source) (train: bool) (epoch: int) =
    let spec =
        if train then { Transforms.Spec.train e.Input.Resize e.Input.Crop with Padding = e.Input.Padding }
        else Transforms.Spec.test e.Input.Resize e.Input.Crop
    Loader.batches source spec e.BatchSize train e.Seed epoch e.Workers 2

let private evaluateWith (engine: Engine.Engine) (e: Experiment) (net: Pmg.Network) (device: torch.Device) classes source =
    batchesOf e source false 0
    |> Seq.map (fun b ->
        let x, y = toDevice engine device b
        use x = x
        Engine.inputLayout engine x, y)
    |> Evaluate.run e.Precision net classes

/// Evaluates a network on a source with the experiment's test transform, batch size and precision.
let evaluateNet (e: Experiment) (net: Pmg.Network) (device: torch.Device) (classes: int) (source: Loader.Source) =
    // A loaded network keeps NCHW weights: NHWC inputs would make every convolution convert them.
    evaluateWith { Engine.forDevice device with ChannelsLast = false } e net device classes source

/// Evaluates a session's network.
let evaluate (s: Session) (classes: int) (source: Loader.Source) : Evaluate.Accuracy =
    evaluateWith s.Engine s.Experiment s.Net s.Device classes source

/// One epoch of training. Losses and accuracy are summed on the device and read once at the end.
let trainEpoch (s: Session) (data: Data) (epoch: int) (hooks: Hooks) =
    let e = s.Experiment
    let steps = List.length e.Schedule
    let active = Schedule.stepsAt e.WarmupEpochs epoch e.Schedule
    s.Jigsaw.manual_seed (epochSeed e.Seed epoch) |> ignore
    Sgd.setLr (fun baseLr -> Schedule.cosine e.Epochs baseLr epoch) s.Optimizer
    s.Net.train ()
    let total = (data.Train.Count + e.BatchSize - 1) / e.BatchSize
    use sums = torch.zeros ([| int64 steps + 1L |], dtype = torch.float64, device = s.Device)
    let mutable images = 0
    let mutable skipped = []
    // Each value goes to its step's column; the last column counts correct predictions. Made once: a per-batch
    // host-to-device copy would wait for the GPU.
    use positions = torch.tensor (Array.append [| for i, _ in active -> int64 i |] [| int64 steps |], device = s.Device)
    let clock = Stopwatch.StartNew()
    batchesOf e data.Train true epoch
    |> Seq.iteri (fun i b ->
        skipped <- skipped @ b.Skipped
        // BatchNorm cannot train on one sample; a last batch of one is skipped like PyTorch's drop_last would.
        if b.Size >= 2 then
            use _ = torch.NewDisposeScope()
            let x, y = toDevice s.Engine s.Device b
            let results = iteration s (List.map snd active) x y
            let losses = results |> List.map (fun (l, _) -> l.to_type torch.float64 |> Runtime.Scalars.scale (float b.Size))
            let correct = results |> List.last |> snd
            let values = torch.stack (losses @ [ correct.to_type torch.float64 ])
            Runtime.Scalars.scalar 1.0 (fun one -> sums.index_add_ (0L, positions, values, one)) |> ignore
            images <- images + b.Size
        hooks.Batch epoch (i + 1) total)
    let seconds = clock.Elapsed.TotalSeconds
    let v = sums.cpu().data<float>().ToArray()
    let n = float (max images 1)
    // Steps that did not run this epoch (warm-up) have no loss.
    let ran = active |> List.map fst |> Set.ofList
    [ for i in 0 .. steps - 1 -> if ran.Contains i then v.[i] / n else nan ], v.[steps] / n, float images / seconds, skipped, seconds

let private checkpointOf (s: Session) (progress: Checkpoint.Progress) : Checkpoint.Checkpoint =
    { Experiment = s.Experiment
      Progress = progress
      Model = [ for kv in s.Net.state_dict () -> kv.Key, kv.Value ]
      Optimizer = Sgd.state s.Optimizer
      Rng = s.Jigsaw.get_state () }

/// Puts a checkpoint's model, optimizer and generator state into a session.
let restore (s: Session) (c: Checkpoint.Checkpoint) =
    Interop.StateDict.loadInto s.Net c.Model true
    Sgd.restore s.Optimizer c.Optimizer
    s.Jigsaw.set_state c.Rng |> ignore

/// Trains the experiment, writing last.ckpt every epoch and best.ckpt when combined accuracy improves.
/// With `resume`, continues from outDir/last.ckpt when it exists.
let run (e: Experiment) (data: Data) (outDir: string) (resume: bool) (hooks: Hooks) : Summary =
    let s = createSession e
    let last = Path.Combine(outDir, lastName)
    let best = Path.Combine(outDir, bestName)
    let start =
        if resume && File.Exists last then
            let c = Checkpoint.load last
            if c.Experiment.Model <> e.Model then
                raise (Checkpoint.CheckpointError(sprintf "%s was trained with a different model (%A); start a new run directory or use the same settings" last c.Experiment.Model))
            restore s c
            c.Progress
        else
            { EpochsDone = 0; BestCombined = -1.0; BestEpoch = -1; Seed = e.Seed }
    let folder (progress: Checkpoint.Progress, history) epoch =
        let stepLosses, trainAcc, speed, skipped, seconds = trainEpoch s data epoch hooks
        hooks.Evaluating epoch
        let test = evaluate s data.Classes.Length data.Test
        let record =
            { Epoch = epoch
              StepLosses = stepLosses
              TrainAccuracy = trainAcc
              Test = test
              Lr = s.Optimizer.Groups.[0].Lr
              BackboneLr = s.Optimizer.Groups.[1].Lr
              ImagesPerSecond = speed
              Skipped = skipped
              Seconds = seconds }
        let improved = test.Combined > progress.BestCombined
        let progress =
            { progress with
                EpochsDone = epoch + 1
                BestCombined = (if improved then test.Combined else progress.BestCombined)
                BestEpoch = (if improved then epoch else progress.BestEpoch) }
        let c = checkpointOf s progress
        Checkpoint.save last c
        if improved then Checkpoint.save best c
        hooks.Epoch record
        progress, history @ [ record ]
    let final, history = List.fold folder (start, []) [ start.EpochsDone .. e.Epochs - 1 ]
    { History = history
      BestEpoch = final.BestEpoch
      BestCombined = final.BestCombined
      LastCheckpoint = last
      BestCheckpoint = best }
