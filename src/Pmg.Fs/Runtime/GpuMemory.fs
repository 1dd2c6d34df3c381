/// GPU memory figures for `pmg bench`, the same two the reference benchmark (scripts/ref_bench.py) prints:
///
/// - growth of device memory in use over the run, from the CUDA runtime (cudaMemGetInfo). libtorch's caching
///   allocator keeps what it reserved, so this is the peak it reserved plus any CUDA library workspace: an upper
///   bound of PyTorch's max_memory_allocated. Always available where CUDA is.
/// - the caching allocator's peak allocated bytes (PyTorch's max_memory_allocated, allocated_bytes.all.peak).
///   TorchSharp 0.107 exposes no allocator statistics (its CUDA memory API is a later pull request), and
///   libtorch's own c10::cuda::CUDACachingAllocator::getDeviceStats is an inline header function, so there is no
///   C entry point. `peakAllocated` calls the native allocator's exported method instead, but only after checking
///   that the allocator object in use is exactly that class; else it answers None and the caller prints n/a.
module Pmg.Fs.Runtime.GpuMemory

open System
open System.IO
open System.Runtime.InteropServices

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type private MemGetInfoFn = delegate of free: byref<unativeint> * total: byref<unativeint> -> int

// The runtime libtorch_cuda loaded (dlopen by soname returns the loaded one), else the driver API.
let private candidates =
    [ "libcudart.so.13", "cudaMemGetInfo"
      "libcudart.so.12", "cudaMemGetInfo"
      "libcudart.so", "cudaMemGetInfo"
      "libcuda.so.1", "cuMemGetInfo_v2" ]

let private memGetInfo =
    lazy
        (candidates
         |> List.tryPick (fun (lib, fn) ->
             match NativeLibrary.TryLoad lib with
             | true, h ->
                 match NativeLibrary.TryGetExport(h, fn) with
                 | true, f -> Some(Marshal.GetDelegateForFunctionPointer<MemGetInfoFn> f)
                 | _ -> None
             | _ -> None))

let private info () =
    match memGetInfo.Value with
    | None -> None
    | Some f ->
        let mutable free = 0un
        let mutable total = 0un
        if f.Invoke(&free, &total) = 0 then Some(int64 free, int64 total) else None

/// Bytes in use on the current device, or None where no CUDA runtime answers.
let used () : int64 option = info () |> Option.map (fun (free, total) -> total - free)

// ---------------------------------------------------------------------------------------------------
// The caching allocator's statistics.

/// c10's DeviceStats begins with nine StatArrays (allocation, segment, active, inactive_split, allocated_bytes,
/// reserved_bytes, ...), each three Stats (all, small pool, large pool) of four int64s (current, peak, allocated,
/// freed). Every version of the struct read (c10/cuda/CUDACachingAllocator.h since 1.4, then
/// c10/core/CachingDeviceAllocator.h) has this prefix; fields were only appended after it. The struct is trivially copyable and returned through a caller's buffer; the buffer here is
/// far larger than the struct has ever been.
module DeviceStats =
    let private statArray = 3 * 4 * 8
    let private stat (array: int) (field: int) = array * statArray + field * 8
    /// Byte offset of allocated_bytes.all.current in the returned stats.
    let allocatedCurrent = stat 4 0
    /// Byte offset of allocated_bytes.all.peak in the returned stats.
    let allocatedPeak = stat 4 1
    /// Byte offset of reserved_bytes.all.peak in the returned stats.
    let reservedPeak = stat 5 1
    /// Size in bytes of the buffer the stats are returned into.
    let bufferBytes = 8192

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type private MethodStatsFn = delegate of result: nativeint * self: nativeint * device: sbyte -> nativeint

// c10::cuda::CUDACachingAllocator: the allocator in use (std::atomic<CUDAAllocator*>, a plain pointer), the native
// allocator's vtable and its getDeviceStats(c10::DeviceIndex) method.
let private allocatorSymbol = "_ZN3c104cuda20CUDACachingAllocator9allocatorE"
let private nativeVtableSymbol = "_ZTVN3c104cuda20CUDACachingAllocator6Native22NativeCachingAllocatorE"
let private nativeStatsSymbol = "_ZN3c104cuda20CUDACachingAllocator6Native22NativeCachingAllocator14getDeviceStatsEa"

/// Peak figures of the CUDA caching allocator on one device.
type AllocatorPeak =
    { /// Peak bytes allocated to tensors (PyTorch's max_memory_allocated).
      PeakAllocated: int64
      /// Peak bytes the allocator reserved from the device (PyTorch's max_memory_reserved).
      PeakReserved: int64 }

/// Why `peakAllocated` has no figure, for the n/a line.
let mutable private why = "not asked"

let private fromNativeAllocator (libDir: string) (device: int) : AllocatorPeak option =
    let c10cuda = Path.Combine(libDir, "libc10_cuda.so")
    match NativeLibrary.TryLoad c10cuda with
    | false, _ ->
        why <- sprintf "cannot open %s" c10cuda
        None
    | true, h ->
        let export (s: string) = match NativeLibrary.TryGetExport(h, s) with | true, p -> Some p | _ -> None
        match export allocatorSymbol, export nativeVtableSymbol, export nativeStatsSymbol with
        | Some slot, Some vtable, Some stats ->
            let self = Marshal.ReadIntPtr slot
            // Itanium C++ ABI: an object's vtable pointer points past the vtable's offset-to-top and RTTI words.
            // Equal only when the allocator in use is exactly NativeCachingAllocator (not cudaMallocAsync's).
            if self = 0n then
                why <- "the CUDA caching allocator is not set up"
                None
            elif Marshal.ReadIntPtr self <> vtable + 16n then
                why <- "the CUDA allocator in use is not libtorch's native caching allocator"
                None
            else
                let buffer = Marshal.AllocHGlobal DeviceStats.bufferBytes
                try
                    Marshal.GetDelegateForFunctionPointer<MethodStatsFn>(stats).Invoke(buffer, self, sbyte device) |> ignore
                    let read (o: int) = Marshal.ReadInt64(buffer, o)
                    let current, peak, reserved = read DeviceStats.allocatedCurrent, read DeviceStats.allocatedPeak, read DeviceStats.reservedPeak
                    let total = info () |> Option.map snd |> Option.defaultValue Int64.MaxValue
                    // A layout other than the one above would show here (a count, not bytes, or garbage).
                    if 0L <= current && current <= peak && 0L < peak && peak <= reserved && reserved <= total then
                        Some { PeakAllocated = peak; PeakReserved = reserved }
                    else
                        why <- sprintf "allocator statistics failed their sanity check (current %d, peak %d, reserved %d)" current peak reserved
                        None
                finally
                    Marshal.FreeHGlobal buffer
        | a, v, s ->
            let missing =
                [ if a.IsNone then allocatorSymbol
                  if v.IsNone then nativeVtableSymbol
                  if s.IsNone then nativeStatsSymbol ]
            why <- sprintf "%s does not export %s" c10cuda (String.concat ", " missing)
            None

/// The caching allocator's peak allocated and peak reserved bytes on `device` since the process started, or None
/// (see `unavailableReason`).
let peakAllocated (device: int) : AllocatorPeak option =
    match Pmg.Fs.Runtime.Native.current () with
    | Some l when l.Backend = Pmg.Fs.Runtime.Native.Cuda ->
        try
            fromNativeAllocator l.LibTorchDir device
        with e ->
            why <- e.Message
            None
    | _ ->
        why <- "no CUDA libtorch is loaded"
        None

/// Why the last `peakAllocated` answered None.
let unavailableReason () = why
