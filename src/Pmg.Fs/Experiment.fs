/// An experiment is a record: everything that decides a run, written to config.json and into checkpoints. This
/// module is the one place recipes live: the paper's, the embedded main job's, and the rules that derive one
/// setting from another (the backbone's learning rate from the heads', the resize from the crop, the schedule from
/// the backbone and S). The CLI and the scripts only parse, call these and print.
module Pmg.Fs.Experiment

open System
open Pmg.Fs.Model
open Pmg.Fs.Runtime
open Pmg.Fs.Data

/// Numeric precision of training.
type Precision =
    /// Everything in fp32.
    | Fp32
    /// bf16 compute with fp32 master weights (mixed precision).
    | Bf16

/// How a granularity step computes its output.
type ForwardMode =
    /// The whole network runs every step, as the reference does (every BN's running statistics see every step).
    | Full
    /// Only the backbone up to the head's stage runs: less work, same gradients.
    | Truncated

/// How an iteration turns its steps into parameter updates.
type Update =
    /// The paper's progressive training: every step has its own forward, loss, backward and optimizer step.
    | Progressive
    /// The ablation "all granularities at once": every step's forward on its own jigsaw, the weighted losses
    /// summed, one backward and one optimizer step per iteration.
    | Joint

/// Where a run's images come from.
type Data =
    /// The embedded procedural dataset: no files needed.
    | Embedded of Synthetic.Config
    /// A dataset on disk in its official layout.
    | OnDisk of OnDisk

/// A dataset on disk: its kind (with FGVC-Aircraft's label level) and root folder.
and OnDisk = { Kind: Dataset.Kind; Root: string }

/// Image sizes of the transforms, in pixels.
type Input =
    { /// Side of the square every image is resized to first.
      Resize: int
      /// Side of the square crop the network sees.
      Crop: int
      /// Zero padding of the random crop.
      Padding: int }

/// SGD settings.
type Optim =
    { /// Base learning rate of every layer outside the backbone (the new layers), annealed by the cosine schedule.
      Lr: float
      /// Base learning rate of the backbone, annealed likewise.
      BackboneLr: float
      /// SGD momentum.
      Momentum: float
      /// L2 weight decay: this times each weight is added to its gradient.
      WeightDecay: float }

/// Everything that decides a run.
type Experiment =
    { /// The network's shape: backbone, heads and classes.
      Model: Pmg.Config
      /// The steps of each iteration (see Schedule).
      Schedule: Schedule.Step list
      /// One jigsaw permutation per batch, or one per image.
      Permutation: Jigsaw.Permutation
      /// Which patch permutations: the reference's cycles, or any.
      JigsawDraw: Jigsaw.Draw
      /// How much of the network a granularity step runs.
      Forward: ForwardMode
      /// Progressive (the paper) or joint updates.
      Update: Update
      /// Learning rates and SGD settings.
      Optimizer: Optim
      /// Training epochs; the learning rate follows a cosine over them.
      Epochs: int
      /// Epochs at the start that train only the concat classifier on whole images (see Schedule.stepsAt).
      WarmupEpochs: int
      /// Images per training batch.
      BatchSize: int
      /// Every BatchNorm normalises over sub-batches of this many images while training, running statistics from
      /// the first: the reference trains under nn.DataParallel on two GPUs, so its batch of 16 is two of 8.
      /// None: the whole batch.
      BatchNormGroup: int option
      /// A last batch smaller than BatchSize is skipped, as the reference does; otherwise trained (2 images or more).
      DropLast: bool
      /// Resize, crop and padding.
      Input: Input
      /// Seed of weight initialisation, data order, augmentation and jigsaw permutations.
      Seed: int
      /// Where training runs; a resumed run may change it.
      Device: Device
      /// fp32, or bf16 mixed precision.
      Precision: Precision
      /// The dataset.
      Data: Data
      /// Cut each image to its annotated object box, where the dataset has one.
      CropToBox: bool
      /// The backbone's starting weights.
      Weights: Backbone.Weights
      /// A whole PMG model (our checkpoint, or a state_dict with the reference's names) that every weight starts
      /// from instead: fine-tuning a trained model on new data. None: the backbone's weights and fresh heads.
      Init: string option
      /// Threads that decode and transform images; a resumed run may change it.
      Workers: int
      /// The engine that spreads training over processes (one per GPU or core group, started by mpirun); None:
      /// one process. Mpi and Nccl compute the same, so a resumed run may change it.
      Collective: Collective.Backend option
      /// K, the number of processes that trained the run, set from the communicator when the run starts; None: one.
      /// Each iteration's batch is split K ways (Collective.part) and BatchNorm normalises each process's part, so
      /// a run resumes only with the same K.
      Ranks: int option }

/// The paper's backbone learning rate is a tenth of the new layers' (0.0002 and 0.002).
let backboneLrFactor = 0.1

/// The paper resizes to 550 and crops 448.
let private paperInput = { Resize = 550; Crop = 448; Padding = 8 }

/// The paper's recipe (ResNet50 from ImageNet weights, 550 -> 448, batch 16, SGD 0.002 / 0.0002, cosine, 200
/// epochs).
let paper (classes: int) (data: Data) : Experiment =
    { Model = Pmg.Config.Paper classes
      Schedule = Schedule.paper
      Permutation = Jigsaw.PerBatch
      JigsawDraw = Jigsaw.Cycle
      Forward = Full
      Update = Progressive
      Optimizer = { Lr = 0.002; BackboneLr = 0.002 * backboneLrFactor; Momentum = 0.9; WeightDecay = 5e-4 }
      Epochs = 200
      WarmupEpochs = 0
      BatchSize = 16
      BatchNormGroup = Some 8
      DropLast = true
      Input = paperInput
      Seed = 0
      Device = Cpu
      Precision = Fp32
      Data = data
      CropToBox = false
      // ResNet50 from torchvision's ImageNet file, from PyTorch's hub cache or downloaded there (Interop.Hub).
      Weights = Backbone.ImageNet
      Init = None
      Workers = max 1 (Environment.ProcessorCount - 1)
      Collective = None
      Ranks = None }

/// The main job: PMG as published (three heads on the last three stages, 8/4/2 jigsaws then concat x2, one SGD
/// step per step, cosine per epoch) fine-tuned from the ImageNet weights that ship with the project, on the
/// embedded dataset, sized for two CPU cores (about 3.5 minutes of training): resnet18-mlnet, 64 px crops (an 8x8
/// patch is 8 px, one cell of conv3_x's output), heads a quarter as wide (128/256), BN momentum 0.1 in the conv
/// blocks (0.01 lags behind over 160 iterations), granularity steps that run the backbone only up to their head
/// (same gradients, less work), 8 epochs, learning rates 0.01 (new layers) and 0.003 (backbone). Two settings
/// differ from the paper recipe's reference behaviour: patches are shuffled by any permutation (the paper's text)
/// rather than the reference code's cycles, and BatchNorm normalises the whole batch rather than the two GPUs'
/// halves; at this size and length the reference's cycles trained more slowly (see the README).
let embedded: Experiment =
    let crop = 64
    let data = { Synthetic.Config.Default with ImageSize = crop + crop / 8 }
    { paper data.Classes (Embedded data) with
        Model =
            { Pmg.Config.Paper data.Classes with
                Backbone = "resnet18-mlnet"
                Head = { Heads.Config.Paper with FeatureSize = 128; BlockChannels = 256; BlockBnMomentum = 0.1 } }
        Schedule = Schedule.progressive (Backbone.find "resnet18-mlnet") 3
        JigsawDraw = Jigsaw.Uniform
        BatchNormGroup = None
        Forward = Truncated
        Optimizer = { Lr = 0.01; BackboneLr = 0.003; Momentum = 0.9; WeightDecay = 5e-4 }
        Epochs = 8
        Input = { Resize = data.ImageSize; Crop = crop; Padding = 4 }
        Weights = Backbone.ImageNet }

/// The recipe for a dataset: the embedded main job, or the paper's for the classes a dataset on disk has.
let forData (data: Data) (classes: int) : Experiment =
    match data with
    | Embedded d -> { embedded with Data = data; Model = { embedded.Model with Classes = d.Classes } }
    | OnDisk _ -> paper classes data

// ---- Changing a recipe: each rule that ties one setting to another lives here. ----------------------------

/// Another backbone: the progressive schedule follows its stage list.
let withBackbone (name: string) (e: Experiment) : Experiment =
    let spec = Backbone.find name
    { e with Model = { e.Model with Backbone = spec.Name }; Schedule = Schedule.progressive spec e.Model.Heads }

/// S granularity heads on the last S stages, with the paper's grids for them.
let withHeads (heads: int) (e: Experiment) : Experiment =
    { e with Model = { e.Model with Heads = heads }; Schedule = Schedule.progressive (Backbone.find e.Model.Backbone) heads }

/// Chosen jigsaw grids for the heads, finest first; concat keeps its step and weight.
let withGrids (grids: int list) (e: Experiment) : Experiment =
    if grids.Length <> e.Model.Heads then
        Errors.setting Setting.Grids (sprintf "%d grids for %d heads: give one grid per head, finest first" grids.Length e.Model.Heads)
    let concatWeight =
        e.Schedule |> List.tryFind (fun s -> s.Head = Pmg.Concat) |> Option.map _.LossWeight |> Option.defaultValue 2.0
    { e with Schedule = Schedule.withGrids (Backbone.find e.Model.Backbone) grids concatWeight }

/// Crop size in pixels; the resize keeps the recipe's ratio (550/448 in the paper's).
let withImageSize (crop: int) (e: Experiment) : Experiment =
    let resize = int (Math.Round(float crop * float e.Input.Resize / float e.Input.Crop))
    { e with Input = { e.Input with Crop = crop; Resize = resize } }

/// The paper's baseline: the plain backbone with one classifier on its last stage's features, trained on whole
/// images (one head, whose concat classifier alone is trained).
let plainBaseline (e: Experiment) : Experiment =
    let e = withHeads 1 e
    { e with Schedule = [ { Head = Pmg.Concat; Grid = 1; LossWeight = 1.0 } ] }

/// The resize side in pixels, leaving the crop as it is.
let withResize (resize: int) (e: Experiment) : Experiment = { e with Input = { e.Input with Resize = resize } }

/// The new layers' learning rate; the backbone's follows at the paper's ratio.
let withLr (lr: float) (e: Experiment) : Experiment =
    { e with Optimizer = { e.Optimizer with Lr = lr; BackboneLr = lr * backboneLrFactor } }

/// The backbone's learning rate alone, leaving the new layers' as it is.
let withBackboneLr (lr: float) (e: Experiment) : Experiment = { e with Optimizer = { e.Optimizer with BackboneLr = lr } }

/// Epochs; warm-up epochs are kept fewer than the epochs.
let withEpochs (epochs: int) (e: Experiment) : Experiment =
    { e with Epochs = epochs; WarmupEpochs = max 0 (min e.WarmupEpochs (epochs - 1)) }

/// The dataset's name: embedded, cub, cars, aircraft, dogs or folder.
let dataName (e: Experiment) : string =
    match e.Data with
    | Embedded _ -> "embedded"
    | OnDisk d -> Dataset.name d.Kind

/// The name a run folder starts with: the dataset and the backbone.
let runName (e: Experiment) : string = sprintf "%s-%s" (dataName e) e.Model.Backbone

// ---- Checking --------------------------------------------------------------------------------------------

/// Whether a backbone takes crops of `crop` px as they are. ConvNeXt's stem and downsampling convolutions would
/// drop the rows and columns that do not fill their stride, so the crop must be a multiple of the deepest stride
/// (32); Swin's windows must also tile every stage's map, or its attention would run over zero padding (torchvision
/// 0.14 pads a map to whole windows, smaller maps included). ResNet and VGG take any size.
let private fitsBackbone (spec: Backbone.Spec) (crop: int) : bool =
    let deepest = (Backbone.stages spec |> List.last).Reduction
    match spec.Family with
    | Backbone.ResNet _
    | Backbone.Vgg _ -> true
    | Backbone.ConvNeXt _ -> crop % deepest = 0
    | Backbone.Swin c ->
        crop % deepest = 0
        && Backbone.stages spec |> List.forall (fun st -> crop / st.Reduction % c.Window = 0)

/// The input-size rule of a backbone, as a problem naming the nearest sizes that fit; None when `crop` fits.
let private backboneSizeProblem (spec: Backbone.Spec) (crop: int) : string option =
    if crop < 1 || fitsBackbone spec crop then None
    else
        let below = seq { crop - 1 .. -1 .. 1 } |> Seq.tryFind (fitsBackbone spec)
        let above = seq { crop + 1 .. crop * 64 + 4096 } |> Seq.tryFind (fitsBackbone spec)
        let nearest = [ below; above ] |> List.choose id |> List.map (sprintf "%d px") |> String.concat " or "
        let why =
            match spec.Family with
            | Backbone.Swin c -> sprintf "a multiple of 32 whose every stage map is a multiple of the %d-token window" c.Window
            | _ -> "a multiple of its deepest stride, 32"
        Some(sprintf "image size %d px does not fit %s, which needs %s: use %s" crop spec.Name why nearest)

/// Every impossible setting at once, each with the setting it concerns (empty when there is none).
let problems (e: Experiment) : (Setting * string) list =
    match Backbone.registry.TryFind(e.Model.Backbone.ToLowerInvariant()) with
    | None -> [ Setting.Backbone, sprintf "unknown backbone '%s'; choose one of: %s" e.Model.Backbone (String.concat ", " Backbone.registry.Keys) ]
    | Some spec ->
    let stages = Backbone.stages spec |> List.length
    let headStages =
        if e.Model.Heads >= 1 && e.Model.Heads <= stages - 1 then Backbone.headStages spec e.Model.Heads |> List.map fst else []
    let finite (x: float) = Double.IsFinite x
    [ if e.Epochs < 1 then Setting.Epochs, sprintf "epochs %d: must be at least 1" e.Epochs
      if e.WarmupEpochs < 0 || e.WarmupEpochs >= e.Epochs then
          Setting.WarmupEpochs, sprintf "warm-up epochs %d: must be 0 or more and fewer than the %d epochs" e.WarmupEpochs e.Epochs
      if e.BatchSize < 2 then Setting.BatchSize, sprintf "batch size %d: must be at least 2 (the classifiers' BatchNorm needs two samples)" e.BatchSize
      match e.BatchNormGroup with
      | Some k when k < 2 -> Setting.BatchNormGroup, sprintf "BatchNorm groups of %d images: need at least 2" k
      | _ -> ()
      if e.Input.Crop < 1 then Setting.ImageSize, sprintf "image size %d: must be positive" e.Input.Crop
      match backboneSizeProblem spec e.Input.Crop with
      | Some why -> Setting.ImageSize, why
      | None -> ()
      if e.Input.Resize < 1 then Setting.Resize, sprintf "resize %d: must be positive" e.Input.Resize
      if e.Input.Padding < 0 then Setting.Padding, sprintf "padding %d: must be 0 or more" e.Input.Padding
      if e.Input.Crop >= 1 && e.Input.Crop > e.Input.Resize + 2 * e.Input.Padding then
          Setting.ImageSize, sprintf "crop %d px is larger than the resize %d px plus padding: resize to at least %d px" e.Input.Crop e.Input.Resize (e.Input.Crop - 2 * e.Input.Padding)
      if e.Model.Classes < 2 then Setting.Classes, sprintf "%d classes: a classifier needs at least 2" e.Model.Classes
      if e.Model.Heads < 1 || e.Model.Heads > stages - 1 then
          Setting.Heads, sprintf "heads %d: must be 1..%d for %s (heads sit on the last stages, never the stem)" e.Model.Heads (stages - 1) e.Model.Backbone
      if e.Schedule.IsEmpty then Setting.Grids, "the schedule has no steps"
      for s in e.Schedule do
          if s.Grid < 1 then Setting.Grids, sprintf "jigsaw grid %d: must be at least 1" s.Grid
          elif s.Grid > e.Input.Crop then
              Setting.ImageSize, sprintf "jigsaw grid %d on %d px crops: patches would be empty; use crops of at least %d px" s.Grid e.Input.Crop s.Grid
          if not (finite s.LossWeight) || s.LossWeight < 0.0 then Setting.Grids, sprintf "loss weight %g of step %s: must be a number, 0 or more" s.LossWeight (Schedule.stepName s)
          match s.Head with
          | Pmg.Stage l when not headStages.IsEmpty && not (headStages |> List.contains l) ->
              Setting.Heads, sprintf "a step trains a head on stage %d, but the heads read stages %s" l (headStages |> List.map string |> String.concat ", ")
          | _ -> ()
      if not (finite e.Optimizer.Lr) || e.Optimizer.Lr <= 0.0 then
          Setting.LearningRate, sprintf "learning rate %g: must be a positive number" e.Optimizer.Lr
      if not (finite e.Optimizer.BackboneLr) || e.Optimizer.BackboneLr < 0.0 then
          Setting.BackboneLearningRate, sprintf "backbone learning rate %g: must be a number, 0 or more (0 freezes the backbone)" e.Optimizer.BackboneLr
      if not (finite e.Optimizer.Momentum) || e.Optimizer.Momentum < 0.0 || e.Optimizer.Momentum >= 1.0 then
          Setting.LearningRate, sprintf "momentum %g: must be in [0, 1)" e.Optimizer.Momentum
      if not (finite e.Optimizer.WeightDecay) || e.Optimizer.WeightDecay < 0.0 then
          Setting.LearningRate, sprintf "weight decay %g: must be a number, 0 or more" e.Optimizer.WeightDecay
      if e.Workers < 1 then Setting.Workers, sprintf "workers %d: must be at least 1" e.Workers
      match e.Ranks with
      | Some k when k > 1 && e.BatchSize >= 2 ->
          // torch.chunk's split: ceil(B/K) images a process, the last processes fewer (BatchNorm needs two).
          let fewest = [ for r in 0 .. k - 1 -> snd (Collective.part e.BatchSize k r) ] |> List.min
          if fewest < 2 then
              Setting.BatchSize,
              sprintf "batch size %d over %d processes gives a process %d images (each takes ceil(%d/%d), the last ones what is left); every process needs 2 or more: use a batch size that is a multiple of %d and at least %d, or fewer processes"
                  e.BatchSize k fewest e.BatchSize k k (2 * k)
      | Some k when k < 1 -> Setting.Distributed, sprintf "%d processes: must be at least 1" k
      | _ -> ()
      match e.Collective, e.Device with
      | Some Collective.Nccl, Cpu -> Setting.Distributed, "the NCCL backend needs a CUDA device: choose the mpi backend for the CPU"
      | _ -> ()
      match e.Data with
      | Embedded d when d.Classes < 2 || d.Classes > Synthetic.maxClasses ->
          Setting.Classes, sprintf "%d embedded classes: must be 2..%d" d.Classes Synthetic.maxClasses
      | Embedded d when d.TrainPerClass < 1 || d.TestPerClass < 1 ->
          Setting.Dataset, sprintf "the embedded dataset needs at least one training and one test image a class (%d and %d)" d.TrainPerClass d.TestPerClass
      | _ -> () ]

/// The experiment unchanged, or InvalidExperiment with every problem.
let validate (e: Experiment) : Experiment =
    match problems e with
    | [] -> e
    | ps -> Errors.fail (InvalidExperiment ps)

/// Fields that change how fast a run goes, not what it learns: a resumed run may change them.
let private speedOnly = set [ "Workers"; "Device"; "Collective" ]

/// The data with its root folder resolved (absolute, links followed, no trailing separator), so that two spellings
/// of one folder are one value.
let resolveData (data: Data) : Data =
    match data with
    | OnDisk d -> OnDisk { d with Root = Files.resolve d.Root }
    | Embedded _ -> data

/// The fields (dotted paths into nested records) whose values differ, with the value in `a` and in `b`, ignoring
/// the speed-only ones; dataset folders are compared after resolving them.
let differences (a: Experiment) (b: Experiment) : (string * string * string) list =
    let rec diff (path: string) (t: Type) (x: obj) (y: obj) =
        if Reflection.FSharpType.IsRecord t then
            Reflection.FSharpType.GetRecordFields t
            |> Array.toList
            |> List.collect (fun f ->
                let name = if path = "" then f.Name else path + "." + f.Name
                if path = "" && speedOnly.Contains f.Name then []
                else diff name f.PropertyType (f.GetValue x) (f.GetValue y))
        else
            let vx, vy = Json.line x, Json.line y
            if vx = vy then [] else [ path, vx, vy ]
    diff "" typeof<Experiment> (box { a with Data = resolveData a.Data }) (box { b with Data = resolveData b.Data })
