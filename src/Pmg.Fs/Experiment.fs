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
      /// Threads that decode and transform images; a resumed run may change it.
      Workers: int }

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
      Workers = max 1 (Environment.ProcessorCount - 1) }

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

/// Raised with every problem of an impossible experiment, one message each.
exception InvalidExperiment of string list

/// Chosen jigsaw grids for the heads, finest first; concat keeps its step and weight.
let withGrids (grids: int list) (e: Experiment) : Experiment =
    if grids.Length <> e.Model.Heads then
        raise (InvalidExperiment [ sprintf "%d grids for %d heads: give one grid per head, finest first" grids.Length e.Model.Heads ])
    let concatWeight =
        e.Schedule |> List.tryFind (fun s -> s.Head = Pmg.Concat) |> Option.map _.LossWeight |> Option.defaultValue 2.0
    { e with Schedule = Schedule.withGrids grids concatWeight }

/// Crop size in pixels; the resize keeps the recipe's ratio (550/448 in the paper's).
let withImageSize (crop: int) (e: Experiment) : Experiment =
    let resize = int (Math.Round(float crop * float e.Input.Resize / float e.Input.Crop))
    { e with Input = { e.Input with Crop = crop; Resize = resize } }

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

/// Every impossible setting at once (empty when there is none).
let problems (e: Experiment) : string list =
    let stages = Backbone.find e.Model.Backbone |> Backbone.stages |> List.length
    [ if e.Epochs < 1 then "epochs must be at least 1"
      if e.WarmupEpochs < 0 || e.WarmupEpochs >= e.Epochs then "warm-up epochs must be 0 or more and fewer than the epochs"
      if e.BatchSize < 2 then "batch size must be at least 2 (the classifiers' BatchNorm needs two samples)"
      match e.BatchNormGroup with
      | Some k when k < 2 -> sprintf "BatchNorm groups of %d: need at least 2 images" k
      | _ -> ()
      if e.Input.Crop < 1 || e.Input.Resize < 1 then "image sizes must be positive"
      if e.Input.Crop > e.Input.Resize + 2 * e.Input.Padding then
          sprintf "crop %d is larger than resize %d plus padding" e.Input.Crop e.Input.Resize
      if e.Model.Classes < 2 then "a classifier needs at least 2 classes"
      if e.Model.Heads < 1 || e.Model.Heads > stages - 1 then
          sprintf "heads must be 1..%d for %s, got %d" (stages - 1) e.Model.Backbone e.Model.Heads
      if e.Schedule.IsEmpty then "the schedule has no steps"
      for s in e.Schedule do
          if s.Grid < 1 then sprintf "jigsaw grid %d: must be at least 1" s.Grid
          elif s.Grid > e.Input.Crop then
              sprintf "jigsaw grid %d on %d px crops: patches would be empty; use crops of at least %d px" s.Grid e.Input.Crop s.Grid
          match s.Head with
          | Pmg.Granularity i when i < 0 || i >= e.Model.Heads ->
              sprintf "a step trains head %d but the model has %d heads" i e.Model.Heads
          | _ -> ()
      if e.Optimizer.Lr <= 0.0 || e.Optimizer.BackboneLr < 0.0 then "the learning rate must be positive and the backbone's not negative (0 freezes the backbone)"
      if e.Workers < 1 then "workers must be at least 1" ]

/// The experiment unchanged, or InvalidExperiment with every problem.
let validate (e: Experiment) : Experiment =
    match problems e with
    | [] -> e
    | ps -> raise (InvalidExperiment ps)

/// Fields that change how fast a run goes, not what it learns: a resumed run may change them.
let private speedOnly = set [ "Workers"; "Device" ]

/// The fields (dotted paths into nested records) whose values differ, ignoring the speed-only ones.
let differences (a: Experiment) (b: Experiment) : string list =
    let rec diff (path: string) (t: Type) (x: obj) (y: obj) =
        if Reflection.FSharpType.IsRecord t then
            Reflection.FSharpType.GetRecordFields t
            |> Array.toList
            |> List.collect (fun f ->
                let name = if path = "" then f.Name else path + "." + f.Name
                if path = "" && speedOnly.Contains f.Name then []
                else diff name f.PropertyType (f.GetValue x) (f.GetValue y))
        elif Json.line x = Json.line y then []
        else [ path ]
    diff "" typeof<Experiment> (box a) (box b)
