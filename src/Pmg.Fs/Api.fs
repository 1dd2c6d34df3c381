/// The library for C# (and any .NET language), in plain .NET shapes: an immutable `Experiment` changed by `With*`
/// methods, training as a Task with per-batch and per-epoch progress and cancellation, trained models (TorchSharp)
/// and exported ONNX models (ONNX Runtime only) that predict, and `PmgException` (namespace Pmg.Fs) for every
/// failure. Each member calls the application layer (Pmg.Fs.App) once: the rules live there, not here.
namespace Pmg.Fs.Api

open System
open System.Collections.Generic
open System.IO
open System.Runtime.InteropServices
open System.Threading
open System.Threading.Tasks
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open Pmg.Fs
open Pmg.Fs.App
open Pmg.Fs.Training

module E = Pmg.Fs.Experiment

/// One step of the progressive schedule: the output it trains, its jigsaw grid and its loss weight.
[<Sealed>]
type ScheduleStep internal (s: Schedule.Step) =
    /// The output trained: "stage3", "stage4", "stage5" ... or "concat".
    member _.Output = Model.Pmg.outputName s.Head
    /// Patches per side of the jigsaw (1: the whole image).
    member _.Grid = s.Grid
    /// Factor on the step's loss.
    member _.LossWeight = s.LossWeight
    override _.ToString() = Schedule.stepName s

/// Everything that decides a run, immutable: every `With*` returns a changed copy, and where one setting follows
/// from another (the schedule from the backbone and heads, the resize from the crop, the backbone's learning rate
/// from the new layers') it follows as it does on the command line.
/// <exception cref="T:Pmg.Fs.InvalidSettingsException">A `With*` value the experiment cannot take.</exception>
[<Sealed>]
type Experiment internal (e: E.Experiment) =
    member internal _.Value = e
    /// The backbone's name.
    member _.Backbone = e.Model.Backbone
    /// Training epochs.
    member _.Epochs = e.Epochs
    /// Classes the model predicts.
    member _.Classes = e.Model.Classes
    /// Granularity heads.
    member _.Heads = e.Model.Heads
    /// Side of the crop the network sees, in pixels.
    member _.ImageSize = e.Input.Crop
    /// Side images are resized to before cropping, in pixels.
    member _.Resize = e.Input.Resize
    /// Images per batch.
    member _.BatchSize = e.BatchSize
    /// The new layers' base learning rate.
    member _.LearningRate = e.Optimizer.Lr
    /// The backbone's base learning rate.
    member _.BackboneLearningRate = e.Optimizer.BackboneLr
    /// Images per BatchNorm group while training; null: the whole batch.
    member _.BatchNormGroup: Nullable<int> = match e.BatchNormGroup with Some k -> Nullable k | None -> Nullable()
    /// The device: cpu, cuda or cuda:N.
    member _.Device = Runtime.Device.text e.Device
    /// The engine between the processes of a distributed run: none, mpi or nccl.
    member _.Distributed = Runtime.Collective.name e.Collective
    /// Where the backbone's weights come from: imagenet, none, or a file.
    member _.Weights =
        match e.Weights with
        | Model.Backbone.ImageNet -> "imagenet"
        | Model.Backbone.Scratch -> "none"
        | Model.Backbone.File f -> f
    /// The dataset: embedded, cub, cars, aircraft, dogs or folder.
    member _.Dataset = E.dataName e
    /// The seed.
    member _.Seed = e.Seed
    /// The progressive schedule's steps, in order.
    member _.Schedule: IReadOnlyList<ScheduleStep> = e.Schedule |> List.map ScheduleStep |> List.toArray :> _

    member private _.With(f: E.Experiment -> E.Experiment) = Experiment(f e)

    /// Another backbone by name (resnet18-mlnet, resnet18, resnet34, resnet50, resnet101, resnet152, vgg16).
    member this.WithBackbone(name: string) = this.With(E.withBackbone name)
    /// Epochs (warm-up is kept below them).
    member this.WithEpochs(epochs: int) = this.With(E.withEpochs epochs)
    /// First epochs that train only the concat classifier on whole images.
    member this.WithWarmupEpochs(epochs: int) = this.With(fun e -> { e with WarmupEpochs = epochs })
    /// Images per batch.
    member this.WithBatchSize(batchSize: int) = this.With(fun e -> { e with BatchSize = batchSize })
    /// The crop size in pixels; the resize keeps the recipe's ratio.
    member this.WithImageSize(pixels: int) = this.With(E.withImageSize pixels)
    /// The resize side in pixels, the crop unchanged.
    member this.WithResize(pixels: int) = this.With(E.withResize pixels)
    /// The new layers' learning rate; the backbone's follows at a tenth.
    member this.WithLearningRate(lr: float) = this.With(E.withLr lr)
    /// The backbone's learning rate alone (0 freezes it).
    member this.WithBackboneLearningRate(lr: float) = this.With(E.withBackboneLr lr)
    /// Granularity heads S, on the last S stages, with the paper's grids.
    member this.WithHeads(heads: int) = this.With(E.withHeads heads)
    /// Jigsaw grids per head, finest first (e.g. 8, 4, 2).
    member this.WithGrids([<ParamArray>] grids: int[]) = this.With(E.withGrids (List.ofArray grids))
    /// BatchNorm normalises groups of this many images while training (the reference's two GPUs: 8); null: the
    /// whole batch.
    member this.WithBatchNormGroup(images: Nullable<int>) = this.With(fun e -> { e with BatchNormGroup = Option.ofNullable images })
    /// Train a last batch smaller than the batch size (true), or skip it as the reference does (false).
    member this.WithPartialBatches(train: bool) = this.With(fun e -> { e with DropLast = not train })
    /// "cycle" (every patch moves, as the reference) or "uniform" (any permutation).
    member this.WithPatchOrder(order: string) =
        this.With(fun e -> { e with JigsawDraw = Training.choose Setting.PatchOrder [ "cycle", Jigsaw.Cycle; "uniform", Jigsaw.Uniform ] order })
    /// One patch permutation per image (true) or per batch (false, as the reference).
    member this.WithPerSampleJigsaw(perSample: bool) =
        this.With(fun e -> { e with Permutation = (if perSample then Jigsaw.PerSample else Jigsaw.PerBatch) })
    /// "full" (every step runs the whole network) or "truncated" (granularity steps stop at their stage).
    member this.WithForward(mode: string) =
        this.With(fun e -> { e with Forward = Training.choose Setting.Forward [ "full", E.Full; "truncated", E.Truncated ] mode })
    /// "progressive" (the paper) or "joint" (all steps' losses in one update).
    member this.WithUpdate(mode: string) =
        this.With(fun e -> { e with Update = Training.choose Setting.Update [ "progressive", E.Progressive; "joint", E.Joint ] mode })
    /// "fp32" or "bf16" (mixed precision).
    member this.WithPrecision(precision: string) =
        this.With(fun e -> { e with Precision = Training.choose Setting.Precision [ "fp32", E.Fp32; "bf16", E.Bf16 ] precision })
    /// The seed of weights, data order, augmentation and jigsaws.
    member this.WithSeed(seed: int) = this.With(fun e -> { e with Seed = seed })
    /// cpu, cuda or cuda:N.
    member this.WithDevice(device: string) =
        this.With(fun e ->
            { e with Device = Runtime.Device.parse device })
    /// The backbone's starting weights: "imagenet", "none", or a file (torchvision .pth/.safetensors, a Pmg.Fs
    /// checkpoint, an ONNX ResNet).
    member this.WithWeights(weights: string) = this.With(fun e -> { e with Weights = Model.Backbone.Weights.parse weights })
    /// A whole trained PMG model to start every weight from (fine-tuning); null: none.
    member this.WithInitialModel(path: string) =
        this.With(fun e -> { e with Init = Option.ofObj path |> Option.map Runtime.Files.resolve })
    /// Image decoding threads.
    member this.WithWorkers(workers: int) = this.With(fun e -> { e with Workers = workers })
    /// Data-parallel training over the processes `mpirun -np K` starts, each running the same program: "mpi"
    /// (Open MPI), "nccl" (CUDA, one process per GPU) or "none". Each process trains its 1/K of every batch.
    member this.WithDistributed(backend: string) = this.With(fun e -> { e with Collective = Runtime.Collective.parse backend })
    /// Crop every image to its annotated object box (CUB, Cars, Aircraft, Dogs).
    member this.WithCropToBox(crop: bool) = this.With(fun e -> { e with CropToBox = crop })
    /// FGVC-Aircraft's label level: "variant", "family" or "manufacturer".
    member this.WithAircraftLevel(level: string) =
        this.With(fun e ->
            match e.Data with
            | E.OnDisk({ Kind = Data.Dataset.Kind.Aircraft _ } as d) ->
                { e with Data = E.OnDisk { d with Kind = Data.Dataset.parseWithLevel "aircraft" (Some level) } }
            | _ -> Errors.setting Setting.Level "the label level applies to the aircraft dataset only")
    /// The embedded dataset with another number of images per class (the same drawing otherwise).
    member this.WithEmbeddedImages(trainPerClass: int, testPerClass: int) =
        this.With(fun e ->
            match e.Data with
            | E.Embedded d -> { e with Data = E.Embedded { d with TrainPerClass = trainPerClass; TestPerClass = testPerClass } }
            | E.OnDisk _ -> Errors.setting Setting.Dataset "this experiment reads a dataset on disk, not the embedded images")

    /// Why the experiment cannot run, one problem a line; empty when it can. The starting weights are checked too
    /// (without the network): weights that are missing while offline are a problem, and weights still to be
    /// downloaded are said ("weights will be downloaded (98 MB) ...").
    member _.Problems() : IReadOnlyList<string> =
        let weights =
            match Model.Backbone.registry.TryFind(e.Model.Backbone.ToLowerInvariant()) with
            | Some spec ->
                match Interop.Hub.status spec e.Weights with
                | Interop.Hub.WillDownload _ as s -> [ s.Text ]
                | s when s.IsProblem -> [ s.Text ]
                | _ -> []
            | None -> []
        (E.problems e |> List.map snd) @ weights |> List.toArray :> _
    /// The experiment as config.json holds it.
    member _.ToJson() = Json.serialize e
    override _.ToString() = sprintf "PMG %s on %s, %d epochs" e.Model.Backbone (E.dataName e) e.Epochs

/// Named starting points for an experiment.
[<AbstractClass; Sealed>]
type Recipes =
    /// The main job: PMG fine-tuned from the ImageNet weights that ship (resnet18-mlnet) on the embedded dataset.
    static member Embedded = Experiment E.embedded

    /// The paper's recipe (ResNet50, 448 px, 200 epochs, the reference's settings) for a dataset on disk:
    /// `dataset` is cub, cars, aircraft, dogs or folder; `root` its folder in the official layout. The dataset is
    /// indexed once to count its classes.
    /// <exception cref="T:Pmg.Fs.InputException">The folder does not hold the dataset's layout.</exception>
    static member Paper(dataset: string, root: string) : Experiment =
        let data = Training.dataOf { Training.Settings.None with Dataset = Some dataset; Root = Some root }
        Experiment(E.forData data (Recipes.ClassCount data))

    /// Your own images, root/train/&lt;class&gt;/* and root/test/&lt;class&gt;/*: the paper's settings on the backbone
    /// whose ImageNet weights ship (resnet18-mlnet), so it runs with nothing to download.
    /// <exception cref="T:Pmg.Fs.InputException">The folder does not hold that layout.</exception>
    static member Folder(root: string) : Experiment =
        let data = Training.dataOf { Training.Settings.None with Dataset = Some "folder"; Root = Some root }
        Experiment({ E.withBackbone "resnet18-mlnet" (E.forData data (Recipes.ClassCount data)) with Weights = Model.Backbone.ImageNet })

    /// The classes a dataset on disk has, from its index alone: its images are checked when a run opens it.
    static member private ClassCount(data: E.Data) =
        match data with
        | E.OnDisk d -> (Data.Dataset.load d.Kind d.Root).Classes.Length
        | E.Embedded d -> d.Classes

/// One trained batch: 1-based counters, each schedule step's loss, the learning rates and the speed.
[<Sealed>]
type BatchProgress internal (b: Trainer.BatchRecord, epochs: int) =
    /// 1-based.
    member _.Epoch = b.Epoch + 1
    /// Epochs of the run.
    member _.Epochs = epochs
    /// 1-based batch within the epoch.
    member _.Batch = b.Batch
    /// Batches in the epoch.
    member _.Batches = b.Batches
    /// Batches since the run started (the same after a resume).
    member _.GlobalStep = b.GlobalStep
    /// Each schedule step's loss on this batch, as weighted in training (NaN for a step that did not run).
    member _.StepLosses: IReadOnlyList<float> = List.toArray b.StepLosses :> _
    /// Each optimizer group's learning rate ("heads", "backbone").
    member _.LearningRates: IReadOnlyDictionary<string, float> = dict b.LearningRates |> Dictionary :> _
    /// Images per second since the epoch started.
    member _.ImagesPerSecond = b.ImagesPerSecond
    override _.ToString() = sprintf "epoch %d/%d batch %d/%d" (b.Epoch + 1) epochs b.Batch b.Batches

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
    /// Trains `experiment` into `runDirectory` on a worker thread. `progress` gets every epoch, `batchProgress`
    /// every batch. Cancelling stops within one batch with OperationCanceledException; the run keeps its last
    /// finished epoch, and `resume: true` continues it with the same losses as an uninterrupted run. A folder
    /// holding a run is never overwritten, and one process writes a run at a time. The run folder gets TensorBoard
    /// event files unless `tensorBoard` is false.
    /// <exception cref="T:Pmg.Fs.RunFolderException">The folder holds another run, other files, or is in use.</exception>
    /// <exception cref="T:Pmg.Fs.InvalidSettingsException">The experiment cannot run.</exception>
    /// <exception cref="T:Pmg.Fs.TrainingException">Training diverged or found no usable image.</exception>
    /// <exception cref="T:System.OperationCanceledException">Cancelled through the token.</exception>
    static member TrainAsync
        (
            experiment: Experiment,
            runDirectory: string,
            [<Optional; DefaultParameterValue(false)>] resume: bool,
            [<Optional; DefaultParameterValue(null: IProgress<EpochResult>)>] progress: IProgress<EpochResult>,
            [<Optional; DefaultParameterValue(null: IProgress<BatchProgress>)>] batchProgress: IProgress<BatchProgress>,
            [<Optional>] cancellationToken: CancellationToken,
            [<Optional; DefaultParameterValue(true)>] tensorBoard: bool
        ) : Task<RunResult> =
        let e = experiment.Value
        let hooks =
            { Trainer.Hooks.None with
                Batch =
                    fun b ->
                        if not (isNull batchProgress) then batchProgress.Report(BatchProgress(b, e.Epochs))
                        if cancellationToken.IsCancellationRequested then
                            raise (
                                OperationCanceledException(
                                    sprintf "training cancelled in epoch %d after batch %d of %d; %s keeps its last finished epoch: train again with resume to continue"
                                        (b.Epoch + 1) b.Batch b.Batches runDirectory,
                                    cancellationToken
                                )
                            )
                Epoch =
                    fun _ r ->
                        if not (isNull progress) then progress.Report(EpochResult(r, e.Epochs)) }
        Task.Run(
            (fun () ->
                let opened = Run.openData e.Data e.CropToBox
                let folder, summary = Training.trainWith { TensorBoard = tensorBoard } (e, opened) (Some runDirectory) resume hooks
                RunResult(folder, summary, e.Epochs)),
            cancellationToken
        )

/// A class and its probability under the combined prediction.
[<Struct>]
type ClassScore(classIndex: int, name: string, score: float32) =
    /// The class index.
    member _.Class = classIndex
    /// Its name.
    member _.Name = name
    /// Its probability.
    member _.Score = score
    override _.ToString() = sprintf "%s (class %d): %.4f" name classIndex score

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

/// What the two model classes share: predictions in plain .NET shapes.
[<AbstractClass>]
type Model internal (predictor: Predictor.IPredictor) =
    let scores (k: int) (p: Predictor.Prediction) =
        Predictor.top predictor.ClassNames k p |> List.map (fun s -> ClassScore(s.Class, s.Name, s.Score)) |> List.toArray

    member internal _.Predictor = predictor
    /// Class names in label order.
    member _.ClassNames: IReadOnlyList<string> = predictor.ClassNames :> _
    /// The crop size the model takes (images are resized and centre-cropped to it).
    member _.ImageSize = predictor.Input.Crop

    /// The `topK` most likely classes of one image, most likely first.
    /// <exception cref="T:Pmg.Fs.InvalidSettingsException">topK outside 1..classes.</exception>
    member _.Predict(image: Image<Rgb24>, [<Optional; DefaultParameterValue(5)>] topK: int) : ClassScore[] =
        predictor.Predict [ image ] |> List.head |> scores topK

    /// The same for an image file (JPEG, PNG, BMP, GIF, TIFF, WebP).
    /// <exception cref="T:Pmg.Fs.InputException">The file is missing or not a usable image.</exception>
    member this.Predict(imageFile: string, [<Optional; DefaultParameterValue(5)>] topK: int) : ClassScore[] =
        use image = Data.Images.loadChecked imageFile
        this.Predict(image, topK)

    /// The same for a stream holding an encoded image.
    /// <exception cref="T:Pmg.Fs.InputException">The stream does not hold a usable image.</exception>
    member this.Predict(image: Stream, [<Optional; DefaultParameterValue(5)>] topK: int) : ClassScore[] =
        use buffer = new MemoryStream()
        image.CopyTo buffer
        // The same verdict as files: a truncated or lying image is refused, not half-read.
        match Data.Images.decodeBytes (buffer.ToArray()) with
        | Ok(decoded, _) ->
            use decoded = decoded
            this.Predict(decoded, topK)
        | Error reason -> Errors.input "the stream" (sprintf "the stream's image cannot be used: %s" reason)

    /// The `topK` most likely classes of each image, in one batch.
    member _.Predict(images: IEnumerable<Image<Rgb24>>, [<Optional; DefaultParameterValue(5)>] topK: int) : IReadOnlyList<ClassScore[]> =
        predictor.Predict(List.ofSeq images) |> List.map (scores topK) |> List.toArray :> _

    /// Every output's logits for one image, by name: stage3 ... concat, combined.
    member _.Logits(image: Image<Rgb24>) : IReadOnlyDictionary<string, float32[]> =
        (predictor.Predict [ image ] |> List.head).Outputs |> dict |> Dictionary :> _

    /// Frees the model (the network's tensors, or the ONNX Runtime session).
    member _.Dispose() = predictor.Dispose()

    interface IDisposable with
        member this.Dispose() = this.Dispose()

/// A trained model run by TorchSharp: a Pmg.Fs checkpoint (.ckpt) or a PyTorch state_dict (.pth, .safetensors)
/// with the reference's key names. Our files describe themselves; a foreign .pth may need its backbone, class count
/// and image size.
[<Sealed>]
type TrainedModel private (m: ModelFiles.Loaded) =
    inherit Model(Predictor.ofLoaded m)

    /// Loads a model file on a device (cpu, cuda, cuda:N).
    /// <exception cref="T:Pmg.Fs.ModelFileException">The file is missing, damaged, or not a PMG model.</exception>
    /// <exception cref="T:Pmg.Fs.InvalidSettingsException">A given setting contradicts the file.</exception>
    static member Load
        (
            path: string,
            [<Optional; DefaultParameterValue("cpu")>] device: string,
            [<Optional; DefaultParameterValue(null: string)>] backbone: string,
            [<Optional>] imageSize: Nullable<int>,
            [<Optional>] classes: Nullable<int>
        ) =
        let d = Runtime.Device.parse device
        let o: ModelFiles.Overrides =
            { ModelFiles.Overrides.None with
                Backbone = Option.ofObj backbone
                ImageSize = Option.ofNullable imageSize
                Classes = Option.ofNullable classes }
        new TrainedModel(ModelFiles.load path o d)

    /// The backbone's name.
    member _.Backbone = m.Net.Config.Backbone

    /// Test accuracy on the test split of an experiment's data (e.g. Recipes.Embedded, or Recipes.Paper(...)).
    member _.Evaluate(data: Experiment, [<Optional; DefaultParameterValue(16)>] batchSize: int) =
        Evaluation(ModelFiles.evaluate m data.Value.Data batchSize)

    /// Writes the eval-mode network as ONNX, with the class names, preprocessing and a checksum in its metadata.
    /// <exception cref="T:Pmg.Fs.OutputException">The file cannot be written, or is the model itself.</exception>
    member _.ExportOnnx(path: string) = ModelFiles.exportOnnx m path |> ignore

    /// Writes a state_dict with the reference implementation's key names (.pth, or .safetensors), described inside.
    /// <exception cref="T:Pmg.Fs.OutputException">The file cannot be written, or is the model itself.</exception>
    member _.ExportPyTorch(path: string) = ModelFiles.exportPyTorch m path

/// An exported ONNX model run by ONNX Runtime alone (libtorch is never loaded): what a deployment needs.
[<Sealed>]
type OnnxModel private (p: Predictor.IPredictor) =
    inherit Model(p)

    /// Loads and verifies an ONNX model written by ExportOnnx (or `pmg export --to onnx`).
    /// <exception cref="T:Pmg.Fs.ModelFileException">The file is missing, damaged, or not exported by Pmg.Fs.</exception>
    static member Load(path: string) = new OnnxModel(Predictor.onnx path)

/// Images of the embedded dataset, to try a model without files.
[<AbstractClass; Sealed>]
type EmbeddedImages =
    /// Image `index` of the embedded dataset's test split (or its training split, `test: false`), as the main job
    /// draws it.
    /// <exception cref="T:Pmg.Fs.InvalidSettingsException">The index is outside the split.</exception>
    static member Get(index: int, [<Optional; DefaultParameterValue(true)>] test: bool) : Image<Rgb24> =
        Embedded.image (if test then Data.Synthetic.Test else Data.Synthetic.Train) index

    /// The class of image `index` (the same in both splits).
    static member ClassOf(index: int) : int = Embedded.classOf index

    /// Images in the test split (or the training split, `test: false`).
    static member Count([<Optional; DefaultParameterValue(true)>] test: bool) : int =
        Embedded.count (if test then Data.Synthetic.Test else Data.Synthetic.Train)
