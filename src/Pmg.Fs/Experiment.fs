/// An experiment is a record: everything that decides a run, written to config.json and into checkpoints.
module Pmg.Fs.Experiment

open Pmg.Fs.Model

type Precision =
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

type Data =
    /// The embedded procedural dataset: no files needed.
    | Embedded of Data.Synthetic.Config
    /// A dataset on disk in its official layout.
    | OnDisk of OnDisk

/// A dataset on disk: its kind (cub, cars, aircraft, dogs, folder), root folder, and label level (FGVC-Aircraft:
/// variant, family or manufacturer).
and OnDisk = { Kind: string; Root: string; Level: string option }

type Input =
    { Resize: int
      Crop: int
      /// Zero padding of the random crop.
      Padding: int }

type Optim =
    { Lr: float
      BackboneLr: float
      Momentum: float
      WeightDecay: float }

type Experiment =
    { Model: Pmg.Config
      Schedule: Schedule.Step list
      Permutation: Jigsaw.Permutation
      Forward: ForwardMode
      Update: Update
      Optimizer: Optim
      Epochs: int
      /// Epochs at the start that train only the concat classifier on whole images (see Schedule.stepsAt).
      WarmupEpochs: int
      BatchSize: int
      Input: Input
      Seed: int
      Device: string
      Precision: Precision
      Data: Data
      CropToBox: bool
      /// The backbone's starting weights.
      Weights: Backbone.Weights
      Workers: int }

/// The paper's recipe (ResNet50, 550 -> 448, batch 16, SGD 0.002 / 0.0002, cosine, 200 epochs).
let paper (classes: int) (data: Data) : Experiment =
    { Model = Pmg.Config.Paper classes
      Schedule = Schedule.paper
      Permutation = Jigsaw.PerBatch
      Forward = Full
      Update = Progressive
      Optimizer = { Lr = 0.002; BackboneLr = 0.0002; Momentum = 0.9; WeightDecay = 5e-4 }
      Epochs = 200
      WarmupEpochs = 0
      BatchSize = 16
      Input = { Resize = 550; Crop = 448; Padding = 8 }
      Seed = 0
      Device = "cpu"
      Precision = Fp32
      Data = data
      CropToBox = false
      Weights = Backbone.Scratch
      Workers = max 1 (System.Environment.ProcessorCount - 1) }

/// The main job: PMG on the embedded dataset, sized to train on two CPU cores in about three minutes. The method
/// is the paper's (three heads on the last three stages, 8/4/2 jigsaws then concat x2, one SGD step per step,
/// cosine per epoch); what differs is sized for a from-scratch CPU run: ResNet18, 48 px crops, heads a quarter as
/// wide, BN momentum 0.1 in the conv blocks (0.01 lags behind over a few hundred iterations), one learning rate for
/// backbone and heads, four warm-up epochs of plain classification standing in for the ImageNet weights the paper
/// starts from (jigsaw steps on random features barely learn), and granularity steps that run the backbone only up
/// to their head (same gradients, a third less work).
let embedded: Experiment =
    let data = Data.Synthetic.Config.Default
    { paper data.Classes (Embedded data) with
        Model =
            { Pmg.Config.Paper data.Classes with
                Backbone = "resnet18"
                Head = { Heads.Config.Paper with FeatureSize = 128; BlockChannels = 256; BlockBnMomentum = 0.1 } }
        Forward = Truncated
        Optimizer = { Lr = 0.01; BackboneLr = 0.01; Momentum = 0.9; WeightDecay = 5e-4 }
        Epochs = 12
        WarmupEpochs = 4
        Input = { Resize = 56; Crop = 48; Padding = 4 } }

exception InvalidExperiment of string list

/// Every impossible setting at once, or the experiment unchanged.
let validate (e: Experiment) : Experiment =
    let problems =
        [ if e.Epochs < 1 then "epochs must be at least 1"
          if e.WarmupEpochs < 0 || e.WarmupEpochs >= e.Epochs then "warm-up epochs must be 0 or more and fewer than the epochs"
          if e.BatchSize < 2 then "batch size must be at least 2 (the classifiers' BatchNorm needs two samples)"
          if e.Input.Crop < 1 || e.Input.Resize < 1 then "image sizes must be positive"
          if e.Input.Crop > e.Input.Resize + 2 * e.Input.Padding then
              sprintf "crop %d is larger than resize %d plus padding" e.Input.Crop e.Input.Resize
          if e.Model.Classes < 2 then "a classifier needs at least 2 classes"
          if e.Schedule.IsEmpty then "the schedule has no steps"
          for s in e.Schedule do
              if s.Grid < 1 then sprintf "jigsaw grid %d: must be at least 1" s.Grid
              match s.Head with
              | Pmg.Granularity i when i < 0 || i >= e.Model.Heads ->
                  sprintf "a step trains head %d but the model has %d heads" i e.Model.Heads
              | _ -> ()
          if e.Optimizer.Lr <= 0.0 || e.Optimizer.BackboneLr < 0.0 then "learning rates must be positive"
          if e.Device <> "cpu" && e.Device <> "cuda" && not (e.Device.StartsWith "cuda:") then
              sprintf "device '%s': use cpu or cuda" e.Device
          if e.Workers < 1 then "workers must be at least 1" ]
    if problems.IsEmpty then e else raise (InvalidExperiment problems)
