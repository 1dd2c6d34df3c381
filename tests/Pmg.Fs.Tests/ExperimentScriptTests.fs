/// The dataset scripts of experiments/: --smoke trains the miniature of the fixture in a child dotnet fsi and leaves
/// a run directory; without a dataset a script says where to get one and exits 2.
module Pmg.Fs.Tests.ExperimentScriptTests

open System
open System.IO
open System.Diagnostics
open Expecto

/// What the scripts return for a missing or bad input, as `pmg` does for a flag.
let private missingInputExit = 2

/// `dotnet fsi experiments/<script> args` in `workDir`.
let private fsi (script: string) (args: string list) (workDir: string) = TestKit.fsi script args workDir []

/// A small run of the paper's recipe in `pmg train`'s own flags (the scripts read those): one epoch of ResNet18 from
/// random weights on 32 px crops, narrow batches.
let private smallRun = [ "--backbone"; "resnet18"; "--pretrained"; "none"; "--epochs"; "1"; "--batch-size"; "4"; "--image-size"; "32"; "--workers"; "1" ]

/// The dataset scripts share one body (Common.fsx) and differ only in their DatasetSpec, so one of them trains
/// (the CUB miniature: 4 classes, 12 training and 12 test images) and another is run without a dataset. The readers
/// of the other layouts are checked by the dataset tests and `pmg data`.
let private cub = {| Script = "cub.fsx"; Classes = FgvcMini.Cub.classes.Length; Images = FgvcMini.Cub.classes.Length * FgvcMini.Cub.perClass / 2 |}

[<Tests>]
let tests =
    // Sequenced: each child trains on all cores.
    testSequenced
    <| testList
        "experiment scripts"
        [ test "experiments/cub.fsx with pmg train's flags trains one epoch on the fixture: its classes, its images, one metrics row" {
              use work = new TestKit.TempDir "experiment"
              let out = work.File "run"
              let r = fsi cub.Script ([ "--root"; FgvcMini.dataset FgvcMini.Cub.folder; "--out"; out ] @ smallRun) work.Path
              Expect.equal r.Code 0 (r.Out + r.Err)
              Expect.stringContains r.Out (sprintf "%d classes, 1 epoch," cub.Classes) "the class count the dataset has"
              Expect.stringContains r.Out "not the paper's recipe" "says the small run is not comparable"
              Expect.stringContains r.Out (sprintf "test set (%d images)" cub.Images) "every test image evaluated"
              Expect.stringContains r.Out "mean per-class accuracy" "mean per-class accuracy"
              Expect.stringContains r.Out "paper: 89.6%" "the paper's number beside ours"
              let rows = File.ReadAllLines(Path.Combine(out, "metrics.csv"))
              Expect.equal rows.Length 2 "header and one epoch row"
              let header = rows.[0].Split(',')
              let col name = rows.[1].Split(',').[Array.findIndex ((=) name) header]
              // The smoke batch is 4 and the paper recipe skips partial batches: 12 images are 3 full batches.
              Expect.floatClose Accuracy.low (float (col "images_per_s") * float (col "seconds")) (float (cub.Images / 4 * 4)) "images trained"
              Expect.equal (File.ReadAllLines(Path.Combine(out, "classes.txt")) |> Array.filter ((<>) "") |> Array.length) cub.Classes "classes.txt"
          }
          test "a dataset script without a dataset names where to download it and exits 2" {
              use work = new TestKit.TempDir "experiment"
              let r = fsi "dogs.fsx" [] work.Path
              Expect.equal r.Code missingInputExit (r.Out + r.Err)
              Expect.stringContains r.Err "Download it from" "download hint"
              Expect.stringContains r.Err "--root" "names the flag to give"
              let bad = fsi "dogs.fsx" [ "--root"; work.Path; "--lr"; "nan" ] work.Path
              Expect.equal bad.Code missingInputExit (bad.Out + bad.Err)
              Expect.stringContains bad.Err "--lr" "a bad value is named by its flag, as pmg does"
          } ]
