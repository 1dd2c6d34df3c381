/// The F# scripts: the loader lists the library's files in compile order, and the quickstart runs in dotnet fsi.
module Pmg.Fs.Tests.ScriptTests

open System.IO
open System.Text.RegularExpressions
open Expecto
open Pmg.Fs.Tests.TestKit

[<Tests>]
let tests =
    testList
        "scripts"
        [ test "experiments/Pmg.fsx loads the library's files in the project's compile order" {
              let r = repoRoot ()
              let fsproj = File.ReadAllText(Path.Combine(r, "src", "Pmg.Fs", "Pmg.Fs.fsproj"))
              let compiled = [ for m in Regex.Matches(fsproj, "<Compile Include=\"([^\"]+)\"") -> m.Groups.[1].Value ]
              let script = File.ReadAllText(Path.Combine(r, "experiments", "Pmg.fsx"))
              let loaded = [ for m in Regex.Matches(script, "\"\\.\\./src/Pmg\\.Fs/([^\"]+\\.fs)\"") -> m.Groups.[1].Value ]
              Expect.isNonEmpty compiled "fsproj lists files"
              Expect.equal loaded compiled "same files, same order"
          }
          test "the quickstart trains in dotnet fsi and prints the results table" {
              use work = new TempDir "quickstart"
              let r = fsi "quickstart.fsx" [ "1" ] work.Path []
              Expect.equal r.Code 0 (r.Out + r.Err)
              Expect.stringContains r.Out "epoch 1/1" "trained one epoch"
              Expect.stringContains r.Out "| combined |" "results table"
          } ]
