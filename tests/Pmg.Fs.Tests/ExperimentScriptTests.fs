/// The dataset scripts of experiments/: each trains its --smoke miniature on the fixture in a child dotnet fsi and
/// leaves a run directory; without a dataset they say where to get one and exit 2.
module Pmg.Fs.Tests.ExperimentScriptTests

open System
open System.IO
open System.Diagnostics
open Expecto

/// The variables through which the scripts find datasets and weights: removed from every child, so that a
/// developer's real datasets neither replace the fixture nor hide the missing-dataset message.
let private datasetVariables =
    [ "PMG_CUB_ROOT"; "PMG_CARS_ROOT"; "PMG_AIRCRAFT_ROOT"; "PMG_DOGS_ROOT"; "PMG_PRETRAINED" ]

/// What the scripts return when a dataset or the weights are missing (Common.fsx's missingInputExit).
let private missingInputExit = 2

/// `dotnet fsi experiments/<script> args` in `workDir`, with the dataset variables removed.
let private fsi (script: string) (args: string list) (workDir: string) = TestKit.fsi script args workDir datasetVariables

/// The generated miniature each dataset script reads with --smoke --root.
let private fixtures =
    [ "cub.fsx", FgvcMini.Cub.folder
      "cars.fsx", FgvcMini.Cars.folder
      "aircraft.fsx", FgvcMini.Aircraft.folder
      "dogs.fsx", FgvcMini.Dogs.folder ]
    |> Map.ofList

let private smoke (script: string) =
    test (sprintf "experiments/%s --smoke trains on the fixture and prints the results table" script) {
        use work = new TestKit.TempDir "experiment"
        let out = work.File "run"
        let r = fsi script [ "--smoke"; "--root"; FgvcMini.dataset (Map.find script fixtures); "--out"; out ] work.Path
        Expect.equal r.Code 0 (r.Out + r.Err)
        Expect.stringContains r.Out "| combined |" "results table"
        Expect.stringContains r.Out "mean per-class accuracy" "mean per-class accuracy"
        Expect.stringContains r.Out "paper:" "the paper's number beside ours"
        Expect.isTrue (File.Exists(Path.Combine(out, "config.json"))) "config.json in the run directory"
    }

[<Tests>]
let tests =
    // Sequenced: each child trains on all cores, and the first one compiles the library for the others.
    testSequenced
    <| testList
        "experiment scripts"
        [ yield! [ "cub.fsx"; "cars.fsx"; "aircraft.fsx"; "dogs.fsx" ] |> List.map smoke
          test "a dataset script without a dataset names where to download it and exits 2" {
              use work = new TestKit.TempDir "experiment"
              let r = fsi "cub.fsx" [] work.Path
              Expect.equal r.Code missingInputExit (r.Out + r.Err)
              Expect.stringContains r.Err "Download it from" "download hint"
              Expect.stringContains r.Err "PMG_CUB_ROOT" "names the variable to set"
          } ]
