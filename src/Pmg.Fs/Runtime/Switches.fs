/// libtorch switches that TorchSharp 0.107 does not expose, reached through libtorch_cpu's exported C++ functions:
/// autocast (mixed precision), cuDNN autotuning and TF32.
module Pmg.Fs.Runtime.Switches

open System
open System.Runtime.InteropServices
open TorchSharp

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type private SetEnabledFn = delegate of deviceType: sbyte * [<MarshalAs(UnmanagedType.U1)>] enabled: bool -> unit

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type private SetDtypeFn = delegate of deviceType: sbyte * scalarType: sbyte -> unit

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type private ClearCacheFn = delegate of unit -> unit

// c10::DeviceType and c10::ScalarType codes.
let private c10DeviceType (device: torch.Device) =
    match device.``type`` with
    | DeviceType.CPU -> 0y
    | DeviceType.CUDA -> 1y
    | other -> invalidArg (nameof device) (sprintf "autocast on %A is not supported" other)

let private bfloat16 = sbyte torch.ScalarType.BFloat16

// Delegates are looked up once; GetDelegateForFunctionPointer allocates.
let private setEnabled =
    lazy (Marshal.GetDelegateForFunctionPointer<SetEnabledFn>(Native.export "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"))

let private setDtype =
    lazy (Marshal.GetDelegateForFunctionPointer<SetDtypeFn>(Native.export "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"))

let private clearCache =
    lazy (Marshal.GetDelegateForFunctionPointer<ClearCacheFn>(Native.export "_ZN2at8autocast11clear_cacheEv"))

/// libtorch's autocast with bf16 on `device`, until disposed: the ops its lists name (convolutions, matrix products)
/// run in bf16, the rest keeps its input types; parameters stay fp32 and receive fp32 gradients. The state is
/// per thread, as in PyTorch: the forward must run on the calling thread. Leaving clears the cache of casted
/// weights, which would otherwise outlive the next optimizer step.
let autocastBf16 (device: torch.Device) : IDisposable =
    let d = c10DeviceType device
    setDtype.Value.Invoke(d, bfloat16)
    setEnabled.Value.Invoke(d, true)
    { new IDisposable with
        member _.Dispose() =
            setEnabled.Value.Invoke(d, false)
            clearCache.Value.Invoke() }

/// cuDNN tries its convolution algorithms once per shape and keeps the fastest (torch.backends.cudnn.benchmark).
/// False where this libtorch has no such setter.
let setCudnnBenchmark (on: bool) : bool = Native.trySetContextFlag "_ZN2at7Context17setBenchmarkCuDNNEb" on

/// TF32 tensor-core math for fp32 convolutions (cuDNN) and matrix products (cuBLAS) on Ampere and later.
/// False where this libtorch lacks either setter.
let setTf32 (on: bool) : bool =
    let cudnn = Native.trySetContextFlag "_ZN2at7Context17setAllowTF32CuDNNEb" on
    let cublas = Native.trySetContextFlag "_ZN2at7Context18setAllowTF32CuBLASEb" on
    cudnn && cublas
