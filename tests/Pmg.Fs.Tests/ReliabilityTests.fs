/// Bad input and interrupted runs, tried as a user would: each case runs `pmg` (or the library where a kill is
/// needed), checks the exit code, that the message names the input and the fix, and that nothing on disk changed
/// that should not have. The table of cases in RELIABILITY.md is this list's output: the last test checks that the
/// file says what the cases do (PMG_WRITE_RELIABILITY=1 rewrites it).
module Pmg.Fs.Tests.ReliabilityTests

open System
open System.IO
open System.Security.Cryptography
open Expecto
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Training
open Pmg.Fs.Tests.TestKit
open Pmg.Fs.Tests.TestKit.Reliability
open SixLabors.ImageSharp

/// Every file under a folder with its SHA-256: what "nothing changed" compares.
let private snapshot (dir: string) : Map<string, string> =
    if not (Directory.Exists dir) then Map.empty
    else
        Directory.GetFiles(dir, "*", SearchOption.AllDirectories)
        |> Array.map (fun f -> Path.GetRelativePath(dir, f), Convert.ToHexString(SHA256.HashData(File.ReadAllBytes f)))
        |> Map.ofArray

let private copyDir (src: string) (dst: string) =
    Directory.CreateDirectory dst |> ignore
    for f in Directory.GetFiles src do
        File.Copy(f, Path.Combine(dst, Path.GetFileName f))

/// A `folder` dataset: class folders under train/ and test/, each with `images` files written by `write`.
let private folderDataset (root: string) (classes: string list) (images: int) (write: string -> unit) =
    for split in [ "train"; "test" ] do
        for c in classes do
            let dir = Path.Combine(root, split, c)
            Directory.CreateDirectory dir |> ignore
            for i in 1..images do
                write (Path.Combine(dir, sprintf "%d.jpg" i))

let private goodImage (path: string) = (Data.Synthetic.renderClass 32 0 (path.GetHashCode())).SaveAsJpeg path

let private table () =
    [ yield "| case | exit | the message starts | kept on disk |"
      yield "| --- | --- | --- | --- |"
      for KeyValue(_, r) in rows |> Seq.sortBy (fun kv -> kv.Key) ->
          sprintf "| %s | %d | %s | %s |" r.Case r.Exit (r.Says.Replace("|", "\\|")) r.Kept ]
    |> String.concat "\n"

let private reliabilityMd () = Path.Combine(repoRoot (), "RELIABILITY.md")
let private begin' = "<!-- cases: produced by tests/Pmg.Fs.Tests/ReliabilityTests.fs -->"
let private end' = "<!-- end of cases -->"

/// Case lists of other files (no [<Tests>] of their own): they run here, in sequence, before the table check.
/// Number ranges keep their rows apart: 1-99 here, 100-199 images and datasets, 200-299 run folders,
/// 300-399 model files, 400-499 weights.
let private cases: Test list = DataReliability.cases

[<Tests>]
let tests =
    testSequenced
    <| testList
        "reliability"
        [ yield! cases
          test "run folders: never overwritten, resumed only when there is something to resume, with the same settings" {
              use tmp = new TempDir "rel-run"
              let run = tmp.File "run"
              copyDir (trainedRunDir ()) run
              let before = snapshot run
              tryCase 1 "`train --out RUN` where RUN holds a run, without `--resume`" tmp.Path [ "train"; "--out"; run ] 1 [ run; "--resume" ] "the run, unchanged" |> ignore
              Expect.equal (snapshot run) before "unchanged"
              tryCase 2 "`train --resume` without `--out`" tmp.Path [ "train"; "--resume" ] 2 [ "--out" ] "nothing written" |> ignore
              let missing = tmp.File "typo"
              tryCase 3 "`train --resume --out DIR` where DIR holds no run" tmp.Path [ "train"; "--resume"; "--out"; missing ] 1 [ missing; "last.ckpt" ] "nothing written" |> ignore
              Expect.isFalse (Directory.Exists missing) "no folder made"
              tryCase 4 "`train --resume` with another `--batch-size` than the run's" tmp.Path
                  [ "train"; "--resume"; "--out"; run; "--epochs"; "1"; "--image-size"; "24"; "--batch-size"; "16"; "--backbone"; "resnet18"; "--pretrained"; "none"; "--workers"; "1" ]
                  1 [ "BatchSize" ] "the run, unchanged" |> ignore
              Expect.equal (snapshot run) before "config.json and manifest.json untouched"
          }

          test "a diverged run stops with the epoch, step and learning rates, and keeps no checkpoint of it" {
              use tmp = new TempDir "rel-nan"
              let out = tmp.File "run"
              tryCase 5 "`train --lr 1e8` (the loss diverges)" tmp.Path
                  [ "train"; "--lr"; "1e8"; "--epochs"; "1"; "--image-size"; "24"; "--batch-size"; "32"; "--backbone"; "resnet18"; "--pretrained"; "none"; "--workers"; "1"; "--out"; out ]
                  1 [ "diverged"; "epoch 1"; "--lr" ] "no last.ckpt, no best.ckpt" |> ignore
              Expect.isFalse (File.Exists(Path.Combine(out, "best.ckpt"))) "no best.ckpt"
              Expect.isFalse (File.Exists(Path.Combine(out, "last.ckpt"))) "no last.ckpt"
          }

          test "datasets without images to train on are errors, for train and for data" {
              use tmp = new TempDir "rel-data"
              let broken = tmp.File "broken"
              folderDataset broken [ "a"; "b" ] 2 (fun p -> File.WriteAllBytes(p, Array.create 64 7uy))
              let out = tmp.File "run"
              tryCase 6 "`train` on a `folder` dataset whose images are all unreadable" tmp.Path
                  [ "train"; "--dataset"; "folder"; "--root"; broken; "--pretrained"; "none"; "--backbone"; "resnet18"; "--image-size"; "24"; "--batch-size"; "2"; "--workers"; "1"; "--out"; out ]
                  1 [ broken; "no usable training images" ] "no checkpoint" |> ignore
              Expect.isFalse (File.Exists(Path.Combine(out, "last.ckpt"))) "no checkpoint"
              tryCase 7 "`data` on that dataset" tmp.Path [ "data"; "--dataset"; "folder"; "--root"; broken ] 1 [ "no usable" ] "-" |> ignore
              let empty = tmp.File "empty"
              folderDataset empty [ "a"; "b" ] 2 goodImage
              Directory.CreateDirectory(Path.Combine(empty, "train", "c")) |> ignore
              let out2 = tmp.File "run2"
              tryCase 8 "`train` on a `folder` dataset with an empty class folder" tmp.Path
                  [ "train"; "--dataset"; "folder"; "--root"; empty; "--pretrained"; "none"; "--out"; out2 ] 1 [ "class c" ] "nothing written" |> ignore
              Expect.isFalse (Directory.Exists out2) "no run folder"
          }

          test "damaged checkpoints are refused by name" {
              use tmp = new TempDir "rel-ckpt"
              let good = trainedCheckpoint ()
              let flipped = tmp.File "flipped.ckpt"
              let bytes = File.ReadAllBytes good
              // Eight bytes in the middle of the model's tensors: the zip stays readable, the checksum does not match.
              for i in 0..7 do
                  bytes.[bytes.Length / 2 + i] <- bytes.[bytes.Length / 2 + i] ^^^ 0xFFuy
              File.WriteAllBytes(flipped, bytes)
              tryCase 9 "`eval` on a checkpoint with 8 bytes overwritten" tmp.Path [ "eval"; "--checkpoint"; flipped ] 1 [ flipped; "damaged" ] "-" |> ignore
              let cut = tmp.File "cut.ckpt"
              File.WriteAllBytes(cut, (File.ReadAllBytes good).[.. 100_000])
              tryCase 10 "`predict` on a truncated checkpoint" tmp.Path [ "predict"; "--checkpoint"; cut; "embedded:test:0" ] 1 [ cut; "damaged" ] "-" |> ignore
          }

          test "bad inputs to the commands name the input and the fix; bad flag values exit 2" {
              use tmp = new TempDir "rel-input"
              let ckpt = trainedCheckpoint ()
              let text = tmp.File "notes.txt"
              File.WriteAllText(text, "not an image")
              tryCase 11 "`predict` on a folder" tmp.Path [ "predict"; "--checkpoint"; ckpt; tmp.Path ] 1 [ tmp.Path; "folder" ] "-" |> ignore
              let o = tryCase 12 "`predict` on a text file and an image" tmp.Path [ "predict"; "--checkpoint"; ckpt; text; "embedded:test:1" ] 1 [ text ] "-"
              Expect.stringContains o.Out "embedded:test:1" "the image after it is still classified"
              tryCase 13 "`train --grids a,b,c`" tmp.Path [ "train"; "--grids"; "a,b,c" ] 2 [ "--grids" ] "nothing written" |> ignore
              tryCase 14 "`train --image-size 100000`" tmp.Path [ "train"; "--image-size"; "100000" ] 2 [ "--image-size" ] "nothing written" |> ignore
              tryCase 15 "`train --image-size 7` (an 8x8 jigsaw of 7 px)" tmp.Path [ "train"; "--image-size"; "7"; "--out"; tmp.File "run7" ] 1 [ "jigsaw grid 8"; "at least 8 px" ] "nothing written" |> ignore
              Expect.isFalse (Directory.Exists(tmp.File "run7")) "no run folder"
              tryCase 16 "`predict --image-size 0`" tmp.Path [ "predict"; "--checkpoint"; ckpt; "--image-size"; "0"; "embedded:test:0" ] 2 [ "--image-size" ] "-" |> ignore
              tryCase 17 "`predict --device tpu`" tmp.Path [ "predict"; "--checkpoint"; ckpt; "--device"; "tpu"; "embedded:test:0" ] 2 [ "tpu" ] "-" |> ignore
              tryCase 18 "`predict --top-k 0`" tmp.Path [ "predict"; "--checkpoint"; ckpt; "--top-k"; "0"; "embedded:test:0" ] 2 [ "--top-k" ] "-" |> ignore
              tryCase 19 "`eval --batch-size 0`" tmp.Path [ "eval"; "--checkpoint"; ckpt; "--batch-size"; "0" ] 2 [ "--batch-size" ] "-" |> ignore
              let pth = tmp.File "model.pth"
              Interop.StateDict.write pth [ "x", TorchSharp.torch.zeros 1L ]
              tryCase 20 "`export --checkpoint model.pth`" tmp.Path [ "export"; "--checkpoint"; pth; "--to"; "onnx"; "--out"; tmp.File "m.onnx" ] 2 [ pth; ".ckpt" ] "-" |> ignore
          }

          test "a run killed during a checkpoint write resumes; the stale temporary file goes" {
              use tmp = new TempDir "rel-kill"
              let e = { TrainingTests.tiny with Epochs = 2 }
              let kill = { Trainer.Hooks.None with Epoch = fun _ r -> if r.Epoch = 0 then failwith "killed" }
              Expect.throws (fun () -> Run.train e tmp.Path false kill |> ignore) "killed after epoch 1"
              let stale = tmp.File ".last.ckpt.tmp-12345-deadbeef"
              File.WriteAllBytes(stale, Array.zeroCreate 1000)
              let resumed = Run.train e tmp.Path true Trainer.Hooks.None
              Expect.equal (resumed.History |> List.map _.Epoch) [ 1 ] "epoch 2 ran"
              Expect.isFalse (File.Exists stale) "stale temp file removed"
              record 21 { Case = "a run killed while writing last.ckpt, then `--resume`"; Exit = 0; Says = "removed .last.ckpt.tmp-..., left by an interrupted write"; Kept = "the run; its last good last.ckpt" }
          }

          test "RELIABILITY.md lists these cases as they behave" {
              let path = reliabilityMd ()
              let text = File.ReadAllText path
              let i, j = text.IndexOf begin', text.IndexOf end'
              Expect.isTrue (i >= 0 && j > i) "markers present"
              let generated = table ()
              if Environment.GetEnvironmentVariable "PMG_WRITE_RELIABILITY" = "1" then
                  File.WriteAllText(path, text.Substring(0, i + begin'.Length) + "\n" + generated + "\n" + text.Substring j)
              else
                  Expect.equal (text.Substring(i + begin'.Length, j - i - begin'.Length).Trim()) generated "the table (PMG_WRITE_RELIABILITY=1 rewrites it)"
          } ]
