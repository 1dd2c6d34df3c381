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

/// Keys and tensors, in state_dict order.
type Entries = (string * torch.Tensor) list

exception StateDictError of string

// ---------------------------------------------------------------------------------------------------
// Storage types: the names torch.save uses for each dtype, and their element sizes.

let private storageTypes =
    [ "DoubleStorage", torch.ScalarType.Float64, 8
      "FloatStorage", torch.ScalarType.Float32, 4
      "HalfStorage", torch.ScalarType.Float16, 2
      "BFloat16Storage", torch.ScalarType.BFloat16, 2
      "LongStorage", torch.ScalarType.Int64, 8
      "IntStorage", torch.ScalarType.Int32, 4
      "ShortStorage", torch.ScalarType.Int16, 2
      "CharStorage", torch.ScalarType.Int8, 1
      "ByteStorage", torch.ScalarType.Byte, 1
      "BoolStorage", torch.ScalarType.Bool, 1 ]

let private storageByName =
    storageTypes |> List.map (fun (n, t, s) -> n, (t, s)) |> dict

let private storageByType =
    storageTypes |> List.map (fun (n, t, s) -> t, (n, s)) |> dict

// ---------------------------------------------------------------------------------------------------
// A small pickle reader. Only data is built: globals stay names, so nothing from the file is executed and
// classes need not exist here (a whole pickled PMG model reads as objects holding its parameters).

type private StorageRef =
    { Key: string
      Dtype: torch.ScalarType
      ElementSize: int
      /// Elements before this storage's start in its root (legacy views).
      ViewOffset: int64 }

type private TensorRef =
    { Storage: StorageRef
      Offset: int64
      Size: int64[]
      Stride: int64[] }

[<ReferenceEquality>]
type private Obj =
    { Module: string
      Name: string
      Args: PVal list
      mutable State: PVal }

and private PVal =
    | PNone
    | PBool of bool
    | PInt of int64
    | PFloat of float
    | PStr of string
    | PBytes of byte[]
    | PTuple of PVal list
    | PList of ResizeArray<PVal>
    | PDict of ResizeArray<PVal * PVal>
    | PGlobal of string * string
    | PObject of Obj
    | PStorage of StorageRef
    | PTensor of TensorRef
    | PMark

let private badFile (msg: string) = raise (StateDictError msg)

let private toInt64 =
    function
    | PInt i -> i
    | PBool b -> if b then 1L else 0L
    | v -> badFile (sprintf "expected an integer in the pickle, got %A" v)

let private intsOf =
    function
    | PTuple xs -> xs |> List.map toInt64 |> Array.ofList
    | PList xs -> xs |> Seq.map toInt64 |> Array.ofSeq
    | v -> badFile (sprintf "expected a tuple of integers in the pickle, got %A" v)

/// The persistent id torch.save writes for a storage: ('storage', type, key, location, numel[, view]).
let private persistentLoad (seen: StorageRef -> unit) (pid: PVal) : PVal =
    match pid with
    | PTuple(PStr "storage" :: PGlobal(_, typeName) :: key :: _ :: _ :: rest) ->
        let dtype, size =
            match storageByName.TryGetValue typeName with
            | true, v -> v
            | _ -> badFile (sprintf "unsupported storage type torch.%s" typeName)
        let key = match key with PStr s -> s | PInt i -> string i | v -> badFile (sprintf "bad storage key %A" v)
        // Legacy files: view_metadata = (view_key, offset, size) of a view into the root storage.
        let viewOffset =
            match rest with
            | PTuple [ _; offset; _ ] :: _ -> toInt64 offset
            | _ -> 0L
        let s = { Key = key; Dtype = dtype; ElementSize = size; ViewOffset = viewOffset }
        seen s
        PStorage s
    | v -> badFile (sprintf "unsupported persistent id in the pickle: %A" v)

let private reduce (callable: PVal) (args: PVal) : PVal =
    let argList = match args with PTuple xs -> xs | v -> [ v ]
    match callable, argList with
    | PGlobal("torch._utils", ("_rebuild_tensor_v2" | "_rebuild_tensor")), PStorage s :: offset :: size :: stride :: _ ->
        PTensor { Storage = s; Offset = toInt64 offset; Size = intsOf size; Stride = intsOf stride }
    | PGlobal("torch._utils", ("_rebuild_parameter" | "_rebuild_parameter_with_state")), data :: _ -> data
    | PGlobal("collections", "OrderedDict"), _ -> PDict(ResizeArray())
    | PGlobal(m, n), _ -> PObject { Module = m; Name = n; Args = argList; State = PNone }
    | v, _ -> badFile (sprintf "cannot call %A in the pickle" v)

/// Runs one pickle from `start`, returning its value and the position after STOP; `seen` hears of every storage.
let private unpickle (seen: StorageRef -> unit) (data: byte[]) (start: int) : PVal * int =
    let mutable pos = start
    let stack = ResizeArray<PVal>()
    let memo = Dictionary<int, PVal>()
    let byte () =
        let b = data.[pos]
        pos <- pos + 1
        b
    // Moves past n bytes, returning where they start.
    let take n =
        let s = pos
        pos <- pos + n
        s
    let u16 () = int (BitConverter.ToUInt16(data, take 2))
    let i32 () = BitConverter.ToInt32(data, take 4)
    let u64 () = int (BitConverter.ToUInt64(data, take 8))
    let line () =
        let e = Array.IndexOf(data, 10uy, pos)
        let s = Encoding.ASCII.GetString(data, pos, e - pos)
        pos <- e + 1
        s
    let utf8 n = Encoding.UTF8.GetString(data, take n, n)
    let latin1 n = Encoding.Latin1.GetString(data, take n, n)
    let bytes n = Array.sub data (take n) n
    let push v = stack.Add v
    let pop () =
        let v = stack.[stack.Count - 1]
        stack.RemoveAt(stack.Count - 1)
        v
    let top () = stack.[stack.Count - 1]
    let popMark () =
        let m = stack.FindLastIndex(fun v -> v = PMark)
        if m < 0 then badFile "pickle MARK not found"
        let items = stack.GetRange(m + 1, stack.Count - m - 1) |> List.ofSeq
        stack.RemoveRange(m, stack.Count - m)
        items
    let long (n: int) =
        // Little-endian two's complement, truncated to 64 bits (only the legacy magic number is longer).
        let b = bytes n
        if n = 0 then 0L
        elif n >= 8 then BitConverter.ToInt64(b, 0)
        else
            let ext = if b.[n - 1] >= 0x80uy then 0xFFuy else 0uy
            BitConverter.ToInt64(Array.init 8 (fun i -> if i < n then b.[i] else ext), 0)
    let setItems (target: PVal) (items: PVal list) =
        match target with
        | PDict d -> items |> List.chunkBySize 2 |> List.iter (fun kv -> d.Add(kv.[0], kv.[1]))
        | PObject _ -> ()
        | v -> badFile (sprintf "SETITEMS on %A" v)
    let appendItems (target: PVal) (items: PVal list) =
        match target with
        | PList l -> l.AddRange items
        | PObject _ -> ()
        | v -> badFile (sprintf "APPENDS on %A" v)
    let mutable result = None
    while result.IsNone do
        if pos >= data.Length then badFile "truncated pickle"
        match char (byte ()) with
        | '\x80' -> byte () |> ignore // PROTO
        | '\x95' -> pos <- pos + 8 // FRAME
        | '.' -> result <- Some(pop ())
        | '(' -> push PMark
        | ')' -> push (PTuple [])
        | ']' -> push (PList(ResizeArray()))
        | '}' -> push (PDict(ResizeArray()))
        | 'N' -> push PNone
        | '\x88' -> push (PBool true)
        | '\x89' -> push (PBool false)
        | 'J' -> push (PInt(int64 (i32 ())))
        | 'K' -> push (PInt(int64 (byte ())))
        | 'M' -> push (PInt(int64 (u16 ())))
        | '\x8a' -> push (PInt(long (int (byte ()))))
        | '\x8b' -> push (PInt(long (i32 ())))
        | 'I' ->
            match line () with
            | "00" -> push (PBool false)
            | "01" -> push (PBool true)
            | s -> push (PInt(int64 s))
        | 'L' -> push (PInt(int64 ((line ()).TrimEnd 'L')))
        | 'G' -> push (PFloat(BitConverter.ToDouble(Array.rev (bytes 8), 0)))
        | 'X' -> push (PStr(utf8 (i32 ())))
        | '\x8c' -> push (PStr(utf8 (int (byte ()))))
        | '\x8d' -> push (PStr(utf8 (u64 ())))
        | 'T' -> push (PStr(latin1 (i32 ())))
        | 'U' -> push (PStr(latin1 (int (byte ()))))
        | 'B' -> push (PBytes(bytes (i32 ())))
        | 'C' -> push (PBytes(bytes (int (byte ()))))
        | '\x8e' -> push (PBytes(bytes (u64 ())))
        | 't' -> push (PTuple(popMark ()))
        | '\x85' -> push (PTuple [ pop () ])
        | '\x86' ->
            let b = pop ()
            push (PTuple [ pop (); b ])
        | '\x87' ->
            let c = pop ()
            let b = pop ()
            push (PTuple [ pop (); b; c ])
        | 'l' -> push (PList(ResizeArray(popMark ())))
        | 'd' ->
            let d = PDict(ResizeArray())
            setItems d (popMark ())
            push d
        | 'a' ->
            let v = pop ()
            appendItems (top ()) [ v ]
        | 'e' ->
            let items = popMark ()
            appendItems (top ()) items
        | 's' ->
            let v = pop ()
            let k = pop ()
            setItems (top ()) [ k; v ]
        | 'u' ->
            let items = popMark ()
            setItems (top ()) items
        | '\x8f' -> push (PList(ResizeArray())) // EMPTY_SET
        | '\x90' ->
            let items = popMark ()
            appendItems (top ()) items
        | '\x91' -> push (PList(ResizeArray(popMark ()))) // FROZENSET
        | 'c' ->
            let m = line ()
            push (PGlobal(m, line ()))
        | '\x93' ->
            let n = pop ()
            match pop (), n with
            | PStr m, PStr n -> push (PGlobal(m, n))
            | v -> badFile (sprintf "STACK_GLOBAL on %A" v)
        | 'R' ->
            let args = pop ()
            push (reduce (pop ()) args)
        | '\x81' ->
            let args = pop ()
            push (reduce (pop ()) args)
        | '\x92' ->
            pop () |> ignore // kwargs
            let args = pop ()
            push (reduce (pop ()) args)
        | 'b' ->
            let state = pop ()
            match top () with
            | PObject o -> o.State <- state
            | _ -> () // OrderedDict's _metadata and the like
        | 'Q' -> push (persistentLoad seen (pop ()))
        | 'q' -> memo.[int (byte ())] <- top ()
        | 'r' -> memo.[i32 ()] <- top ()
        | '\x94' -> memo.[memo.Count] <- top ()
        | 'h' -> push memo.[int (byte ())]
        | 'j' -> push memo.[i32 ()]
        | '0' -> pop () |> ignore
        | '1' -> popMark () |> ignore
        | '2' -> push (top ())
        | op -> badFile (sprintf "unsupported pickle opcode 0x%02x at byte %d" (int op) (pos - 1))
    result.Value, pos

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
let read (path: string) : Entries =
    if not (File.Exists path) then badFile (sprintf "state dict file not found: %s" path)
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

// ---------------------------------------------------------------------------------------------------
// Writing: the pickle torch.save writes for an OrderedDict of tensors, protocol 2.

let private pickleStateDict (tensors: (string * torch.Tensor * string) list) : byte[] =
    use ms = new MemoryStream()
    use w = new BinaryWriter(ms)
    let op (c: char) = w.Write(byte c)
    let str (s: string) =
        let b = Encoding.UTF8.GetBytes s
        op 'X'
        w.Write(b.Length)
        w.Write b
    let glob (m: string) (n: string) =
        op 'c'
        w.Write(Encoding.ASCII.GetBytes(m + "\n" + n + "\n"))
    let int (i: int64) =
        if i >= 0L && i < 256L then
            op 'K'
            w.Write(byte i)
        elif i >= int64 Int32.MinValue && i <= int64 Int32.MaxValue then
            op 'J'
            w.Write(int32 i)
        else
            w.Write 0x8auy
            w.Write 8uy
            w.Write i
    let tuple (items: int64[]) =
        op '('
        items |> Array.iter int
        op 't'
    w.Write 0x80uy
    w.Write 2uy
    glob "collections" "OrderedDict"
    op ')'
    op 'R'
    for chunk in List.chunkBySize 1000 tensors do
        op '('
        for (k, t, storageKey) in chunk do
            str k
            glob "torch._utils" "_rebuild_tensor_v2"
            op '('
            // Persistent id: ('storage', torch.FloatStorage, key, 'cpu', numel).
            op '('
            str "storage"
            glob "torch" (fst storageByType.[t.dtype])
            str storageKey
            str "cpu"
            int t.NumberOfElements
            op 't'
            op 'Q'
            int 0L
            tuple t.shape
            tuple (t.stride ())
            w.Write 0x89uy // requires_grad=False, as state_dict() detaches
            glob "collections" "OrderedDict"
            op ')'
            op 'R'
            op 't'
            op 'R'
        op 'u'
    op '.'
    w.Flush()
    ms.ToArray()

let private writeTorch (stream: Stream) (entries: Entries) =
    use scope = torch.NewDisposeScope()
    let tensors =
        entries
        |> List.mapi (fun i (k, t) ->
            if not (storageByType.ContainsKey t.dtype) then
                badFile (sprintf "%s: dtype %A cannot be written" k t.dtype)
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

let private writeSafetensors (stream: Stream) (entries: Entries) =
    use scope = torch.NewDisposeScope()
    let d = Dictionary<string, torch.Tensor>()
    for (k, t) in entries do
        d.[k] <- t.detach().cpu().contiguous()
    TorchSharp.PyBridge.Safetensors.SaveStateDict(stream, d, true)

/// Writes entries as a torch.load-able .pth (or .safetensors by extension), atomically: a temporary file in
/// the same folder, then a rename over the target.
let write (path: string) (entries: Entries) : unit =
    let full = Path.GetFullPath path
    let dir = Path.GetDirectoryName full
    Directory.CreateDirectory dir |> ignore
    let tmp = Path.Combine(dir, sprintf ".%s.%s.tmp" (Path.GetFileName full) (Guid.NewGuid().ToString "N"))
    try
        do
            use f = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write)
            if isSafetensors full then writeSafetensors f entries else writeTorch f entries
            f.Flush true
        File.Move(tmp, full, true)
    with _ ->
        if File.Exists tmp then File.Delete tmp
        reraise ()

// ---------------------------------------------------------------------------------------------------
// Loading into modules.

/// How entries differ from a module's state_dict.
type Mismatch =
    { Missing: string list
      Unexpected: string list
      /// Key, shape in the entries, shape in the module.
      Shapes: (string * int64[] * int64[]) list }

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

/// A ResNet's name from its keys: blocks per layer and whether blocks have conv3 (bottlenecks).
let private backboneOf (keys: string list) : string option =
    let blocks =
        [ 1..4 ]
        |> List.map (fun l ->
            let r = Regex(sprintf @"(^|\.)layer%d\.(\d+)\." l)
            keys |> List.choose (fun k -> let m = r.Match k in if m.Success then Some(int m.Groups.[2].Value) else None)
            |> List.fold (fun a b -> max a (b + 1)) 0)
    let bottleneck = keys |> List.exists (fun k -> k.Contains ".conv3.")
    Pmg.Fs.Model.Backbone.registry
    |> Map.tryFindKey (fun _ spec ->
        match spec.Family with
        | Pmg.Fs.Model.Backbone.ResNet(block, layers) -> layers = blocks && (block = Pmg.Fs.Model.Backbone.Bottleneck) = bottleneck
        | Pmg.Fs.Model.Backbone.Vgg _ -> false)

/// Says what to change when the difference has a known cause: the class count or the backbone.
let private hints (expected: Entries) (entries: Entries) (m: Mismatch) : string list =
    let classes =
        m.Shapes
        |> List.tryFind (fun (k, s, _) -> Regex.IsMatch(k, @"(^|\.)classifier(\d+|_concat)\.4\.weight$") && s.Length = 2)
        |> Option.map (fun (k, s, w) ->
            sprintf "checkpoint has %d classes (%s %s), the model has %d: pass --classes %d" s.[0] k (shapeText s) w.[0] s.[0])
    let backbone =
        if m.Missing.IsEmpty && m.Unexpected.IsEmpty && m.Shapes.IsEmpty then None
        else
            match backboneOf (List.map fst entries), backboneOf (List.map fst expected) with
            | Some a, Some b when a <> b -> Some(sprintf "checkpoint looks like %s, the model is %s: pass --backbone %s" a b a)
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

let private load (what: string) (target: torch.nn.Module) (entries: Entries) (strict: bool) =
    let expected = stateOf target
    let m = compare expected entries
    // Like PyTorch: shapes must agree even when not strict.
    let fatal = if strict then not m.IsEmpty else not m.Shapes.IsEmpty
    if fatal then raise (StateDictError(describe what expected entries m))
    if not strict && not m.Missing.IsEmpty then
        eprintfn "%s" (describe (what + " (not strict; missing keys keep their values)") expected entries { m with Unexpected = [] })
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
/// (StateDictError lists the differences). Not strict: unexpected keys are ignored, missing ones reported.
let loadInto (target: torch.nn.Module) (entries: Entries) (strict: bool) : unit =
    load "state dict does not match the model" target entries strict

/// ImageNet weights from a torchvision ResNet state_dict (keys conv1.weight, layer1.0..., fc...), or one whose
/// keys carry "features." (a PMG checkpoint's backbone), loaded strictly into the network's backbone.
let loadPretrainedBackbone (net: Pmg.Fs.Model.Pmg.Network) (path: string) : unit =
    let entries = read path
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
    try
        load (sprintf "%s does not fit the %s backbone" path net.Config.Backbone) net.Backbone backbone true
    finally
        entries |> List.iter (fun (_, t) -> t.Dispose())

/// The network's state_dict, with the reference implementation's names, as a .pth (or .safetensors).
let export (net: Pmg.Fs.Model.Pmg.Network) (path: string) : unit = write path (stateOf net)

/// Reads a reference or exported checkpoint into the network, strictly.
let import (net: Pmg.Fs.Model.Pmg.Network) (path: string) : unit =
    let entries = read path
    try
        loadInto net entries true
    finally
        entries |> List.iter (fun (_, t) -> t.Dispose())
