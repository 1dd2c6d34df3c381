/// PyTorch state_dicts in and out: reads torch.save files (zip and the legacy pre-1.6 format, plain state_dicts,
/// checkpoints that wrap one, and whole pickled modules) and .safetensors; writes .pth files that the reference
/// implementation's torch.load + load_state_dict(strict=True) accepts; copies entries into modules with
/// errors that say what differs.
module Pmg.Fs.Interop.StateDict

open System
open System.Collections.Generic
open System.IO
open System.IO.Compression
open System.Text
open System.Text.RegularExpressions
open TorchSharp
open Pmg.Fs.Interop.Pickle

/// Keys and tensors, in state_dict order.
type Entries = (string * torch.Tensor) list

/// A file without a readable state_dict; `read` turns it into a ModelFile error naming the file.
exception private Unreadable of string

let private badFile (msg: string) = raise (Unreadable msg)

/// What `read` says to do with a file it cannot read.
let private readableFix = "give a state_dict saved by torch.save (.pth) or a .safetensors file"

// ---------------------------------------------------------------------------------------------------
// From pickled values to entries.

let private strKey =
    function
    | PStr s -> Some s
    | _ -> None

let private dictItems =
    function
    | PDict d -> d |> Seq.choose (fun (k, v) -> strKey k |> Option.map (fun k -> k, v)) |> List.ofSeq
    | _ -> []

/// A pickled nn.Module keeps its tensors in the _parameters/_buffers/_modules entries of its __dict__.
let rec private moduleTensors (prefix: string) (o: Obj) : (string * TensorRef) list =
    let state = dictItems o.State
    let field name = state |> List.tryPick (fun (k, v) -> if k = name then Some v else None)
    let tensors name =
        field name
        |> Option.map dictItems
        |> Option.defaultValue []
        |> List.choose (fun (k, v) -> match v with PTensor t -> Some(prefix + k, t) | _ -> None)
    let children =
        field "_modules"
        |> Option.map dictItems
        |> Option.defaultValue []
        |> List.collect (fun (k, v) -> match v with PObject c -> moduleTensors (prefix + k + ".") c | _ -> [])
    tensors "_parameters" @ tensors "_buffers" @ children

/// The state_dict inside what torch.load would return: the dict itself, a checkpoint wrapping it under
/// "state_dict"/"model", or a whole pickled module (the reference saves torch.save(net)).
let rec private stateDictOf (root: PVal) : (string * TensorRef) list =
    let items = dictItems root
    let wrapped =
        [ "state_dict"; "model"; "model_state_dict"; "net" ]
        |> List.tryPick (fun name ->
            items
            |> List.tryPick (fun (k, v) ->
                match v with
                | PDict _
                | PObject _ when k = name -> Some v
                | _ -> None))
    match root, wrapped with
    | PObject o, _ -> moduleTensors "" o
    | _, Some inner -> stateDictOf inner
    | PDict _, None -> items |> List.choose (fun (k, v) -> match v with PTensor t -> Some(k, t) | _ -> None)
    | v, None -> badFile (sprintf "the file holds no state_dict (top-level %s)" (v.GetType().Name))

/// DataParallel (which the reference trains with) prefixes every key with "module.".
let private stripModule (entries: (string * 'a) list) =
    if not entries.IsEmpty && entries |> List.forall (fun (k, _) -> k.StartsWith "module.") then
        entries |> List.map (fun (k, v) -> k.Substring 7, v)
    else
        entries

/// Builds tensors from refs; `storageBytes key` gives a root storage's raw bytes.
let private materialize (storageBytes: string -> byte[]) (refs: (string * TensorRef) list) : Entries =
    let bases = Dictionary<string, torch.Tensor>()
    let baseOf (s: StorageRef) =
        match bases.TryGetValue s.Key with
        | true, t -> t
        | _ ->
            let b = storageBytes s.Key
            let t = torch.empty([| int64 (b.Length / s.ElementSize) |], dtype = s.Dtype)
            t.bytes <- Span<byte>(b)
            bases.[s.Key] <- t
            t
    use scope = torch.NewDisposeScope()
    let entries =
        refs
        |> List.map (fun (k, r) ->
            let t = (baseOf r.Storage).as_strided(r.Size, r.Stride, r.Storage.ViewOffset + r.Offset).clone()
            k, t.MoveToOuterDisposeScope())
    entries

let private readZip (path: string) : Entries =
    use archive = ZipFile.OpenRead path
    let pkl =
        archive.Entries
        |> Seq.tryFind (fun e -> e.FullName.EndsWith "data.pkl")
        |> Option.defaultWith (fun () -> badFile (sprintf "%s is a zip without data.pkl: not a torch.save file" path))
    let prefix = pkl.FullName.Substring(0, pkl.FullName.Length - "data.pkl".Length)
    let readEntry (e: ZipArchiveEntry) =
        use s = e.Open()
        use ms = new MemoryStream()
        s.CopyTo ms
        ms.ToArray()
    let root, _ = unpickle ignore (readEntry pkl) 0
    let storage key =
        match archive.GetEntry(prefix + "data/" + key) with
        | null -> badFile (sprintf "%s lacks the storage %sdata/%s" path prefix key)
        | e -> readEntry e
    stateDictOf root |> stripModule |> materialize storage

/// torch.save before 1.6 (torchvision's resnet50-19c8e357.pth): magic, protocol, sys_info and the object as
/// pickles, then the storage keys, then each storage as an int64 count and its bytes.
let private readLegacy (path: string) : Entries =
    let data = File.ReadAllBytes path
    let noStorage _ = badFile (sprintf "%s: unexpected storage in the header" path)
    let magic, p1 = unpickle noStorage data 0
    // The magic number 0x1950a86a20f9469cfc6c needs 80 bits; the reader keeps the low 64.
    if magic <> PInt 0xa86a20f9469cfc6cL then badFile (sprintf "%s: not a torch.save file" path)
    let _, p2 = unpickle noStorage data p1 // protocol version
    let _, p3 = unpickle noStorage data p2 // sys_info
    let elementSizes = Dictionary<string, int>()
    let root, p4 = unpickle (fun s -> elementSizes.[s.Key] <- s.ElementSize) data p3
    let keys, p5 = unpickle noStorage data p4
    let keyList =
        match keys with
        | PList l -> l |> Seq.choose strKey |> List.ofSeq
        | _ -> badFile (sprintf "%s: bad storage key list" path)
    let storages = Dictionary<string, byte[]>()
    let mutable pos = p5
    for key in keyList do
        let n = int (BitConverter.ToInt64(data, pos) * int64 elementSizes.[key])
        storages.[key] <- data.[pos + 8 .. pos + 8 + n - 1]
        pos <- pos + 8 + n
    stateDictOf root |> stripModule |> materialize (fun k -> storages.[k])

let private readSafetensors (path: string) : Entries =
    // The file's own order (by data offset) from its JSON header, which PyBridge's dictionary does not keep.
    let order =
        use f = File.OpenRead path
        let len = Array.zeroCreate<byte> 8
        f.ReadExactly(len, 0, 8)
        let header = Array.zeroCreate<byte> (int (BitConverter.ToUInt64(len, 0)))
        f.ReadExactly(header, 0, header.Length)
        use doc = Text.Json.JsonDocument.Parse(header)
        doc.RootElement.EnumerateObject()
        |> Seq.filter (fun p -> p.Name <> "__metadata__")
        |> Seq.map (fun p -> p.Name, p.Value.GetProperty("data_offsets").[0].GetInt64())
        |> Seq.sortBy snd
        |> Seq.map fst
        |> List.ofSeq
    let tensors = TorchSharp.PyBridge.Safetensors.LoadStateDict(path, null)
    order |> List.map (fun k -> k, tensors.[k]) |> stripModule

let private isSafetensors (path: string) =
    Path.GetExtension(path).Equals(".safetensors", StringComparison.OrdinalIgnoreCase)

/// Reads a state_dict from .pth/.pt/.bin/.ckpt (torch.save, zip or legacy) or .safetensors. A leading
/// "module." on every key is removed.
let rec read (path: string) : Entries =
    let refuse (msg: string) =
        let named = if msg.Contains path then msg else sprintf "%s: %s" path msg
        Pmg.Fs.Errors.modelFile path (sprintf "%s; %s" named readableFix)
    try
        readFile path
    with
    | PickleError msg
    | Unreadable msg -> refuse msg
    | :? InvalidDataException as e -> refuse (sprintf "%s is damaged (%s)" path e.Message)
    | :? EndOfStreamException -> refuse (sprintf "%s is truncated" path)

and private readFile (path: string) : Entries =
    if not (File.Exists path) then badFile (sprintf "%s: no such file" path)
    if isSafetensors path then
        readSafetensors path
    else
        let head = Array.zeroCreate<byte> 4
        do
            use f = File.OpenRead path
            f.ReadExactly(head, 0, min 4 (int f.Length))
        if head.[0] = 0x50uy && head.[1] = 0x4Buy then readZip path
        elif head.[0] = 0x80uy then readLegacy path
        else badFile (sprintf "%s is neither a torch.save file nor .safetensors" path)

/// The name of the description's entry in a .pth zip, beside data.pkl (torch.load reads only the records it needs).
let private descriptionEntry = Pmg.Fs.Interop.Description.key + ".json"

let private writeTorch (stream: Stream) (description: string option) (entries: Entries) =
    use scope = torch.NewDisposeScope()
    let tensors =
        entries
        |> List.mapi (fun i (k, t) ->
            if not (storageByType.ContainsKey t.dtype) then
                invalidArg (nameof entries) (sprintf "%s: dtype %A cannot be written to a .pth" k t.dtype)
            k, t.detach().cpu().contiguous(), string i)
    use archive = new ZipArchive(stream, ZipArchiveMode.Create, true)
    let entry (name: string) (write: Stream -> unit) =
        // Stored, not deflated, as torch.save does.
        use s = archive.CreateEntry("archive/" + name, CompressionLevel.NoCompression).Open()
        write s
    let text (s: string) (out: Stream) = out.Write(Encoding.ASCII.GetBytes s)
    // data.pkl first: torch's reader takes the archive folder from the first entry.
    entry "data.pkl" (fun s -> s.Write(pickleStateDict tensors))
    entry "byteorder" (text "little")
    for (_, t, key) in tensors do
        entry ("data/" + key) (fun s -> s.Write(t.bytes))
    entry "version" (text "3\n")
    description |> Option.iter (fun d -> entry descriptionEntry (fun s -> s.Write(Encoding.UTF8.GetBytes d)))

let private writeSafetensors (stream: Stream) (description: string option) (entries: Entries) =
    use scope = torch.NewDisposeScope()
    let d = Dictionary<string, torch.Tensor>()
    for (k, t) in entries do
        d.[k] <- t.detach().cpu().contiguous()
    match description with
    | None -> TorchSharp.PyBridge.Safetensors.SaveStateDict(stream, d, true)
    | Some text ->
        // PyBridge writes no metadata: its header gets a "__metadata__" map (offsets count from the data, so the
        // tensors' bytes stay as they are).
        use ms = new MemoryStream()
        TorchSharp.PyBridge.Safetensors.SaveStateDict(ms, d, true)
        let bytes = ms.ToArray()
        let length = int (BitConverter.ToUInt64(bytes, 0))
        let header = Text.Json.Nodes.JsonNode.Parse(ReadOnlySpan(bytes, 8, length)).AsObject()
        let meta = Text.Json.Nodes.JsonObject()
        meta.[Pmg.Fs.Interop.Description.key] <- Text.Json.Nodes.JsonValue.Create(text)
        header.["__metadata__"] <- meta
        let json = Encoding.UTF8.GetBytes(header.ToJsonString())
        // The format asks for data aligned to 8 bytes: the header is padded with spaces.
        let json = Array.append json (Array.create ((8 - json.Length % 8) % 8) (byte ' '))
        stream.Write(BitConverter.GetBytes(uint64 json.Length), 0, 8)
        stream.Write(json, 0, json.Length)
        stream.Write(bytes, 8 + length, bytes.Length - 8 - length)

/// Writes entries as a torch.load-able .pth (or .safetensors by extension), atomically: a temporary file in
/// the same folder, then a rename over the target.
let write (path: string) (entries: Entries) : unit =
    Pmg.Fs.Runtime.Files.writeAtomically path (fun f -> if isSafetensors path then writeSafetensors f None entries else writeTorch f None entries)

/// Writes entries with a model description: an extra `pmg-fs.json` entry in a .pth zip, the `__metadata__` of a
/// .safetensors (see readDescription).
let writeDescribed (path: string) (description: Pmg.Fs.Interop.Description.ModelDescription) (entries: Entries) : unit =
    let d = Some(Pmg.Fs.Interop.Description.toJson description)
    Pmg.Fs.Runtime.Files.writeAtomically path (fun f -> if isSafetensors path then writeSafetensors f d entries else writeTorch f d entries)

/// The description a .pth or .safetensors file carries (exports of this project), if any; a file that cannot be
/// read is refused naming it.
let readDescription (path: string) : Pmg.Fs.Interop.Description.ModelDescription option =
    let text =
        try
            if isSafetensors path then
                use f = File.OpenRead path
                let len = Array.zeroCreate<byte> 8
                f.ReadExactly(len, 0, 8)
                let header = Array.zeroCreate<byte> (int (BitConverter.ToUInt64(len, 0)))
                f.ReadExactly(header, 0, header.Length)
                use doc = Text.Json.JsonDocument.Parse(header)
                match doc.RootElement.TryGetProperty "__metadata__" with
                | true, meta ->
                    match meta.TryGetProperty Pmg.Fs.Interop.Description.key with
                    | true, v when v.ValueKind = Text.Json.JsonValueKind.String -> Some(v.GetString())
                    | _ -> None
                | _ -> None
            else
                use archive = ZipFile.OpenRead path
                archive.Entries
                |> Seq.tryFind (fun e -> e.Name = descriptionEntry)
                |> Option.map (fun e ->
                    use r = new StreamReader(e.Open())
                    r.ReadToEnd())
        with
        | :? FileNotFoundException
        | :? DirectoryNotFoundException -> Pmg.Fs.Errors.modelFile path (sprintf "%s: no such file; check the path" path)
        | :? InvalidDataException
        | :? EndOfStreamException
        | :? Text.Json.JsonException
        | :? OverflowException
        | :? ArgumentException -> None
    text |> Option.map (Pmg.Fs.Interop.Description.ofJson path)

// ---------------------------------------------------------------------------------------------------
// Loading into modules.

/// How entries differ from a module's state_dict.
type Mismatch =
    { /// Keys the module has and the entries lack (BatchNorm's num_batches_tracked excepted).
      Missing: string list
      /// Keys in the entries that the module does not have.
      Unexpected: string list
      /// Key, shape in the entries, shape in the module.
      Shapes: (string * int64[] * int64[]) list }

    /// True when keys and shapes all agree.
    member m.IsEmpty = m.Missing.IsEmpty && m.Unexpected.IsEmpty && m.Shapes.IsEmpty

/// BatchNorm's counter came with PyTorch 0.4.1; older files (torchvision's resnet50-19c8e357.pth) lack it,
/// and PyTorch's own loader accepts that.
let private optional (key: string) = key.EndsWith "num_batches_tracked"

/// Compares entries with a module's (key, tensor) list.
let compare (expected: Entries) (entries: Entries) : Mismatch =
    let have = entries |> List.map (fun (k, t) -> k, t.shape) |> dict
    let want = expected |> List.map (fun (k, t) -> k, t.shape) |> dict
    { Missing = expected |> List.map fst |> List.filter (fun k -> not (have.ContainsKey k) && not (optional k))
      Unexpected = entries |> List.map fst |> List.filter (want.ContainsKey >> not)
      Shapes =
        entries
        |> List.choose (fun (k, t) ->
            match want.TryGetValue k with
            | true, s when s <> t.shape -> Some(k, t.shape, s)
            | _ -> None) }

let private shapeText (s: int64[]) =
    if s.Length = 0 then "scalar" else s |> Array.map string |> String.concat "x"

let private listed (title: string) (items: string list) =
    if items.IsEmpty then []
    else
        let shown = items |> List.truncate 10 |> String.concat ", "
        let more = if items.Length > 10 then sprintf ", ... (%d more)" (items.Length - 10) else ""
        [ sprintf "  %s (%d): %s%s" title items.Length shown more ]

/// A registered backbone's name from its keys and shapes: a ResNet's blocks per layer and whether they have conv3
/// (bottlenecks); a VGG's convolutions per block; a ConvNeXt's blocks per stage (features.1, 3, 5, 7) and its
/// widths (the stem's and the downsampling convolutions' outputs); a Swin's blocks per stage, embedding width
/// (the patch embedding's output), heads per stage and window (its relative position bias tables, (2w-1)^2 x heads).
let private backboneOf (entries: (string * int64[]) list) : string option =
    let keys = List.map fst entries
    let blocks =
        [ 1..4 ]
        |> List.map (fun l ->
            let r = Regex(sprintf @"(^|\.)layer%d\.(\d+)\." l)
            keys |> List.choose (fun k -> let m = r.Match k in if m.Success then Some(int m.Groups.[2].Value) else None)
            |> List.fold (fun a b -> max a (b + 1)) 0)
    let bottleneck = keys |> List.exists (fun k -> k.Contains ".conv3.")
    // VGG: torchvision's features indices that hold a convolution's weight.
    let vggIndex = Regex(@"(^|\.)features\.(\d+)\.weight$")
    let convIndices =
        keys |> List.choose (fun k -> let m = vggIndex.Match k in if m.Success then Some(int m.Groups.[2].Value) else None) |> set
    // Per block: its convolutions (each followed by a ReLU), then a max pool.
    let vggConvs (convs: int list) =
        convs
        |> List.fold (fun (start, acc) n -> start + 2 * n + 1, acc @ [ for i in 0 .. n - 1 -> start + 2 * i ]) (0, [])
        |> snd
        |> set
    // ConvNeXt and Swin: torchvision's features.0 .. features.7, blocks in features.1, 3, 5 and 7 (a PMG state_dict
    // holds them under one more "features.").
    let shapeOf (suffix: string) =
        let r = Regex(@"(^|\.)" + Regex.Escape suffix + "$")
        entries |> List.tryPick (fun (k, s) -> if r.IsMatch k then Some s else None)
    let perStage (leaf: string) =
        [ 1; 3; 5; 7 ]
        |> List.map (fun f ->
            let r = Regex(sprintf @"(^|\.)features\.%d\.(\d+)\.%s$" f (Regex.Escape leaf))
            keys |> List.choose (fun k -> let m = r.Match k in if m.Success then Some(int m.Groups.[2].Value) else None)
            |> List.fold (fun a b -> max a (b + 1)) 0)
    let dim0 (suffix: string) = shapeOf suffix |> Option.filter (fun s -> s.Length >= 1) |> Option.map (fun s -> int s.[0])
    let convnextDepths = perStage "layer_scale"
    let convnextDims = [ dim0 "features.0.0.weight"; dim0 "features.2.1.weight"; dim0 "features.4.1.weight"; dim0 "features.6.1.weight" ]
    let swinDepths = perStage "attn.qkv.weight"
    // Bias table of each stage's first block: (2w - 1)^2 rows, one column per head.
    let swinTables = [ 1; 3; 5; 7 ] |> List.map (fun f -> shapeOf (sprintf "features.%d.0.attn.relative_position_bias_table" f))
    let swinHeads = swinTables |> List.map (Option.filter (fun s -> s.Length = 2) >> Option.map (fun s -> int s.[1]))
    let swinWindow (w: int) = swinTables |> List.forall (Option.exists (fun s -> s.[0] = int64 ((2 * w - 1) * (2 * w - 1))))
    Pmg.Fs.Model.Backbone.registry
    |> Map.tryFindKey (fun _ spec ->
        match spec.Family with
        | Pmg.Fs.Model.Backbone.ResNet(block, layers) -> layers = blocks && (block = Pmg.Fs.Model.Backbone.Bottleneck) = bottleneck
        | Pmg.Fs.Model.Backbone.Vgg convs -> blocks = [ 0; 0; 0; 0 ] && not convIndices.IsEmpty && convIndices = vggConvs convs
        | Pmg.Fs.Model.Backbone.ConvNeXt c -> convnextDepths = c.Depths && convnextDims = List.map Some c.Dims
        | Pmg.Fs.Model.Backbone.Swin c ->
            swinDepths = c.Depths
            && dim0 "features.0.0.weight" = Some c.EmbedDim
            && swinHeads = List.map Some c.Heads
            && swinWindow c.Window)

/// Says what to change when the difference has a known cause: the class count or the backbone.
let private hints (expected: Entries) (entries: Entries) (m: Mismatch) : string list =
    let classes =
        m.Shapes
        |> List.tryFind (fun (k, s, _) -> Regex.IsMatch(k, @"(^|\.)classifier(\d+|_concat)\.4\.weight$") && s.Length = 2)
        |> Option.map (fun (k, s, w) ->
            sprintf "the file has %d classes (%s %s), the model has %d: build the model with %d classes" s.[0] k (shapeText s) w.[0] s.[0])
    let backbone =
        if m.Missing.IsEmpty && m.Unexpected.IsEmpty && m.Shapes.IsEmpty then None
        else
            let shaped (es: Entries) = es |> List.map (fun (k, t) -> k, t.shape)
            match backboneOf (shaped entries), backboneOf (shaped expected) with
            | Some a, Some b when a <> b -> Some(sprintf "the file looks like %s, the model is %s: build the model on the %s backbone" a b a)
            | _ -> None
    [ classes; backbone ] |> List.choose id |> List.map (sprintf "hint: %s")

let private describe (what: string) (expected: Entries) (entries: Entries) (m: Mismatch) =
    [ sprintf "%s: %d missing, %d unexpected, %d with another shape" what m.Missing.Length m.Unexpected.Length m.Shapes.Length ]
    @ listed "missing" m.Missing
    @ listed "unexpected" m.Unexpected
    @ listed "shape (file vs model)" (m.Shapes |> List.map (fun (k, s, w) -> sprintf "%s %s vs %s" k (shapeText s) (shapeText w)))
    @ hints expected entries m
    |> String.concat "\n"

let private stateOf (target: torch.nn.Module) : Entries =
    [ for kv in target.state_dict () -> kv.Key, kv.Value ]

let private load (source: string) (what: string) (target: torch.nn.Module) (entries: Entries) (strict: bool) =
    let expected = stateOf target
    let m = compare expected entries
    // Like PyTorch: shapes must agree even when not strict.
    let fatal = if strict then not m.IsEmpty else not m.Shapes.IsEmpty
    if fatal then Pmg.Fs.Errors.modelFile source (describe what expected entries m)
    if not strict && not m.Missing.IsEmpty then
        Pmg.Fs.Notices.Say(describe (what + " (not strict; missing keys keep their values)") expected entries { m with Unexpected = [] })
    let targets = dict expected
    use _ = torch.no_grad ()
    for (k, t) in entries do
        match targets.TryGetValue k with
        | true, dst -> dst.copy_ t |> ignore
        | _ -> ()
    let given = entries |> List.map fst |> set
    for (k, dst) in expected do
        if optional k && not (given.Contains k) then dst.zero_ () |> ignore

/// Copies entries into a module's parameters and buffers. Strict: keys and shapes must match exactly
/// (a ModelFile error lists the differences). Not strict: unexpected keys are ignored, missing ones reported
/// as a notice.
let loadInto (target: torch.nn.Module) (entries: Entries) (strict: bool) : unit =
    load "" "the state_dict does not match the model" target entries strict

/// loadInto for entries read from the file `path`, which the error names.
let loadFrom (path: string) (target: torch.nn.Module) (entries: Entries) (strict: bool) : unit =
    load path (sprintf "%s does not match the model" path) target entries strict

/// Entries of a torchvision state_dict (keys conv1.weight, layer1.0..., fc...), or of a whole PMG network (keys
/// carrying "features."), loaded strictly into the network's backbone; `source` names them in errors. The caller
/// keeps and frees the entries.
let loadBackboneEntries (net: Pmg.Fs.Model.Pmg.Network) (source: string) (entries: Entries) : unit =
    let wanted = net.Backbone.state_dict().Keys |> Set.ofSeq
    let fits (es: Entries) = es |> List.filter (fun (k, _) -> wanted.Contains k) |> List.length
    // A PMG checkpoint's keys carry "features."; torchvision VGG's own keys start with "features." too: take
    // the reading that matches more of the backbone's names.
    let stripped = entries |> List.choose (fun (k, t) -> if k.StartsWith "features." then Some(k.Substring 9, t) else None)
    let chosen = if fits stripped > fits entries then stripped else entries
    // torchvision VGG's fully connected classifier has no place in PMG's VGG backbone.
    let backbone =
        if wanted |> Set.exists (fun k -> k.StartsWith "classifier.") then chosen
        else chosen |> List.filter (fun (k, _) -> not (k.StartsWith "classifier."))
    load source (sprintf "%s does not fit the %s backbone" source net.Config.Backbone) net.Backbone backbone true

/// ImageNet weights from a torchvision ResNet state_dict file, or a PMG network's exported state_dict, loaded
/// strictly into the network's backbone (see loadBackboneEntries).
let loadPretrainedBackbone (net: Pmg.Fs.Model.Pmg.Network) (path: string) : unit =
    let entries = read path
    try
        loadBackboneEntries net path entries
    finally
        entries |> List.iter (fun (_, t) -> t.Dispose())

/// The network's state_dict, with the reference implementation's names, as a .pth (or .safetensors), with the
/// model's description inside (see writeDescribed; readDescription reads it back).
let export (net: Pmg.Fs.Model.Pmg.Network) (description: Pmg.Fs.Interop.Description.ModelDescription) (path: string) : unit =
    writeDescribed path description (stateOf net)

/// The network config a PMG state_dict's keys and shapes imply (for files without a description, such as the
/// reference's): the backbone from its blocks (every registered one), the heads from conv_block1..S, FeatureSize
/// from conv_block1.0.conv.weight, BlockChannels from conv_block1.1.conv.weight, the classes from
/// classifier_concat.4.weight. BatchNorm momentum, which no file holds, is the paper's. Anything else is refused
/// naming `path`.
let inferConfig (path: string) (entries: Entries) : Pmg.Fs.Model.Pmg.Config =
    let shapes = entries |> List.map (fun (k, t) -> k, t.shape) |> dict
    let need (key: string) =
        match shapes.TryGetValue key with
        | true, s when s.Length >= 2 -> s
        | _ ->
            Pmg.Fs.Errors.modelFile path
                (sprintf "%s has no %s: it is not a PMG state_dict (a backbone's weights are starting weights, not a model)" path key)
    let backbone =
        match backboneOf (entries |> List.map (fun (k, t) -> k, t.shape)) with
        | Some b -> b
        | None ->
            Pmg.Fs.Errors.modelFile path
                (sprintf "%s holds a backbone that is none of the registered ones (%s): give a PMG state_dict of one of them"
                    path (String.concat ", " Pmg.Fs.Model.Backbone.registry.Keys))
    let headKey = Regex(@"^conv_block(\d+)\.0\.conv\.weight$")
    let heads =
        entries |> List.choose (fun (k, _) -> let m = headKey.Match k in if m.Success then Some(int m.Groups.[1].Value) else None)
    if heads.IsEmpty || List.max heads <> heads.Length then
        Pmg.Fs.Errors.modelFile path (sprintf "%s has no conv_block1..S heads: it is not a PMG state_dict" path)
    let config: Pmg.Fs.Model.Pmg.Config =
        { Backbone = backbone
          Classes = int (need "classifier_concat.4.weight").[0]
          Heads = heads.Length
          Head =
            { Pmg.Fs.Model.Heads.Config.Paper with
                FeatureSize = int (need "conv_block1.0.conv.weight").[0]
                BlockChannels = int (need "conv_block1.1.conv.weight").[0] } }
    // The heads must sit on stages of that backbone with the widths the file holds.
    let stages =
        try
            Pmg.Fs.Model.Pmg.headStages config
        with _ ->
            Pmg.Fs.Errors.modelFile path (sprintf "%s has %d heads, more than the %s backbone takes" path heads.Length backbone)
    stages
    |> List.iteri (fun i (_, stage) ->
        let s = need (sprintf "conv_block%d.0.conv.weight" (i + 1))
        if int s.[1] <> stage.Channels then
            Pmg.Fs.Errors.modelFile path
                (sprintf "%s: conv_block%d reads %d channels where the %s backbone's stage gives %d: the file is not a PMG state_dict of a registered backbone"
                    path (i + 1) s.[1] backbone stage.Channels))
    config

/// Reads a reference or exported checkpoint into the network, strictly.
let import (net: Pmg.Fs.Model.Pmg.Network) (path: string) : unit =
    let entries = read path
    try
        loadFrom path net entries true
    finally
        entries |> List.iter (fun (_, t) -> t.Dispose())
