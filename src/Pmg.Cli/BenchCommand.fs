/// `pmg bench`: the library's benchmarks (Training.Bench) with their output, and `--ladder`, which runs each speed
/// change in a child process of its own (a fresh caching allocator each, so memory figures are its own).
module Pmg.Cli.BenchCommand

open System
open System.IO
open System.Diagnostics
open Argu
open Pmg.Fs
open Pmg.Fs.Training
open Pmg.Cli.Args

let private gib (bytes: int64) = float bytes / 1073741824.0

let private single (a: ParseResults<BenchArgs>) =
    let dev = a.GetResult(BenchArgs.Device, "cpu") |> device
    let precision = a.TryGetResult BenchArgs.Precision |> Option.map (choose "--precision" [ "fp32", Experiment.Fp32; "bf16", Experiment.Bf16 ])
    let e =
        Bench.experiment (a.GetResult(BenchArgs.Backbone, "resnet50")) (a.GetResult(BenchArgs.Classes, 200) |> within "--classes" 2 100000)
            (a.GetResult(BenchArgs.Batch_Size, 16) |> within "--batch-size" 2 4096) dev (defaultArg precision Experiment.Fp32)
    let r =
        Bench.run
            { Experiment = e
              Mode = a.GetResult(Mode, "train") |> choose "--mode" [ "train", Bench.Train; "eval", Bench.Eval ]
              Engine = Bench.engineOf (Runtime.Device.torch dev) (a.GetResult(BenchArgs.Engine, "default"))
              ImageSize = a.GetResult(BenchArgs.Image_Size, e.Input.Crop) |> within "--image-size" 8 4096
              Iterations = a.GetResult(Iterations, 10) |> within "--iterations" 1 100000
              Warmup = a.GetResult(Warmup, 3) |> within "--warmup" 0 100000 }
    printfn "%s" r.Description
    printfn "ms per iteration (median): %.1f" r.Milliseconds
    // The same memory lines as scripts/ref_bench.py, so that the two compare like with like.
    let figure label =
        Option.iter (function
            | Ok b -> printfn "%s: %.2f GiB" label (gib b)
            | Error why -> printfn "%s: n/a (%s)" label why)
    figure "peak GPU memory allocated" r.Memory.Allocated
    figure "peak GPU memory growth" r.Memory.Growth
    printfn "peak host memory: %.2f GiB" (gib r.Memory.Host)
    printfn "%.1f img/s" r.ImagesPerSecond
    0

let private data (a: ParseResults<BenchArgs>) =
    let crop = a.GetResult(BenchArgs.Image_Size, (Experiment.paper 2 Experiment.embedded.Data).Input.Crop)
    let workers = a.GetResult(BenchArgs.Workers, 1) |> within "--workers" 1 1024
    let count = (a.GetResult(Iterations, 10) |> within "--iterations" 1 100000) * 16
    let rate = Bench.data crop workers count
    printfn "decode + resize + random crop %d + flip + normalise, %d worker(s), %d images" crop workers count
    printfn "per core: %.1f img/s" (rate / float workers)
    printfn "%.1f img/s" rate
    0

/// The rungs of `--ladder`: each adds one change to the one before.
let private ladder =
    [ "plain port, fp32", "plain", "fp32"
      "+ flat parameters and SGD", "flat", "fp32"
      "+ cuDNN autotuning, TF32 matmul", "flat,benchmark,tf32", "fp32"
      "+ NHWC (channels_last)", "flat,benchmark,tf32,nhwc", "fp32"
      "+ bf16 mixed precision", "flat,benchmark,tf32,nhwc", "bf16"
      "bf16 mixed, plain otherwise", "plain", "bf16" ]

let private runLadder (argv: string[]) =
    let self = Reflection.Assembly.GetEntryAssembly().Location
    let keep =
        // The caller's other options, minus the ones each rung sets.
        let rec strip =
            function
            | "--ladder" :: rest -> strip rest
            | ("--engine" | "--precision") :: _ :: rest -> strip rest
            | x :: rest -> x :: strip rest
            | [] -> []
        argv |> List.ofArray |> List.skipWhile ((<>) "bench") |> List.tail |> strip
    let runRung (engine: string) (precision: string) =
        let psi = ProcessStartInfo(Environment.ProcessPath, RedirectStandardOutput = true)
        if Path.GetFileNameWithoutExtension Environment.ProcessPath = "dotnet" then psi.ArgumentList.Add self
        for arg in [ "bench"; yield! keep; "--engine"; engine; "--precision"; precision ] do
            psi.ArgumentList.Add arg
        use p = Process.Start psi
        let out = p.StandardOutput.ReadToEnd()
        p.WaitForExit()
        printf "%s" out
        let lines = out.Split('\n')
        let field (prefix: string) =
            lines |> Array.tryFind (fun l -> l.StartsWith prefix) |> Option.map (fun l -> l.Substring(prefix.Length).Trim())
        let rate = lines |> Array.tryFindBack (fun l -> l.EndsWith " img/s") |> Option.map (fun l -> l.Replace(" img/s", "").Trim())
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

let run (argv: string[]) (a: ParseResults<BenchArgs>) =
    if a.Contains BenchArgs.Data then data a
    elif a.Contains Ladder then runLadder argv
    else single a
