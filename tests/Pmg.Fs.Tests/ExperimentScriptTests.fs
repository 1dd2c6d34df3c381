/// The dataset scripts of experiments/: each trains its --smoke miniature on the fixture in a child dotnet fsi and
/// leaves a run directory; without a dataset they say where to get one and exit 2.
module Pmg.Fs.Tests.ExperimentScriptTests

open System
open System.IO
open System.Diagnostics
open Expecto

/// The repository root: the first folder holding Pmg.Fs.sln above the test binaries (or, failing that, above the
/// working directory), as ScriptTests finds it.
let private root () =
    let rec up (d: DirectoryInfo) =
        if isNull d then None
        elif File.Exists(Path.Combine(d.FullName, "Pmg.Fs.sln")) then Some d.FullName
        else up d.Parent
    [ AppContext.BaseDirectory; Environment.CurrentDirectory ]
    |> List.tryPick (DirectoryInfo >> up)
    |> Option.defaultWith (fun () -> failwith "repository root not found")

/// The variables through which the scripts find datasets and weights: removed from every child, so that a
/// developer's real datasets neither replace the fixture nor hide the missing-dataset message.
let private datasetVariables =
    [ "PMG_CUB_ROOT"; "PMG_CARS_ROOT"; "PMG_AIRCRAFT_ROOT"; "PMG_DOGS_ROOT"; "PMG_PRETRAINED" ]

/// What the scripts return when a dataset or the weights are missing (Common.fsx's missingInputExit).
let private missingInputExit = 2

type private Outcome = { Code: int; Out: string; Err: string }

/// `dotnet fsi experiments/<script> args` in a fresh folder, with the dataset variables removed.
let private fsi (script: string) (args: string list) (workDir: string) : Outcome =
    let psi = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = workDir)
    for a in [ "fsi"; Path.Combine(root (), "experiments", script) ] @ args do
        psi.ArgumentList.Add a
    for v in datasetVariables do
        psi.Environment.Remove v |> ignore
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    p.WaitForExit()
    { Code = p.ExitCode; Out = out.Result; Err = err.Result }

/// A temporary folder, removed afterwards (a smoke run leaves checkpoints of tens of MB).
let private withTempDir (f: string -> unit) =
    let d = Directory.CreateTempSubdirectory("pmg-experiment-").FullName
    try f d finally (try Directory.Delete(d, true) with _ -> ())

let private smoke (script: string) =
    test (sprintf "experiments/%s --smoke trains on the fixture and prints the results table" script) {
        withTempDir (fun work ->
            let out = Path.Combine(work, "run")
            let r = fsi script [ "--smoke"; "--out"; out ] work
            Expect.equal r.Code 0 (r.Out + r.Err)
            Expect.stringContains r.Out "| combined |" "results table"
            Expect.stringContains r.Out "mean per-class accuracy" "mean per-class accuracy"
            Expect.stringContains r.Out "paper:" "the paper's number beside ours"
            Expect.isTrue (File.Exists(Path.Combine(out, "config.json"))) "config.json in the run directory")
    }

[<Tests>]
let tests =
    // Sequenced: each child trains on all cores, and the first one compiles the library for the others.
    testSequenced
    <| testList
        "experiment scripts"
        [ yield! [ "cub.fsx"; "cars.fsx"; "aircraft.fsx"; "dogs.fsx" ] |> List.map smoke
          test "a dataset script without a dataset names where to download it and exits 2" {
              withTempDir (fun work ->
                  let r = fsi "cub.fsx" [] work
                  Expect.equal r.Code missingInputExit (r.Out + r.Err)
                  Expect.stringContains r.Err "Download it from" "download hint"
                  Expect.stringContains r.Err "PMG_CUB_ROOT" "names the variable to set")
          } ]
