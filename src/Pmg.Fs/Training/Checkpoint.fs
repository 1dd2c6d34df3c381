/// Checkpoints: one zip file holding the experiment, the progress counters, the model's state and the optimizer's
/// momentum buffers, with a SHA-256 of every part so that a damaged file is refused rather than half-loaded.
/// Written atomically (Runtime.Files): a kill during the write leaves the previous checkpoint whole. The jigsaw
/// generator is reseeded at every epoch start, so no generator state needs keeping.
module Pmg.Fs.Training.Checkpoint

open System
open System.IO
open System.IO.Compression
open System.Security.Cryptography
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Runtime

let private formatName = Interop.PmgCheckpoint.formatName
let private formatVersion = Interop.PmgCheckpoint.formatVersion

/// Everything a run needs to resume, or a model to load: read by `load`, written by `save`.
type Checkpoint =
    { /// The experiment the run trains.
      Experiment: Experiment.Experiment
      /// Where training stood when it was saved.
      Progress: Trainer.Progress
      /// The network's state_dict: tensors by name.
      Model: (string * torch.Tensor) list
      /// The optimizer's momentum buffers by parameter name (Sgd.state).
      Optimizer: (string * torch.Tensor) list }

/// A checkpoint that is missing, damaged, or not one this version reads; the message says what to do.
exception CheckpointError of string

// Named tensors: Interop.PmgCheckpoint's codec, which the starting-weights reader shares.

let private tensorBytes = Interop.PmgCheckpoint.encode

let private readTensors = Interop.PmgCheckpoint.decode

// ---------------------------------------------------------------------------------------------------

let private utf8 (s: string) = Text.Encoding.UTF8.GetBytes s
let private sha256 (bytes: byte[]) = Convert.ToHexString(SHA256.HashData bytes).ToLowerInvariant()

/// The parts of a checkpoint, by entry name, in the order they are written.
let private parts (c: Checkpoint) =
    [ "experiment.json", utf8 (Json.serialize c.Experiment)
      "progress.json", utf8 (Json.serialize c.Progress)
      "model.bin", tensorBytes c.Model
      "optimizer.bin", tensorBytes c.Optimizer ]

type private Format = { format: string; version: int; sha256: Map<string, string> }

/// Writes a checkpoint to `path` atomically, with a SHA-256 of every part.
let save (path: string) (c: Checkpoint) =
    let ps = parts c
    let format = { format = formatName; version = formatVersion; sha256 = ps |> List.map (fun (n, b) -> n, sha256 b) |> Map.ofList }
    Files.writeAtomically path (fun fs ->
        use zip = new ZipArchive(fs, ZipArchiveMode.Create, true)
        for name, bytes in ("format.json", utf8 (Json.serialize format)) :: ps do
            use s = zip.CreateEntry(name, CompressionLevel.NoCompression).Open()
            s.Write(ReadOnlySpan bytes))

/// True for files this module writes (a zip with our format entry); false for anything else.
let isCheckpoint (path: string) =
    try
        use zip = ZipFile.OpenRead path
        not (isNull (zip.GetEntry "format.json")) && not (isNull (zip.GetEntry "progress.json"))
    with _ ->
        false

let private damaged (path: string) (what: string) =
    CheckpointError(
        sprintf "%s is damaged (%s): it cannot be used; resume from or evaluate another checkpoint (the run's best.ckpt or last.ckpt), or train again" path what
    )

/// Reads a checkpoint and checks every part against its SHA-256; the tensors are on the CPU (free them with `dispose`).
let load (path: string) : Checkpoint =
    if Directory.Exists path then
        raise (CheckpointError(sprintf "%s is a folder: give the checkpoint file in it (last.ckpt or best.ckpt)" path))
    if not (File.Exists path) then
        raise (CheckpointError(sprintf "checkpoint %s does not exist" path))
    let zip =
        try
            ZipFile.OpenRead path
        with
        | :? InvalidDataException -> raise (damaged path "not a complete zip archive: cut off while being copied, or not a checkpoint")
        | e -> raise (CheckpointError(sprintf "%s cannot be read: %s" path e.Message))
    use zip = zip
    let bytes (name: string) : byte[] =
        match zip.GetEntry name with
        | null -> raise (CheckpointError(sprintf "checkpoint %s has no %s: it is incomplete or not a Pmg.Fs checkpoint" path name))
        | e ->
            try
                use s = e.Open()
                use m = new MemoryStream()
                s.CopyTo m
                m.ToArray()
            with :? InvalidDataException as ex ->
                raise (damaged path (sprintf "%s: %s" name ex.Message))
    let text name = Text.Encoding.UTF8.GetString(bytes name)
    let format =
        try
            Json.deserialize<Format> (text "format.json")
        with :? Text.Json.JsonException ->
            raise (damaged path "format.json is not readable")
    if format.format <> formatName then
        raise (CheckpointError(sprintf "%s is not a Pmg.Fs checkpoint (format %s)" path format.format))
    if format.version <> formatVersion then
        raise (
            CheckpointError(
                sprintf "%s is a version %d checkpoint; this Pmg.Fs reads version %d: use the Pmg.Fs that wrote it, or `pmg export --to pytorch` there and load the .pth"
                    path format.version formatVersion
            )
        )
    let verified (name: string) =
        let b = bytes name
        match Map.tryFind name format.sha256 with
        | Some h when h = sha256 b -> b
        | Some _ -> raise (damaged path (sprintf "the checksum of %s does not match" name))
        | None -> raise (damaged path (sprintf "no checksum for %s" name))
    let json name = Text.Encoding.UTF8.GetString(verified name)
    let read name (parse: string -> 'T) =
        try
            parse (json name)
        with :? Text.Json.JsonException as e ->
            raise (CheckpointError(sprintf "%s: its %s does not match this version of Pmg.Fs (%s); use the Pmg.Fs that wrote it" path name e.Message))
    { Experiment = read "experiment.json" Json.deserialize<Experiment.Experiment>
      Progress = read "progress.json" Json.deserialize<Trainer.Progress>
      Model = verified "model.bin" |> readTensors
      Optimizer = verified "optimizer.bin" |> readTensors }

/// A session's state after `progress`.
let ofSession (s: Trainer.Session) (progress: Trainer.Progress) : Checkpoint =
    { Experiment = s.Experiment
      Progress = progress
      Model = [ for kv in s.Net.state_dict () -> kv.Key, kv.Value ]
      Optimizer = Sgd.state s.Optimizer }

/// Puts a checkpoint's model and optimizer state into a session.
let restore (s: Trainer.Session) (c: Checkpoint) =
    Interop.StateDict.loadInto s.Net c.Model true
    Sgd.restore s.Optimizer c.Optimizer

/// The checkpoint's tensors freed.
let dispose (c: Checkpoint) =
    for _, t in c.Model @ c.Optimizer do
        t.Dispose()
