/// The `pmg` command run as a separate process, as a user runs it: exit codes, messages, output formats.
module Pmg.Fs.Tests.CliTests

open System
open System.IO
open System.Diagnostics
open System.Text.Json
open Expecto
open SixLabors.ImageSharp
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Training

/// Runs pmg with arguments; returns exit code, stdout, stderr.
let pmg (args: string list) =
    let r = TestKit.pmg args
    r.Code, r.Out, r.Err

/// A checkpoint of an untrained 3-class ResNet18 PMG (our format) and a test image.
let private fixture =
    lazy
        (let dir = TestKit.processTempDir "cli"
         let s = Trainer.createSession TrainingTests.tiny
         let ckpt = Path.Combine(dir, "tiny.ckpt")
         Checkpoint.save ckpt (TestKit.checkpointOf s (TestKit.progress 1))
         let image = Path.Combine(dir, "bird.png")
         (Data.Synthetic.renderClass 28 0 1).SaveAsPng image
         dir, ckpt, image)

[<Tests>]
let tests =
    testList
        "cli"
        [ test "every command has --help" {
              for cmd in [ "train"; "eval"; "predict"; "export"; "bench"; "data" ] do
                  let code, out, _ = pmg [ cmd; "--help" ]
                  Expect.equal code 0 (sprintf "%s --help exits 0" cmd)
                  Expect.stringContains out "USAGE" (sprintf "%s usage" cmd)
          }
          test "a bad flag is named, with exit code 2" {
              let code, _, err = pmg [ "train"; "--epoks"; "3" ]
              Expect.equal code 2 "exit code"
              Expect.stringContains err "--epoks" "names the flag"
          }
          test "a missing checkpoint file is named" {
              let code, _, err = pmg [ "predict"; "--checkpoint"; "/nonexistent/x.ckpt"; "a.jpg" ]
              Expect.equal code 1 "exit code"
              Expect.stringContains err "/nonexistent/x.ckpt" "names the file"
          }
          test "a missing image is named" {
              let _, ckpt, _ = fixture.Force()
              let code, _, err = pmg [ "predict"; "--checkpoint"; ckpt; "/nonexistent/bird.jpg" ]
              Expect.equal code 1 "exit code"
              Expect.stringContains err "/nonexistent/bird.jpg" "names the file"
          }
          test "a checkpoint of the wrong class count is refused with a hint" {
              let dir, ckpt, image = fixture.Force()
              // A flag that contradicts what the file says of itself: a bad value, exit 2, named by its flag.
              let code, _, err = pmg [ "predict"; "--checkpoint"; ckpt; "--classes"; "5"; image ]
              Expect.equal code 2 "our checkpoint: exit code"
              Expect.stringContains err "--classes" "our checkpoint: hint"
              let pth = Path.Combine(dir, "tiny.pth")
              let code, _, err = pmg [ "export"; "--checkpoint"; ckpt; "--to"; "pytorch"; "--out"; pth ]
              Expect.equal code 0 (sprintf "export: %s" err)
              let code, _, err = pmg [ "predict"; "--checkpoint"; pth; "--backbone"; "resnet18"; "--classes"; "5"; "--image-size"; "28"; image ]
              Expect.equal code 2 ".pth (ours, described inside): exit code"
              Expect.stringContains err "3" ".pth: names the checkpoint's class count"
              Expect.stringContains err "--classes" ".pth: hint"
          }
          test "predict --json --logits prints one object per image with every head's logits" {
              let _, ckpt, image = fixture.Force()
              let code, out, err = pmg [ "predict"; "--checkpoint"; ckpt; "--json"; "--logits"; "--top-k"; "2"; image; image ]
              Expect.equal code 0 err
              let lines = out.Split('\n', StringSplitOptions.RemoveEmptyEntries)
              Expect.equal lines.Length 2 "one line per image"
              use doc = JsonDocument.Parse lines.[0]
              let root = doc.RootElement
              Expect.equal (root.GetProperty("image").GetString()) image "image"
              let top = [ for t in root.GetProperty("top").EnumerateArray() -> t.GetProperty("class").GetInt32(), t.GetProperty("score").GetDouble() ]
              Expect.equal top.Length 2 "top-k"
              Expect.isTrue (snd top.[0] >= snd top.[1]) "sorted by score"
              let logits = root.GetProperty "logits"
              let arr (name: string) = [| for v in logits.GetProperty(name).EnumerateArray() -> v.GetDouble() |]
              for name in [ "stage3"; "stage4"; "stage5"; "concat"; "combined" ] do
                  Expect.equal (arr name).Length 3 (sprintf "%s has one logit per class" name)
              let sum = Array.init 3 (fun i -> [ "stage3"; "stage4"; "stage5"; "concat" ] |> List.sumBy (fun n -> (arr n).[i]))
              for i in 0..2 do
                  // The network adds the four in fp32 (rounding ~1e-7 of the sum per addition); the test adds the
                  // printed values in float64. 1e-4 relative is far above that and far below any missing term.
                  Expect.floatClose { absolute = 1e-3; relative = 1e-4 } (arr "combined").[i] sum.[i] "combined = sum of the four"
          }
          test "eval prints every head's accuracy for a checkpoint, on the data it was trained on" {
              let _, ckpt, _ = fixture.Force()
              let code, out, err = pmg [ "eval"; "--checkpoint"; ckpt ]
              Expect.equal code 0 err
              for row in [ "| stage3"; "| stage4"; "| stage5"; "| concat"; "| combined" ] do
                  Expect.stringContains out row row
              Expect.stringContains out "6 test images" "the tiny dataset's test split"
          }
          test "export --to pytorch writes the reference key names, and the file loads back strictly" {
              let dir, ckpt, _ = fixture.Force()
              let pth = Path.Combine(dir, "export.pth")
              let code, _, err = pmg [ "export"; "--checkpoint"; ckpt; "--to"; "pytorch"; "--out"; pth ]
              Expect.equal code 0 err
              let keys = Interop.StateDict.read pth |> List.map fst
              use net = Pmg.create TrainingTests.tiny.Model
              Expect.equal (List.sort keys) (net.state_dict().Keys |> List.ofSeq |> List.sort) "keys"
          }
          test "train on the embedded dataset writes a run directory and a results table" {
              use runDir = new TestKit.TempDir "cli-train"
              let dir = runDir.Path
              let code, out, err = pmg [ "train"; "--epochs"; "1"; "--image-size"; "24"; "--batch-size"; "32"; "--out"; dir ]
              Expect.equal code 0 err
              Expect.stringContains out "| combined |" "results table"
              for f in [ "config.json"; "manifest.json"; "metrics.csv"; "last.ckpt"; "best.ckpt" ] do
                  Expect.isTrue (File.Exists(Path.Combine(dir, f))) f
              // Flags not given keep the embedded recipe's values.
              let config = File.ReadAllText(Path.Combine(dir, "config.json"))
              Expect.stringContains config "\"Forward\": \"Truncated\"" "embedded recipe's forward mode kept"
              Expect.stringContains config "\"Backbone\": \"resnet18-mlnet\"" "embedded recipe's backbone kept"
              Expect.stringContains config "\"Weights\": \"ImageNet\"" "from the ImageNet weights that ship"
              // The libtorch read from the loaded binary (x.y.z), not TorchSharp's four-part build figure.
              let manifest = File.ReadAllText(Path.Combine(dir, "manifest.json"))
              Expect.isMatch manifest "\"libtorch\": \"\\d+\\.\\d+\\.\\d+(\\+[^\"]+)?\"" "manifest names the loaded libtorch's version"
          } ]

/// `pmg data` and a one-epoch `pmg train` on each miniature benchmark, in its official layout.
[<Tests>]
let datasets =
    let fixtures =
        [ "cub", "CUB_200_2011", 4, 12, 12
          "cars", "stanford_cars", 3, 9, 9
          "aircraft", "fgvc-aircraft-2013b", 3, 18, 9
          "dogs", "stanford_dogs", 3, 9, 9 ]
    testList
        "cli datasets"
        [ for name, folder, classes, trainCount, testCount in fixtures do
              test (sprintf "pmg data --json on %s" name) {
                  let code, out, err = pmg [ "data"; "--dataset"; name; "--root"; FgvcMini.dataset folder; "--json" ]
                  Expect.equal code 0 err
                  use doc = JsonDocument.Parse out
                  let r = doc.RootElement
                  Expect.equal (r.GetProperty("classes").GetInt32()) classes "classes"
                  Expect.equal (r.GetProperty("train").GetInt32()) trainCount "train"
                  Expect.equal (r.GetProperty("test").GetInt32()) testCount "test"
                  Expect.equal (r.GetProperty("problems").GetArrayLength()) 0 "no problems"
              }
              if name = "cub" then
                  // One training run through the CLI is enough to check the layout -> data -> run path; the
                  // readers of the other layouts are checked by `pmg data` above and the dataset tests.
                  test (sprintf "one-epoch pmg train on %s: classes, images and metrics as the dataset has them" name) {
                      use runDir = new TestKit.TempDir "cli-train"
                      let dir = runDir.Path
                      let code, out, err =
                          pmg [ "train"; "--dataset"; name; "--root"; FgvcMini.dataset folder; "--pretrained"; "none"
                                "--backbone"; "resnet18"; "--epochs"; "1"; "--batch-size"; "4"; "--image-size"; "32"; "--workers"; "1"; "--out"; dir ]
                      Expect.equal code 0 err
                      Expect.stringContains out (sprintf "%d classes" classes) "class count"
                      Expect.stringContains out (sprintf "test set (%d images)" testCount) "every test image evaluated"
                      let rows = File.ReadAllLines(Path.Combine(dir, "metrics.csv"))
                      Expect.equal rows.Length 2 "header and one epoch row"
                      let header = rows.[0].Split(',')
                      let row = rows.[1].Split(',')
                      let col name = row.[Array.findIndex ((=) name) header]
                      Expect.equal (col "epoch") "1" "epoch"
                      // The paper recipe trains full batches only: 12 images in batches of 4.
                      let trained = float (col "images_per_s") * float (col "seconds")
                      Expect.floatClose Accuracy.low trained (float (trainCount / 4 * 4)) "images trained"
                      Expect.equal (File.ReadAllLines(Path.Combine(dir, "classes.txt")) |> Array.filter ((<>) "") |> Array.length) classes "classes.txt"
                  } ]
