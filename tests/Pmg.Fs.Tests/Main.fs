module Pmg.Fs.Tests.Main

open Expecto

[<EntryPoint>]
let main argv =
    Pmg.Fs.Runtime.Native.init Pmg.Fs.Runtime.Native.Cpu |> ignore
    Tests.runTestsInAssemblyWithCLIArgs [] argv
