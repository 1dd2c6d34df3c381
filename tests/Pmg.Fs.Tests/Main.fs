module Pmg.Fs.Tests.Main

open System
open Expecto
open Expecto.Impl

/// Expecto's own printer; it also keeps the counts for the plain closing line that CI tools read.
let mutable private counts = None

let private printer =
    let p = TestPrinters.defaultPrinter
    { p with
        summary =
            fun config summary ->
                counts <- Some(summary.passed.Length, summary.failed.Length + summary.errored.Length)
                p.summary config summary }

/// A program that only loads a checkpoint through the C# door and predicts, as a deployment does: nothing else runs
/// first in its process (no native runtime loaded beforehand).
let private childPredict (checkpoint: string) (index: int) =
    use model = Pmg.Fs.Api.TrainedModel.Load checkpoint
    use image = Pmg.Fs.Api.EmbeddedImages.Get index
    let top = model.Predict(image, 1).[0]
    printfn "class %d %s %f" top.Class top.Name top.Score
    0

[<EntryPoint>]
let main argv =
    match argv with
    | [| "--child-predict"; checkpoint; index |] -> childPredict checkpoint (int index)
    | _ ->
    Pmg.Fs.Runtime.Native.ensure Pmg.Fs.Runtime.Native.Cpu |> ignore
    // No test may reach the network, nor read or fill the user's PyTorch cache: starting weights resolve offline
    // against an empty cache, here and in every child process (WeightsTests serve their own downloads).
    Environment.SetEnvironmentVariable("PMG_OFFLINE", "1")
    Environment.SetEnvironmentVariable("TORCH_HOME", Pmg.Fs.Tests.TestKit.processTempDir "torch-home")
    let code = Tests.runTestsInAssemblyWithCLIArgs [ Printer printer ] argv
    // On a line of its own, after Expecto's colour codes.
    counts |> Option.iter (fun (passed, failed) -> printfn "\n%d passed, %d failed" passed failed)
    code
