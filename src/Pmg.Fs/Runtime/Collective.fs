/// Collective operations between the processes of one run (data-parallel training): every rank sums its tensors
/// with the others' (all-reduce) and receives rank 0's bytes (broadcast). Three communicators behind one
/// interface: Single (one process, every operation a no-op), Mpi (Open MPI's libmpi.so.40 through a few P/Invokes;
/// host buffers) and Nccl (libnccl.so.2 on CUDA tensors, its unique id broadcast over MPI). Every wait has a
/// deadline (`PMG_COLLECTIVE_TIMEOUT` seconds, default `defaultTimeout`): a rank that died or hangs makes the
/// others fail with a message naming this rank and the wait, never hang.
module Pmg.Fs.Runtime.Collective

open System
open System.Diagnostics
open System.Runtime.InteropServices
open System.Threading
open TorchSharp
open Pmg.Fs

/// Which engine carries the collectives of a distributed run.
type Backend =
    /// Open MPI (CPU buffers; CUDA tensors pass through host memory).
    | Mpi
    /// NCCL on CUDA tensors, one process per GPU, bootstrapped through MPI.
    | Nccl

/// The backend named `mpi` or `nccl` (None for `none`), as a door's text gives it.
let parse (text: string) : Backend option =
    match text.Trim().ToLowerInvariant() with
    | "none" -> None
    | "mpi" -> Some Mpi
    | "nccl" -> Some Nccl
    | _ -> Errors.setting Setting.Distributed (sprintf "distributed backend '%s': use mpi, nccl or none" text)

/// The name `parse` reads.
let name (b: Backend option) =
    match b with
    | None -> "none"
    | Some Mpi -> "mpi"
    | Some Nccl -> "nccl"

/// Seconds a rank waits on one collective when `PMG_COLLECTIVE_TIMEOUT` does not say: long enough for rank 0 to
/// write a checkpoint and evaluate while the others wait, short enough that a hang ends.
let defaultTimeout = 600.0

/// The deadline of one collective, in seconds (`PMG_COLLECTIVE_TIMEOUT`, else `defaultTimeout`).
let timeoutSeconds () =
    match Environment.GetEnvironmentVariable "PMG_COLLECTIVE_TIMEOUT" with
    | null
    | "" -> defaultTimeout
    | v ->
        match Double.TryParse(v, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
        | true, s when s > 0.0 -> s
        | _ ->
            Errors.setting
                Setting.Distributed
                (sprintf "collective timeout '%s' (environment variable PMG_COLLECTIVE_TIMEOUT): give a positive number of seconds" v)

/// The processes of a run and the operations between them. Every rank must call the same operations in the same
/// order with the same sizes.
type Communicator =
    inherit IDisposable
    /// This process's rank, 0-based; rank 0 writes the run folder.
    abstract Rank: int
    /// Number of processes (K).
    abstract Size: int
    /// The rank among the processes on this machine (picks the GPU).
    abstract LocalRank: int
    /// Sums a contiguous tensor over the ranks, in place (float32, float64 or int64).
    abstract AllReduceSum: torch.Tensor -> unit
    /// Sums host values over the ranks, in place.
    abstract AllReduceHost: float[] -> unit
    /// Rank 0's bytes on every rank (the argument is ignored on the others).
    abstract Broadcast: byte[] -> byte[]
    /// Rank 0's values of a contiguous tensor on every rank, in place.
    abstract BroadcastTensor: torch.Tensor -> unit
    /// This process stops before the others (an error): at exit it does not wait for them (the launcher then
    /// ends the job at once instead of after the others' collective timeout).
    abstract Abandon: unit -> unit

/// One process: every operation leaves its argument as it is.
type private Single() =
    interface Communicator with
        member _.Rank = 0
        member _.Size = 1
        member _.LocalRank = 0
        member _.AllReduceSum _ = ()
        member _.AllReduceHost _ = ()
        member _.Broadcast b = b
        member _.BroadcastTensor _ = ()
        member _.Abandon() = ()
        member _.Dispose() = ()

/// The one-process communicator.
let single: Communicator = new Single()

// ---- Pure rules, shared by every backend (and unit-tested) ------------------------------------------------

/// Rank r's part of a batch of n images over k ranks, as (start, count): torch.chunk's rule (and DataParallel's
/// scatter), ceil(n/k) images a rank, the last ranks fewer (16 over 2: 8 + 8; 9 over 2: 5 + 4; 3 over 4: 1+1+1+0).
let part (n: int) (k: int) (r: int) : int * int =
    let c = (n + k - 1) / k
    let start = min n (r * c)
    start, min n (start + c) - start

/// The factor rank r's gradient is scaled by before the ranks' gradients are summed: its images over all the
/// batch's images, so the sum is the gradient of the mean loss over the whole batch (1/K for equal parts).
let gradientWeight (local: int) (total: int) : float = if total = 0 then 0.0 else float local / float total

/// Element ranges (offset, count) of at most `most` elements covering `count` elements: MPI counts are 32-bit.
let chunks (count: int64) (most: int64) : (int64 * int) list =
    [ for offset in 0L .. most .. count - 1L -> offset, int (min most (count - offset)) ]

/// The launcher's rank, size and local rank from the environment (Open MPI's OMPI_COMM_WORLD_*), or None outside
/// a launcher.
let launcherRanks () : (int * int * int) option =
    let read (n: string) =
        match Environment.GetEnvironmentVariable n with
        | null -> None
        | v ->
            match Int32.TryParse v with
            | true, i -> Some i
            | _ -> None
    match read "OMPI_COMM_WORLD_RANK", read "OMPI_COMM_WORLD_SIZE" with
    | Some r, Some s -> Some(r, s, read "OMPI_COMM_WORLD_LOCAL_RANK" |> Option.defaultValue 0)
    | _ -> None

/// Time this process spent in all-reduces (waiting for the others included), in Stopwatch ticks.
let mutable private allReduceTicks = 0L

/// Time this process has spent in all-reduces since it started, waiting for slower ranks included: with the
/// training time it gives the all-reduce's share of an iteration.
let allReduceTime () : TimeSpan =
    TimeSpan.FromSeconds(float (Interlocked.Read &allReduceTicks) / float Stopwatch.Frequency)

/// Runs `f`, adding its time to the all-reduce clock.
let private timedAllReduce (f: unit -> unit) =
    let start = Stopwatch.GetTimestamp()
    try f () finally Interlocked.Add(&allReduceTicks, Stopwatch.GetTimestamp() - start) |> ignore

/// Polls `finished` until it says true or the deadline passes; then fails naming this rank and the operation.
let private waitFor (rank: int) (size: int) (what: string) (finished: unit -> bool) =
    let limit = timeoutSeconds ()
    let clock = Stopwatch.StartNew()
    let mutable spins = 0
    while not (finished ()) do
        if clock.Elapsed.TotalSeconds > limit then
            Errors.fail (
                TrainingFailed(
                    sprintf "rank %d of %d: %s did not complete within %g s: another rank stopped or hangs (the launcher's own message names a rank that died); resume the run from its folder with the same number of processes (the wait is set by the environment variable PMG_COLLECTIVE_TIMEOUT)"
                        rank size what limit
                )
            )
        spins <- spins + 1
        // Busy at first (a collective between busy ranks takes microseconds), then yield the core.
        if spins > 1000 then Thread.Sleep 1 elif spins > 100 then Thread.Yield() |> ignore

// ---- Native access ----------------------------------------------------------------------------------------

module private Native =
    [<DllImport("libc", EntryPoint = "dlopen")>]
    extern nativeint dlopen(string file, int mode)

    [<DllImport("libc", EntryPoint = "dlerror")>]
    extern nativeint dlerror()

    [<DllImport("libc", EntryPoint = "setenv")>]
    extern int setenv(string name, string value, int overwrite)

    let RTLD_NOW = 2
    let RTLD_GLOBAL = 0x100
    let RTLD_NOLOAD = 4

    let lastError () =
        let p = dlerror ()
        if p = 0n then "unknown error" else Marshal.PtrToStringAnsi p

    [<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
    type DataPtr = delegate of nativeint -> nativeint

    /// LibTorchSharp's THSTensor_data: the address of a tensor's first element (host or device memory).
    let dataPtr: Lazy<DataPtr> =
        lazy
            (let h = dlopen ("libLibTorchSharp.so", RTLD_NOW ||| RTLD_NOLOAD)
             if h = 0n then
                 Errors.fail (NativeRuntime(sprintf "LibTorchSharp is not loaded (%s): load the native runtime before a collective operation" (lastError ())))
             Marshal.GetDelegateForFunctionPointer<DataPtr>(NativeLibrary.GetExport(h, "THSTensor_data")))

/// The address of a contiguous tensor's first element.
let private addressOf (t: torch.Tensor) : nativeint =
    if not (t.is_contiguous ()) then invalidArg "t" "collective operations need contiguous tensors"
    Native.dataPtr.Force().Invoke t.Handle

// ---- Open MPI ---------------------------------------------------------------------------------------------

module private Ompi =
    [<Literal>]
    let Lib = "libmpi.so.40"

    [<DllImport(Lib)>]
    extern int MPI_Initialized(int& flag)

    [<DllImport(Lib)>]
    extern int MPI_Init_thread(nativeint argc, nativeint argv, int required, int& provided)

    [<DllImport(Lib)>]
    extern int MPI_Finalize()

    [<DllImport(Lib)>]
    extern int MPI_Comm_rank(nativeint comm, int& rank)

    [<DllImport(Lib)>]
    extern int MPI_Comm_size(nativeint comm, int& size)

    [<DllImport(Lib)>]
    extern int MPI_Allreduce(nativeint sendbuf, nativeint recvbuf, int count, nativeint datatype, nativeint op, nativeint comm)

    [<DllImport(Lib)>]
    extern int MPI_Bcast(nativeint buffer, int count, nativeint datatype, int root, nativeint comm)

    /// MPI_IN_PLACE in Open MPI.
    let inPlace = 1n

    /// The handles (exported objects' addresses) of Open MPI's predefined communicator, types and op.
    type Handles = { World: nativeint; Float: nativeint; Double: nativeint; Int64: nativeint; Byte: nativeint; Sum: nativeint }

    let mutable private handles: Handles option = None

    /// Loads libmpi globally (its plugins resolve symbols from it) and reads the predefined handles.
    let load () =
        match handles with
        | Some h -> h
        | None ->
            let lib = Native.dlopen (Lib, Native.RTLD_NOW ||| Native.RTLD_GLOBAL)
            if lib = 0n then
                Errors.fail (
                    NativeRuntime(sprintf "Open MPI's %s cannot be loaded (%s): install Open MPI (Debian: apt-get install openmpi-bin) and start the processes with mpirun" Lib (Native.lastError ()))
                )
            let get (n: string) = NativeLibrary.GetExport(lib, n)
            let h =
                { World = get "ompi_mpi_comm_world"
                  Float = get "ompi_mpi_float"
                  Double = get "ompi_mpi_double"
                  Int64 = get "ompi_mpi_long_long_int"
                  Byte = get "ompi_mpi_byte"
                  Sum = get "ompi_mpi_op_sum" }
            handles <- Some h
            h

    let check (what: string) (code: int) =
        if code <> 0 then Errors.fail (TrainingFailed(sprintf "MPI %s failed with error code %d" what code))

/// The MPI datatype of a tensor's elements.
let private mpiType (h: Ompi.Handles) (t: torch.ScalarType) =
    match t with
    | torch.ScalarType.Float32 -> h.Float, 4L
    | torch.ScalarType.Float64 -> h.Double, 8L
    | torch.ScalarType.Int64 -> h.Int64, 8L
    | other -> invalidArg "t" (sprintf "collective operations take float32, float64 or int64 tensors, not %A" other)

/// MPI_COMM_WORLD of an `mpirun` launch.
type private MpiWorld(h: Ompi.Handles) =
    let rank, size =
        let mutable r = 0
        let mutable s = 1
        Ompi.check "MPI_Comm_rank" (Ompi.MPI_Comm_rank(h.World, &r))
        Ompi.check "MPI_Comm_size" (Ompi.MPI_Comm_size(h.World, &s))
        r, s
    let local = launcherRanks () |> Option.map (fun (_, _, l) -> l) |> Option.defaultValue 0
    let mutable broken = false

    /// Runs a blocking MPI call on a worker thread and waits for it with the deadline; a timeout marks the world
    /// broken (finalising it would hang) and leaves the call blocked. Blocking collectives are about twice as fast
    /// as non-blocking ones polled with MPI_Test (Open MPI's tuned algorithms; 20 ms against 43 ms for 48 MB
    /// between two processes here). One call at a time: MPI_THREAD_SERIALIZED.
    member private _.Call (what: string) (name: string) (call: unit -> int) =
        if broken then Errors.fail (TrainingFailed(sprintf "rank %d of %d: an earlier collective failed; %s cannot run" rank size what))
        let task = Tasks.Task.Run(call)
        try
            waitFor rank size what (fun () -> task.IsCompleted)
        with _ ->
            broken <- true
            reraise ()
        Ompi.check name task.Result

    /// Sums `count` elements at `address` in place.
    member this.SumAt (address: nativeint) (count: int64) (dtype: torch.ScalarType) (what: string) =
        let t, width = mpiType h dtype
        timedAllReduce (fun () ->
            for offset, n in chunks count (1L <<< 30) do
                let at = address + nativeint (offset * width)
                this.Call what "MPI_Allreduce" (fun () -> Ompi.MPI_Allreduce(Ompi.inPlace, at, n, t, h.Sum, h.World)))

    /// Rank 0's `count` bytes at `address` on every rank.
    member this.BroadcastAt (address: nativeint) (count: int64) (what: string) =
        for offset, n in chunks count (1L <<< 30) do
            let at = address + nativeint offset
            this.Call what "MPI_Bcast" (fun () -> Ompi.MPI_Bcast(at, n, h.Byte, 0, h.World))

    member _.Broken = broken

    /// Runs `f` on a host copy of `t` (or `t` itself on the CPU), then copies back.
    member private _.OnHost (t: torch.Tensor) (f: torch.Tensor -> unit) =
        if t.device_type = DeviceType.CPU && t.is_contiguous () then f t
        else
            use host = t.cpu().contiguous ()
            f host
            t.copy_ host |> ignore

    interface Communicator with
        member _.Rank = rank
        member _.Size = size
        member _.LocalRank = local
        member this.AllReduceSum t =
            if size > 1 then this.OnHost t (fun h -> this.SumAt (addressOf h) (h.numel ()) h.dtype "a sum of gradients or counts")
        member this.AllReduceHost values =
            if size > 1 && values.Length > 0 then
                let pin = GCHandle.Alloc(values, GCHandleType.Pinned)
                // Unpinned only after the call returned: a call left blocked by a timeout may still write.
                this.SumAt (pin.AddrOfPinnedObject()) (int64 values.Length) torch.ScalarType.Float64 "a sum of batch sizes or counts"
                pin.Free()
        member this.Broadcast bytes =
            if size = 1 then bytes
            else
                // The length first, so the other ranks can make room.
                let length = [| (if rank = 0 then float bytes.Length else 0.0) |]
                let pin = GCHandle.Alloc(length, GCHandleType.Pinned)
                this.BroadcastAt (pin.AddrOfPinnedObject()) 8L "a broadcast from rank 0"
                pin.Free()
                let buffer = if rank = 0 then bytes else Array.zeroCreate (int length.[0])
                if buffer.Length > 0 then
                    let pin = GCHandle.Alloc(buffer, GCHandleType.Pinned)
                    this.BroadcastAt (pin.AddrOfPinnedObject()) (int64 buffer.Length) "a broadcast from rank 0"
                    pin.Free()
                buffer
        member this.BroadcastTensor t =
            if size > 1 then
                this.OnHost t (fun h -> this.BroadcastAt (addressOf h) (h.numel () * h.element_size ()) "a broadcast of rank 0's weights")
        member _.Abandon() = broken <- true
        member _.Dispose() = ()

/// MPI_COMM_WORLD, initialised once per process and finalised when it exits (not after a failed wait: finalising
/// would wait for the rank that is gone).
let private mpiWorld: Lazy<MpiWorld> =
    lazy
        (let h = Ompi.load ()
         // Open MPI's handlers for SIGSEGV and friends would take the signals .NET uses for null references.
         Native.setenv ("OMPI_MCA_opal_signal", "", 0) |> ignore
         let mutable initialised = 0
         Ompi.check "MPI_Initialized" (Ompi.MPI_Initialized(&initialised))
         if initialised = 0 then
             let mutable provided = 0
             // Serialized: one thread at a time calls MPI (a worker thread per call, then the exit handler).
             Ompi.check "MPI_Init_thread" (Ompi.MPI_Init_thread(0n, 0n, 2, &provided))
         let w = new MpiWorld(h)
         AppDomain.CurrentDomain.ProcessExit.Add(fun _ -> if not w.Broken then Ompi.MPI_Finalize() |> ignore)
         w)

// ---- NCCL -------------------------------------------------------------------------------------------------

module private NcclLib =
    [<Literal>]
    let Lib = "libnccl.so.2"

    /// ncclUniqueId: 128 opaque bytes, passed by value.
    [<Struct; StructLayout(LayoutKind.Sequential)>]
    type UniqueId =
        val mutable A0: int64
        val mutable A1: int64
        val mutable A2: int64
        val mutable A3: int64
        val mutable A4: int64
        val mutable A5: int64
        val mutable A6: int64
        val mutable A7: int64
        val mutable A8: int64
        val mutable A9: int64
        val mutable A10: int64
        val mutable A11: int64
        val mutable A12: int64
        val mutable A13: int64
        val mutable A14: int64
        val mutable A15: int64

    [<DllImport(Lib)>]
    extern int ncclGetUniqueId(UniqueId& id)

    [<DllImport(Lib)>]
    extern int ncclCommInitRank(nativeint& comm, int nranks, UniqueId id, int rank)

    [<DllImport(Lib)>]
    extern int ncclAllReduce(nativeint sendbuff, nativeint recvbuff, unativeint count, int datatype, int op, nativeint comm, nativeint stream)

    [<DllImport(Lib)>]
    extern int ncclBroadcast(nativeint sendbuff, nativeint recvbuff, unativeint count, int datatype, int root, nativeint comm, nativeint stream)

    [<DllImport(Lib)>]
    extern int ncclCommAbort(nativeint comm)

    [<DllImport(Lib)>]
    extern int ncclCommDestroy(nativeint comm)

    [<DllImport(Lib)>]
    extern nativeint ncclGetErrorString(int result)

    let check (what: string) (code: int) =
        if code <> 0 then
            let text = try Marshal.PtrToStringAnsi(ncclGetErrorString code) with _ -> "unknown"
            Errors.fail (TrainingFailed(sprintf "NCCL %s failed with error %d (%s)" what code text))

/// ncclUniqueId's size in bytes.
let ncclIdBytes = 128

/// NCCL's datatype code of a tensor's elements (ncclInt64 4, ncclFloat32 7, ncclFloat64 8, ncclUint8 1).
let ncclType (t: torch.ScalarType) : int =
    match t with
    | torch.ScalarType.Int64 -> 4
    | torch.ScalarType.Float32 -> 7
    | torch.ScalarType.Float64 -> 8
    | torch.ScalarType.Byte -> 1
    | other -> invalidArg "t" (sprintf "NCCL collectives here take float32, float64, int64 or uint8 tensors, not %A" other)

/// The 128 bytes of a unique id, and back (what rank 0 broadcasts).
let private idBytes (id: NcclLib.UniqueId) : byte[] =
    let b = Array.zeroCreate<byte> ncclIdBytes
    let mutable v = id
    MemoryMarshal.Write(Span<byte>(b), &v)
    b

let private idOf (bytes: byte[]) : NcclLib.UniqueId =
    if bytes.Length <> ncclIdBytes then
        Errors.fail (TrainingFailed(sprintf "rank 0 sent an NCCL id of %d bytes, not %d: every rank must run the same program" bytes.Length ncclIdBytes))
    MemoryMarshal.Read<NcclLib.UniqueId>(ReadOnlySpan<byte>(bytes))

/// The unique id's bytes survive the trip through `Broadcast`'s byte form (for the bootstrap's unit test).
let ncclIdRoundTrip (bytes: byte[]) : byte[] = idBytes (idOf bytes)

/// NCCL over the ranks of an MPI launch (or alone, without MPI, for one process); host values go over MPI.
type private NcclWorld(mpi: Communicator option) =
    let rank, size, local =
        match mpi with
        | Some m -> m.Rank, m.Size, m.LocalRank
        | None -> 0, 1, 0
    let mutable comm = 0n
    let mutable aborted = false

    /// The NCCL communicator, made on first use: rank 0 draws the id, MPI carries it to the others.
    member private _.Comm =
        if comm = 0n then
            let mutable id = NcclLib.UniqueId()
            if rank = 0 then NcclLib.check "ncclGetUniqueId" (NcclLib.ncclGetUniqueId(&id))
            let id =
                match mpi with
                | Some m -> idOf (m.Broadcast(if rank = 0 then idBytes id else Array.zeroCreate ncclIdBytes))
                | None -> id
            let mutable c = 0n
            NcclLib.check "ncclCommInitRank" (NcclLib.ncclCommInitRank(&c, size, id, rank))
            comm <- c
        comm

    /// Runs an NCCL call on the default stream and waits for it with the deadline (aborting the communicator
    /// unblocks a call whose peer is gone).
    member private this.Run (what: string) (device: torch.Device) (call: nativeint -> int) =
        let c = this.Comm
        NcclLib.check what (call c)
        let sync = Tasks.Task.Run(fun () -> torch.cuda.synchronize device)
        try
            waitFor rank size what (fun () -> sync.IsCompleted)
        with _ ->
            aborted <- true
            NcclLib.ncclCommAbort c |> ignore
            reraise ()
        sync.Wait()

    member private _.Cuda (t: torch.Tensor) =
        if t.device_type <> DeviceType.CUDA then
            Errors.fail (TrainingFailed "the NCCL backend needs the model on a CUDA device: choose the mpi backend for the CPU")
        if not (t.is_contiguous ()) then invalidArg "t" "collective operations need contiguous tensors"

    interface Communicator with
        member _.Rank = rank
        member _.Size = size
        member _.LocalRank = local
        // Also with one rank: the GPU check's smoke test runs the NCCL calls alone.
        member this.AllReduceSum t =
            this.Cuda t
            let p = addressOf t
            timedAllReduce (fun () ->
                this.Run "ncclAllReduce" t.device (fun c -> NcclLib.ncclAllReduce(p, p, unativeint (t.numel ()), ncclType t.dtype, 0, c, 0n)))
        member _.AllReduceHost values = mpi |> Option.iter (fun m -> m.AllReduceHost values)
        member _.Broadcast bytes = match mpi with Some m -> m.Broadcast bytes | None -> bytes
        member this.BroadcastTensor t =
            this.Cuda t
            let p = addressOf t
            let n = t.numel () * t.element_size ()
            this.Run "ncclBroadcast" t.device (fun c -> NcclLib.ncclBroadcast(p, p, unativeint n, ncclType torch.ScalarType.Byte, 0, c, 0n))
        member _.Abandon() =
            aborted <- true
            mpi |> Option.iter (fun m -> m.Abandon())
        member _.Dispose() =
            if comm <> 0n && not aborted then NcclLib.ncclCommDestroy comm |> ignore
            comm <- 0n

/// NCCL over MPI_COMM_WORLD under a launcher; alone (one rank, no MPI) otherwise.
let private ncclWorld: Lazy<NcclWorld> =
    lazy
        (let mpi = if launcherRanks().IsSome then Some(mpiWorld.Force() :> Communicator) else None
         new NcclWorld(mpi))

/// The communicator of this process for a backend: Single for None; MPI_COMM_WORLD (or NCCL over it) made once
/// per process, so every session of the process shares it. Outside a launcher, Mpi is one process.
let connect (backend: Backend option) : Communicator =
    match backend with
    | None -> single
    | Some Mpi -> if launcherRanks().IsSome then mpiWorld.Force() :> Communicator else single
    | Some Nccl -> ncclWorld.Force() :> Communicator

/// `OMPI_COMM_WORLD_LOCAL_RANK` when a launcher started this process, else None: a device "cuda" becomes
/// "cuda:LOCAL_RANK" for NCCL.
let localRank () : int option = launcherRanks () |> Option.map (fun (_, _, l) -> l)
