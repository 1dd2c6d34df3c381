/// TensorBoard event files in a run folder, so that `tensorboard --logdir runs/` shows a run live and beside others:
/// per batch each step's loss, the learning rates and the speed; per epoch the accuracies; the experiment as text
/// and as the hparams plugin's session; at the end, images. The file format is TensorFlow's record framing (length,
/// masked CRC-32C of the length, data, masked CRC-32C of the data) around Event protobufs, written here by hand with
/// Interop.Protobuf: TorchSharp's SummaryWriter takes steps as int32 and wall times in whole seconds, has no
/// hparams record and no flush, and its images go through SkiaSharp; and a resumed run needs the records read back
/// (`truncateAfter`) anyway. The step of every record is Trainer's global batch index, the same whether the run was
/// resumed or not.
module Pmg.Fs.Visual.TensorBoard

open System
open System.Buffers.Binary
open System.IO
open System.Numerics
open System.Text
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Experiment
open Pmg.Fs.Training
open Pmg.Fs.Interop
open Pmg.Fs.Runtime

// ---------------------------------------------------------------------------------------------------
// Record framing

/// CRC-32C (Castagnoli) of `data`, with the hardware instruction where there is one.
let private crc32c (data: ReadOnlySpan<byte>) : uint32 =
    let mutable crc = 0xFFFFFFFFu
    let mutable i = 0
    while i + 8 <= data.Length do
        crc <- BitOperations.Crc32C(crc, BinaryPrimitives.ReadUInt64LittleEndian(data.Slice(i, 8)))
        i <- i + 8
    while i < data.Length do
        crc <- BitOperations.Crc32C(crc, data.[i])
        i <- i + 1
    ~~~crc

/// TensorFlow's masked CRC: rotated and offset, so that a CRC stored inside checksummed data does not confuse it.
let private masked (crc: uint32) = ((crc >>> 15) ||| (crc <<< 17)) + 0xa282ead8u

/// One record: uint64 length, masked CRC of those 8 bytes, the data, masked CRC of the data (little-endian).
let private frame (data: byte[]) : byte[] =
    let record = Array.zeroCreate (8 + 4 + data.Length + 4)
    let span = Span record
    BinaryPrimitives.WriteUInt64LittleEndian(span.Slice(0, 8), uint64 data.Length)
    BinaryPrimitives.WriteUInt32LittleEndian(span.Slice(8, 4), masked (crc32c (ReadOnlySpan(record, 0, 8))))
    data.CopyTo(span.Slice 12)
    BinaryPrimitives.WriteUInt32LittleEndian(span.Slice(12 + data.Length, 4), masked (crc32c (ReadOnlySpan data)))
    record

/// The whole records of a file's bytes, each as (start, length of the whole record, data), and whether bytes were
/// left after them: a record cut off by a kill, or one whose checksums do not match (nothing after it is trusted).
let private records (bytes: byte[]) : (int * int * ReadOnlyMemory<byte>) list * bool =
    let acc = ResizeArray()
    let mutable pos = 0
    let mutable bad = false
    while not bad && pos < bytes.Length do
        if bytes.Length - pos < 16 then bad <- true
        else
            let n = BinaryPrimitives.ReadUInt64LittleEndian(ReadOnlySpan(bytes, pos, 8))
            if BinaryPrimitives.ReadUInt32LittleEndian(ReadOnlySpan(bytes, pos + 8, 4)) <> masked (crc32c (ReadOnlySpan(bytes, pos, 8)))
               || n > uint64 (bytes.Length - pos - 16) then
                bad <- true
            else
                let n = int n
                let crc = masked (crc32c (ReadOnlySpan(bytes, pos + 12, n)))
                if BinaryPrimitives.ReadUInt32LittleEndian(ReadOnlySpan(bytes, pos + 12 + n, 4)) <> crc then bad <- true
                else
                    acc.Add((pos, 16 + n, ReadOnlyMemory(bytes, pos + 12, n)))
                    pos <- pos + 16 + n
    List.ofSeq acc, bad

// ---------------------------------------------------------------------------------------------------
// Event and Summary protobufs (TensorFlow's event.proto, summary.proto; TensorBoard's hparams plugin_data.proto)

/// Protocol-buffer fields as the Event records need them, written through Google.Protobuf's coded stream.
type private ProtoWriter() =
    let buffer = new MemoryStream()
    let out = new Google.Protobuf.CodedOutputStream(buffer, true)
    let tag (field: int) (wire: Google.Protobuf.WireFormat.WireType) = out.WriteTag(field, wire)
    member _.Int64(field: int, v: int64) =
        tag field Google.Protobuf.WireFormat.WireType.Varint
        out.WriteInt64 v
    member _.Float32(field: int, v: float32) =
        tag field Google.Protobuf.WireFormat.WireType.Fixed32
        out.WriteFloat v
    member _.String(field: int, v: string) =
        tag field Google.Protobuf.WireFormat.WireType.LengthDelimited
        out.WriteString v
    member _.Bytes(field: int, v: ReadOnlySpan<byte>) =
        tag field Google.Protobuf.WireFormat.WireType.LengthDelimited
        out.WriteBytes(Google.Protobuf.ByteString.CopyFrom v)
    member this.Message(field: int, m: ProtoWriter) =
        let bytes: byte[] = m.ToArray()
        this.Bytes(field, ReadOnlySpan<byte> bytes)
    member _.ToArray() =
        out.Flush()
        buffer.ToArray()

/// A 64-bit double field (wire type 1): the key byte and the raw bits.
let private doubleField (number: int) (v: float) : byte[] =
    let b = Array.zeroCreate 9
    b.[0] <- byte ((number <<< 3) ||| 1)
    BinaryPrimitives.WriteDoubleLittleEndian(Span(b, 1, 8), v)
    b

/// An Event: wall_time (1, seconds since 1970), step (2), then the fields `body` writes (file_version 3, summary 5).
let private event (wallTime: float) (step: int64) (body: ProtoWriter -> unit) : byte[] =
    let w = ProtoWriter()
    w.Int64(2, step)
    body w
    Array.append (doubleField 1 wallTime) (w.ToArray())

/// Summary.Value: tag (1), then its value.
let private summaryValue (tag: string) (value: ProtoWriter -> unit) =
    let v = ProtoWriter()
    v.String(1, tag)
    value v
    v

/// SummaryMetadata (Value field 9) naming the plugin that reads the value, with its content.
let private pluginMetadata (plugin: string) (content: byte[]) =
    let data = ProtoWriter()
    data.String(1, plugin)
    data.Bytes(2, ReadOnlySpan content)
    let m = ProtoWriter()
    m.Message(1, data)
    m

/// An Event holding a Summary (field 5) of one value.
let private summaryEvent (wallTime: float) (step: int64) (value: ProtoWriter) =
    event wallTime step (fun e ->
        let s = ProtoWriter()
        s.Message(1, value)
        e.Message(5, s))

let private scalarValue (tag: string) (v: float) =
    // simple_value (2): TensorBoard's scalars plugin reads it as is.
    summaryValue tag (fun w -> w.Float32(2, float32 v))

let private textValue (tag: string) (text: string) =
    summaryValue tag (fun w ->
        w.Message(9, pluginMetadata "text" [||])
        // TensorProto: dtype DT_STRING (7), shape [1], string_val (8).
        let dim = ProtoWriter()
        dim.Int64(1, 1L)
        let shape = ProtoWriter()
        shape.Message(2, dim)
        let t = ProtoWriter()
        t.Int64(1, 7L)
        t.Message(2, shape)
        t.String(8, text)
        w.Message(8, t))

/// Width, height and TensorBoard colorspace (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA) of a PNG, from its IHDR chunk.
let private pngHeader (png: byte[]) =
    let signature = [| 0x89uy; 0x50uy; 0x4Euy; 0x47uy; 0x0Duy; 0x0Auy; 0x1Auy; 0x0Auy |]
    if png.Length < 33 || png.[0..7] <> signature || Encoding.ASCII.GetString(png, 12, 4) <> "IHDR" then
        invalidArg "png" "not a PNG image"
    let width = BinaryPrimitives.ReadInt32BigEndian(ReadOnlySpan(png, 16, 4))
    let height = BinaryPrimitives.ReadInt32BigEndian(ReadOnlySpan(png, 20, 4))
    let colorspace =
        match png.[25] with
        | 0uy -> 1L
        | 4uy -> 2L
        | 6uy -> 4L
        | _ -> 3L // RGB, or a palette that decodes to RGB
    width, height, colorspace

let private imageValue (tag: string) (png: byte[]) =
    let width, height, colorspace = pngHeader png
    summaryValue tag (fun w ->
        let i = ProtoWriter()
        i.Int64(1, int64 height)
        i.Int64(2, int64 width)
        i.Int64(3, colorspace)
        i.Bytes(4, ReadOnlySpan png)
        w.Message(4, i))

/// A google.protobuf.Value: a number, a string or a boolean.
type private HValue =
    | Number of float
    | Str of string
    | Bool of bool

let private hvalue (v: HValue) : byte[] =
    match v with
    | Number x -> doubleField 2 x
    | Str s -> (let w = ProtoWriter() in w.String(3, s); w.ToArray())
    | Bool b -> (let w = ProtoWriter() in w.Int64(4, (if b then 1L else 0L)); w.ToArray())

/// The hparams plugin's value: HParamsPluginData (version 0) with one of its data fields.
let private hparamsValue (tag: string) (field: int) (data: byte[]) =
    let content = ProtoWriter()
    content.Bytes(field, ReadOnlySpan data)
    summaryValue tag (fun w -> w.Message(9, pluginMetadata "hparams" (content.ToArray())))

// ---------------------------------------------------------------------------------------------------
// Tags

/// Tag of each schedule step's loss: `loss/<output>` (stage3.., concat); a second step on the same output gets
/// `loss/<output>_2`.
let lossTags (e: Experiment) : string list =
    let names = e.Schedule |> List.map (fun s -> Pmg.outputName s.Head)
    names
    |> List.mapi (fun i n ->
        match List.take i names |> List.filter ((=) n) |> List.length with
        | 0 -> "loss/" + n
        | k -> sprintf "loss/%s_%d" n (k + 1))

/// Tag of a learning-rate group's rate: `lr/heads`, `lr/backbone`.
let lrTag (group: string) = "lr/" + group

/// Tag of the training speed, per batch (images per second since the epoch started).
let speedTag = "speed/images_per_s"

/// Tags of an epoch's values, in the order `logEpoch` writes them: `train/accuracy`, `test/<head>/top1` for every
/// head, `test/concat/top1`, `test/combined/top1`, `test/combined/top5`, `test/mean_per_class`.
let epochTags (e: Experiment) : string list =
    [ "train/accuracy"
      yield! Pmg.headNames e.Model |> List.map (sprintf "test/%s/top1")
      "test/concat/top1"
      "test/combined/top1"
      "test/combined/top5"
      "test/mean_per_class" ]

/// Tag of the experiment's JSON (text, step 0).
let experimentTag = "experiment"

// ---------------------------------------------------------------------------------------------------
// Writer

/// The global step at the end of `epoch` (0-based): batches per epoch times epochs done, as Trainer counts
/// BatchRecord.GlobalStep (every batch counts, trained or skipped). At resume, the step to `truncateAfter`.
let epochStep (e: Experiment) (trainImages: int) (epoch: int) : int64 =
    let batches = (trainImages + e.BatchSize - 1) / e.BatchSize
    int64 (epoch + 1) * int64 batches

let private isEventFile (path: string) =
    let name = Path.GetFileName path
    name.Contains "tfevents" && not (name.StartsWith ".")

/// The event files of a run folder, oldest first (TensorBoard reads them in name order).
let eventFiles (runDir: string) : string list =
    if not (Directory.Exists runDir) then []
    else Directory.GetFiles runDir |> Array.filter isEventFile |> Array.sortWith (fun a b -> String.CompareOrdinal(a, b)) |> List.ofArray

/// The time in a file name `events.out.tfevents.<seconds>.<host>...`, when it has one.
let private timeIn (path: string) =
    match Path.GetFileName(path).Split('.') with
    | parts when parts.Length > 3 ->
        match Int64.TryParse parts.[3] with
        | true, t -> Some t
        | _ -> None
    | _ -> None

let private wallNow () = float (DateTimeOffset.UtcNow.ToUnixTimeMilliseconds()) / 1000.0

let private cannotWrite (path: string) (e: exn) : 'a =
    Errors.fail (
        OutputFailed(path, sprintf "TensorBoard file %s cannot be written (%s): free disk space or fix the folder's permissions, or switch TensorBoard output off" path e.Message)
    )

/// An open event file of a run, or nothing at all when TensorBoard output is switched off (every function then does
/// nothing). One file per `openRun`: a resumed run adds a file whose name sorts after the earlier ones.
[<Sealed>]
type Writer internal (file: FileStream option, e: Experiment, trainImages: int, fresh: bool) =
    let mutable lastStep = 0L

    /// The event file written, when output is on.
    member _.Path = file |> Option.map (fun f -> f.Name)

    /// The experiment of the run.
    member internal _.Experiment = e

    /// Images in the training split (for the step at an epoch's end).
    member internal _.TrainImages = trainImages

    /// Whether the folder had no event file before this one (the experiment's records belong to a fresh run only).
    member internal _.Fresh = fresh

    /// The largest step written so far.
    member internal _.LastStep = lastStep

    /// Appends records and hands them to the operating system (TensorBoard reads the file as it grows; a killed
    /// process loses nothing written).
    member internal _.Append(step: int64, events: byte[] list) =
        match file with
        | None -> ()
        | Some f ->
            try
                for data in events do
                    f.Write(ReadOnlySpan(frame data))
                f.Flush()
            with
            | :? IOException
            | :? UnauthorizedAccessException as ex -> cannotWrite f.Name ex
            lastStep <- max lastStep step

    /// Writes the file's buffers to disk.
    member _.Flush() = file |> Option.iter (fun f -> f.Flush true)

    interface IDisposable with
        member _.Dispose() = file |> Option.iter (fun f -> f.Dispose())

/// Opens a new event file in `runDir` (`events.out.tfevents.<unix seconds>.<host>`, its first record the file
/// version), or a writer that writes nothing when `enabled` is false. `trainImages` is the training split's size
/// (for the step of an epoch's end). At a resume, call `truncateAfter` first.
let openRun (enabled: bool) (runDir: string) (e: Experiment) (trainImages: int) : Writer =
    if not enabled then new Writer(None, e, trainImages, false)
    else
        let earlier = eventFiles runDir
        // A name that sorts after every earlier file: TensorBoard reads a folder's files in name order, and a
        // resumed run within the second of the last write must not sort before it.
        let now = DateTimeOffset.UtcNow.ToUnixTimeSeconds()
        let time = earlier |> List.choose timeIn |> List.fold (fun t earlierTime -> max t (earlierTime + 1L)) now
        let host = Environment.MachineName |> String.filter (fun c -> Char.IsLetterOrDigit c || c = '-' || c = '_')
        let path = Path.Combine(runDir, sprintf "events.out.tfevents.%010d.%s" time (if host = "" then "localhost" else host))
        let file =
            try
                Directory.CreateDirectory runDir |> ignore
                new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.Read)
            with
            | :? IOException
            | :? UnauthorizedAccessException as ex -> cannotWrite path ex
        let w = new Writer(Some file, e, trainImages, earlier.IsEmpty)
        w.Append(0L, [ event (wallNow ()) 0L (fun ev -> ev.String(3, "brain.Event:2")) ])
        w

/// A scalar at `step`, with the current wall time.
let scalar (w: Writer) (tag: string) (step: int64) (value: float) =
    w.Append(step, [ summaryEvent (wallNow ()) step (scalarValue tag value) ])

/// Text (Markdown) at `step`, for TensorBoard's text plugin.
let text (w: Writer) (tag: string) (step: int64) (markdown: string) =
    w.Append(step, [ summaryEvent (wallNow ()) step (textValue tag markdown) ])

/// A PNG image at `step`, as TensorBoard's images plugin shows it.
let image (w: Writer) (tag: string) (step: int64) (png: byte[]) =
    w.Append(step, [ summaryEvent (wallNow ()) step (imageValue tag png) ])

/// The hyperparameters the hparams plugin shows, one column each: the settings that tell runs apart.
let private hparams (e: Experiment) : (string * HValue) list =
    [ "backbone", Str e.Model.Backbone
      "heads", Number(float e.Model.Heads)
      "grids", Str(e.Schedule |> List.map (fun s -> string s.Grid) |> String.concat ",")
      "dataset", Str(match e.Data with Embedded _ -> "embedded" | OnDisk d -> (sprintf "%A" d.Kind).ToLowerInvariant())
      "weights", Str(match e.Weights with Backbone.Scratch -> "none" | Backbone.ImageNet -> "imagenet" | Backbone.File p -> Path.GetFileName p)
      "epochs", Number(float e.Epochs)
      "warmup_epochs", Number(float e.WarmupEpochs)
      "batch_size", Number(float e.BatchSize)
      "image_size", Number(float e.Input.Crop)
      "resize", Number(float e.Input.Resize)
      "lr", Number e.Optimizer.Lr
      "backbone_lr", Number e.Optimizer.BackboneLr
      "momentum", Number e.Optimizer.Momentum
      "weight_decay", Number e.Optimizer.WeightDecay
      "patch_order", Str((sprintf "%A" e.JigsawDraw).ToLowerInvariant())
      "per_sample_jigsaw", Bool(e.Permutation = Jigsaw.PerSample)
      "bn_group", Str(match e.BatchNormGroup with Some n -> string n | None -> "none")
      "update", Str((sprintf "%A" e.Update).ToLowerInvariant())
      "forward", Str((sprintf "%A" e.Forward).ToLowerInvariant())
      "precision", Str((sprintf "%A" e.Precision).ToLowerInvariant())
      "seed", Number(float e.Seed) ]

/// At the start of a fresh run (nothing when the folder already had event files, so a resume adds no second copy):
/// the experiment as JSON text (`experiment`, step 0) and the hparams plugin's session start, which makes the run
/// a row of TensorBoard's HPARAMS table (its metrics are the run's scalar tags).
let logExperiment (w: Writer) =
    if w.Fresh then
        let e = w.Experiment
        // Indented four spaces: a Markdown code block, so the text plugin shows the JSON as written.
        let json = (Json.serialize e).Split('\n') |> Array.map (fun l -> "    " + l.TrimEnd '\r') |> String.concat "\n"
        let start = ProtoWriter()
        for name, v in hparams e do
            let entry = ProtoWriter()
            entry.String(1, name)
            entry.Bytes(2, ReadOnlySpan(hvalue v))
            start.Message(1, entry)
        let startInfo = Array.append (start.ToArray()) (doubleField 5 (wallNow ()))
        let now = wallNow ()
        w.Append(
            0L,
            [ summaryEvent now 0L (textValue experimentTag json)
              summaryEvent now 0L (hparamsValue "_hparams_/session_start_info" 3 startInfo) ]
        )

/// One training batch at step GlobalStep: each step's loss (not for steps that did not run, or a batch not trained),
/// each group's learning rate and the speed.
let logBatch (w: Writer) (r: Trainer.BatchRecord) =
    let now = wallNow ()
    let step = r.GlobalStep
    w.Append(
        step,
        [ for tag, loss in List.zip (lossTags w.Experiment) r.StepLosses do
              if Double.IsFinite loss then summaryEvent now step (scalarValue tag loss)
          for group, lr in r.LearningRates do
              summaryEvent now step (scalarValue (lrTag group) lr)
          summaryEvent now step (scalarValue speedTag r.ImagesPerSecond) ]
    )

/// One epoch at the step of its last batch: train accuracy, every head's, concat's and combined test top-1,
/// combined top-5 and the mean per-class accuracy (the tags of `epochTags`).
let logEpoch (w: Writer) (r: Trainer.EpochRecord) =
    let now = wallNow ()
    let step = epochStep w.Experiment w.TrainImages r.Epoch
    let values =
        [ r.TrainAccuracy
          yield! r.Test.Heads
          r.Test.Concat
          r.Test.Combined
          r.Test.CombinedTop5
          Evaluate.meanPerClass r.Test ]
    w.Append(step, List.map2 (fun tag v -> summaryEvent now step (scalarValue tag v)) (epochTags w.Experiment) values)

/// At the end of a run: the given PNG images (e.g. `jigsaw`, `gradcam`) at the last step written, the hparams
/// plugin's session end (finished), and the file flushed to disk.
let logEnd (w: Writer) (images: (string * byte[]) list) =
    let step = w.LastStep
    let now = wallNow ()
    let endInfo = Array.append (let s = ProtoWriter() in s.Int64(1, 1L); s.ToArray()) (doubleField 2 now)
    w.Append(
        step,
        [ for tag, png in images do
              summaryEvent now step (imageValue tag png)
          summaryEvent now step (hparamsValue "_hparams_/session_end_info" 4 endInfo) ]
    )
    w.Flush()

/// Flushes the file to disk.
let flush (w: Writer) = w.Flush()

// ---------------------------------------------------------------------------------------------------
// Resume

/// The step of an event and whether it holds a summary (the file-version record holds none).
let private stepOf (data: ReadOnlyMemory<byte>) =
    let input = new Google.Protobuf.CodedInputStream(data.ToArray())
    let mutable step = 0L
    let mutable summary = false
    let mutable tag = input.ReadTag()
    while tag <> 0u do
        match Google.Protobuf.WireFormat.GetTagFieldNumber tag with
        | 2 -> step <- input.ReadInt64()
        | 5 ->
            summary <- true
            input.SkipLastField()
        | _ -> input.SkipLastField()
        tag <- input.ReadTag()
    step, summary

/// Rewrites the run folder's event files without the summaries of steps after `step` (the committed epoch's last
/// global step, `epochStep`), and without a record a kill cut off: a run killed mid-epoch logged batches that its
/// resume trains again. A file that changes is replaced atomically (Runtime.Files); others are left alone. Call it
/// at resume, before `openRun`.
let truncateAfter (runDir: string) (step: int64) =
    for path in eventFiles runDir do
        let bytes = File.ReadAllBytes path
        let whole, torn = records bytes
        let kept = whole |> List.filter (fun (_, _, data) -> match stepOf data with s, true -> s <= step | _, false -> true)
        if torn then
            Notices.Say(sprintf "%s: dropped a cut-off TensorBoard record at its end, left by an interrupted run" path)
        if torn || kept.Length <> whole.Length then
            Files.writeAtomically path (fun s ->
                for start, length, _ in kept do
                    s.Write(ReadOnlySpan(bytes, start, length)))
