/// The F# scripts: the loader lists the library's files in compile order, and the quickstart runs in dotnet fsi.
module Pmg.Fs.Tests.ScriptTests

open System.IO
open System.Diagnostics
open System.Text.RegularExpressions
open Expecto

/// The repository root: the folder above tests/ that holds this test project.
let private root () =
    let rec up (d: DirectoryInfo) =
        if isNull d then failwith "repository root not found"
        elif File.Exists(Path.Combine(d.FullName, "Pmg.Fs.sln")) then d.FullName
        else up d.Parent
    up (DirectoryInfo System.AppContext.BaseDirectory)

[<Tests>]
let tests =
    testList
        "scripts"
        [ test "experiments/Pmg.fsx loads the library's files in the project's compile order" {
              let r = root ()
              let fsproj = File.ReadAllText(Path.Combine(r, "src", "Pmg.Fs", "Pmg.Fs.fsproj"))
              let compiled = [ for m in Regex.Matches(fsproj, "<Compile Include=\"([^\"]+)\"") -> m.Groups.[1].Value ]
              let script = File.ReadAllText(Path.Combine(r, "experiments", "Pmg.fsx"))
              let loaded = [ for m in Regex.Matches(script, "\"\\.\\./src/Pmg\\.Fs/([^\"]+\\.fs)\"") -> m.Groups.[1].Value ]
              Expect.isNonEmpty compiled "fsproj lists files"
              Expect.equal loaded compiled "same files, same order"
          }
          test "the quickstart trains in dotnet fsi and prints the results table" {
              let r = root ()
              let psi = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = TrainingTests.tempDir ())
              for a in [ "fsi"; Path.Combine(r, "experiments", "quickstart.fsx"); "1" ] do
                  psi.ArgumentList.Add a
              use p = Process.Start psi
              let out = p.StandardOutput.ReadToEndAsync()
              let err = p.StandardError.ReadToEndAsync()
              p.WaitForExit()
              Expect.equal p.ExitCode 0 (out.Result + err.Result)
              Expect.stringContains out.Result "epoch 1/1" "trained one epoch"
              Expect.stringContains out.Result "| combined |" "results table"
          } ]
