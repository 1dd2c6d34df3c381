/// Reliability cases 100-199: images and datasets. One verdict per image for `data`, `train` and `predict`;
/// `data` exits 1 exactly when `train` refuses; unusable test images counted; `predict` goes on past a file it
/// cannot read.
module Pmg.Fs.Tests.DataReliability

open System
open System.IO
open Expecto
open Pmg.Fs.Tests.TestKit
open Pmg.Fs.Tests.TestKit.Reliability
open Pmg.Fs.Tests.ImageVerdictTests

/// A `folder` dataset: per split and class, `count` good JPEGs named 1.jpg ...
let private folderOf (root: string) (classes: string list) (count: int) =
    folderDataset root classes (fun _ -> count) (fun dir _ c i -> BrokenImages.jpeg (Path.Combine(dir, sprintf "%d.jpg" i)) (i + 10 * c.Length))

/// `train` of one epoch at 24 px on a `folder` dataset, into `out`.
let private train (root: string) (out: string) =
    [ "train"; "--dataset"; "folder"; "--root"; root; "--pretrained"; "none"; "--backbone"; "resnet18"; "--image-size"; "24"
      "--batch-size"; "2"; "--workers"; "1"; "--epochs"; "1"; "--out"; out ]

let private data (root: string) = [ "data"; "--dataset"; "folder"; "--root"; root ]

/// The first line of `text` that contains `fragment`, with the test's folder shown as <dir>.
let private lineWith (dir: string) (fragment: string) (text: string) =
    text.Split('\n') |> Array.tryFind (fun l -> l.Contains fragment) |> Option.defaultValue "" |> says dir

let cases: Test list =
    [ test "a test split without usable images is an error; single unusable test images are counted" {
          use tmp = new TempDir "rel-testsplit"
          let root = tmp.File "data"
          folderOf root [ "a"; "b" ] 2
          for f in Directory.GetFiles(Path.Combine(root, "test"), "*", SearchOption.AllDirectories) do
              BrokenImages.cut 0.6 f
          let testDir = Path.Combine(root, "test")
          let out = tmp.File "run"
          tryCase 100 "`train` on a `folder` dataset whose test images are all truncated" tmp.Path (train root out) 1
              [ testDir; "no usable test images"; "download the dataset again" ] "nothing written" |> ignore
          Expect.isFalse (Directory.Exists out) "no run folder"
          tryCase 101 "`data` on that dataset" tmp.Path (data root) 1 [ testDir; "no usable test images" ] "-" |> ignore
          // Repair all but one: training runs and says which test image it left out.
          folderOf root [ "a"; "b" ] 2
          let bad = Path.Combine(root, "test", "b", "2.jpg")
          BrokenImages.cut 0.6 bad
          let out2 = tmp.File "run2"
          let o = tryCase 102 "`train` with one truncated test image" tmp.Path (train root out2) 0 [ bad; "1 test image could not be used" ] "the run"
          Expect.stringContains o.Out "test set (3 images)" "three images evaluated"
          record 102 { Case = "`train` with one truncated test image"; Exit = 0; Says = lineWith tmp.Path "test image" o.Err; Kept = "the run" }
      }

      test "a truncated JPEG or PNG, a lying header and a WebP named .jpg: the same verdict in data, train and predict" {
          use tmp = new TempDir "rel-verdict"
          let root = tmp.File "data"
          folderOf root [ "a"; "b" ] 2
          let file name = Path.Combine(root, "train", "a", name)
          let cutJpeg = file "cut.jpg"
          BrokenImages.jpeg cutJpeg 1
          BrokenImages.cut 0.6 cutJpeg
          let cutPng = file "cut.png"
          BrokenImages.png cutPng 2
          BrokenImages.cut 0.6 cutPng
          let lying = file "lying.png"
          BrokenImages.lyingPng lying 20000 20000
          let webp = file "webp.jpg"
          BrokenImages.webp webp 3
          let o = tryCase 103 "`data` on a dataset with a truncated JPEG, a truncated PNG, a PNG saying 20000x20000 and a WebP named .jpg" tmp.Path (data root) 0 [] "-"
          for f in [ cutJpeg; cutPng; lying ] do
              Expect.stringContains o.Out f "listed as unusable"
          Expect.isFalse (o.Out.Contains webp) "the WebP is usable"
          Expect.stringContains o.Out "train 5, test 4 usable" "counts"
          record 103 { Case = "`data` on a dataset with a truncated JPEG, a truncated PNG, a PNG saying 20000x20000 and a WebP named .jpg"
                       Exit = 0; Says = lineWith tmp.Path "3 unusable" o.Out; Kept = "-" }
          let out = tmp.File "run"
          let o = tryCase 104 "`train` on that dataset" tmp.Path (train root out) 0 [ "3 unusable images skipped" ] "the run"
          record 104 { Case = "`train` on that dataset"; Exit = 0; Says = lineWith tmp.Path "unusable" o.Err; Kept = "the run" }
          let ckpt = trainedCheckpoint ()
          for n, f, why in [ 105, cutJpeg, "end-of-image"; 106, cutPng, "cut off"; 107, lying, "20000x20000" ] do
              tryCase n (sprintf "`predict` on %s" (Path.GetFileName f)) tmp.Path [ "predict"; "--checkpoint"; ckpt; f ] 1 [ f; why; "re-download" ] "-" |> ignore
          let o = tryCase 108 "`predict` on the WebP named .jpg" tmp.Path [ "predict"; "--checkpoint"; ckpt; webp ] 0 [] "-"
          Expect.stringContains o.Out webp "classified"
          Expect.stringContains o.Out "class " "a class"
          record 108 { Case = "`predict` on the WebP named .jpg"; Exit = 0; Says = "(classified) " + lineWith tmp.Path "class " o.Out; Kept = "-" }
      }

      test "data exits 1 exactly on the layouts train refuses" {
          use tmp = new TempDir "rel-layout"
          let mutable n = 110
          let both (case: string) (arrange: string -> unit) (mentions: string -> string list) =
              let root = tmp.File(sprintf "data%d" n)
              folderOf root [ "a"; "b" ] 1
              arrange root
              let out = tmp.File(sprintf "run%d" n)
              tryCase n (sprintf "`data` on %s" case) tmp.Path (data root) 1 (mentions root) "-" |> ignore
              tryCase (n + 1) (sprintf "`train` on %s" case) tmp.Path (train root out) 1 (mentions root) "nothing written" |> ignore
              Expect.isFalse (Directory.Exists out) (sprintf "%s: no run folder" case)
              n <- n + 2
          both "a class only in test/" (fun root ->
              Directory.CreateDirectory(Path.Combine(root, "test", "c")) |> ignore
              BrokenImages.jpeg (Path.Combine(root, "test", "c", "1.jpg")) 9)
              (fun _ -> [ "class c"; "add training images" ])
          both "a file `train/c` where a class folder belongs" (fun root -> File.WriteAllText(Path.Combine(root, "train", "c"), "x"))
              (fun root -> [ Path.Combine(root, "train", "c"); "is a file"; "move it" ])
          both "a class folder whose images are all unreadable" (fun root -> BrokenImages.cut 0.5 (Path.Combine(root, "train", "b", "1.jpg")))
              (fun _ -> [ "class b"; "no usable training images" ])
          both "a folder symlink loop `train/d_loop`" (fun root ->
              let loop = Path.Combine(root, "train", "d_loop")
              Directory.CreateSymbolicLink(loop, loop) |> ignore)
              (fun root -> [ Path.Combine(root, "train", "d_loop"); "loops"; "remove it" ])
          both "a single class" (fun root -> Directory.Delete(Path.Combine(root, "train", "b"), true); Directory.Delete(Path.Combine(root, "test", "b"), true))
              (fun _ -> [ "1 class"; "at least 2" ])
          let root = tmp.File "webp"
          folderOf root [ "a"; "b" ] 1
          for split in [ "train"; "test" ] do
              let w = Path.Combine(root, split, "w")
              Directory.CreateDirectory w |> ignore
              BrokenImages.webp (Path.Combine(w, "1.webp")) 4
          let o = tryCase 120 "`data` on a dataset with a class of only .webp files" tmp.Path (data root) 0 [] "-"
          Expect.stringContains o.Out "classes 3, train 3, test 3 usable" "the WebP class listed and usable"
          record 120 { Case = "`data` on a dataset with a class of only .webp files"; Exit = 0; Says = lineWith tmp.Path "classes 3" o.Out; Kept = "-" }
      }

      test "predict goes on past a symlink loop or a link to nothing, and exits 1 at the end" {
          use tmp = new TempDir "rel-predict"
          let ckpt = trainedCheckpoint ()
          let good = tmp.File "good.jpg"
          BrokenImages.jpeg good 5
          let loop = tmp.File "loop.jpg"
          File.CreateSymbolicLink(loop, loop) |> ignore
          let o = tryCase 130 "`predict loop.jpg good.jpg` (a symlink loop)" tmp.Path [ "predict"; "--checkpoint"; ckpt; loop; good ] 1 [ loop; "symbolic link"; "point it at an image" ] "-"
          Expect.stringContains o.Out good "the good image classified"
          let lines = o.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries) |> Array.filter (fun l -> l.Contains loop)
          Expect.equal lines.Length 1 (sprintf "one line names it: %s" o.Err)
          let gone = tmp.File "gone.jpg"
          File.CreateSymbolicLink(gone, tmp.File "nowhere.jpg") |> ignore
          let o = tryCase 131 "`predict gone.jpg good.jpg` (a link to nothing)" tmp.Path [ "predict"; "--checkpoint"; ckpt; gone; good ] 1 [ gone; "leads nowhere" ] "-"
          Expect.stringContains o.Out good "the good image classified"
      } ]
