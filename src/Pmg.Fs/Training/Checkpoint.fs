/// Checkpoints: one zip file holding the experiment, the progress counters, the model's state and the optimizer's
/// momentum buffers, with a SHA-256 of every part so that a damaged file is refused rather than half-loaded.
/// Written atomically (Runtime.Files): a kill during the write leaves the previous checkpoint whole. The jigsaw
/// generator is reseeded at every epoch start, so no generator state needs keeping.
///
/// Two kinds share the format: a resumable one (`save`, last.ckpt) with everything a resume needs, and a model-only
/// one (`saveModel`, best.ckpt) without the momentum buffers, which nothing but a resume reads and which are as
/// large as the weights. A model-only file leaves out optimizer.bin and stores model.bin deflated; `load` reads
/// both, `loadResumable` refuses the model-only kind by name.
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
      /// The optimizer's momentum buffers by parameter name (Sgd.state); empty when read from a model-only file.
      Optimizer: (string * torch.Tensor) list }

/// What a checkpoint file holds.
type Contents =
    /// Everything a resume needs: the model and the optimizer's momentum buffers (last.ckpt).
    | Resumable
    /// The model only: weights, buffers, the experiment and the progress, no optimizer state (best.ckpt).
    | ModelOnly

let private fail (path: string) (message: string) : 'a = Errors.fail (ModelFile(path, message))

// Named tensors: Interop.PmgCheckpoint's codec, which the starting-weights reader shares.

let private tensorBytes = Interop.PmgCheckpoint.encode

let private readTensors = Interop.PmgCheckpoint.decode

// ---------------------------------------------------------------------------------------------------

let private utf8 (s: string) = Text.Encoding.UTF8.GetBytes s
let private sha256 (bytes: byte[]) = Convert.ToHexString(SHA256.HashData bytes).ToLowerInvariant()

let private optimizerEntry = "optimizer.bin"

/// The parts of a checkpoint, by entry name, in the order they are written, with how each is stored. The weights of
/// a model-only file are deflated: fp32 weights give up about 7% (their exponents repeat), which is what brings a
/// model-only file under half a resumable one (the weights alone are a little over half: BatchNorm's statistics
/// have no momentum buffers). A resumable file is written every epoch, so it is not compressed.
let private parts (contents: Contents) (c: Checkpoint) =
    [ "experiment.json", utf8 (Json.serialize c.Experiment), CompressionLevel.NoCompression
      "progress.json", utf8 (Json.serialize c.Progress), CompressionLevel.NoCompression
      match contents with
      | Resumable ->
          "model.bin", tensorBytes c.Model, CompressionLevel.NoCompression
          optimizerEntry, tensorBytes c.Optimizer, CompressionLevel.NoCompression
      | ModelOnly -> "model.bin", tensorBytes c.Model, CompressionLevel.Optimal ]

type private Format = { format: string; version: int; sha256: Map<string, string> }

let private write (contents: Contents) (path: string) (c: Checkpoint) =
    let ps = parts contents c
    let format = { format = formatName; version = formatVersion; sha256 = ps |> List.map (fun (n, b, _) -> n, sha256 b) |> Map.ofList }
    Files.writeAtomically path (fun fs ->
        use zip = new ZipArchive(fs, ZipArchiveMode.Create, true)
        for name, bytes, level in ("format.json", utf8 (Json.serialize format), CompressionLevel.NoCompression) :: ps do
            use s = zip.CreateEntry(name, level).Open()
            s.Write(ReadOnlySpan bytes))

/// Writes a resumable checkpoint (model and optimizer state) to `path` atomically, with a SHA-256 of every part.
let save (path: string) (c: Checkpoint) = write Resumable path c

/// Writes a model-only checkpoint to `path` atomically: the experiment, the progress and the model's state, not the
/// optimizer's (`c.Optimizer` is ignored). About 46% of a resumable file of the same network; `load`, evaluation,
/// prediction and export read it; a resume refuses it.
let saveModel (path: string) (c: Checkpoint) = write ModelOnly path c

/// True for files this module writes (a zip with our format entry); false for anything else.
let isCheckpoint (path: string) =
    try
        use zip = ZipFile.OpenRead path
        not (isNull (zip.GetEntry "format.json")) && not (isNull (zip.GetEntry "progress.json"))
    with _ ->
        false

let private damaged (path: string) (what: string) : 'a =
    fail path (sprintf "%s is damaged (%s): it cannot be used; resume from or evaluate another checkpoint (the run's best.ckpt or last.ckpt), or train again" path what)

/// Reads a checkpoint of either kind and checks every part against its SHA-256, with what it holds; the tensors are
/// on the CPU (free them with `dispose`). A model-only file gives an empty Optimizer.
let private readChecked (path: string) : Checkpoint * Contents =
    if Directory.Exists path then
        fail path (sprintf "%s is a folder: give the checkpoint file in it (last.ckpt or best.ckpt)" path)
    if not (File.Exists path) then
        fail path (sprintf "checkpoint %s does not exist: give the path of a run's best.ckpt or last.ckpt" path)
    let zip =
        try
            ZipFile.OpenRead path
        with
        | :? InvalidDataException -> (damaged path "not a complete zip archive: cut off while being copied, or not a checkpoint")
        | e -> fail path (sprintf "%s cannot be read: %s; check its permissions, or copy it again" path e.Message)
    use zip = zip
    let bytes (name: string) : byte[] =
        match zip.GetEntry name with
        | null -> fail path (sprintf "checkpoint %s has no %s: it is incomplete or not a Pmg.Fs checkpoint; use the run's best.ckpt or last.ckpt" path name)
        | e ->
            try
                use s = e.Open()
                use m = new MemoryStream()
                s.CopyTo m
                m.ToArray()
            with :? InvalidDataException as ex ->
                (damaged path (sprintf "%s: %s" name ex.Message))
    let text name = Text.Encoding.UTF8.GetString(bytes name)
    let format =
        try
            Json.deserialize<Format> (text "format.json")
        with :? Text.Json.JsonException ->
            (damaged path "format.json is not readable")
    if format.format <> formatName then
        fail path (sprintf "%s is not a Pmg.Fs checkpoint (format %s): give a run's best.ckpt or last.ckpt" path format.format)
    if format.version <> formatVersion then
        fail path (
            sprintf "%s is a version %d checkpoint; this Pmg.Fs reads version %d: use the Pmg.Fs that wrote it, or export it there as a PyTorch state_dict and load that"
                path format.version formatVersion
        )
    let verified (name: string) =
        let b = bytes name
        match Map.tryFind name format.sha256 with
        | Some h when h = sha256 b -> b
        | Some _ -> (damaged path (sprintf "the checksum of %s does not match" name))
        | None -> (damaged path (sprintf "no checksum for %s" name))
    let json name = Text.Encoding.UTF8.GetString(verified name)
    let read name (parse: string -> 'T) =
        try
            parse (json name)
        with :? Text.Json.JsonException as e ->
            fail path (sprintf "%s: its %s does not match this version of Pmg.Fs (%s); use the Pmg.Fs that wrote it" path name e.Message)
    // The kind is what the checksums list: a model-only file has no optimizer part, and a resumable one whose
    // optimizer part went missing fails its check like any other part.
    let contents = if format.sha256.ContainsKey optimizerEntry then Resumable else ModelOnly
    { Experiment = read "experiment.json" Json.deserialize<Experiment.Experiment>
      Progress = read "progress.json" Json.deserialize<Trainer.Progress>
      Model = verified "model.bin" |> readTensors
      Optimizer = (match contents with Resumable -> verified optimizerEntry |> readTensors | ModelOnly -> []) },
    contents

/// Reads a checkpoint of either kind and checks every part against its SHA-256; the tensors are on the CPU (free
/// them with `dispose`). A model-only file (best.ckpt) gives an empty Optimizer.
let load (path: string) : Checkpoint = fst (readChecked path)

/// Reads a checkpoint a run can continue from: a model-only file (best.ckpt) is refused by name, since resuming
/// without the momentum buffers would not continue the run it came from.
let loadResumable (path: string) : Checkpoint =
    match readChecked path with
    | c, Resumable -> c
    | c, ModelOnly ->
        for _, t in c.Model do
            t.Dispose()
        fail path (
            sprintf "%s holds the model only (weights without the optimizer's state, as best.ckpt is saved): a run cannot continue from it; resume from the run's last.ckpt, or start a new run with it as the starting weights"
                path
        )

/// A session's state after `progress`.
let ofSession (s: Trainer.Session) (progress: Trainer.Progress) : Checkpoint =
    { Experiment = s.Experiment
      Progress = progress
      Model = [ for kv in s.Net.state_dict () -> kv.Key, kv.Value ]
      Optimizer = Sgd.state s.Optimizer }

/// Puts a checkpoint's model and optimizer state into a session. A checkpoint without optimizer state (model-only,
/// or saved before the first step) leaves the session's momentum buffers as they are.
let restore (s: Trainer.Session) (c: Checkpoint) =
    Interop.StateDict.loadInto s.Net c.Model true
    if not c.Optimizer.IsEmpty then Sgd.restore s.Optimizer c.Optimizer

/// The checkpoint's tensors freed.
let dispose (c: Checkpoint) =
    for _, t in c.Model @ c.Optimizer do
        t.Dispose()
