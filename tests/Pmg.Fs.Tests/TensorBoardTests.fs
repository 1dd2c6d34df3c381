/// TensorBoard event files read back with a reader of the tests' own (record framing, CRC-32C, the Event and
/// Summary protobufs), and model-only checkpoints.
module Pmg.Fs.Tests.TensorBoardTests

open System
open System.IO
open System.Text
open Expecto
open SkiaSharp
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Training
open Pmg.Fs.Visual
open Pmg.Fs.Tests.TestKit

// ---------------------------------------------------------------------------------------------------
// A reader of event files, independent of the writer: bitwise CRC-32C, a minimal protobuf decoder.

/// CRC-32C, bit by bit (reflected polynomial 0x82F63B78).
let crc32c (data: byte[]) (offset: int) (count: int) : uint32 =
    let mutable crc = 0xFFFFFFFFu
    for i in offset .. offset + count - 1 do
        crc <- crc ^^^ uint32 data.[i]
        for _ in 1..8 do
            crc <- if crc &&& 1u = 1u then (crc >>> 1) ^^^ 0x82F63B78u else crc >>> 1
    ~~~crc

let private unmask (m: uint32) =
    let rot = m - 0xa282ead8u
    (rot >>> 17) ||| (rot <<< 15)

/// A protobuf field: number and payload (varint, 64-bit, 32-bit or bytes).
type private Field =
    | V of uint64
    | F64 of uint64
    | F32 of uint32
    | B of byte[]

let private decode (bytes: byte[]) : (int * Field) list =
    let mutable pos = 0
    let varint () =
        let mutable v = 0UL
        let mutable shift = 0
        let mutable go = true
        while go do
            let b = bytes.[pos]
            pos <- pos + 1
            v <- v ||| (uint64 (b &&& 0x7fuy) <<< shift)
            shift <- shift + 7
            go <- b &&& 0x80uy <> 0uy
        v
    [ while pos < bytes.Length do
          let key = varint ()
          let number = int (key >>> 3)
          match int (key &&& 7UL) with
          | 0 -> yield number, V(varint ())
          | 1 ->
              yield number, F64(BitConverter.ToUInt64(bytes, pos))
              pos <- pos + 8
          | 5 ->
              yield number, F32(BitConverter.ToUInt32(bytes, pos))
              pos <- pos + 4
          | 2 ->
              let n = int (varint ())
              yield number, B bytes.[pos .. pos + n - 1]
              pos <- pos + n
          | w -> failwithf "wire type %d" w ]

let private one n fs = fs |> List.tryFind (fst >> (=) n) |> Option.map snd
let private bytesOf n fs = match one n fs with Some(B b) -> Some b | _ -> None
let private stringOf n fs = bytesOf n fs |> Option.map Encoding.UTF8.GetString

/// One summary value as read back.
type Value =
    { Tag: string
      Simple: float32 option
      Plugin: string option
      Text: string option
      /// Height, width, colorspace and the encoded bytes of an image.
      Image: (int * int * int * byte[]) option }

/// One event as read back.
type Event = { WallTime: float; Step: int64; FileVersion: string option; Values: Value list }

let private value (bytes: byte[]) =
    let fs = decode bytes
    { Tag = defaultArg (stringOf 1 fs) ""
      Simple = (match one 2 fs with Some(F32 v) -> Some(BitConverter.UInt32BitsToSingle v) | _ -> None)
      Plugin = bytesOf 9 fs |> Option.bind (decode >> bytesOf 1) |> Option.bind (decode >> stringOf 1)
      Text = bytesOf 8 fs |> Option.bind (decode >> stringOf 8)
      Image =
        bytesOf 4 fs
        |> Option.map (fun b ->
            let i = decode b
            let int n = match one n i with Some(V v) -> int v | _ -> 0
            int 1, int 2, int 3, defaultArg (bytesOf 4 i) [||]) }

/// The events of a file, every record's length and data checked against their masked CRC-32C.
let readEvents (path: string) : Event list =
    let bytes = File.ReadAllBytes path
    let mutable pos = 0
    [ while pos < bytes.Length do
          let n = int (BitConverter.ToUInt64(bytes, pos))
          Expect.equal (unmask (BitConverter.ToUInt32(bytes, pos + 8))) (crc32c bytes pos 8) (sprintf "%s: length CRC at byte %d" path pos)
          Expect.equal (unmask (BitConverter.ToUInt32(bytes, pos + 12 + n))) (crc32c bytes (pos + 12) n) (sprintf "%s: data CRC at byte %d" path pos)
          let fs = decode bytes.[pos + 12 .. pos + 12 + n - 1]
          pos <- pos + 16 + n
          yield
              { WallTime = (match one 1 fs with Some(F64 v) -> BitConverter.UInt64BitsToDouble v | _ -> 0.0)
                Step = (match one 2 fs with Some(V v) -> int64 v | _ -> 0L)
                FileVersion = stringOf 3 fs
                Values =
                  match bytesOf 5 fs with
                  | Some s -> decode s |> List.choose (function 1, B v -> Some(value v) | _ -> None)
                  | None -> [] } ]

/// The events of a file as TorchSharp's generated Event class (Google.Protobuf) parses them: a second reader.
let private torchSharpEvents (path: string) : Tensorboard.Event list =
    let bytes = File.ReadAllBytes path
    let mutable pos = 0
    [ while pos < bytes.Length do
          let n = int (BitConverter.ToUInt64(bytes, pos))
          yield Tensorboard.Event.Parser.ParseFrom(bytes, pos + 12, n)
          pos <- pos + 16 + n ]

/// (tag, step) of every summary value in the run folder's event files, in file order.
let private tagSteps (dir: string) =
    [ for f in TensorBoard.eventFiles dir do
          for e in readEvents f do
              for v in e.Values -> v.Tag, e.Step ]

let private stepsOf (tag: string) (pairs: (string * int64) list) = pairs |> List.filter (fst >> (=) tag) |> List.map snd

let private png (width: int) (height: int) =
    use bitmap = new SKBitmap(width, height)
    bitmap.Erase(SKColors.Orange)
    use data = bitmap.Encode(SKEncodedImageFormat.Png, 100)
    data.ToArray()

exception private Killed

/// The tiny run's data and a session over it.
let private tinyRun () =
    let d, _ = Run.openData TrainingTests.tiny.Data false
    d, Trainer.createSession TrainingTests.tiny

[<Tests>]
let tests =
    testSequenced
    <| testList
        "tensorboard"
        [ test "the tests' CRC-32C gives the standard check value" {
              // CRC-32C("123456789") = 0xE3069283 (RFC 3720's check value).
              Expect.equal (crc32c (Encoding.ASCII.GetBytes "123456789") 0 9) 0xE3069283u "check value"
          }
          test "a 2-epoch run's event file reads back record by record: every tag at every batch or epoch step" {
              use dir = new TempDir "tb"
              let e = TrainingTests.tiny
              let d, s = tinyRun ()
              let batches = ResizeArray<Trainer.BatchRecord>()
              let epochs = ResizeArray<Trainer.EpochRecord>()
              let started = float (DateTimeOffset.UtcNow.ToUnixTimeSeconds()) - 1.0
              let write () =
                  use w = TensorBoard.openRun true dir.Path e d.Train.Count
                  TensorBoard.logExperiment w
                  let hooks: Trainer.Hooks =
                      { Trainer.Hooks.None with
                          Batch = fun r -> batches.Add r; TensorBoard.logBatch w r
                          Epoch = fun _ r -> epochs.Add r; TensorBoard.logEpoch w r }
                  Trainer.run s d Trainer.Progress.Start hooks |> ignore
                  TensorBoard.logEnd w [ "jigsaw", png 6 4; "gradcam", png 3 5 ]
              write ()
              let files = TensorBoard.eventFiles dir.Path
              Expect.equal files.Length 1 "one event file"
              let name = Path.GetFileName files.Head
              Expect.isTrue (name.StartsWith "events.out.tfevents.") name
              let events = readEvents files.Head
              Expect.equal events.Head.FileVersion (Some "brain.Event:2") "the first record is the file version"
              let theirs = torchSharpEvents files.Head
              Expect.equal (theirs |> List.map _.Step) (events |> List.map _.Step) "TorchSharp's Event parser reads the same steps"
              Expect.equal
                  (theirs |> List.map (fun ev -> if isNull ev.Summary then [] else [ for v in ev.Summary.Value -> v.Tag, v.SimpleValue ]))
                  (events |> List.map (fun ev -> ev.Values |> List.map (fun v -> v.Tag, defaultArg v.Simple 0.0f)))
                  "and the same tags and values"
              Expect.isTrue (events |> List.forall (fun ev -> ev.WallTime >= started && ev.WallTime < started + 3600.0)) "wall times are now"
              // 12 training images in batches of 4: 3 batches an epoch, global steps 1..6.
              let perEpoch = (d.Train.Count + e.BatchSize - 1) / e.BatchSize
              let allSteps = [ 1L .. int64 (2 * perEpoch) ]
              Expect.equal (batches |> Seq.map _.GlobalStep |> List.ofSeq) allSteps "the trainer's global steps"
              let pairs = tagSteps dir.Path
              for tag in [ "loss/stage3"; "loss/stage4"; "loss/stage5"; "loss/concat"; "lr/heads"; "lr/backbone"; "speed/images_per_s" ] do
                  Expect.equal (stepsOf tag pairs) allSteps (sprintf "%s at every batch" tag)
              let epochEnds = [ int64 perEpoch; int64 (2 * perEpoch) ]
              Expect.equal epochEnds (List.ofSeq batches |> List.filter (fun b -> b.Batch = b.Batches) |> List.map _.GlobalStep) "an epoch's step is its last batch's"
              let epochTags =
                  [ "train/accuracy"; "test/stage3/top1"; "test/stage4/top1"; "test/stage5/top1"; "test/concat/top1"
                    "test/combined/top1"; "test/combined/top5"; "test/mean_per_class" ]
              Expect.equal (TensorBoard.epochTags e) epochTags "the epoch tags"
              for tag in epochTags do
                  Expect.equal (stepsOf tag pairs) epochEnds (sprintf "%s at each epoch's end" tag)
              // The values are the records' (as float32).
              let valueAt tag step =
                  events |> List.pick (fun ev -> if ev.Step = step then ev.Values |> List.tryPick (fun v -> if v.Tag = tag then v.Simple else None) else None)
              for r in epochs do
                  let step = epochEnds.[r.Epoch]
                  Expect.equal (valueAt "test/combined/top1" step) (float32 r.Test.Combined) "combined top-1"
                  Expect.equal (valueAt "test/stage4/top1" step) (float32 r.Test.Heads.[1]) "stage4 top-1"
                  Expect.equal (valueAt "test/mean_per_class" step) (float32 (Evaluate.meanPerClass r.Test)) "mean per class"
                  Expect.equal (valueAt "train/accuracy" step) (float32 r.TrainAccuracy) "train accuracy"
              for b in batches do
                  Expect.equal (valueAt "loss/concat" b.GlobalStep) (float32 (List.last b.StepLosses)) "concat loss of the batch"
                  Expect.equal (valueAt "lr/backbone" b.GlobalStep) (float32 (b.LearningRates |> List.find (fst >> (=) "backbone") |> snd)) "backbone lr"
              // The experiment, once, as JSON text at step 0; the hparams session start and end.
              let texts = events |> List.collect (fun ev -> ev.Values |> List.filter (fun v -> v.Tag = "experiment") |> List.map (fun v -> ev.Step, v))
              Expect.equal (texts |> List.map fst) [ 0L ] "experiment text once, at step 0"
              let _, t = texts.Head
              Expect.equal t.Plugin (Some "text") "text plugin"
              let json = t.Text.Value.Split('\n') |> Array.map (fun l -> l.Substring(min 4 l.Length)) |> String.concat "\n"
              Expect.equal (Json.deserialize<Experiment.Experiment> json) e "the experiment's JSON"
              Expect.equal (stepsOf "_hparams_/session_start_info" pairs) [ 0L ] "hparams session start"
              Expect.equal (stepsOf "_hparams_/session_end_info" pairs) [ List.last allSteps ] "hparams session end"
              // Images at the last step, with their sizes.
              let images = events |> List.collect (fun ev -> ev.Values |> List.choose (fun v -> v.Image |> Option.map (fun i -> v.Tag, ev.Step, i)))
              Expect.equal (images |> List.map (fun (tag, step, (h, w, _, _)) -> tag, step, h, w)) [ "jigsaw", 6L, 4, 6; "gradcam", 6L, 5, 3 ] "images"
              let _, _, (_, _, _, bytes) = images.Head
              Expect.equal bytes (png 6 4) "PNG bytes as given"
          }
          test "a run killed mid-epoch and resumed logs no step twice" {
              use dir = new TempDir "tb-resume"
              let e = TrainingTests.tiny
              let d, s = tinyRun ()
              let log (w: TensorBoard.Writer) (killAt: int64 option) : Trainer.Hooks =
                  { Trainer.Hooks.None with
                      Batch =
                          fun r ->
                              TensorBoard.logBatch w r
                              if Some r.GlobalStep = killAt then raise Killed
                      Epoch = fun _ r -> TensorBoard.logEpoch w r }
              // Epoch 1 and two batches of epoch 2, then a kill (which also cut a record short).
              let first =
                  let write () =
                      use w = TensorBoard.openRun true dir.Path e d.Train.Count
                      TensorBoard.logExperiment w
                      let p, r = Trainer.epoch s d (log w None) Trainer.Progress.Start 0
                      (log w None).Epoch p r
                      Expect.throwsT<Killed> (fun () -> Trainer.epoch s d (log w (Some(TensorBoard.epochStep e d.Train.Count 0 + 2L))) p 1 |> ignore) "killed"
                      w.Path.Value
                  write ()
              let committed = TensorBoard.epochStep e d.Train.Count 0
              let before = tagSteps dir.Path
              Expect.equal (stepsOf "loss/concat" before) [ 1L .. committed + 2L ] "batches past the committed epoch were logged"
              File.AppendAllText(first, "cut off")
              TensorBoard.truncateAfter dir.Path committed
              let cut = tagSteps dir.Path
              Expect.equal (stepsOf "loss/concat" cut) [ 1L .. committed ] "truncated to the committed epoch"
              Expect.equal (stepsOf "test/combined/top1" cut) [ committed ] "its epoch record kept"
              // The resume: epoch 2 again, in a new file.
              let write () =
                  use w = TensorBoard.openRun true dir.Path e d.Train.Count
                  TensorBoard.logExperiment w
                  let p, r = Trainer.epoch s d (log w None) { Trainer.Progress.Start with EpochsDone = 1 } 1
                  (log w None).Epoch p r
                  TensorBoard.logEnd w []
              write ()
              let files = TensorBoard.eventFiles dir.Path
              Expect.equal files.Length 2 "a second file"
              Expect.equal files.Head first "the first file sorts first"
              let pairs = tagSteps dir.Path
              for tag in pairs |> List.map fst |> List.distinct do
                  let steps = stepsOf tag pairs
                  Expect.equal steps (List.sort (List.distinct steps)) (sprintf "%s: no step twice, in order across files" tag)
              let all = committed * 2L
              Expect.equal (stepsOf "loss/concat" pairs) [ 1L .. all ] "every batch once"
              Expect.equal (stepsOf "test/combined/top1" pairs) [ committed; all ] "every epoch once"
              Expect.equal (stepsOf "experiment" pairs) [ 0L ] "the experiment once"
          }
          test "switched off, a writer writes nothing" {
              use dir = new TempDir "tb-off"
              let e = TrainingTests.tiny
              let write () =
                  use w = TensorBoard.openRun false dir.Path e 12
                  TensorBoard.logExperiment w
                  TensorBoard.logBatch w { Epoch = 0; Batch = 1; Batches = 3; GlobalStep = 1L; StepLosses = [ 1.0; 1.0; 1.0; 1.0 ]; LearningRates = [ "heads", 0.1 ]; Images = 4; ImagesPerSecond = 1.0 }
                  TensorBoard.logEnd w [ "x", png 2 2 ]
                  Expect.isNone w.Path "no file"
              write ()
              Expect.isEmpty (Directory.GetFileSystemEntries dir.Path) "nothing in the folder"
          }
          test "a model-only checkpoint is at most half a resumable one, loads with equal weights, and a resume refuses it" {
              use _ = torch.NewDisposeScope()
              use dir = new TempDir "ckpt-model"
              let e = TrainingTests.tiny
              let s = Trainer.createSession e
              s.Net.train ()
              // One iteration, so that the optimizer holds momentum buffers.
              Trainer.iteration s (Trainer.lrAt e 0) e.Schedule (torch.randn (4L, 3L, 28L, 28L)) (torch.tensor [| 0L; 1L; 2L; 0L |]) |> ignore
              let c = checkpointOf s { progress 1 with BestCombined = 0.5 }
              let last, best = dir.File "last.ckpt", dir.File "best.ckpt"
              Checkpoint.save last c
              Checkpoint.saveModel best c
              let lastSize, bestSize = FileInfo(last).Length, FileInfo(best).Length
              Expect.isLessThanOrEqual (2L * bestSize) lastSize (sprintf "best.ckpt %d bytes, last.ckpt %d" bestSize lastSize)
              let back = Checkpoint.load best
              Expect.equal back.Experiment e "experiment"
              Expect.equal back.Progress c.Progress "progress"
              Expect.isEmpty back.Optimizer "no momentum buffers"
              Expect.equal (back.Model |> List.map fst) (c.Model |> List.map fst) "model keys"
              for (_, a), (_, b) in List.zip c.Model back.Model do
                  Expect.isTrue (same a b) "model tensor"
              Checkpoint.dispose back
              let full = Checkpoint.loadResumable last
              Expect.equal full.Optimizer.Length c.Optimizer.Length "last.ckpt resumes with its momentum buffers"
              Checkpoint.dispose full
              let refused =
                  try
                      Checkpoint.loadResumable best |> ignore
                      None
                  with ex ->
                      Errors.tryOf ex
              match refused with
              | Some(ModelFile(path, message)) ->
                  Expect.equal path best "names the file"
                  Expect.stringContains message best "the message names the file"
                  Expect.stringContains message "last.ckpt" "and says to resume from last.ckpt"
                  Expect.isFalse (message.Contains "--") "no command-line flag"
              | other -> failtestf "expected a ModelFile error, got %A" other
              // What eval and predict load.
              let m = App.ModelFiles.load best App.ModelFiles.Overrides.None Runtime.Cpu
              let loaded = m.Net.state_dict ()
              for name, t in c.Model do
                  Expect.isTrue (same t loaded.[name]) (sprintf "%s as saved" name)
          }
          test "a missing checkpoint is a ModelFile error naming it" {
              let path = Path.Combine(Path.GetTempPath(), "pmg-no-such", "last.ckpt")
              match (try Checkpoint.load path |> ignore; None with ex -> Errors.tryOf ex) with
              | Some(ModelFile(p, m)) ->
                  Expect.equal p path "the path"
                  Expect.stringContains m path "the message names it"
              | other -> failtestf "expected a ModelFile error, got %A" other
          } ]
