/// `pmg train`'s flags as the library's training settings: shared by the command and the dataset scripts
/// (experiments/Common.fsx loads this file), so both read the same flags by the same rules.
module Pmg.Cli.TrainSettings

open Argu
open Pmg.Fs.App
open Pmg.Cli.Args

/// The settings the flags give.
let settingsOf (a: ParseResults<TrainArgs>) : Training.Settings =
    { Dataset = a.TryGetResult TrainArgs.Dataset
      Root = a.TryGetResult TrainArgs.Root
      Level = a.TryGetResult TrainArgs.Level
      Backbone = a.TryGetResult TrainArgs.Backbone
      Epochs = a.TryGetResult TrainArgs.Epochs
      WarmupEpochs = a.TryGetResult TrainArgs.Warmup_Epochs
      BatchSize = a.TryGetResult TrainArgs.Batch_Size
      ImageSize = a.TryGetResult TrainArgs.Image_Size
      Resize = a.TryGetResult TrainArgs.Resize
      LearningRate = a.TryGetResult TrainArgs.Lr
      BackboneLearningRate = a.TryGetResult TrainArgs.Backbone_Lr
      Heads = a.TryGetResult TrainArgs.Heads
      Grids = a.TryGetResult TrainArgs.Grids |> Option.map (positiveInts "--grids")
      PerSampleJigsaw = a.Contains TrainArgs.Per_Sample_Jigsaw
      PatchOrder = a.TryGetResult TrainArgs.Patch_Order
      BatchNormGroup = a.TryGetResult TrainArgs.Bn_Group
      PartialBatches = a.TryGetResult TrainArgs.Partial_Batches
      Forward = a.TryGetResult TrainArgs.Forward
      Update = a.TryGetResult TrainArgs.Update
      Precision = a.TryGetResult TrainArgs.Precision
      Seed = a.TryGetResult TrainArgs.Seed
      Device = a.TryGetResult TrainArgs.Device
      Weights = a.TryGetResult TrainArgs.Pretrained
      Init = a.TryGetResult TrainArgs.Init
      CropToBox = a.Contains TrainArgs.Crop_To_Box
      Workers = a.TryGetResult TrainArgs.Workers
      Distributed = a.TryGetResult TrainArgs.Distributed }

