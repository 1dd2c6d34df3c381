module Pmg.Cli.Program

open System
open System.IO
open System.Diagnostics
open Argu
open SixLabors.ImageSharp
open SixLabors.ImageSharp.Processing
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Data
open Pmg.Fs.Training
open Pmg.Cli.Args

let private pct (x: float) = sprintf "%5.1f%%" (100.0 * x)
let private accuracyTable (config: Pmg.Config) (a: Evaluate.Accuracy) = Evaluate.table (Pmg.headNames config) a

let private deviceBackend (device: string) =
    if device.StartsWith "cuda" then Runtime.Native.Cuda else Runtime.Native.Cpu

let private resizeFor (crop: int) = int (Math.Round(float crop * float Transforms.Spec.paperResize / float Transforms.Spec.paperCrop))

let private onDisk (name: string) (root: string option) (level: string option) : Experiment.Data =
    match root with
    | None -> failwithf "--dataset %s needs --root DIR (the dataset's folder in its official layout)" name
    | Some r -> Experiment.OnDisk { Kind = name; Root = r; Level = level }

/// A flag's value among named choices; the fallback when the flag is absent.
let private choose (flag: string) (choices: (string * 'T) list) (fallback: 'T) (given: string option) : 'T =
    match given with
    | None -> fallback
    | Some v ->
        match choices |> List.tryFind (fun (name, _) -> name = v.ToLowerInvariant()) with
        | Some(_, x) -> x
        | None -> failwithf "%s %s: use %s" flag v (choices |> List.map fst |> String.concat " or ")

let private precisions = [ "fp32", Experiment.Fp32; "bf16", Experiment.Bf16 ]

// ---------------------------------------------------------------------------------------------------

let private experimentOf (a: ParseResults<TrainArgs>) : Experiment.Experiment =
    let name = a.GetResult(TrainArgs.Dataset, "embedded").ToLowerInvariant()
    let baseline =
        if name = "embedded" then
            Experiment.embedded
        else
            let data = onDisk name (a.TryGetResult TrainArgs.Root) (a.TryGetResult TrainArgs.Level)
            let classes =
                match data with
                | Experiment.OnDisk d -> (Run.data { Experiment.paper 2 data with Data = data } |> fst).Classes.Length
                | _ -> 0
            Experiment.paper classes data
    let crop = a.GetResult(TrainArgs.Image_Size, baseline.Input.Crop)
    let resize =
        match a.TryGetResult TrainArgs.Resize, a.TryGetResult TrainArgs.Image_Size with
        | Some r, _ -> r
        | None, Some c -> if name = "embedded" then c + (baseline.Input.Resize - baseline.Input.Crop) else resizeFor c
        | None, None -> baseline.Input.Resize
    let heads = a.GetResult(TrainArgs.Heads, baseline.Model.Heads)
    let model = { baseline.Model with Backbone = a.GetResult(TrainArgs.Backbone, baseline.Model.Backbone); Heads = heads }
    let stages = Backbone.stages (Backbone.find model.Backbone) |> List.length
    let schedule =
        match a.TryGetResult TrainArgs.Grids with
        | Some g ->
            let grids = g.Split(',', StringSplitOptions.RemoveEmptyEntries) |> Array.map (fun s -> int (s.Trim())) |> List.ofArray
            if grids.Length <> heads then failwithf "--grids lists %d grids but there are %d heads" grids.Length heads
            Schedule.withGrids grids 2.0
        | None -> Schedule.progressive stages heads
    let lr = a.GetResult(TrainArgs.Lr, baseline.Optimizer.Lr)
    let backboneLr =
        a.GetResult(TrainArgs.Backbone_Lr, (if a.Contains TrainArgs.Lr then lr / 10.0 else baseline.Optimizer.BackboneLr))
    { baseline with
        Model = model
        Schedule = schedule
        Permutation = (if a.Contains Per_Sample_Jigsaw then Jigsaw.PerSample else baseline.Permutation)
        Forward = a.TryGetResult Forward |> choose "--forward" [ "full", Experiment.Full; "truncated", Experiment.Truncated ] baseline.Forward
        Update = a.TryGetResult Update |> choose "--update" [ "progressive", Experiment.Progressive; "joint", Experiment.Joint ] baseline.Update
        Precision = a.TryGetResult TrainArgs.Precision |> choose "--precision" precisions baseline.Precision
        Optimizer = { baseline.Optimizer with Lr = lr; BackboneLr = backboneLr }
        Epochs = a.GetResult(TrainArgs.Epochs, baseline.Epochs)
        WarmupEpochs = a.GetResult(Warmup_Epochs, (if a.Contains TrainArgs.Epochs then min baseline.WarmupEpochs (a.GetResult TrainArgs.Epochs - 1) else baseline.WarmupEpochs))
        BatchSize = a.GetResult(TrainArgs.Batch_Size, baseline.BatchSize)
        Input = { baseline.Input with Crop = crop; Resize = resize }
        Seed = a.GetResult(TrainArgs.Seed, baseline.Seed)
        Device = a.GetResult(TrainArgs.Device, baseline.Device)
        CropToBox = a.Contains Crop_To_Box || baseline.CropToBox
        Pretrained = a.TryGetResult TrainArgs.Pretrained |> Option.orElse baseline.Pretrained
        Workers = a.GetResult(TrainArgs.Workers, baseline.Workers) }

let private train (a: ParseResults<TrainArgs>) =
    let e = experimentOf a |> Experiment.validate
    let dataName = match e.Data with Experiment.Embedded _ -> "embedded" | Experiment.OnDisk d -> d.Kind
    let out =
        a.GetResult(
            TrainArgs.Out,
            Path.Combine("runs", sprintf "%s-%s-%s" dataName e.Model.Backbone (DateTime.Now.ToString "yyyyMMdd-HHmmss"))
        )
    printfn "PMG %s on %s: %d classes, %d epochs, batch %d, %dpx crops of %dpx, steps %s, device %s"
        e.Model.Backbone dataName e.Model.Classes e.Epochs e.BatchSize e.Input.Crop e.Input.Resize
        (e.Schedule |> List.map (fun s -> sprintf "%A n=%d w=%g" s.Head s.Grid s.LossWeight) |> String.concat "; ")
        e.Device
    printfn "run directory: %s" (Path.GetFullPath out)
    let clock = Stopwatch.StartNew()
    let epochClock = Stopwatch()
    let hooks: Trainer.Hooks =
        { Batch =
            fun epoch i total ->
                if i = 1 then epochClock.Restart()
                let line = Progress.render (sprintf "epoch %d/%d" (epoch + 1) e.Epochs) (float i / float total) (sprintf "%d/%d" i total) epochClock.Elapsed
                Progress.show line false
          Evaluating = fun _ -> ()
          Epoch =
            fun r ->
                // "-" for steps that did not run (warm-up epochs).
                let losses = r.StepLosses |> List.map (fun l -> if Double.IsNaN l then "-" else sprintf "%.3f" l) |> String.concat " "
                let line =
                    sprintf "epoch %d/%d  loss %s  train %s  test combined %s concat %s  %.1f img/s  %s"
                        (r.Epoch + 1) e.Epochs losses (pct r.TrainAccuracy) (pct r.Test.Combined) (pct r.Test.Concat)
                        r.ImagesPerSecond (Progress.render "" (float (r.Epoch + 1) / float e.Epochs) "" clock.Elapsed)
                Progress.show line true
                if not r.Skipped.IsEmpty then
                    eprintfn "  warning: %d unusable images skipped this epoch, e.g. %s: %s" r.Skipped.Length (fst r.Skipped.Head) (snd r.Skipped.Head) }
    let summary = Run.train e out (a.Contains Resume) hooks
    match summary.History |> List.tryFind (fun r -> r.Epoch = summary.BestEpoch), summary.History with
    | _, [] -> printfn "nothing to do: %s already holds %d epochs" out e.Epochs
    | best, history ->
        let last = List.last history
        printfn ""
        printfn "final epoch %d, test set (%d images):" (last.Epoch + 1) last.Test.Images
        printfn "%s" (accuracyTable e.Model last.Test)
        best |> Option.iter (fun b -> printfn "best combined %s at epoch %d -> %s" (pct b.Test.Combined) (b.Epoch + 1) summary.BestCheckpoint)
        printfn "elapsed %s" (clock.Elapsed.ToString @"mm\:ss")
    0

// ---------------------------------------------------------------------------------------------------

let private overridesOf (backbone, classes, size, resize) : Inference.Overrides =
    { Backbone = backbone; Classes = classes; ImageSize = size; Resize = resize }

let private eval (a: ParseResults<EvalArgs>) =
    let device = a.GetResult(EvalArgs.Device, "cpu")
    Runtime.Native.init (deviceBackend device) |> ignore
    let path = a.GetResult EvalArgs.Checkpoint
    let o = overridesOf (a.TryGetResult EvalArgs.Backbone, a.TryGetResult EvalArgs.Classes, a.TryGetResult EvalArgs.Image_Size, a.TryGetResult EvalArgs.Resize)
    let m = Inference.load path o device
    let data =
        match a.TryGetResult EvalArgs.Dataset with
        | Some name when name <> "embedded" -> onDisk name (a.TryGetResult EvalArgs.Root) (a.TryGetResult EvalArgs.Level)
        | Some _ -> Experiment.Embedded Synthetic.Config.Default
        | None when Checkpoint.isCheckpoint path -> (Checkpoint.load path).Experiment.Data
        | None -> failwith "a .pth checkpoint says nothing about its data: pass --dataset and --root"
    let e =
        { Experiment.paper m.Net.Config.Classes data with
            Model = m.Net.Config
            BatchSize = a.GetResult(EvalArgs.Batch_Size, 16)
            Input = { Resize = m.Resize; Crop = m.Crop; Padding = 0 }
            Device = device }
    let d, _ = Run.data e
    if d.Classes.Length <> m.Net.Config.Classes then
        failwithf "the dataset has %d classes but the checkpoint %s has %d" d.Classes.Length path m.Net.Config.Classes
    let acc = Trainer.evaluateNet e m.Net m.Device d.Classes.Length d.Test
    printfn "%s: %d test images" path acc.Images
    printfn "%s" (accuracyTable m.Net.Config acc)
    printfn "mean per-class accuracy (combined): %s" (pct (Evaluate.meanPerClass acc))
    0

let private predict (a: ParseResults<PredictArgs>) =
    let device = a.GetResult(PredictArgs.Device, "cpu")
    Runtime.Native.init (deviceBackend device) |> ignore
    let o = overridesOf (a.TryGetResult PredictArgs.Backbone, a.TryGetResult PredictArgs.Classes, a.TryGetResult PredictArgs.Image_Size, a.TryGetResult PredictArgs.Resize)
    let m = Inference.load (a.GetResult PredictArgs.Checkpoint) o device
    let k = a.GetResult(Top_K, 5)
    for path in a.GetResult Images do
        let image = Inputs.loadImage path
        let p = Inference.predict m image
        let top =
            p.Probabilities |> Array.mapi (fun i s -> i, s) |> Array.sortByDescending snd |> Array.truncate k
        if a.Contains PredictArgs.Json then
            let topJson = [ for i, s in top -> {| ``class`` = i; score = float s |} ]
            if a.Contains Logits then
                let logits =
                    dict (p.Heads @ [ "concat", p.Concat; "combined", p.Combined ])
                printfn "%s" (Json.line {| image = path; top = topJson; logits = logits |})
            else
                printfn "%s" (Json.line {| image = path; top = topJson |})
        else
            printfn "%s" path
            for i, s in top do
                printfn "  class %d  %.4f" i s
            if a.Contains Logits then
                for name, l in p.Heads @ [ "concat", p.Concat; "combined", p.Combined ] do
                    printfn "  %-8s %s" name (l |> Array.map (sprintf "%.3f") |> String.concat " ")
    0

let private export (a: ParseResults<ExportArgs>) =
    Runtime.Native.init Runtime.Native.Cpu |> ignore
    match a.GetResult To with
    | "pytorch" ->
        let m = Inference.load (a.GetResult ExportArgs.Checkpoint) Inference.Overrides.None "cpu"
        let out = a.GetResult ExportArgs.Out
        Interop.StateDict.export m.Net out
        printfn "wrote %s (%d entries, reference PMG key names)" out (m.Net.state_dict().Count)
        0
    | other -> failwithf "--to %s: the only export format is pytorch" other

// ---------------------------------------------------------------------------------------------------

let private median (xs: float list) =
    let s = List.sort xs
    let n = s.Length
    if n % 2 = 1 then s.[n / 2] else (s.[n / 2 - 1] + s.[n / 2]) / 2.0

let private benchData (a: ParseResults<BenchArgs>) =
    let size = a.GetResult(BenchArgs.Image_Size, Transforms.Spec.paperCrop)
    let workers = a.GetResult(BenchArgs.Workers, 1)
    let count = a.GetResult(Iterations, 10) * 16
    // CUB-like JPEGs: 500x375 with texture, written once to a temp folder.
    let dir = Directory.CreateTempSubdirectory "pmg-bench-"
    let files =
        [| for i in 0..7 ->
               let path = Path.Combine(dir.FullName, sprintf "%d.jpg" i)
               use img = Synthetic.renderClass 500 (i % Synthetic.maxClasses) i
               img.Mutate(fun c -> c.Resize(500, 375) |> ignore)
               img.SaveAsJpeg path
               { Path = path; Label = 0; Box = None; TrimBottom = 0 } |]
    let spec = Transforms.Spec.train (resizeFor size) size
    let rate = Loader.throughput (Loader.fromSamples files false) spec count workers
    dir.Delete true
    printfn "decode + resize %d + random crop %d + flip + normalise, %d worker(s), %d images" (resizeFor size) size workers count
    printfn "per core: %.1f img/s" (rate / float workers)
    printfn "%.1f img/s" rate
    0

let private engineOf (device: torch.Device) (spec: string) : Engine.Engine =
    match spec with
    | "default" -> Engine.forDevice device
    | "plain" -> Engine.plain
    | list ->
        list.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
        |> Array.fold
            (fun (e: Engine.Engine) feature ->
                match feature with
                | "flat" -> { e with FlatParameters = true }
                | "nhwc" -> { e with ChannelsLast = true }
                | "benchmark" -> { e with CudnnBenchmark = true }
                | "tf32" -> { e with Tf32 = true }
                | "pinned" -> { e with PinnedCopies = true }
                | other -> failwithf "--engine: unknown feature '%s'; use default, plain, or a list of flat, nhwc, benchmark, tf32, pinned" other)
            Engine.plain

/// The rungs of `--ladder`: each adds one change to the one before.
let private ladder =
    [ "plain port, fp32", "plain", "fp32"
      "+ flat parameters and SGD", "flat", "fp32"
      "+ cuDNN autotuning, TF32 matmul", "flat,benchmark,tf32", "fp32"
      "+ NHWC (channels_last)", "flat,benchmark,tf32,nhwc", "fp32"
      "+ bf16 mixed precision", "flat,benchmark,tf32,nhwc", "bf16"
      "bf16 mixed, plain otherwise", "plain", "bf16" ]

/// Runs every rung in a child process of its own (a fresh caching allocator each, so memory figures are its own).
let private benchLadder (argv: string[]) =
    let self = Reflection.Assembly.GetEntryAssembly().Location
    let keep =
        // The caller's other options, minus the ones each rung sets.
        let rec strip = function
            | ("--ladder") :: rest -> strip rest
            | ("--engine" | "--precision") :: _ :: rest -> strip rest
            | x :: rest -> x :: strip rest
            | [] -> []
        argv |> List.ofArray |> List.skipWhile ((<>) "bench") |> List.tail |> strip
    let runRung (engine: string) (precision: string) =
        let args = [ "bench"; yield! keep; "--engine"; engine; "--precision"; precision ]
        let psi = ProcessStartInfo(Environment.ProcessPath, RedirectStandardOutput = true)
        if Path.GetFileNameWithoutExtension Environment.ProcessPath = "dotnet" then psi.ArgumentList.Add self
        for a in args do psi.ArgumentList.Add a
        use p = Process.Start psi
        let out = p.StandardOutput.ReadToEnd()
        p.WaitForExit()
        printf "%s" out
        let field (prefix: string) =
            out.Split('\n') |> Array.tryFind (fun l -> l.StartsWith prefix) |> Option.map (fun l -> l.Substring(prefix.Length).Trim())
        let rate = out.Split('\n') |> Array.tryFindBack (fun l -> l.EndsWith " img/s") |> Option.map (fun l -> l.Replace(" img/s", "").Trim())
        let figure (prefix: string) = field prefix |> Option.filter (fun v -> not (v.StartsWith "n/a"))
        let memory =
            figure "peak GPU memory allocated:" |> Option.map (sprintf "%s allocated")
            |> Option.orElse (figure "peak GPU memory growth:" |> Option.map (sprintf "%s growth"))
            |> Option.orElse (field "peak host memory:" |> Option.map (sprintf "%s (host)"))
        p.ExitCode, field "ms per iteration (median):", rate, memory
    let results = [ for name, engine, precision in ladder -> name, engine, precision, runRung engine precision ]
    printfn ""
    printfn "| change | --engine | --precision | ms / iteration | img/s | speed-up | peak memory |"
    printfn "| --- | --- | --- | --- | --- | --- | --- |"
    let baseRate =
        match results with
        | (_, _, _, (0, _, Some r, _)) :: _ -> Some(float r)
        | _ -> None
    for name, engine, precision, (code, ms, rate, mem) in results do
        let speedup =
            match baseRate, rate with
            | Some b, Some r when code = 0 -> sprintf "%.2fx" (float r / b)
            | _ -> "-"
        let show = Option.defaultValue (if code = 0 then "-" else sprintf "failed (exit %d)" code)
        printfn "| %s | %s | %s | %s | %s | %s | %s |" name engine precision (show ms) (show rate) speedup (show mem)
    if results |> List.forall (fun (_, _, _, (c, _, _, _)) -> c = 0) then 0 else 1

let private bench (argv: string[]) (a: ParseResults<BenchArgs>) =
    if a.Contains BenchArgs.Data then benchData a
    elif a.Contains Ladder then benchLadder argv
    else
    let device = a.GetResult(BenchArgs.Device, "cpu")
    Runtime.Native.init (deviceBackend device) |> ignore
    let batch = a.GetResult(BenchArgs.Batch_Size, 16)
    let size = a.GetResult(BenchArgs.Image_Size, Transforms.Spec.paperCrop)
    let mode = a.GetResult(Mode, "train")
    if mode <> "train" && mode <> "eval" then failwithf "--mode %s: use train or eval" mode
    let classes = a.GetResult(BenchArgs.Classes, 200)
    let e =
        { Experiment.paper classes (Experiment.Embedded Synthetic.Config.Default) with
            Model = { Pmg.Config.Paper classes with Backbone = a.GetResult(BenchArgs.Backbone, "resnet50") }
            BatchSize = batch
            Device = device
            Precision = a.TryGetResult BenchArgs.Precision |> choose "--precision" precisions Experiment.Fp32 }
    let dev = torch.Device device
    let cuda = dev.``type`` = DeviceType.CUDA
    let sync () = if cuda then torch.cuda.synchronize ()
    if cuda then (use _ = torch.ones (1L, device = dev) in sync ())
    let before = if cuda then GpuMemory.used () else None
    let engine = engineOf dev (a.GetResult(BenchArgs.Engine, "default"))
    let s = Trainer.createSessionWith engine e
    use x = torch.randn ([| int64 batch; 3L; int64 size; int64 size |], device = dev)
    use y = torch.randint (int64 classes, [| int64 batch |], device = dev)
    let once () =
        use _ = torch.NewDisposeScope()
        if mode = "train" then
            s.Net.train ()
            Trainer.iteration s e.Schedule x y |> ignore
        else
            s.Net.eval ()
            use _ = torch.no_grad ()
            use _ = Evaluate.computeRegion e.Precision dev
            s.Net.forward (Engine.inputLayout engine x) |> ignore
    let warm = a.GetResult(Warmup, 3)
    let iters = a.GetResult(Iterations, 10)
    for _ in 1..warm do once ()
    sync ()
    let times =
        [ for _ in 1..iters ->
              let w = Stopwatch.StartNew()
              once ()
              sync ()
              w.Elapsed.TotalMilliseconds ]
    let ms = median times
    printfn "%s %s %s %s batch %d %dx%d, %d steps/iteration, %d timed after %d warm-up, engine %A"
        mode e.Model.Backbone device (a.GetResult(BenchArgs.Precision, "fp32")) batch size size
        (if mode = "train" then e.Schedule.Length else 1) iters warm engine
    printfn "ms per iteration (median): %.1f" ms
    // The same memory lines as scripts/ref_bench.py, so that the two compare like with like.
    let gib (bytes: int64) = float bytes / 1073741824.0
    if cuda then
        match GpuMemory.peakAllocated (max 0 dev.index) with
        | Some p -> printfn "peak GPU memory allocated: %.2f GiB" (gib p.PeakAllocated)
        | None -> printfn "peak GPU memory allocated: n/a (%s)" (GpuMemory.unavailableReason ())
        match before, GpuMemory.used () with
        | Some b, Some after -> printfn "peak GPU memory growth: %.2f GiB" (gib (after - b))
        | _ -> printfn "peak GPU memory growth: n/a (no CUDA runtime answered cudaMemGetInfo)"
    printfn "peak host memory: %.2f GiB" (gib (Process.GetCurrentProcess().PeakWorkingSet64))
    printfn "%.1f img/s" (float batch * 1000.0 / ms)
    0

// ---------------------------------------------------------------------------------------------------

let private data (a: ParseResults<DataArgs>) =
    let root = a.GetResult DataArgs.Root
    let kind = Run.kindOf { Kind = a.GetResult DataArgs.Dataset; Root = root; Level = a.TryGetResult DataArgs.Level }
    let index = Dataset.load kind root
    let report = Inspect.inspect index
    if a.Contains DataArgs.Json then
        printfn "%s" (Inspect.toJson report)
    else
        printfn "%s at %s" index.Name index.Root
        printfn "classes %d, train %d, test %d usable images (grayscale %d, CMYK %d: converted to RGB)"
            report.Classes report.Train report.Test report.Grayscale report.Cmyk
        printfn "%d unusable:" report.Problems.Length
        for p in report.Problems do
            printfn "  %s: %s" p.File p.Problem
    0

let private errorText (e: exn) =
    match e with
    | Experiment.InvalidExperiment problems -> String.concat "\n  " ("invalid settings:" :: problems)
    | Runtime.Native.NativeLoadError m
    | Checkpoint.CheckpointError m
    | Inference.LoadError m
    | Interop.StateDict.StateDictError m
    | DatasetError m
    | Backbone.UnknownBackbone m
    | Pmg.ConfigError m -> m
    | :? FileNotFoundException as f -> sprintf "file not found: %s" f.FileName
    | e ->
        // Not one of ours: often libtorch's own error, so say which libtorch was loaded.
        match Runtime.Native.current () with
        | Some l -> sprintf "%s\n(libtorch %s from %s)" e.Message (Runtime.Native.libTorchVersion ()) l.LibTorchDir
        | None -> e.Message

[<EntryPoint>]
let main argv =
    let parser = ArgumentParser.Create<Command>(programName = "pmg")
    try
        let results = parser.ParseCommandLine(argv, raiseOnUsage = true)
        match results.GetSubCommand() with
        | Train a -> train a
        | Eval a -> eval a
        | Predict a -> predict a
        | Export a -> export a
        | Bench a -> bench argv a
        | Data a -> data a
        | Cam a -> VisualCommands.cam a
        | Jigsaw a -> VisualCommands.jigsaw a
        | Report a -> VisualCommands.report a
    with
    | :? ArguParseException as e ->
        (if e.ErrorCode = ErrorCode.HelpText then printfn "%s" e.Message else eprintfn "%s" e.Message)
        if e.ErrorCode = ErrorCode.HelpText then 0 else 2
    | e ->
        eprintfn "pmg: %s" (errorText e)
        // PMG_DEBUG=1 shows where it happened.
        if Environment.GetEnvironmentVariable "PMG_DEBUG" = "1" then eprintfn "%O" e
        1
