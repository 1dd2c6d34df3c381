/// Checkpoints: one zip file holding the experiment, the progress counters, the model's state, the optimizer's
/// momentum buffers and the RNG state. Written to a temporary file beside the target and renamed over it, so a
/// kill during the write leaves the previous checkpoint whole.
module Pmg.Fs.Training.Checkpoint

open System
open System.IO
open System.IO.Compression
open TorchSharp
open Pmg.Fs

let private formatName = "pmg-fs-checkpoint"
let private formatVersion = 1

/// Where training stands after a completed epoch.
type Progress =
    { /// Epochs completed (the next epoch to run, 0-based).
      EpochsDone: int
      BestCombined: float
      BestEpoch: int
      Seed: int }

type Checkpoint =
    { Experiment: Experiment.Experiment
      Progress: Progress
      Model: (string * torch.Tensor) list
      Optimizer: (string * torch.Tensor) list
      /// State of the jigsaw generator.
      Rng: torch.Tensor }

exception CheckpointError of string

// ---------------------------------------------------------------------------------------------------
// Named tensors: name, dtype, shape, raw little-endian bytes.

let private writeTensors (stream: Stream) (entries: (string * torch.Tensor) list) =
    use w = new BinaryWriter(stream, Text.Encoding.UTF8, true)
    w.Write(List.length entries)
    for name, t in entries do
        use c = t.detach().cpu().contiguous ()
        w.Write name
        w.Write(int c.dtype)
        w.Write c.shape.Length
        for d in c.shape do
            w.Write d
        let bytes = c.bytes.ToArray()
        w.Write bytes.Length
        w.Write bytes

let private readTensors (stream: Stream) : (string * torch.Tensor) list =
    use r = new BinaryReader(stream, Text.Encoding.UTF8, true)
    let n = r.ReadInt32()
    [ for _ in 1..n ->
          let name = r.ReadString()
          let dtype: torch.ScalarType = LanguagePrimitives.EnumOfValue(sbyte (r.ReadInt32()))
          let shape = Array.init (r.ReadInt32()) (fun _ -> r.ReadInt64())
          let bytes = r.ReadBytes(r.ReadInt32())
          let t = torch.empty (shape, dtype = dtype)
          t.bytes <- Span bytes
          name, t ]

// ---------------------------------------------------------------------------------------------------

let private entry (zip: ZipArchive) (name: string) (write: Stream -> unit) =
    use s = zip.CreateEntry(name, CompressionLevel.NoCompression).Open()
    write s

let private text (s: string) (stream: Stream) =
    let b = Text.Encoding.UTF8.GetBytes s
    stream.Write(b, 0, b.Length)

/// Writes atomically: a temp file in the same folder, flushed to disk, then renamed over `path`.
let writeAtomically (path: string) (write: Stream -> unit) =
    let full = Path.GetFullPath path
    Directory.CreateDirectory(Path.GetDirectoryName full) |> ignore
    let tmp = sprintf "%s.tmp-%d" full Environment.ProcessId
    try
        (use fs = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None)
         write fs
         fs.Flush true)
        File.Move(tmp, full, true)
    with _ ->
        if File.Exists tmp then File.Delete tmp
        reraise ()

/// A text file, written atomically.
let writeTextAtomically (path: string) (text: string) =
    writeAtomically path (fun s ->
        let b = Text.Encoding.UTF8.GetBytes text
        s.Write(b, 0, b.Length))

let save (path: string) (c: Checkpoint) =
    writeAtomically path (fun fs ->
        use zip = new ZipArchive(fs, ZipArchiveMode.Create, true)
        entry zip "format.json" (text (Json.serialize {| format = formatName; version = formatVersion |}))
        entry zip "experiment.json" (text (Json.serialize c.Experiment))
        entry zip "progress.json" (text (Json.serialize c.Progress))
        entry zip "model.bin" (fun s -> writeTensors s c.Model)
        entry zip "optimizer.bin" (fun s -> writeTensors s c.Optimizer)
        entry zip "rng.bin" (fun s -> writeTensors s [ ("jigsaw", c.Rng) ]))

/// True for files this module writes (a zip with our format entry); false for anything else.
let isCheckpoint (path: string) =
    try
        use zip = ZipFile.OpenRead path
        not (isNull (zip.GetEntry "format.json")) && not (isNull (zip.GetEntry "progress.json"))
    with _ ->
        false

let load (path: string) : Checkpoint =
    if not (File.Exists path) then
        raise (CheckpointError(sprintf "checkpoint %s does not exist" path))
    let zip =
        try
            ZipFile.OpenRead path
        with e ->
            raise (CheckpointError(sprintf "%s is not a Pmg.Fs checkpoint (%s)" path e.Message))
    use zip = zip
    let part (name: string) (read: Stream -> 'T) : 'T =
        match zip.GetEntry name with
        | null -> raise (CheckpointError(sprintf "checkpoint %s has no %s: it is incomplete or not a Pmg.Fs checkpoint" path name))
        | e ->
            use s = e.Open()
            use m = new MemoryStream()
            s.CopyTo m
            m.Position <- 0L
            read m
    let json (s: Stream) = (new StreamReader(s)).ReadToEnd()
    let format = part "format.json" json |> Json.deserialize<{| format: string; version: int |}>
    if format.format <> formatName || format.version > formatVersion then
        raise (CheckpointError(sprintf "%s: format %s v%d is not readable by this version" path format.format format.version))
    { Experiment = part "experiment.json" json |> Json.deserialize<Experiment.Experiment>
      Progress = part "progress.json" json |> Json.deserialize<Progress>
      Model = part "model.bin" readTensors
      Optimizer = part "optimizer.bin" readTensors
      Rng = part "rng.bin" readTensors |> List.head |> snd }
