/// Device memory in use, from the CUDA runtime (TorchSharp exposes no allocator statistics). libtorch's caching
/// allocator keeps what it reserved, so the growth over a run is the peak it reserved: an upper bound of
/// PyTorch's max_memory_allocated.
module Pmg.Fs.Runtime.GpuMemory

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

/// Bytes in use on the current device, or None where no CUDA runtime answers.
let used () : int64 option =
    match memGetInfo.Value with
    | None -> None
    | Some f ->
        let mutable free = 0un
        let mutable total = 0un
        if f.Invoke(&free, &total) = 0 then Some(int64 total - int64 free) else None
