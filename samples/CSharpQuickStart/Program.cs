// Pmg.Fs from C#, as a package: train the main job's recipe for one epoch on a small embedded dataset with
// per-batch progress and a cancellation token, evaluate, predict a batch, export ONNX and predict with ONNX Runtime
// alone, and load the checkpoint in a new process. Every result is checked: a wrong one exits with code 1.
//
//   dotnet run                        the whole tour (about a minute on two CPU cores)
//   dotnet run -- onnx MODEL IMAGE..  ONNX Runtime only: the top class of each image (the tour runs this itself)
//   dotnet run -- checkpoint CKPT IMAGE..  the same with the trained checkpoint (TorchSharp)

using System.Diagnostics;
using System.Globalization;
using Pmg.Fs;
using Pmg.Fs.Api;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;

CultureInfo.CurrentCulture = CultureInfo.InvariantCulture;
try
{
    return args switch
    {
        ["onnx", var model, .. var images] => PredictWithOnnx(model, images),
        ["checkpoint", var checkpoint, .. var images] => PredictWithCheckpoint(checkpoint, images),
        [] => await TourAsync(),
        _ => Usage(),
    };
}
catch (PmgException e)
{
    // The library's errors share one base class; the message names the input and the fix.
    Console.Error.WriteLine($"pmg: {e.Message}");
    return 1;
}
catch (CheckFailed e)
{
    Console.Error.WriteLine($"FAILED: {e.Message}");
    return 1;
}

static int Usage()
{
    Console.Error.WriteLine("usage: CSharpQuickStart [onnx MODEL IMAGE.. | checkpoint CKPT IMAGE..]");
    return 2;
}

static async Task<int> TourAsync()
{
    var work = Directory.CreateTempSubdirectory("pmg-quickstart-").FullName;
    try
    {
        // The main job's recipe (resnet18-mlnet from the ImageNet weights that ship, 64 px), one epoch on 10
        // training and 5 test images per class of the embedded dataset's 8 classes.
        var experiment = Recipes.Embedded.WithEpochs(1).WithEmbeddedImages(trainPerClass: 10, testPerClass: 5);
        Check(experiment.Problems().Count == 0, $"the recipe can run: {string.Join("; ", experiment.Problems())}");

        // Ctrl+C stops training within one batch (OperationCanceledException); the run folder keeps its last epoch.
        using var cancel = new CancellationTokenSource();
        Console.CancelKeyPress += (_, e) => { e.Cancel = true; cancel.Cancel(); };

        var batches = new List<BatchProgress>();
        var run = await Runs.TrainAsync(
            experiment,
            Path.Combine(work, "run"),
            batchProgress: new Reporter<BatchProgress>(b =>
            {
                batches.Add(b);
                Console.WriteLine(
                    $"epoch {b.Epoch}/{b.Epochs} batch {b.Batch}/{b.Batches}  losses {string.Join(" ", b.StepLosses.Select(l => l.ToString("F3")))}" +
                    $"  lr {b.LearningRates["heads"]:G3}/{b.LearningRates["backbone"]:G3}  {b.ImagesPerSecond:F1} img/s");
            }),
            cancellationToken: cancel.Token);

        // 80 training images in batches of 16: 5 batches, each reported once, in order.
        Check(batches.Count == 5 && batches.Select(b => b.Batch).SequenceEqual([1, 2, 3, 4, 5]), $"5 batches reported in order, got {batches.Count}");
        Check(batches.All(b => b.Epoch == 1 && b.Epochs == 1 && b.Batches == 5), "epoch 1 of 1, 5 batches");
        Check(batches.Zip(batches.Skip(1)).All(p => p.Second.GlobalStep > p.First.GlobalStep), "the global step grows");
        Check(batches.All(b => b.StepLosses.Count == 4 && b.StepLosses.All(double.IsFinite)), "four finite step losses a batch (8x8, 4x4, 2x2, whole)");
        Check(batches.All(b => b.LearningRates["heads"] > 0 && b.LearningRates["backbone"] > 0 && b.ImagesPerSecond > 0), "learning rates and speed");

        var epoch = run.Epochs.Single();
        Console.WriteLine($"epoch 1: train {epoch.TrainAccuracy:0.0%}, test combined {epoch.TestCombined:0.0%}, best -> {run.BestCheckpoint}");
        Check(run.BestEpoch == 1 && File.Exists(run.BestCheckpoint), "best.ckpt of epoch 1");

        using var model = TrainedModel.Load(run.BestCheckpoint, device: "cpu");
        Check(model.ClassNames.Count == 8 && model.ImageSize == 64, "8 classes, 64 px");

        // The same weights on the same 40 test images as the epoch's own evaluation.
        var evaluation = model.Evaluate(experiment);
        Console.WriteLine($"evaluate: {evaluation.Images} images, combined {evaluation.Combined:0.0%}, top-5 {evaluation.CombinedTop5:0.0%}");
        Check(evaluation.Images == 40, "40 test images");
        Check(Math.Abs(evaluation.Combined - epoch.TestCombined) <= 1.0 / 40, $"evaluation {evaluation.Combined} = training's {epoch.TestCombined}");

        // A batch of test images, one of each class, predicted at once and one by one.
        var images = Enumerable.Range(0, 8).Select(i => EmbeddedImages.Get(i, test: true)).ToList();
        var batch = model.Predict(images, topK: 8);
        Check(batch.Count == 8 && batch.All(s => s.Length == 8), "8 images, 8 classes each");
        for (var i = 0; i < images.Count; i++)
        {
            var one = model.Predict(images[i], topK: 8);
            Check(one[0].Class == batch[i][0].Class && Math.Abs(one[0].Score - batch[i][0].Score) < 1e-4f, $"image {i}: batch = single");
            Check(batch[i].Zip(batch[i].Skip(1)).All(p => p.First.Score >= p.Second.Score), "most likely first");
            Check(Math.Abs(batch[i].Sum(s => s.Score) - 1f) < 1e-3f, "softmax scores sum to 1");
            Console.WriteLine($"image {i} (class {EmbeddedImages.ClassOf(i)}): {batch[i][0].Name} {batch[i][0].Score:0.0%}");
        }

        // The images as files, for the two other processes.
        var files = images.Select((image, i) => Path.Combine(work, $"test-{i}.png")).ToArray();
        for (var i = 0; i < images.Count; i++) images[i].SaveAsPng(files[i]);
        foreach (var image in images) image.Dispose();

        var onnx = Path.Combine(work, "model.onnx");
        model.ExportOnnx(onnx);
        Check(new FileInfo(onnx).Length > 1_000_000, "model.onnx written");

        // ONNX Runtime alone, in a process that never loads libtorch; then the checkpoint in another process.
        Check(LoadedLibTorch() is not null, "this process shows libtorch among its modules (what the ONNX process must not)");
        foreach (var (mode, file) in new[] { ("onnx", onnx), ("checkpoint", run.BestCheckpoint) })
        {
            var lines = RunSelf([mode, file, .. files]);
            Check(lines.Length == files.Length, $"{mode}: one line per image, got {lines.Length}");
            for (var i = 0; i < files.Length; i++)
            {
                var parts = lines[i].Split(' ');
                var (cls, score) = (int.Parse(parts[1]), float.Parse(parts[2]));
                Check(cls == batch[i][0].Class && Math.Abs(score - batch[i][0].Score) < 1e-3f,
                    $"{mode}, image {i}: class {cls} {score} = this process's {batch[i][0].Class} {batch[i][0].Score}");
            }
            Console.WriteLine($"{mode} in a new process: the same top class and score for all {files.Length} images");
        }
        Console.WriteLine("quick start: every check passed");
        return 0;
    }
    finally
    {
        Directory.Delete(work, recursive: true);
    }
}

// ONNX Runtime only: OnnxModel reads the class names and preprocessing from the model's metadata.
static int PredictWithOnnx(string model, string[] images)
{
    using var onnx = OnnxModel.Load(model);
    foreach (var file in images)
    {
        var top = onnx.Predict(file, topK: 1)[0];
        Console.WriteLine($"{Path.GetFileName(file)} {top.Class} {top.Score:R} {top.Name}");
    }
    var torch = LoadedLibTorch();
    Check(torch is null, $"ONNX Runtime alone: {torch} was loaded");
    return 0;
}

// libtorch_cpu's file where this process has loaded it, else null.
static string? LoadedLibTorch()
{
    using var self = Process.GetCurrentProcess();
    return self.Modules.Cast<ProcessModule>().FirstOrDefault(m => m.ModuleName.Contains("torch_cpu"))?.FileName;
}

static int PredictWithCheckpoint(string checkpoint, string[] images)
{
    using var model = TrainedModel.Load(checkpoint);
    foreach (var file in images)
    {
        var top = model.Predict(file, topK: 1)[0];
        Console.WriteLine($"{Path.GetFileName(file)} {top.Class} {top.Score:R} {top.Name}");
    }
    return 0;
}

// This program again, with arguments; its stdout lines (it must exit 0).
static string[] RunSelf(string[] arguments)
{
    var self = Environment.ProcessPath!;
    var start = new ProcessStartInfo(self) { RedirectStandardOutput = true };
    // Run as `dotnet CSharpQuickStart.dll`: the host needs the assembly first.
    if (Path.GetFileNameWithoutExtension(self) == "dotnet") start.ArgumentList.Add(typeof(Reporter<>).Assembly.Location);
    foreach (var a in arguments) start.ArgumentList.Add(a);
    using var child = Process.Start(start)!;
    var output = child.StandardOutput.ReadToEnd();
    child.WaitForExit();
    Check(child.ExitCode == 0, $"{string.Join(" ", arguments.Take(2))}: exit code {child.ExitCode}");
    return output.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
}

static void Check(bool condition, string what)
{
    if (!condition) throw new CheckFailed(what);
}

/// <summary>An <see cref="IProgress{T}"/> that reports on the training thread, in order (the BCL's Progress posts
/// each report to the thread pool, so reports could arrive after training returned, or out of order).</summary>
sealed class Reporter<T>(Action<T> action) : IProgress<T>
{
    public void Report(T value) => action(value);
}

/// <summary>A result that is not what it must be.</summary>
sealed class CheckFailed(string message) : Exception(message);
