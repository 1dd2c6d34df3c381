/// Python's pickle, as far as torch.save uses it: a reader that builds data only (globals stay names, so nothing
/// from a file is executed and its classes need not exist here) and a writer for the OrderedDict of tensors that
/// a state_dict is. Interop/StateDict.fs holds the file formats around it and the loading policy.
module Pmg.Fs.Interop.Pickle

open System
open System.Collections.Generic
open System.IO
open System.Text
open TorchSharp

/// A pickle this reader does not understand, or a tensor the writer cannot write.
exception internal PickleError of string

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

let internal storageByName =
    storageTypes |> List.map (fun (n, t, s) -> n, (t, s)) |> dict

let internal storageByType =
    storageTypes |> List.map (fun (n, t, s) -> t, (n, s)) |> dict

// ---------------------------------------------------------------------------------------------------
// A small pickle reader. Only data is built: globals stay names, so nothing from the file is executed and
// classes need not exist here (a whole pickled PMG model reads as objects holding its parameters).

type internal StorageRef =
    { Key: string
      Dtype: torch.ScalarType
      ElementSize: int
      /// Elements before this storage's start in its root (legacy views).
      ViewOffset: int64 }

type internal TensorRef =
    { Storage: StorageRef
      Offset: int64
      Size: int64[]
      Stride: int64[] }

[<ReferenceEquality>]
type internal Obj =
    { Module: string
      Name: string
      Args: PVal list
      mutable State: PVal }

and internal PVal =
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

let internal badFile (msg: string) = raise (PickleError msg)

let internal toInt64 =
    function
    | PInt i -> i
    | PBool b -> if b then 1L else 0L
    | v -> badFile (sprintf "expected an integer in the pickle, got %A" v)

let internal intsOf =
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
let internal unpickle (seen: StorageRef -> unit) (data: byte[]) (start: int) : PVal * int =
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
// Writing: the pickle torch.save writes for an OrderedDict of tensors, protocol 2.

let internal pickleStateDict (tensors: (string * torch.Tensor * string) list) : byte[] =
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

