/// The progressive trainer: a step function and a fold. An iteration folds over the schedule's steps; each step is
/// one jigsaw, forward, loss, backward and optimizer step. An epoch folds over iterations and returns a record;
/// `run` folds epochs over the progress. Files and console are reached only through the hooks that Run and the
/// CLI install.
module Pmg.Fs.Training.Trainer

open System
open System.Diagnostics
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Data
open Pmg.Fs.Runtime
open Pmg.Fs.Experiment

/// Images and class names of a run.
type Data =
    { /// Class names; a label is an index into this array (0-based).
      Classes: string[]
      /// The training split.
      Train: Loader.Source
      /// The test split, evaluated after every epoch.
      Test: Loader.Source }

/// What one epoch gave: losses, accuracies, learning rates and speed (one row of metrics.csv).
type EpochRecord =
    { /// The epoch, 0-based.
      Epoch: int
      /// Mean loss of each schedule step (weighted as trained); NaN for steps that did not run (warm-up).
      StepLosses: float list
      /// Top-1 of the last step on the training images it saw (concat on whole images).
      TrainAccuracy: float
      /// Accuracies on the test split after this epoch.
      Test: Evaluate.Accuracy
      /// Learning rate of the new layers in this epoch.
      Lr: float
      /// Learning rate of the backbone in this epoch.
      BackboneLr: float
      /// Images trained per second of training time.
      ImagesPerSecond: float
      /// Images that could not be read this epoch: file and reason.
      Skipped: (string * string) list
      /// Training time of the epoch in seconds, evaluation excluded.
      Seconds: float }

/// Where training stands after a completed epoch.
type Progress =
    { /// Epochs completed (the next epoch to run, 0-based).
      EpochsDone: int
      /// Best combined top-1 on the test split so far, in [0, 1]; -1 before the first epoch.
      BestCombined: float
      /// The epoch (0-based) of BestCombined; -1 before the first epoch.
      BestEpoch: int
      /// metrics.csv's rows of the epochs done, committed with them (a run folder's metrics.csv is rebuilt from
      /// these, so the table and the checkpoint never disagree).
      Metrics: string list }

    /// Before the first epoch.
    static member Start = { EpochsDone = 0; BestCombined = -1.0; BestEpoch = -1; Metrics = [] }

/// What one training batch gave (one per iteration): read back from the device once per batch.
type BatchRecord =
    { /// The epoch, 0-based.
      Epoch: int
      /// Batches done in this epoch, 1-based (this one included).
      Batch: int
      /// Batches in the epoch.
      Batches: int
      /// Batches done since the run started, this one included: `Epoch * Batches + Batch`, the same whether
      /// the run was resumed or not (TensorBoard's step).
      GlobalStep: int64
      /// Loss of each schedule step on this batch (weighted as trained); NaN for steps that did not run, and for
      /// every step of a batch that was not trained (too small).
      StepLosses: float list
      /// Learning rate of each optimizer group ("heads", "backbone") in this epoch.
      LearningRates: (string * float) list
      /// Images trained in this batch (0 when it was skipped).
      Images: int
      /// Images per second since the epoch started.
      ImagesPerSecond: float }

/// Callbacks the trainer makes while it runs; its only way to files and the console.
type Hooks =
    { /// After each batch.
      Batch: BatchRecord -> unit
      /// Start of evaluation after an epoch.
      Evaluating: int -> unit
      /// After each epoch, with the progress that includes it (BestEpoch = record's epoch when it improved).
      Epoch: Progress -> EpochRecord -> unit }

    /// Hooks that do nothing.
    static member None = { Batch = ignore; Evaluating = ignore; Epoch = fun _ _ -> () }

/// Where a session's jigsaw patch orders come from.
type Permutations =
    /// Drawn from the session's generator, reseeded at every epoch start (training).
    | Drawn
    /// Given by a function of the grid and the batch size, returning rows of patch indices as
    /// `Jigsaw.permutations` does: a test fixes the permutation to compare with another implementation.
    | Given of (int -> int -> torch.Tensor)

/// How a session is built beyond its experiment: the speed settings, the floating-point type of its weights and
/// batches, and where its patch orders come from.
type SessionOptions =
    { /// Speed and memory settings (Engine.forDevice by default).
      Engine: Engine.Engine
      /// float32 (training) or float64 (a reference comparison to many digits).
      Dtype: torch.ScalarType
      /// Drawn (training) or given (tests).
      Permutations: Permutations }

/// The live objects of a run.
type Session =
    { /// The experiment being trained.
      Experiment: Experiment
      /// The network, on Device.
      Net: Pmg.Network
      /// SGD over two groups: "heads" (the new layers) and "backbone".
      Optimizer: Sgd.Optimizer
      /// Generator of the jigsaw permutations, reseeded at every epoch start.
      Jigsaw: torch.Generator
      /// Where the network and the batches live.
      Device: torch.Device
      /// The speed and memory settings the session was built with.
      Engine: Engine.Engine
      /// The floating-point type of the weights and batches.
      Dtype: torch.ScalarType
      /// Where the patch orders come from.
      Permutations: Permutations
      /// The processes training together (Collective.single for one); made from the experiment's backend.
      Collective: Collective.Communicator }

/// Whether a session trains as one of several processes (also with one, under a backend: the same code runs).
let private parted (s: Session) = s.Experiment.Collective.IsSome

/// The jigsaw generator's seed for an epoch: the data order and crops use (seed, epoch) too, so an epoch's
/// randomness does not depend on how the run got there; a resumed run draws what an uninterrupted one would, and
/// a checkpoint needs no generator state.
let private epochSeed (seed: int) (epoch: int) = int64 seed * 1_000_003L + int64 epoch

let private initLock = obj ()

/// Builds the network, optimizer and generator of a (validated) experiment as `options` say.
let createSessionFrom (options: SessionOptions) (e: Experiment) : Session =
    let engine = options.Engine
    let device = Device.torch e.Device
    // Seeding and drawing the initial weights from libtorch's global generator must not interleave with
    // another session's.
    let net =
        lock initLock (fun () ->
            torch.manual_seed (int64 e.Seed) |> ignore
            Pmg.create e.Model)
    Interop.ImageNet.loadBackbone net e.Weights
    Layers.setBatchNormGroup e.BatchNormGroup net
    net.``to`` device |> ignore
    if options.Dtype <> torch.float32 then net.``to`` options.Dtype |> ignore
    for missing in Engine.applySwitches engine device do
        // A speed option only: say so and go on.
        Notices.Say(sprintf "this libtorch cannot switch on %s; training goes on without it" missing)
    // Before the optimizer: flat storage keeps the strides it finds.
    if engine.ChannelsLast then Engine.toChannelsLast net
    let storage = if engine.FlatParameters then Sgd.Flat else Sgd.PerParameter
    let groups: Sgd.Group list =
        [ { Name = "heads"; Parameters = net.HeadParameters(); BaseLr = e.Optimizer.Lr }
          { Name = "backbone"; Parameters = net.BackboneParameters(); BaseLr = e.Optimizer.BackboneLr } ]
    { Experiment = e
      Net = net
      Optimizer = Sgd.create storage { Momentum = e.Optimizer.Momentum; WeightDecay = e.Optimizer.WeightDecay } groups
      Jigsaw = new torch.Generator(uint64 e.Seed)
      Device = device
      Engine = engine
      Dtype = options.Dtype
      Permutations = options.Permutations
      Collective = Collective.connect e.Collective }

/// A session laid out and stepped as `engine` says, float32, patch orders drawn.
let createSessionWith (engine: Engine.Engine) (e: Experiment) : Session =
    createSessionFrom { Engine = engine; Dtype = torch.float32; Permutations = Drawn } e

/// A session with the engine chosen for the experiment's device (Engine.forDevice).
let createSession (e: Experiment) : Session =
    createSessionWith (Engine.forDevice (Device.torch e.Device)) e

/// The learning rate of a group in an epoch: cosine annealing from its base rate.
let lrAt (e: Experiment) (epoch: int) (g: Sgd.Group) = Schedule.cosine e.Epochs g.BaseLr epoch

/// Where a process's images sit in the whole batch: (first position, images in the whole batch). The patch orders
/// are drawn for the whole batch, so every rank's generator stays where the single process's would be, and each
/// rank takes the rows of its own images.
type private Slice = int * int

/// The rows of `perm` that belong to this process's images (every row when one is shared by the batch).
let private rowsOf (slice: Slice option) (count: int) (perm: torch.Tensor) =
    match slice with
    | Some(start, _) when perm.shape.[0] > 1L -> perm.narrow (0L, int64 start, int64 count)
    | _ -> perm.alias ()

/// The logits (fp32) of one step's output on its jigsaw of x; the forward runs in bf16 under autocast when the
/// experiment says so, the loss after it in fp32.
let private stepLogits (s: Session) (slice: Slice option) (step: Schedule.Step) (x: torch.Tensor) : torch.Tensor =
    let count = int x.shape.[0]
    let whole = match slice with Some(_, total) -> total | None -> count
    let input =
        match s.Permutations with
        | Drawn when step.Grid > 1 && slice.IsSome ->
            use all = Jigsaw.permutations s.Jigsaw s.Experiment.Permutation s.Experiment.JigsawDraw whole step.Grid
            use perm = rowsOf slice count all
            Jigsaw.apply perm step.Grid x
        | Drawn -> Jigsaw.shuffle s.Jigsaw s.Experiment.Permutation s.Experiment.JigsawDraw step.Grid x
        | Given order when step.Grid > 1 ->
            use all = order step.Grid whole
            use perm = rowsOf slice count all
            Jigsaw.apply perm step.Grid x
        | Given _ -> x.alias ()
        |> Engine.inputLayout s.Engine
    let logits =
        use _ = Evaluate.computeRegion s.Experiment.Precision s.Device
        match s.Experiment.Forward, step.Head with
        | Truncated, Pmg.Stage l -> s.Net.ForwardHead(input, s.Net.HeadIndex l)
        | _ -> (s.Net.forward input).Of step.Head
    // The loss in fp32 (bf16 forward), or in the session's own type when that is wider.
    if s.Dtype = torch.float64 then logits.to_type torch.float64 else logits.to_type torch.float32

let private lossOf (step: Schedule.Step) (logits: torch.Tensor) (y: torch.Tensor) =
    torch.nn.functional.cross_entropy (logits, y) |> Ops.scale step.LossWeight

/// Runs a collective operation `f` in place on `t`, through a contiguous copy when `t` is not contiguous (the
/// communicators read and write one contiguous buffer).
let private onContiguous (f: torch.Tensor -> unit) (t: torch.Tensor) =
    if t.is_contiguous () then f t
    else
        use dense = t.contiguous ()
        f dense
        t.copy_ dense |> ignore

/// The gradient of the whole batch's mean loss on every rank: each rank's gradient (of its part's mean) times its
/// share of the batch (Collective.gradientWeight), summed over the ranks; one all-reduce per flat slab (per
/// gradient with per-parameter storage). Nothing for one process.
let private averageGradients (s: Session) (weight: float option) =
    match weight with
    | None -> ()
    | Some w ->
        use _ = torch.no_grad ()
        let reduce (g: torch.Tensor) =
            if w <> 1.0 then Ops.scalar w (fun k -> g.mul_ k) |> ignore
            s.Collective.AllReduceSum g
        if s.Optimizer.Slabs.IsEmpty then
            // The same steps on every rank leave the same parameters without a gradient.
            for g in s.Optimizer.Groups do
                for _, p in g.Parameters do
                    let grad = p.grad
                    if not (isNull grad) then onContiguous reduce grad
        else
            for slab in s.Optimizer.Slabs do
                reduce slab.Grads

let private trainStepOn (s: Session) (slice: Slice option) (weight: float option) (lr: Sgd.Group -> float) (step: Schedule.Step) (x: torch.Tensor) (y: torch.Tensor) =
    Sgd.zeroGrad s.Optimizer
    let logits = stepLogits s slice step x
    let loss = lossOf step logits y
    loss.backward ()
    averageGradients s weight
    Sgd.step lr s.Optimizer
    loss.detach (), Evaluate.correctTopK 1 logits y

/// One progressive step: jigsaw, forward, weighted cross-entropy, backward, SGD step at the rates `lr` gives.
/// Returns the loss and the number of correct top-1 predictions, both still on the device.
let trainStep (s: Session) (lr: Sgd.Group -> float) (step: Schedule.Step) (x: torch.Tensor) (y: torch.Tensor) =
    trainStepOn s None None lr step x y

let private iterationOn (s: Session) (slice: Slice option) (weight: float option) (lr: Sgd.Group -> float) (steps: Schedule.Step list) (x: torch.Tensor) (y: torch.Tensor) =
    match s.Experiment.Update with
    | Progressive -> steps |> List.map (fun step -> trainStepOn s slice weight lr step x y)
    | Joint ->
        Sgd.zeroGrad s.Optimizer
        let outputs = steps |> List.map (fun step -> let logits = stepLogits s slice step x in lossOf step logits y, logits)
        let total = outputs |> List.map fst |> List.reduce Ops.add
        total.backward ()
        averageGradients s weight
        Sgd.step lr s.Optimizer
        outputs |> List.map (fun (loss, logits) -> loss.detach (), Evaluate.correctTopK 1 logits y)

/// One iteration on one batch: the given steps in order, each with its own update (Progressive), or all their
/// weighted losses summed into one backward and one update (Joint). Returns each step's loss and correct count.
let iteration (s: Session) (lr: Sgd.Group -> float) (steps: Schedule.Step list) (x: torch.Tensor) (y: torch.Tensor) =
    iterationOn s None None lr steps x y

/// A loader batch on the device; the host copies are freed here.
let private toDevice (engine: Engine.Engine) (device: torch.Device) (b: Loader.Batch) =
    use x = torch.tensor (b.Images, dimensions = ReadOnlySpan [| int64 b.Size; 3L; int64 b.Height; int64 b.Width |])
    use y = torch.tensor (b.Labels)
    Engine.upload engine device x, Engine.upload engine device y

/// A batch on the session's device, in its floating-point type.
let private toSession (s: Session) (b: Loader.Batch) =
    let x, y = toDevice s.Engine s.Device b
    if s.Dtype = torch.float32 then x, y
    else
        use x = x
        x.to_type s.Dtype, y

/// This process's part (rank, ranks) of an epoch's batches; (0, 1) for the whole batches.
let private batchesOf (e: Experiment) (part: int * int) (source: Loader.Source) (train: bool) (epoch: int) =
    let spec =
        if train then { Transforms.Spec.train e.Input.Resize e.Input.Crop with Padding = e.Input.Padding }
        else Transforms.Spec.test e.Input.Resize e.Input.Crop
    Loader.batchesPart part source spec e.BatchSize train e.Seed epoch e.Workers 2

/// The ranks' accuracies as one: counts summed over the ranks (every rank gets the same figures).
let private combineAccuracies (c: Collective.Communicator) (a: Evaluate.Accuracy) : Evaluate.Accuracy =
    let n = float a.Images
    let count (f: float) = Math.Round(f * n)
    let classes = Array2D.length1 a.Confusion
    let values =
        Array.concat
            [ a.Heads |> List.map count |> Array.ofList
              [| count a.Concat; count a.Combined; count a.CombinedTop5; n |]
              Array.init (classes * classes) (fun k -> float a.Confusion.[k / classes, k % classes]) ]
    c.AllReduceHost values
    let heads = a.Heads.Length
    let images = values.[heads + 3]
    let frac (v: float) = if images = 0.0 then 0.0 else v / images
    { a with
        Heads = [ for i in 0 .. heads - 1 -> frac values.[i] ]
        Concat = frac values.[heads]
        Combined = frac values.[heads + 1]
        CombinedTop5 = frac values.[heads + 2]
        Images = int images
        Confusion = Array2D.init classes classes (fun i j -> int values.[heads + 4 + i * classes + j]) }

/// Evaluates this process's part of the test batches; `combine` turns its accuracy into the run's.
let private evaluatePart (engine: Engine.Engine) (e: Experiment) (part: int * int) (combine: Evaluate.Accuracy -> Evaluate.Accuracy) (net: Pmg.Network) (device: torch.Device) classes (source: Loader.Source) =
    // Images the loader could not use are counted beside the accuracies, never silently dropped.
    let skipped = ResizeArray<string * string>()
    // Batches in the network's floating-point type (float64 in reference comparisons).
    let dtype = (net.parameters () |> Seq.head).dtype
    let acc =
        batchesOf e part source false 0
        |> Seq.choose (fun b ->
            skipped.AddRange b.Skipped
            if b.Size = 0 then None
            else
                let x, y = toDevice engine device b
                use x = if dtype = torch.float32 then x else (use x = x in x.to_type dtype)
                Some(Engine.inputLayout engine x, y))
        |> Evaluate.run e.Precision net classes
        |> combine
    let skipped = List.ofSeq skipped
    if acc.Images = 0 then
        // An accuracy over no image is no result: the split itself is unusable.
        match skipped with
        | (file, reason) :: _ ->
            let folder = IO.Path.GetDirectoryName(IO.Path.GetDirectoryName file: string)
            Errors.fail (
                DatasetInvalid(
                    folder,
                    sprintf "%s: none of the %d test images could be used (e.g. %s: %s): replace the damaged files"
                        folder skipped.Length file reason
                )
            )
        | [] -> Errors.fail (DatasetInvalid("", "the test split holds no images: add test images to evaluate on"))
    match skipped with
    | (file, reason) :: _ ->
        Notices.Say(
            sprintf "%d test image%s could not be used and %s left out of the accuracies, e.g. %s: %s"
                skipped.Length (if skipped.Length = 1 then "" else "s") (if skipped.Length = 1 then "is" else "are") file reason
        )
    | [] -> ()
    { acc with Skipped = skipped }

let private evaluateWith (engine: Engine.Engine) (e: Experiment) (net: Pmg.Network) (device: torch.Device) classes (source: Loader.Source) =
    evaluatePart engine e (0, 1) id net device classes source

/// Evaluates a network on a source with the experiment's test transform, batch size and precision.
let evaluateNet (e: Experiment) (net: Pmg.Network) (device: torch.Device) (classes: int) (source: Loader.Source) =
    // A loaded network keeps NCHW weights: NHWC inputs would make every convolution convert them.
    evaluateWith { Engine.forDevice device with ChannelsLast = false } e net device classes source

/// Evaluates a session's network.
let evaluate (s: Session) (classes: int) (source: Loader.Source) : Evaluate.Accuracy =
    evaluateWith s.Engine s.Experiment s.Net s.Device classes source

/// Rank 0's values of a tensor on every rank.
let private broadcastInPlace (c: Collective.Communicator) (t: torch.Tensor) = onContiguous c.BroadcastTensor t

/// Rank 0's buffers (BatchNorm's running statistics) on every rank: each rank's own follow its own part of the
/// batches, but the run's are rank 0's (as DataParallel keeps replica 0's).
let private broadcastBuffers (s: Session) =
    use _ = torch.no_grad ()
    for b in s.Net.buffers () do
        broadcastInPlace s.Collective b

/// Evaluates a session's network as one of its ranks: rank 0's running statistics, each rank its part of every
/// test batch, the counts summed; every rank gets the whole test split's accuracies.
let private evaluateParted (s: Session) (classes: int) (source: Loader.Source) : Evaluate.Accuracy =
    if not (parted s) then evaluate s classes source
    else
        broadcastBuffers s
        let c = s.Collective
        evaluatePart s.Engine s.Experiment (c.Rank, c.Size) (combineAccuracies c) s.Net s.Device classes source

/// Rank 0's weights, buffers, momentum and progress on every rank, before training starts (a fresh run's and a
/// resumed run's alike): only rank 0 reads the run folder, and no rank depends on drawing the same numbers.
/// Returns rank 0's progress; one process gets its own back.
let synchronise (s: Session) (progress: Progress) : Progress =
    if not (parted s) then progress
    else
        let c = s.Collective
        use _ = torch.no_grad ()
        if s.Optimizer.Slabs.IsEmpty then
            for p in s.Net.parameters () do
                broadcastInPlace c p
        else
            for slab in s.Optimizer.Slabs do
                broadcastInPlace c slab.Values
        broadcastBuffers s
        // Which momentum buffers exist, and the progress, as text from rank 0.
        let header: Progress * string list =
            Json.line (progress, Sgd.state s.Optimizer |> List.map fst |> List.sort)
            |> Text.Encoding.UTF8.GetBytes
            |> c.Broadcast
            |> Text.Encoding.UTF8.GetString
            |> Json.deserialize
        let progress, names = header
        if c.Rank <> 0 then
            // Room for rank 0's buffers (the values follow): zeros shaped as the parameters.
            let shapes = s.Optimizer.Groups |> List.collect (fun g -> g.Parameters) |> Map.ofList
            let zeros = names |> List.map (fun n -> n, torch.zeros_like shapes.[n])
            Sgd.restore s.Optimizer zeros
            zeros |> List.iter (fun (_, t) -> t.Dispose())
        if s.Optimizer.Slabs.IsEmpty then
            for n in names do
                broadcastInPlace c s.Optimizer.Buffers.[n]
        else
            for slab in s.Optimizer.Slabs do
                slab.Momentum |> Option.iter (broadcastInPlace c)
        progress

/// What an epoch of training gives, before evaluation.
type private Trained =
    { StepLosses: float list
      TrainAccuracy: float
      ImagesPerSecond: float
      Skipped: (string * string) list
      Seconds: float }

/// One epoch of training. Losses and accuracy are summed on the device and read once at the end.
let private trainEpoch (s: Session) (data: Data) (epoch: int) (onBatch: BatchRecord -> unit) : Trained =
    let e = s.Experiment
    let steps = List.length e.Schedule
    let active = Schedule.stepsAt e.WarmupEpochs epoch e.Schedule
    let lr = lrAt e epoch
    s.Jigsaw.manual_seed (epochSeed e.Seed epoch) |> ignore
    // Each rank drops its own blocks (rank 0 as one process would); the same draws on every rank would tie them.
    s.Net.Backbone.Reseed(epochSeed e.Seed epoch + (int64 s.Collective.Rank <<< 40))
    s.Net.train ()
    let total = (data.Train.Count + e.BatchSize - 1) / e.BatchSize
    use sums = torch.zeros ([| int64 steps + 1L |], dtype = torch.float64, device = s.Device)
    // Each value goes to its step's column; the last column counts correct predictions. Made once: a per-batch
    // host-to-device copy would wait for the GPU.
    use positions = torch.tensor (Array.append [| for i, _ in active -> int64 i |] [| int64 steps |], device = s.Device)
    let c = s.Collective
    let clock = Stopwatch.StartNew()
    let images, skipped =
        batchesOf e (if parted s then (c.Rank, c.Size) else (0, 1)) data.Train true epoch
        |> Seq.indexed
        |> Seq.fold
            (fun (images, skipped) (i, b) ->
                Files.TestHooks.killAt (sprintf "epoch-%d-batch-%d" (epoch + 1) (i + 1))
                // Every rank's part of the batch, so that all decide alike whether it trains and where each
                // rank's images sit in it.
                let sizes =
                    if parted s then
                        let sizes = Array.zeroCreate c.Size
                        sizes.[c.Rank] <- float b.Size
                        c.AllReduceHost sizes
                        Array.map int sizes
                    else [| b.Size |]
                let whole = Array.sum sizes
                // BatchNorm cannot train on one sample: a last batch of one is never trained, and with DropLast (the
                // reference's `if inputs.shape[0] < batch_size: continue`) no partial batch is. Several processes:
                // every part needs two.
                let trained, batchLosses =
                    if Array.forall (fun n -> n >= 2) sizes && (not e.DropLast || whole = e.BatchSize) then
                        use _ = torch.NewDisposeScope()
                        let x, y = toSession s b
                        let slice, weight =
                            if parted s then Some(Array.sum sizes.[.. c.Rank - 1], whole), Some(Collective.gradientWeight b.Size whole)
                            else None, None
                        let results = iterationOn s slice weight lr (List.map snd active) x y
                        let losses = results |> List.map (fun (l, _) -> l.to_type torch.float64 |> Ops.scale (float b.Size))
                        let correct = results |> List.last |> snd
                        let values = torch.stack (losses @ [ correct.to_type torch.float64 ])
                        // The whole batch's sums on every rank.
                        if parted s then c.AllReduceSum values
                        Ops.scalar 1.0 (fun one -> sums.index_add_ (0L, positions, values, one)) |> ignore
                        // One read per batch, after its last step: the per-batch record (progress, TensorBoard).
                        let host =
                            if parted s then Ops.hostFloats values |> Array.truncate active.Length |> Array.map (fun v -> v / float32 whole)
                            else Ops.hostFloats (torch.stack(results |> List.map fst).to_type torch.float32)
                        let byStep = Map.ofList (List.zip (List.map fst active) (List.ofArray host))
                        whole, [ for i in 0 .. steps - 1 -> match byStep.TryFind i with Some v -> float v | None -> nan ]
                    else
                        0, List.replicate steps nan
                let images = images + trained
                onBatch
                    { Epoch = epoch
                      Batch = i + 1
                      Batches = total
                      GlobalStep = int64 epoch * int64 total + int64 (i + 1)
                      StepLosses = batchLosses
                      LearningRates = [ for g in s.Optimizer.Groups -> g.Name, lr g ]
                      Images = trained
                      ImagesPerSecond = float images / max 1e-9 clock.Elapsed.TotalSeconds }
                images, skipped @ b.Skipped)
            (0, [])
    let seconds = clock.Elapsed.TotalSeconds
    let v = (use host = sums.cpu () in host.data<float>().ToArray())
    let n = float (max images 1)
    // Steps that did not run this epoch (warm-up) have no loss.
    let ran = active |> List.map fst |> Set.ofList
    if images = 0 then
        match skipped with
        | (f, why) :: _ ->
            Errors.fail (TrainingFailed(sprintf "epoch %d trained no image: %d unreadable, e.g. %s: %s; check the dataset (pmg data)" (epoch + 1) skipped.Length f why))
        | [] ->
            Errors.fail (TrainingFailed(sprintf "epoch %d trained no image: %d training images do not fill one batch of %d (partial batches are skipped): lower the batch size, or train partial batches" (epoch + 1) data.Train.Count e.BatchSize))
    { StepLosses = [ for i in 0 .. steps - 1 -> if ran.Contains i then v.[i] / n else nan ]
      TrainAccuracy = v.[steps] / n
      ImagesPerSecond = float images / seconds
      Skipped = skipped
      Seconds = seconds }

/// The step of the fold: trains and evaluates one epoch and says where training stands after it. Raises Diverged,
/// before any hook runs, when a step's loss is not finite.
let epoch (s: Session) (data: Data) (hooks: Hooks) (progress: Progress) (epoch: int) : Progress * EpochRecord =
    let e = s.Experiment
    let t = trainEpoch s data epoch hooks.Batch
    let lrOf name = s.Optimizer.Groups |> List.find (fun g -> g.Name = name) |> lrAt e epoch
    let active = Schedule.stepsAt e.WarmupEpochs epoch e.Schedule |> List.map fst
    match active |> List.tryFind (fun i -> not (Double.IsFinite t.StepLosses.[i])) with
    | Some i ->
        Errors.fail (
            TrainingFailed(
                sprintf "training diverged in epoch %d: step %d (%s) has loss %g at learning rates %g (new layers) and %g (backbone); lower the learning rate"
                    (epoch + 1) (i + 1) (Schedule.stepName e.Schedule.[i]) t.StepLosses.[i] (lrOf "heads") (lrOf "backbone")
            )
        )
    | None -> ()
    hooks.Evaluating epoch
    let test = evaluateParted s data.Classes.Length data.Test
    let record =
        { Epoch = epoch
          StepLosses = t.StepLosses
          TrainAccuracy = t.TrainAccuracy
          Test = test
          Lr = lrOf "heads"
          BackboneLr = lrOf "backbone"
          ImagesPerSecond = t.ImagesPerSecond
          Skipped = t.Skipped
          Seconds = t.Seconds }
    let improved = test.Combined > progress.BestCombined
    { progress with
        EpochsDone = epoch + 1
        BestCombined = (if improved then test.Combined else progress.BestCombined)
        BestEpoch = (if improved then epoch else progress.BestEpoch) },
    record

/// Trains from `start` to the experiment's last epoch: a fold of `epoch`. After each epoch `commit` gets the progress
/// and the record and returns the progress to go on from (Run keeps its files there), then the Epoch hook runs.
let runWith (s: Session) (data: Data) (start: Progress) (hooks: Hooks) (commit: Progress -> EpochRecord -> Progress) : Progress * EpochRecord list =
    let final, history =
        [ start.EpochsDone .. s.Experiment.Epochs - 1 ]
        |> List.fold
            (fun (progress, history) n ->
                let progress, record = epoch s data hooks progress n
                let progress = commit progress record
                progress, record :: history)
            (start, [])
    final, List.rev history

/// Trains from `start` to the experiment's last epoch: a fold of `epoch`, calling the Epoch hook after each.
let run (s: Session) (data: Data) (start: Progress) (hooks: Hooks) : Progress * EpochRecord list =
    runWith s data start hooks (fun p r -> hooks.Epoch p r; p)
