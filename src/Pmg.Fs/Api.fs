/// The library for C# (and any .NET language): experiments from named recipes changed by methods, training as a
/// Task with progress and cancellation, trained models that evaluate, predict and export, all in plain .NET types
/// (arrays, IReadOnlyList, nullable). F# scripts can use it too, but the modules it wraps are the F# surface.
namespace Pmg.Fs.Api

open System
open System.Collections.Generic
open System.IO
open System.Runtime.CompilerServices
open System.Runtime.InteropServices
open System.Threading
open System.Threading.Tasks
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open Pmg.Fs
open Pmg.Fs.Training

/// Named starting points for an experiment.
[<AbstractClass; Sealed>]
type Recipes =
    /// The main job: PMG fine-tuned from the ImageNet weights that ship (resnet18-mlnet) on the embedded dataset.
    static member Embedded: Experiment.Experiment = Experiment.embedded

    /// The paper's recipe (ResNet50, 448 px, 200 epochs, the reference's settings) for a dataset on disk:
    /// `dataset` is cub, cars, aircraft, dogs or folder; `root` its folder in the official layout. The dataset is
    /// indexed once to count its classes. ResNet50's ImageNet weights do not ship: set them with WithWeights.
    static member Paper(dataset: string, root: string) : Experiment.Experiment =
        let data = Experiment.OnDisk { Kind = Data.Dataset.parse dataset; Root = root }
        let d, _ = Run.openData data false
        Experiment.forData data d.Classes.Length

/// Changes of an experiment, each returning a new one; where one setting follows from another (the schedule
/// from the backbone, the resize from the crop, the backbone's learning rate from the heads'), it follows here as
/// it does for F# and the command line.
[<Extension; AbstractClass; Sealed>]
type ExperimentExtensions =
    /// Another backbone by name (resnet18-mlnet, resnet18, resnet34, resnet50, resnet101, resnet152, vgg16).
    [<Extension>]
    static member WithBackbone(e: Experiment.Experiment, name: string) = Experiment.withBackbone name e

    /// Epochs (warm-up is kept below them).
    [<Extension>]
    static member WithEpochs(e: Experiment.Experiment, epochs: int) = Experiment.withEpochs epochs e

    /// The crop size; the resize keeps the recipe's ratio.
    [<Extension>]
    static member WithImageSize(e: Experiment.Experiment, pixels: int) = Experiment.withImageSize pixels e

    /// The new layers' learning rate; the backbone's follows at a tenth.
    [<Extension>]
    static member WithLearningRate(e: Experiment.Experiment, lr: float) = Experiment.withLr lr e

    /// Granularity heads S.
    [<Extension>]
    static member WithHeads(e: Experiment.Experiment, heads: int) = Experiment.withHeads heads e

    /// Jigsaw grids per head, finest first (e.g. 8, 4, 2).
    [<Extension>]
    static member WithGrids(e: Experiment.Experiment, [<ParamArray>] grids: int[]) = Experiment.withGrids (List.ofArray grids) e

    /// Images per batch.
    [<Extension>]
    static member WithBatchSize(e: Experiment.Experiment, batchSize: int) = { e with BatchSize = batchSize }

    /// The seed of weights, data order, augmentation and jigsaws.
    [<Extension>]
    static member WithSeed(e: Experiment.Experiment, seed: int) = { e with Seed = seed }

    /// cpu, cuda or cuda:N.
    [<Extension>]
    static member WithDevice(e: Experiment.Experiment, device: string) = { e with Device = Runtime.Device.parse device }

    /// The backbone's starting weights: imagenet, none, or a file (torchvision .pth/.safetensors, ONNX ResNet).
    [<Extension>]
    static member WithWeights(e: Experiment.Experiment, weights: string) = { e with Weights = Model.Backbone.Weights.parse weights }

    /// The embedded dataset with another number of images per class (the same drawing otherwise).
    [<Extension>]
    static member WithEmbeddedImages(e: Experiment.Experiment, trainPerClass: int, testPerClass: int) =
        match e.Data with
        | Experiment.Embedded d -> { e with Data = Experiment.Embedded { d with TrainPerClass = trainPerClass; TestPerClass = testPerClass } }
        | Experiment.OnDisk _ -> invalidArg (nameof e) "WithEmbeddedImages: this experiment reads a dataset on disk"

    /// Why the experiment cannot run, one problem a line; empty when it can.
    [<Extension>]
    static member Problems(e: Experiment.Experiment) : IReadOnlyList<string> = Experiment.problems e |> List.toArray :> _

/// One trained epoch: accuracies in [0, 1], losses per schedule step (NaN for steps a warm-up epoch skipped).
[<Sealed>]
type EpochResult internal (r: Trainer.EpochRecord, epochs: int) =
    /// 1-based.
    member _.Epoch = r.Epoch + 1
    /// Epochs of the run.
    member _.Epochs = epochs
    /// Mean loss of each schedule step, as weighted in training.
    member _.StepLosses: IReadOnlyList<float> = List.toArray r.StepLosses :> _
    /// Top-1 of the last step (concat, whole images) on the training batches.
    member _.TrainAccuracy = r.TrainAccuracy
    /// Test top-1 of each granularity head, finest first.
    member _.TestHeads: IReadOnlyList<float> = List.toArray r.Test.Heads :> _
    /// Test top-1 of the concat classifier.
    member _.TestConcat = r.Test.Concat
    /// Test top-1 of the combined prediction (the sum of every output's logits).
    member _.TestCombined = r.Test.Combined
    /// Test top-5 of the combined prediction.
    member _.TestCombinedTop5 = r.Test.CombinedTop5
    /// Training speed.
    member _.ImagesPerSecond = r.ImagesPerSecond
    /// Training time of the epoch, evaluation not included.
    member _.Seconds = r.Seconds
    override _.ToString() = sprintf "epoch %d/%d: test combined %.1f%%" (r.Epoch + 1) epochs (100.0 * r.Test.Combined)

/// A finished (or resumed and finished) run.
[<Sealed>]
type RunResult internal (directory: string, s: Run.Summary, epochs: int) =
    /// The run folder.
    member _.Directory = directory
    /// The epochs this call trained (a resumed run: only the remaining ones).
    member _.Epochs: IReadOnlyList<EpochResult> = s.History |> List.map (fun r -> EpochResult(r, epochs)) |> List.toArray :> _
    /// 1-based epoch of the best combined test accuracy.
    member _.BestEpoch = s.BestEpoch + 1
    /// The best combined test top-1.
    member _.BestCombined = s.BestCombined
    /// best.ckpt: the weights of the best epoch.
    member _.BestCheckpoint = s.BestCheckpoint
    /// last.ckpt: what a resume continues from.
    member _.LastCheckpoint = s.LastCheckpoint

/// Training runs.
[<AbstractClass; Sealed>]
type Runs =
    /// Trains `experiment` into `runDirectory` on a worker thread. Progress gets every epoch. Cancelling stops
    /// within one batch with OperationCanceledException; the run keeps last.ckpt of its last finished epoch, and
    /// `resume: true` continues it with the same losses as an uninterrupted run. A folder holding a run is never
    /// overwritten: pass `resume: true` to continue it.
    static member TrainAsync
        (
            experiment: Experiment.Experiment,
            runDirectory: string,
            [<Optional; DefaultParameterValue(false)>] resume: bool,
            [<Optional; DefaultParameterValue(null: IProgress<EpochResult>)>] progress: IProgress<EpochResult>,
            [<Optional>] cancellationToken: CancellationToken
        ) : Task<RunResult> =
        let hooks =
            { Trainer.Hooks.None with
                Batch =
                    fun b ->
                        let epoch, batch, batches = b.Epoch, b.Batch, b.Batches
                        if cancellationToken.IsCancellationRequested then
                            raise (
                                OperationCanceledException(
                                    sprintf "training cancelled in epoch %d after batch %d of %d; %s keeps its last finished epoch: train again with resume to continue"
                                        (epoch + 1) batch batches runDirectory,
                                    cancellationToken
                                )
                            )
                Epoch =
                    fun _ r ->
                        if not (isNull progress) then progress.Report(EpochResult(r, experiment.Epochs)) }
        Task.Run(
            (fun () -> RunResult(runDirectory, Run.train experiment runDirectory resume hooks, experiment.Epochs)),
            cancellationToken
        )

/// A class and its softmax score (of the combined logits).
[<Struct>]
type ClassScore =
    { /// The class index.
      Class: int
      /// Its name.
      Name: string
      /// Its probability.
      Score: float32 }

/// Test accuracies of a trained model, in [0, 1].
[<Sealed>]
type Evaluation internal (a: Evaluate.Accuracy) =
    /// Test images evaluated.
    member _.Images = a.Images
    /// Top-1 of each granularity head, finest first.
    member _.Heads: IReadOnlyList<float> = List.toArray a.Heads :> _
    /// Top-1 of the concat classifier.
    member _.Concat = a.Concat
    /// Top-1 of the combined prediction.
    member _.Combined = a.Combined
    /// Top-5 of the combined prediction.
    member _.CombinedTop5 = a.CombinedTop5
    /// FGVC-Aircraft's official metric.
    member _.MeanPerClass = Evaluate.meanPerClass a
    /// Rows: true class, columns: combined prediction.
    member _.Confusion = Array2D.copy a.Confusion

/// A trained model: a Pmg.Fs checkpoint (.ckpt) or a reference PyTorch state_dict (.pth).
[<Sealed>]
type TrainedModel private (path: string, m: Inference.Model, device: Runtime.Device) =
    let classes = Inference.classNames path m.Net.Config.Classes

    /// Loads a checkpoint on a device (cpu, cuda, cuda:N). A .pth needs `backbone` and the image size it was
    /// trained at unless they are the paper's (resnet50, 448).
    static member Load
        (
            checkpoint: string,
            [<Optional; DefaultParameterValue("cpu")>] device: string,
            [<Optional; DefaultParameterValue(null: string)>] backbone: string,
            [<Optional>] imageSize: Nullable<int>
        ) =
        let d = Runtime.Device.parse device
        let o = { Inference.Overrides.None with Backbone = Option.ofObj backbone; ImageSize = Option.ofNullable imageSize }
        new TrainedModel(checkpoint, Inference.load checkpoint o d, d)

    /// Class names: the run's classes.txt beside the checkpoint, or the class numbers.
    member _.ClassNames: IReadOnlyList<string> = classes :> _
    /// The crop size the model takes (images are resized and centre-cropped to it).
    member _.ImageSize = m.Crop
    /// The backbone's name.
    member _.Backbone = m.Net.Config.Backbone

    /// The `topK` most likely classes of one image, most likely first.
    member _.Predict(image: Image<Rgb24>, [<Optional; DefaultParameterValue(5)>] topK: int) : ClassScore[] =
        let p = Inference.predict m image
        p.Probabilities
        |> Array.mapi (fun i s -> { Class = i; Name = classes.[i]; Score = s })
        |> Array.sortByDescending _.Score
        |> Array.truncate (max 1 topK)

    /// The same from an image file (JPEG, PNG, BMP, GIF, TIFF, WebP).
    member this.Predict(imageFile: string, [<Optional; DefaultParameterValue(5)>] topK: int) : ClassScore[] =
        use image = Data.Images.load { Path = imageFile; Label = 0; Box = None; TrimBottom = 0 } false
        this.Predict(image, topK)

    /// The same from a stream holding an encoded image.
    member this.Predict(image: Stream, [<Optional; DefaultParameterValue(5)>] topK: int) : ClassScore[] =
        use decoded = Image.Load<Rgb24> image
        this.Predict(decoded, topK)

    /// Every head's, concat's and the combined logits of one image, by output name (stage3 ... concat, combined).
    member _.Logits(image: Image<Rgb24>) : IReadOnlyDictionary<string, float32[]> =
        let p = Inference.predict m image
        dict (p.Heads @ [ "concat", p.Concat; "combined", p.Combined ]) |> Dictionary :> _

    /// Test accuracy on the test split of an experiment's data (e.g. Recipes.Embedded, or Recipes.Paper(...)).
    member _.Evaluate(data: Experiment.Experiment, [<Optional; DefaultParameterValue(16)>] batchSize: int) =
        Evaluation(Inference.evaluate m data.Data batchSize device)

    /// Writes the eval-mode network as ONNX, with the class names and preprocessing in its metadata.
    member _.ExportOnnx(path: string) = Inference.exportOnnx m classes path

    /// Writes a state_dict with the reference implementation's key names (.pth).
    member _.ExportPyTorch(path: string) =
        Interop.StateDict.export m.Net (Interop.Description.describe m.Net classes (Interop.Description.input m.Resize m.Crop)) path

    interface IDisposable with
        member _.Dispose() = m.Net.Dispose()

/// Images of the embedded dataset, to try a model without files.
[<AbstractClass; Sealed>]
type EmbeddedImages =
    /// Image `index` of the embedded dataset's training (`test: false`) or test split, as the main job draws it.
    static member Get(index: int, [<Optional; DefaultParameterValue(true)>] test: bool) : Image<Rgb24> =
        match Experiment.embedded.Data with
        | Experiment.Embedded config -> Data.Synthetic.render config (if test then Data.Synthetic.Test else Data.Synthetic.Train) index
        | Experiment.OnDisk _ -> invalidOp "the embedded recipe reads no files"

    /// The class of image `index` (the same in both splits).
    static member ClassOf(index: int) : int =
        match Experiment.embedded.Data with
        | Experiment.Embedded config -> Data.Synthetic.label config index
        | Experiment.OnDisk _ -> invalidOp "the embedded recipe reads no files"
