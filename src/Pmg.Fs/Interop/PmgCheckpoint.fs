/// The parts of a Pmg.Fs checkpoint that readers before the trainer need: the format's name and version, the
/// codec of its named-tensor parts (model.bin, optimizer.bin), and reading the model part alone, checked against
/// its SHA-256, so that a checkpoint's backbone can be a run's starting weights. Training/Checkpoint.fs writes and
/// reads whole checkpoints with the same codec; it compiles after the trainer, which loads starting weights.
module Pmg.Fs.Interop.PmgCheckpoint

open System
open System.IO
open System.IO.Compression
open System.Security.Cryptography
open System.Text.Json
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Runtime

/// The `format` of format.json in every checkpoint Pmg.Fs writes.
let formatName = "pmg-fs-checkpoint"

/// The version of the checkpoint layout this Pmg.Fs writes and reads.
let formatVersion = 2

/// Named tensors as bytes: a count, then per tensor its name, dtype, shape and raw little-endian bytes.
let encode (entries: (string * torch.Tensor) list) : byte[] =
    use m = new MemoryStream()
    (use w = new BinaryWriter(m, Text.Encoding.UTF8, true)
     w.Write(List.length entries)
     for name, t in entries do
         w.Write name
         w.Write(int t.dtype)
         w.Write t.shape.Length
         for d in t.shape do
             w.Write d
         let bytes = Ops.hostBytes t
         w.Write bytes.Length
         w.Write bytes)
    m.ToArray()

/// The named tensors `encode` wrote, on the CPU; the caller disposes them.
let decode (bytes: byte[]) : (string * torch.Tensor) list =
    use r = new BinaryReader(new MemoryStream(bytes))
    let n = r.ReadInt32()
    [ for _ in 1..n ->
          let name = r.ReadString()
          let dtype: torch.ScalarType = LanguagePrimitives.EnumOfValue(sbyte (r.ReadInt32()))
          let shape = Array.init (r.ReadInt32()) (fun _ -> r.ReadInt64())
          let bytes = r.ReadBytes(r.ReadInt32())
          let t = torch.empty (shape, dtype = dtype)
          t.bytes <- Span bytes
          name, t ]

/// True for a Pmg.Fs checkpoint, whole or damaged: a zip holding format.json, or a .ckpt that starts like a zip
/// but cannot be opened as one (cut off). torch.save zips (data.pkl) and pickles are not.
let looksLikeCheckpoint (path: string) : bool =
    try
        use zip = ZipFile.OpenRead path
        not (isNull (zip.GetEntry "format.json"))
    with
    | :? InvalidDataException ->
        Path.GetExtension(path).Equals(".ckpt", StringComparison.OrdinalIgnoreCase)
        && (try
                use f = File.OpenRead path
                f.ReadByte() = int 'P' && f.ReadByte() = int 'K'
            with _ ->
                false)
    | _ -> false

let private sha256 (bytes: byte[]) = Convert.ToHexString(SHA256.HashData bytes).ToLowerInvariant()

/// The network's state_dict stored in a checkpoint (model.bin), checked against the SHA-256 that format.json
/// records for it. A damaged, foreign or newer file is refused by name (ModelFile).
let readModel (path: string) : (string * torch.Tensor) list =
    let refuse (why: string) : 'a =
        Errors.modelFile path (sprintf "%s %s: it cannot give starting weights; use another checkpoint (the run's best.ckpt or last.ckpt) or a torchvision state_dict" path why)
    let bytesOf (zip: ZipArchive) (name: string) =
        match zip.GetEntry name with
        | null -> refuse (sprintf "has no %s (incomplete, or not a Pmg.Fs checkpoint)" name)
        | e ->
            try
                use s = e.Open()
                use m = new MemoryStream()
                s.CopyTo m
                m.ToArray()
            with :? InvalidDataException as ex ->
                refuse (sprintf "is damaged (%s: %s)" name ex.Message)
    let zip =
        try
            ZipFile.OpenRead path
        with
        | :? InvalidDataException -> refuse "is damaged (not a complete zip archive)"
        | :? FileNotFoundException
        | :? DirectoryNotFoundException -> refuse "does not exist"
        | e -> refuse (sprintf "cannot be read (%s)" e.Message)
    use zip = zip
    let format, version, expected =
        try
            use doc = JsonDocument.Parse(bytesOf zip "format.json")
            let root = doc.RootElement
            let hash =
                match root.TryGetProperty "sha256" with
                | true, h ->
                    match h.TryGetProperty "model.bin" with
                    | true, v -> v.GetString()
                    | _ -> null
                | _ -> null
            root.GetProperty("format").GetString(), root.GetProperty("version").GetInt32(), hash
        with
        | :? JsonException
        | :? InvalidOperationException
        | :? Collections.Generic.KeyNotFoundException -> refuse "is damaged (format.json is not readable)"
    if format <> formatName then refuse (sprintf "is not a Pmg.Fs checkpoint (format %s)" format)
    if version <> formatVersion then
        refuse (sprintf "is a version %d checkpoint; this Pmg.Fs reads version %d (export it to a state_dict with the Pmg.Fs that wrote it)" version formatVersion)
    let model = bytesOf zip "model.bin"
    match expected with
    | null -> refuse "is damaged (no checksum for model.bin)"
    | h when h <> sha256 model -> refuse "is damaged (the checksum of model.bin does not match)"
    | _ -> decode model
