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
    TestKit.folderDataset root classes (fun _ -> images) (fun dir _ _ i -> write (Path.Combine(dir, sprintf "%d.jpg" i)))

let private goodImage (path: string) = (Data.Synthetic.renderClass 32 0 (path.GetHashCode())).SaveAsJpeg path


/// A small `folder` dataset that trains an epoch in seconds: 2 classes, 4 training and 2 test images each, 24 px.
let private smallFolder (root: string) =
    let count split = if split = "train" then 4 else 2
    TestKit.folderDataset root [ "a"; "b" ] count (fun dir split c i ->
        (Data.Synthetic.renderClass 24 (if c = "a" then 0 else 1) (i * 7 + count split)).SaveAsPng(Path.Combine(dir, sprintf "%d.png" i)))

/// `pmg train` flags for the small folder dataset: one epoch of ResNet18 from random weights.
let private smallTrain (root: string) (out: string) =
    [ "train"; "--dataset"; "folder"; "--root"; root; "--backbone"; "resnet18"; "--pretrained"; "none"; "--epochs"; "1"
      "--image-size"; "16"; "--batch-size"; "4"; "--workers"; "1"; "--out"; out ]

let private tempsIn (dir: string) = Directory.GetFiles(dir, ".*.tmp-*") |> Array.map Path.GetFileName |> List.ofArray

let private runFolderCases: Test list =
    [ test "a run holds its folder: a second writer is refused naming the first, and other files are never overwritten" {
          use tmp = new TempDir "rel-lock"
          let root = tmp.File "data"
          smallFolder root
          let held = tmp.File "held"
          let lock = RunFolder.acquire held "training (a test)"
          try
              tryCase 22 "`train --out RUN` while another process trains into RUN" tmp.Path (smallTrain root held) 1 [ held; "in use by process" ] "the other run's folder, untouched" |> ignore
              Expect.isFalse (File.Exists(Path.Combine(held, "config.json"))) "nothing written by the refused run"
          finally
              (lock :> IDisposable).Dispose()
          let mine = tmp.File "mine"
          Directory.CreateDirectory mine |> ignore
          for f in [ "config.json"; "report.md"; "classes.txt"; "manifest.json" ] do
              File.WriteAllText(Path.Combine(mine, f), "the user's own " + f)
          let before = snapshot mine
          tryCase 23 "`train --out DIR` where DIR holds other files (the user's config.json, report.md, ...)" tmp.Path (smallTrain root mine) 1 [ mine; "config.json"; "--out" ] "the folder, unchanged" |> ignore
          Expect.equal (snapshot mine) before "the user's files untouched"
          tryCase 24 "`train --out \"\"`" tmp.Path (smallTrain root "") 2 [ "--out" ] "nothing written" |> ignore
          let file = tmp.File "a-file"
          File.WriteAllText(file, "x")
          tryCase 25 "`train --out FILE/run` (a file on the path)" tmp.Path (smallTrain root (Path.Combine(file, "run"))) 1 [ file; "is a file" ] "nothing written" |> ignore
      }

      test "no command writes onto its own input or into another run" {
          use tmp = new TempDir "rel-self"
          let run = tmp.File "run"
          copyDir (trainedRunDir ()) run
          let ckpt = Path.Combine(run, "best.ckpt")
          let before = snapshot run
          // The same file spelled another way: relative to the working directory of the child.
          let relative = Path.GetRelativePath(Environment.CurrentDirectory, ckpt)
          tryCase 26 "`export --checkpoint C --to pytorch --out C` (the same file, spelled relatively)" tmp.Path [ "export"; "--checkpoint"; ckpt; "--to"; "pytorch"; "--out"; relative ] 1 [ "also an input" ] "the checkpoint, unchanged" |> ignore
          let other = tmp.File "other"
          copyDir (trainedRunDir ()) other
          let otherBefore = snapshot other
          tryCase 27 "`report RUN_A --out RUN_B/report.md` (another run's report)" tmp.Path [ "report"; run; "--out"; Path.Combine(other, "report.md") ] 1 [ other; "belongs to the run" ] "both runs, unchanged" |> ignore
          Expect.equal (snapshot other) otherBefore "the other run untouched (no report, no plot)"
          Expect.equal (snapshot run) before "the input run untouched"
          tryCase 28 "`report` on a folder that does not exist" tmp.Path [ "report"; tmp.File "missing" ] 1 [ tmp.File "missing"; "does not exist" ] "-" |> ignore
      }

      test "an epoch commits as a whole: a kill at any moment leaves a folder that one command continues" {
          use tmp = new TempDir "rel-commit"
          let root = tmp.File "data"
          smallFolder root
          // Killed after last.ckpt (the commit) and before best.ckpt, metrics.csv and the report.
          let afterCommit = tmp.File "after"
          let killed = pmgWith [ "PMG_TEST_KILL_AT", "epoch-1-after-commit" ] (smallTrain root afterCommit)
          Expect.notEqual killed.Code 0 "the kill ends the process"
          Expect.isTrue (File.Exists(Path.Combine(afterCommit, "last.ckpt"))) "committed"
          Expect.isFalse (File.Exists(Path.Combine(afterCommit, "best.ckpt"))) "best.ckpt not yet written"
          let o = tryCase 29 "killed after committing the last epoch (before best.ckpt and the report), then `--resume`" tmp.Path (smallTrain root afterCommit @ [ "--resume" ]) 0 [] "the run, completed: best.ckpt, metrics.csv, report.md"
          Expect.stringContains o.Out "completed" "says what it completed"
          for f in [ "best.ckpt"; "metrics.csv"; "report.md" ] do
              Expect.isTrue (File.Exists(Path.Combine(afterCommit, f))) (sprintf "%s written" f)
          let again = pmg (smallTrain root afterCommit @ [ "--resume" ])
          Expect.equal again.Code 0 again.Err
          Expect.stringContains again.Out "nothing to do" "then complete and consistent"
          // Killed before the first commit: the run has no epoch; resume starts it again, plain train refuses.
          let beforeCommit = tmp.File "before"
          let killed = pmgWith [ "PMG_TEST_KILL_AT", "epoch-1-before-commit" ] (smallTrain root beforeCommit)
          Expect.notEqual killed.Code 0 "the kill ends the process"
          tryCase 30 "killed before the first commit, then `train` again without `--resume`" tmp.Path (smallTrain root beforeCommit) 1 [ beforeCommit; "no epoch finished yet"; "--resume" ] "the run's config, kept" |> ignore
          tryCase 31 "the same folder with `--resume`" tmp.Path (smallTrain root beforeCommit @ [ "--resume" ]) 0 [] "the run, trained from its start" |> ignore
          Expect.isTrue (File.Exists(Path.Combine(beforeCommit, "best.ckpt"))) "trained to the end"
          // A garbage line in metrics.csv: the table is rebuilt from the commit.
          File.AppendAllText(Path.Combine(beforeCommit, "metrics.csv"), "garbage,,,\n")
          let o = tryCase 32 "a garbage line in metrics.csv, then `--resume`" tmp.Path (smallTrain root beforeCommit @ [ "--resume" ]) 0 [] "metrics.csv rebuilt from last.ckpt"
          Expect.stringContains o.Out "metrics.csv" "metrics.csv completed"
          Expect.isFalse ((File.ReadAllText(Path.Combine(beforeCommit, "metrics.csv"))).Contains "garbage") "rebuilt"
      }

      test "a signal during a checkpoint write leaves no temporary file, and the run continues" {
          use tmp = new TempDir "rel-term"
          let root = tmp.File "data"
          smallFolder root
          let out = tmp.File "run"
          let o = pmgWith [ "PMG_TEST_TERM_WRITING", "last.ckpt" ] (smallTrain root out)
          Expect.notEqual o.Code 0 "SIGTERM ends the process"
          Expect.isEmpty (tempsIn out) "no .last.ckpt.tmp-* left"
          record 33 { Case = "SIGTERM while last.ckpt is being written"; Exit = o.Code; Says = "(terminated)"; Kept = "no temporary file; the run (no epoch committed)" }
          let resumed = pmg (smallTrain root out @ [ "--resume" ])
          Expect.equal resumed.Code 0 resumed.Err
      }

      test "resume compares settings, not spellings; a changed setting is shown with both values" {
          use tmp = new TempDir "rel-resume"
          let root = tmp.File "data"
          smallFolder root
          let out = tmp.File "run"
          let first = pmg (smallTrain root out)
          Expect.equal first.Code 0 first.Err
          let link = tmp.File "data-link"
          Directory.CreateSymbolicLink(link, root) |> ignore
          for spelling in [ root + "/"; Path.GetRelativePath(Environment.CurrentDirectory, root); link ] do
              let o = pmg (smallTrain spelling out @ [ "--resume" ])
              Expect.equal o.Code 0 (sprintf "%s: %s" spelling o.Err)
              Expect.stringContains o.Out "nothing to do" spelling
          record 34 { Case = "`train --resume` with the dataset root spelled with a trailing slash, relatively, or through a link"; Exit = 0; Says = "nothing to do: <dir>/run holds all 1 epoch of the run"; Kept = "the run" }
          tryCase 35 "`train --resume` with another `--batch-size`" tmp.Path (smallTrain root out @ [ "--resume"; "--batch-size"; "2" ]) 1 [ "BatchSize: 4 in the run, 2 now" ] "the run, unchanged" |> ignore
      }

      test "bad values exit 2 naming the flag, before anything is written" {
          use tmp = new TempDir "rel-flags"
          let root = tmp.File "data"
          smallFolder root
          let out = tmp.File "run"
          let cases =
              [ 36, "`train --lr nan`", [ "--lr"; "nan" ], [ "--lr" ]
                37, "`train --lr -1`", [ "--lr"; "-1" ], [ "--lr" ]
                38, "`train --heads 0`", [ "--heads"; "0" ], [ "--heads" ]
                39, "`train --level foo` on a folder dataset", [ "--level"; "foo" ], [ "--level" ]
                40, "`train --batch-size 16` on 8 training images (partial batches skipped)", [ "--batch-size"; "16" ], [ "--batch-size"; "8" ] ]
          for n, case, extra, mentions in cases do
              tryCase n case tmp.Path (smallTrain root out @ extra) 2 mentions "nothing written" |> ignore
              Expect.isFalse (Directory.Exists out) (sprintf "%s: no run folder" case)
          let ckpt = trainedCheckpoint ()
          tryCase 41 "`predict embedded:test:99999` (120 exist) and a good image" tmp.Path [ "predict"; "--checkpoint"; ckpt; "embedded:test:99999"; "embedded:test:1" ] 1 [ "embedded:test:99999"; "0..119" ] "-" |> ignore
          tryCase 42 "`predict embedded:foo`" tmp.Path [ "predict"; "--checkpoint"; ckpt; "embedded:foo" ] 1 [ "embedded:test:N" ] "-" |> ignore
          let onnx = tmp.File "m.onnx"
          Expect.equal (pmg [ "export"; "--checkpoint"; ckpt; "--to"; "onnx"; "--out"; onnx ]).Code 0 "exported"
          tryCase 43 "`predict --onnx M --top-k 99` (the model has 8 classes)" tmp.Path [ "predict"; "--onnx"; onnx; "--top-k"; "99"; "embedded:test:0" ] 2 [ "--top-k" ] "-" |> ignore
          let viaCheckpoint = pmg [ "predict"; "--checkpoint"; onnx; "embedded:test:0" ]
          Expect.equal viaCheckpoint.Code 0 ("predict takes an .onnx given as --checkpoint: " + viaCheckpoint.Err)
          tryCase 44 "an .onnx given to `eval --checkpoint` (only predict runs ONNX models)" tmp.Path [ "eval"; "--checkpoint"; onnx ] 1 [ onnx; "--onnx" ] "-" |> ignore
          let o = pmg [ "eval"; "--checkpoint"; ckpt; "--batch-size"; "1" ]
          Expect.equal o.Code 0 ("eval --batch-size 1 works: " + o.Err)
      }

      test "TensorBoard through a real run: a run killed in epoch 2 and resumed logs every step once" {
          use tmp = new TempDir "rel-tensorboard"
          let root = tmp.File "data"
          smallFolder root
          let out = tmp.File "run"
          let one = smallTrain root out
          let at = List.findIndex ((=) "--epochs") one
          let args = one |> List.mapi (fun i a -> if i = at + 1 then "2" else a)
          // Killed after epoch 2's batches were logged, before its commit: the resume trains epoch 2 again.
          let killed = pmgWith [ "PMG_TEST_KILL_AT", "epoch-2-before-commit" ] args
          Expect.notEqual killed.Code 0 "the kill ends the process"
          let resumed = pmg (args @ [ "--resume" ])
          Expect.equal resumed.Code 0 resumed.Err
          let pairs =
              [ for f in Visual.TensorBoard.eventFiles out do
                    for e in TensorBoardTests.readEvents f do
                        for v in e.Values -> v.Tag, e.Step ]
          let twice = pairs |> List.countBy id |> List.filter (fun (_, n) -> n > 1)
          Expect.isEmpty twice "no (tag, step) twice after the kill and the resume"
          // 8 training images in batches of 4: 2 batches an epoch, steps 1..4 over two epochs.
          let steps tag = pairs |> List.filter (fst >> (=) tag) |> List.map snd |> List.sort
          Expect.equal (steps "loss/concat") [ 1L; 2L; 3L; 4L ] "every batch's loss once"
          Expect.equal (steps "test/combined/top1") [ 2L; 4L ] "every epoch once, at its last batch"
          Expect.isNonEmpty (steps "gradcam") "the end images"
          record 46 { Case = "killed in epoch 2 after its batches were logged, then `--resume`: TensorBoard's records"; Exit = resumed.Code; Says = "(the run completes)"; Kept = "every step logged once" }
      }

      test "the GPU script's symbol preflight checks every C++ symbol the sources look up, wherever they are" {
          let root = repoRoot ()
          let inSources =
              Directory.GetFiles(Path.Combine(root, "src"), "*.fs", SearchOption.AllDirectories)
              |> Array.filter (fun f -> not (f.Contains "/bin/" || f.Contains "/obj/"))
              |> Array.collect (fun f -> Text.RegularExpressions.Regex.Matches(File.ReadAllText f, "\"(_Z[A-Za-z0-9_]+)\"") |> Seq.map (fun m -> m.Groups.[1].Value) |> Array.ofSeq)
              |> Set.ofArray
          Expect.isNonEmpty inSources "the project looks symbols up by name"
          let o = run "bash" [ Path.Combine(root, "scripts", "gpu-check.sh"); "--dry-run" ] (Some root) []
          Expect.equal o.Code 0 o.Err
          let listed = o.Out.Split('\n') |> Array.map _.Trim() |> Array.filter (fun l -> l.StartsWith "_Z") |> Set.ofArray
          Expect.equal listed inSources "every symbol, none missing"
          // With no sources to read, the dry run fails instead of checking nothing.
          use empty = new TempDir "gpu-dry"
          Directory.CreateDirectory(Path.Combine(empty.Path, "scripts")) |> ignore
          File.Copy(Path.Combine(root, "scripts", "gpu-check.sh"), Path.Combine(empty.Path, "scripts", "gpu-check.sh"))
          let bare = run "bash" [ Path.Combine(empty.Path, "scripts", "gpu-check.sh"); "--dry-run" ] (Some empty.Path) []
          Expect.equal bare.Code 1 ("no sources, no dry run: " + bare.Out + bare.Err)
          record 45 { Case = "`bash scripts/gpu-check.sh --dry-run` in a tree without the sources it reads"; Exit = bare.Code; Says = Reliability.says empty.Path bare.Err; Kept = "-" }
      } ]

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
let private cases: Test list = DataReliability.cases @ WeightsTests.cases

[<Tests>]
let tests =
    testSequenced
    <| testList
        "reliability"
        [ yield! cases
          yield! runFolderCases
          test "run folders: never overwritten, resumed only when there is something to resume, with the same settings" {
              use tmp = new TempDir "rel-run"
              let run = tmp.File "run"
              copyDir (trainedRunDir ()) run
              let before = snapshot run
              tryCase 1 "`train --out RUN` where RUN holds a run, without `--resume`" tmp.Path [ "train"; "--out"; run ] 1 [ run; "--resume" ] "the run, unchanged" |> ignore
              Expect.equal (snapshot run) before "unchanged"
              tryCase 2 "`train --resume` without `--out`" tmp.Path [ "train"; "--resume" ] 2 [ "--out" ] "nothing written" |> ignore
              let missing = tmp.File "typo"
              tryCase 3 "`train --resume --out DIR` where DIR holds no run" tmp.Path [ "train"; "--resume"; "--out"; missing ] 1 [ missing; "no run to resume" ] "nothing written" |> ignore
              Expect.isFalse (Directory.Exists missing) "no folder made"
              tryCase 4 "`train --resume` with another `--batch-size` than the run's" tmp.Path
                  [ "train"; "--resume"; "--out"; run; "--epochs"; "1"; "--image-size"; "24"; "--batch-size"; "16"; "--backbone"; "resnet18"; "--pretrained"; "none"; "--workers"; "1" ]
                  1 [ "BatchSize: 32 in the run, 16 now" ] "the run, unchanged" |> ignore
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
              tryCase 15 "`train --image-size 7` (an 8x8 jigsaw of 7 px)" tmp.Path [ "train"; "--image-size"; "7"; "--out"; tmp.File "run7" ] 2 [ "jigsaw grid 8"; "at least 8 px" ] "nothing written" |> ignore
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
