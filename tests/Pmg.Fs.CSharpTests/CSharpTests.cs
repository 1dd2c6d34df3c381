using Pmg.Fs.Api;
using SixLabors.ImageSharp;

namespace Pmg.Fs.CSharpTests;

/// <summary>
/// The library as a C# program uses it: the main job trained for one epoch, evaluated, asked about two embedded
/// images and exported; a run cancelled midway and resumed. Each test is a named action; the F# suite runs them.
/// </summary>
public static class CSharpTests
{
    /// <summary>Every test, by name.</summary>
    public static IReadOnlyList<KeyValuePair<string, Func<Task>>> All { get; } =
    [
        new("the main job trains for one epoch, evaluates, predicts and exports", MainJobAsync),
        new("cancelling stops within one batch, and the run resumes with the losses of an uninterrupted one", CancelAndResumeAsync),
        new("ConvNeXt and Swin are one word: WithBackbone trains, predicts and exports; a size Swin cannot tile is a problem naming the sizes that fit", ModernBackbonesAsync),
    ];

    /// <summary>An <see cref="IProgress{T}"/> that runs the action on the training thread, in order (the BCL's
    /// Progress posts to the thread pool, so a test could not cancel at a known point with it).</summary>
    private sealed class Now<T>(Action<T> action) : IProgress<T>
    {
        public void Report(T value) => action(value);
    }

    private static string NewFolder(string name) =>
        Path.Combine(Path.GetTempPath(), $"pmg-csharp-{name}-{Guid.NewGuid():N}");

    private static void Check(bool condition, string what)
    {
        if (!condition) throw new InvalidOperationException("C#: " + what);
    }

    private static async Task MainJobAsync()
    {
        var dir = NewFolder("main");
        try
        {
            var experiment = Recipes.Embedded.WithEpochs(1);
            Check(experiment.Problems().Count == 0, "the main job's recipe is valid");
            var seen = new List<EpochResult>();
            var run = await Runs.TrainAsync(experiment, dir, progress: new Now<EpochResult>(seen.Add));

            Check(run.Epochs.Count == 1 && seen.Count == 1, "one epoch trained and reported");
            var epoch = run.Epochs[0];
            Check(epoch.Epoch == 1 && epoch.Epochs == 1, "epochs are 1-based");
            Check(epoch.StepLosses.Count == 4 && epoch.StepLosses.All(double.IsFinite), "four finite step losses (8, 4, 2, concat)");
            Check(epoch.TestHeads.Count == 3, "three granularity heads");
            // Chance is 1/8; one epoch from the ImageNet weights that ship is far above it (35% on the main job's
            // seed), a broken loop or unloaded weights stay near it.
            Check(epoch.TestCombined > 0.25, $"one epoch learns: combined {epoch.TestCombined:P1}");
            Check(File.Exists(run.BestCheckpoint) && run.BestEpoch == 1, "best.ckpt of epoch 1");

            using var model = TrainedModel.Load(run.BestCheckpoint);
            Check(model.ClassNames.Count == 8 && model.ImageSize == 64, "8 class names from classes.txt, 64 px");
            var evaluation = model.Evaluate(Recipes.Embedded);
            Check(evaluation.Images == 120, "120 embedded test images");
            // The same weights on the same images: equal to the epoch's own evaluation, up to an argmax tie.
            Check(Math.Abs(evaluation.Combined - epoch.TestCombined) <= 1.0 / 120, $"evaluation {evaluation.Combined} = training's {epoch.TestCombined}");
            Check(evaluation.MeanPerClass > 0 && evaluation.CombinedTop5 >= evaluation.Combined, "mean per class and top-5");

            foreach (var index in new[] { 3, 13 })
            {
                using var image = EmbeddedImages.Get(index);
                var top = model.Predict(image, topK: 3);
                Check(top.Length == 3, "three classes");
                Check(top[0].Score >= top[1].Score && top[1].Score >= top[2].Score, "most likely first");
                Check(top.Sum(s => s.Score) <= 1.0001f && top[0].Score > 1f / 8, "softmax scores");
                Check(top[0].Name == model.ClassNames[top[0].Class], "names match classes");
                // The same image as an encoded stream gives the same answer.
                using var png = new MemoryStream();
                image.SaveAsPng(png);
                png.Position = 0;
                var fromStream = model.Predict(png, topK: 3);
                Check(fromStream.Select(s => s.Class).SequenceEqual(top.Select(s => s.Class)), "stream = image");
                var logits = model.Logits(image);
                Check(logits.Keys.SequenceEqual(["stage3", "stage4", "stage5", "concat", "combined"]), "every output's logits");
            }

            var onnx = Path.Combine(dir, "model.onnx");
            model.ExportOnnx(onnx);
            Check(new FileInfo(onnx).Length > 1_000_000, "an ONNX file with the weights");
        }
        finally
        {
            if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
        }
    }

    private static async Task ModernBackbonesAsync()
    {
        var swin = Recipes.Embedded.WithBackbone("swin_t").WithWeights("none");
        var problems = swin.Problems();
        Check(problems.Count == 1 && problems[0].Contains("224 px"), $"swin_t at 64 px: {string.Join("; ", problems)}");
        Check(swin.WithImageSize(224).WithResize(256).Problems().Count == 0, "swin_t at 224 px fits");

        var dir = NewFolder("convnext");
        try
        {
            var experiment = Recipes.Embedded.WithBackbone("convnext_tiny").WithWeights("none").WithEpochs(1)
                .WithBatchSize(4).WithEmbeddedImages(trainPerClass: 2, testPerClass: 1);
            Check(experiment.Problems().Count == 0, "convnext_tiny at the main job's 64 px is valid");
            var run = await Runs.TrainAsync(experiment, dir);
            Check(run.Epochs.Count == 1 && run.Epochs[0].StepLosses.All(double.IsFinite), "one epoch, finite losses");

            using var model = TrainedModel.Load(run.BestCheckpoint);
            Check(model.Backbone == "convnext_tiny", $"the checkpoint says its backbone: {model.Backbone}");
            using var image = EmbeddedImages.Get(3);
            var top = model.Predict(image, topK: 2);
            Check(top.Length == 2 && top[0].Score >= top[1].Score, "predicts");
            var onnx = Path.Combine(dir, "convnext.onnx");
            model.ExportOnnx(onnx);
            using var exported = OnnxModel.Load(onnx);
            var fromOnnx = exported.Predict(image, topK: 2);
            Check(fromOnnx[0].Class == top[0].Class && Math.Abs(fromOnnx[0].Score - top[0].Score) < 1e-3f,
                $"ONNX Runtime agrees: {fromOnnx[0].Score} vs {top[0].Score}");
        }
        finally
        {
            if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
        }
    }

    private static async Task CancelAndResumeAsync()
    {
        // 8 classes x 4 images: two batches of 16 an epoch.
        var experiment = Recipes.Embedded.WithEmbeddedImages(4, 1).WithEpochs(2);
        var whole = NewFolder("whole");
        var cancelled = NewFolder("cancelled");
        try
        {
            var uninterrupted = await Runs.TrainAsync(experiment, whole);

            using var cts = new CancellationTokenSource();
            // Cancelled when epoch 1 is reported: its checkpoint is written, epoch 2 has not started.
            var progress = new Now<EpochResult>(r => { if (r.Epoch == 1) cts.Cancel(); });
            OperationCanceledException? stop = null;
            try
            {
                await Runs.TrainAsync(experiment, cancelled, progress: progress, cancellationToken: cts.Token);
            }
            catch (OperationCanceledException e)
            {
                stop = e;
            }
            Check(stop is not null, "cancelling throws OperationCanceledException");
            Check(stop!.Message.Contains("epoch 2 after batch 1 of 2"), $"stopped within one batch: {stop.Message}");
            Check(File.ReadAllLines(Path.Combine(cancelled, "metrics.csv")).Length == 2, "metrics: header and epoch 1");

            var resumed = await Runs.TrainAsync(experiment, cancelled, resume: true);
            Check(resumed.Epochs.Count == 1 && resumed.Epochs[0].Epoch == 2, "the resumed run trains epoch 2 only");
            var a = uninterrupted.Epochs[1].StepLosses;
            var b = resumed.Epochs[0].StepLosses;
            for (var i = 0; i < a.Count; i++)
            {
                // The same computation from the same checkpoint, batches and jigsaws, up to the order of
                // multithreaded reductions (a few ulps over an epoch).
                Check(Math.Abs(a[i] - b[i]) <= 1e-6 * Math.Max(1.0, Math.Abs(a[i])), $"step {i + 1} loss {b[i]} = {a[i]}");
            }
            Check(resumed.Epochs[0].TestCombined == uninterrupted.Epochs[1].TestCombined, "the same test accuracy");
        }
        finally
        {
            foreach (var d in new[] { whole, cancelled })
                if (Directory.Exists(d)) Directory.Delete(d, recursive: true);
        }
    }
}
