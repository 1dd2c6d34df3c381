/// One use case, three doors: the command line, C# and the library give the same answer for the same model and
/// image, and a program that only loads a model and predicts works on its own.
module Pmg.Fs.Tests.DoorsTests

open System
open System.IO
open System.Text.Json
open Expecto
open Pmg.Fs
open Pmg.Fs.App
open Pmg.Fs.Data
open Pmg.Fs.Training
open Pmg.Fs.Tests.TestKit

/// The top class and its score from `pmg predict --json` for one image.
let private cliTop (model: string list) (image: string) =
    let o = pmg ([ "predict" ] @ model @ [ "--json"; "--top-k"; "1"; image ])
    Expect.equal o.Code 0 (sprintf "predict %s: %s" image o.Err)
    use doc = JsonDocument.Parse(o.Out.Trim())
    let top = doc.RootElement.GetProperty("top").[0]
    top.GetProperty("class").GetInt32(), top.GetProperty("score").GetDouble()

/// The class the evaluation path (loader batches, the test transform, Evaluate.run) predicts for one embedded test
/// image: a one-image source evaluated, read off the confusion matrix.
let private evalPrediction (m: ModelFiles.Loaded) (index: int) =
    let source: Loader.Source =
        { Count = 1
          Label = fun _ -> Embedded.classOf index
          Name = fun _ -> sprintf "embedded:test:%d" index
          Load = fun _ -> Embedded.image Synthetic.Test index }
    let i = m.Description.Input
    let e = { Experiment.embedded with Model = m.Net.Config; BatchSize = 1; Input = { Resize = i.Resize; Crop = i.Crop; Padding = 0 } }
    let acc = Trainer.evaluateNet e m.Net m.Device m.Net.Config.Classes source
    let row = Embedded.classOf index
    [ 0 .. m.Net.Config.Classes - 1 ] |> List.find (fun j -> acc.Confusion.[row, j] = 1)

[<Tests>]
let tests =
    testList
        "doors"
        [ test "predict embedded:test:N: the command line, C# and evaluation give one class and score" {
              let ckpt = trainedCheckpoint ()
              use model = Api.TrainedModel.Load ckpt
              let m = ModelFiles.load ckpt ModelFiles.Overrides.None Runtime.Cpu
              use _ = m.Net
              for index in [ 3; 13 ] do
                  let cliClass, cliScore = cliTop [ "--checkpoint"; ckpt ] (sprintf "embedded:test:%d" index)
                  use image = Api.EmbeddedImages.Get index
                  let csharp = (model.Predict(image, 1)).[0]
                  Expect.equal csharp.Class cliClass (sprintf "image %d: C# and the CLI" index)
                  Expect.floatClose Accuracy.high (float csharp.Score) cliScore (sprintf "image %d: the same score" index)
                  Expect.equal (evalPrediction m index) cliClass (sprintf "image %d: evaluation's prediction" index)
              // The embedded images are the recipe's drawing: the same pixels through both names.
              use a = Embedded.load "embedded:test:3"
              use b = Api.EmbeddedImages.Get 3
              Expect.equal (a.Width, a.Height) (Embedded.config.ImageSize, Embedded.config.ImageSize) "the recipe's size"
              Expect.isTrue (a.DangerousTryGetSinglePixelMemory() |> fun (_, x) -> x.Span.SequenceEqual((snd (b.DangerousTryGetSinglePixelMemory())).Span)) "same pixels"
          }

          test "a new process that only loads a checkpoint and predicts works (the native runtime is loaded at the door)" {
              let o = run "dotnet" [ Path.Combine(AppContext.BaseDirectory, "Pmg.Fs.Tests.dll"); "--child-predict"; trainedCheckpoint (); "3" ] None []
              Expect.equal o.Code 0 (sprintf "the child exits 0: %s %s" o.Out o.Err)
              Expect.stringContains o.Out "class" "it printed a prediction"
          }

          test "export --to pytorch, then predict from the .pth with no flags, equals predict from the .ckpt" {
              use tmp = new TempDir "doors-pth"
              let ckpt = trainedCheckpoint ()
              let pth = tmp.File "model.pth"
              let o = pmg [ "export"; "--checkpoint"; ckpt; "--to"; "pytorch"; "--out"; pth ]
              Expect.equal o.Code 0 o.Err
              for index in [ 3; 13 ] do
                  let image = sprintf "embedded:test:%d" index
                  let fromCkpt = cliTop [ "--checkpoint"; ckpt ] image
                  let fromPth = cliTop [ "--checkpoint"; pth ] image
                  Expect.equal (fst fromPth) (fst fromCkpt) "the same class"
                  Expect.floatClose Accuracy.high (snd fromPth) (snd fromCkpt) "the same score"
          }

          test "predict --onnx verifies the model: bytes flipped in its weights are refused by name" {
              use tmp = new TempDir "doors-onnx"
              let onnx = tmp.File "model.onnx"
              let o = pmg [ "export"; "--checkpoint"; trainedCheckpoint (); "--to"; "onnx"; "--out"; onnx ]
              Expect.equal o.Code 0 o.Err
              let good = cliTop [ "--onnx"; onnx ] "embedded:test:3"
              Expect.equal (fst good) (fst (cliTop [ "--checkpoint"; trainedCheckpoint () ] "embedded:test:3")) "ONNX = checkpoint"
              let bytes = File.ReadAllBytes onnx
              for i in 0..1999 do
                  let at = bytes.Length / 2 + i
                  bytes.[at] <- bytes.[at] ^^^ 0x5Auy
              let damaged = tmp.File "damaged.onnx"
              File.WriteAllBytes(damaged, bytes)
              let o = pmg [ "predict"; "--onnx"; damaged; "embedded:test:3" ]
              Expect.equal o.Code 1 "refused"
              Expect.stringContains o.Err damaged "names the file"
              Expect.isFalse (o.Out.Contains "NaN") "no NaN score printed"
          } ]
