module Pmg.Fs.Tests.Main

open Expecto
open Expecto.Impl

/// Expecto's own printer, plus one plain closing line ("N passed, N failed") that CI tools read.
let private printer =
    let p = TestPrinters.defaultPrinter
    { p with
        summary =
            fun config summary ->
                async {
                    do! p.summary config summary
                    printfn "%d passed, %d failed" summary.passed.Length (summary.failed.Length + summary.errored.Length)
                } }

[<EntryPoint>]
let main argv =
    Pmg.Fs.Runtime.Native.init Pmg.Fs.Runtime.Native.Cpu |> ignore
    Tests.runTestsInAssemblyWithCLIArgs [ Printer printer ] argv
