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

[<EntryPoint>]
let main argv =
    Pmg.Fs.Runtime.Native.ensure Pmg.Fs.Runtime.Native.Cpu |> ignore
    // No test may reach the network, nor read or fill the user's PyTorch cache: starting weights resolve offline
    // against an empty cache, here and in every child process (WeightsTests serve their own downloads).
    Environment.SetEnvironmentVariable("PMG_OFFLINE", "1")
    Environment.SetEnvironmentVariable("TORCH_HOME", Pmg.Fs.Tests.TestKit.processTempDir "torch-home")
    let code = Tests.runTestsInAssemblyWithCLIArgs [ Printer printer ] argv
    // On a line of its own, after Expecto's colour codes.
    counts |> Option.iter (fun (passed, failed) -> printfn "\n%d passed, %d failed" passed failed)
    code
