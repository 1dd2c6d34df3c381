/// Benchmarks: one training iteration (every progressive step) or one inference forward on synthetic tensors
/// already on the device, timed as the median of synchronised iterations after warm-up; and the data pipeline
/// (JPEG decoding and augmentation) on CUB-sized images.
module Pmg.Fs.Training.Bench

open System
open System.Diagnostics
open System.IO
open SixLabors.ImageSharp
open SixLabors.ImageSharp.Processing
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Data
open Pmg.Fs.Runtime

/// What a benchmark times.
type Mode =
    /// One training iteration: every step of the schedule with its backward and optimizer step.
    | Train
    /// One inference forward, without gradients.
    | Eval

/// What to benchmark and how.
type Options =
    { /// The experiment whose network, batch size, device and precision are timed (see `experiment`).
      Experiment: Experiment.Experiment
      /// Training iteration or inference forward.
      Mode: Mode
      /// The speed and memory settings to time with (see `engineOf`).
      Engine: Engine.Engine
      /// Side of the square random input, in pixels.
      ImageSize: int
      /// Timed iterations; the result is their median.
      Iterations: int
      /// Untimed iterations before the timed ones.
      Warmup: int }

/// Peak memory of the run, as scripts/ref_bench.py reports it for PyTorch: on CUDA the caching allocator's peak
/// allocated bytes (max_memory_allocated; Error says why it is not available) and the growth of device memory in
/// use (cudaMemGetInfo); always the process's peak host memory.
type Memory =
    { /// Peak bytes allocated by the CUDA caching allocator; None off CUDA.
      Allocated: Result<int64, string> option
      /// Growth in bytes of device memory in use, from before the network was built to the end; None off CUDA.
      Growth: Result<int64, string> option
      /// Peak working set of the process, in bytes.
      Host: int64 }

/// A benchmark's median time, throughput, memory, and what was timed.
type Result =
    { /// Median time of one iteration, in milliseconds.
      Milliseconds: float
      /// Images per second: the batch size over the median time.
      ImagesPerSecond: float
      /// Peak memory of the run.
      Memory: Memory
      /// What was timed, in one line: mode, backbone, device, precision, batch, size, steps, iterations and engine.
      Description: string }

/// The network-sized experiment a benchmark times: the paper's recipe on `backbone` for `classes` classes.
let experiment (backbone: string) (classes: int) (batch: int) (device: Device) (precision: Experiment.Precision) =
    { Experiment.paper classes (Experiment.Embedded Synthetic.Config.Default) with BatchSize = batch; Device = device; Precision = precision }
    |> Experiment.withBackbone backbone

let private median (xs: float list) =
    let s = List.sort xs
    let n = s.Length
    if n % 2 = 1 then s.[n / 2] else (s.[n / 2 - 1] + s.[n / 2]) / 2.0

/// Engine features by name: `default` (the device's), `plain`, or a comma list of flat, nhwc, benchmark, tf32, pinned.
let engineOf (device: torch.Device) (spec: string) : Engine.Engine =
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
                | other -> Errors.setting Setting.Engine (sprintf "engine feature '%s' is unknown: use default, plain, or a list of flat, nhwc, benchmark, tf32, pinned" other))
            Engine.plain

/// Times the network (Options.Mode) on random tensors. Weights start from the seed: speed does not depend on them.
let run (o: Options) : Result =
    // The input size is checked with the rest: a size the backbone cannot take is refused as a run would refuse it.
    let e = Experiment.validate (Experiment.withImageSize o.ImageSize { o.Experiment with Weights = Model.Backbone.Scratch })
    let dev = Device.torch e.Device
    let cuda = dev.``type`` = DeviceType.CUDA
    let sync () = if cuda then torch.cuda.synchronize ()
    if cuda then (use _ = torch.ones (1L, device = dev) in sync ())
    let before = if cuda then GpuMemory.used () else None
    let s = Trainer.createSessionWith o.Engine e
    let batch, size, classes = e.BatchSize, o.ImageSize, e.Model.Classes
    use x = torch.randn ([| int64 batch; 3L; int64 size; int64 size |], device = dev)
    use y = torch.randint (int64 classes, [| int64 batch |], device = dev)
    let once () =
        use _ = torch.NewDisposeScope()
        match o.Mode with
        | Train ->
            s.Net.train ()
            Trainer.iteration s (Trainer.lrAt e 0) e.Schedule x y |> ignore
        | Eval ->
            s.Net.eval ()
            use _ = torch.no_grad ()
            use _ = Evaluate.computeRegion e.Precision dev
            s.Net.forward (Engine.inputLayout o.Engine x) |> ignore
    for _ in 1 .. o.Warmup do
        once ()
    sync ()
    let times =
        [ for _ in 1 .. o.Iterations ->
              let w = Stopwatch.StartNew()
              once ()
              sync ()
              w.Elapsed.TotalMilliseconds ]
    let ms = median times
    let memory =
        { Allocated =
            if not cuda then None
            else
                match GpuMemory.peakAllocated (max 0 dev.index) with
                | Some p -> Some(Ok p.PeakAllocated)
                | None -> Some(Error(GpuMemory.unavailableReason ()))
          Growth =
            if not cuda then None
            else
                match before, GpuMemory.used () with
                | Some b, Some after -> Some(Ok(after - b))
                | _ -> Some(Error "no CUDA runtime answered cudaMemGetInfo")
          Host = Process.GetCurrentProcess().PeakWorkingSet64 }
    { Milliseconds = ms
      ImagesPerSecond = float batch * 1000.0 / ms
      Memory = memory
      Description =
        sprintf "%s %s %s %A batch %d %dx%d, %d steps/iteration, %d timed after %d warm-up, engine %A"
            (match o.Mode with Train -> "train" | Eval -> "eval") e.Model.Backbone (Device.text e.Device) e.Precision batch size size
            (match o.Mode with Train -> e.Schedule.Length | Eval -> 1) o.Iterations o.Warmup o.Engine }

/// Images per second through decoding, resize, random crop, flip and normalisation with `workers` threads, on
/// CUB-like JPEGs (500x375, textured) written once to a temporary folder.
let data (crop: int) (workers: int) (count: int) : float =
    let dir = Directory.CreateTempSubdirectory "pmg-bench-"
    try
        let files =
            [| for i in 0..7 ->
                   let path = Path.Combine(dir.FullName, sprintf "%d.jpg" i)
                   use img = Synthetic.renderClass 500 (i % Synthetic.maxClasses) i
                   img.Mutate(fun c -> c.Resize(500, 375) |> ignore)
                   img.SaveAsJpeg path
                   { Path = path; Label = 0; Box = None; TrimBottom = 0 } |]
        let e = Experiment.withImageSize crop (Experiment.paper 2 (Experiment.Embedded Synthetic.Config.Default))
        Loader.throughput (Loader.fromSamples files false) (Transforms.Spec.train e.Input.Resize crop) count workers
    finally
        dir.Delete true
