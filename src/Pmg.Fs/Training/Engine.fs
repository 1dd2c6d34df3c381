/// How a run uses its device: settings that change speed and memory, not the method. Chosen per device by
/// `forDevice`; `pmg bench --ladder` measures each on its own.
module Pmg.Fs.Training.Engine

open TorchSharp

/// Speed and memory settings of a run; `plain` has all off, `forDevice` gives the defaults.
type Engine =
    { /// Parameters, gradients and momentum in one flat tensor per learning-rate group (Sgd.Flat).
      FlatParameters: bool
      /// Convolution weights and network inputs with NHWC strides (channels_last), the layout tensor-core
      /// convolutions want; the tensors keep their NCHW shapes.
      ChannelsLast: bool
      /// cuDNN picks the fastest convolution algorithm per shape (process-wide).
      CudnnBenchmark: bool
      /// TF32 for fp32 convolutions and matrix products (process-wide; Ampere and later).
      Tf32: bool
      /// Batches go to the GPU from pinned host memory without blocking the host.
      PinnedCopies: bool }

/// Everything off: what a plain port does.
let plain =
    { FlatParameters = false
      ChannelsLast = false
      CudnnBenchmark = false
      Tf32 = false
      PinnedCopies = false }

let private isCuda (device: torch.Device) = device.``type`` = DeviceType.CUDA

/// The defaults: flat parameters everywhere; on CUDA also NHWC, cuDNN autotuning, TF32 and pinned copies.
let forDevice (device: torch.Device) =
    if isCuda device then
        { FlatParameters = true
          ChannelsLast = true
          CudnnBenchmark = true
          Tf32 = true
          PinnedCopies = true }
    else
        { plain with FlatParameters = true }

/// Turns on the process-wide switches a CUDA engine asks for. Off leaves libtorch's defaults (TF32 convolutions,
/// fp32 matrix products, no autotuning), which is also what the reference PyTorch code runs with. Returns the
/// switches this libtorch could not set.
let applySwitches (engine: Engine) (device: torch.Device) : string list =
    if isCuda device then
        [ if engine.CudnnBenchmark && not (Pmg.Fs.Runtime.Switches.setCudnnBenchmark true) then "cuDNN autotuning"
          if engine.Tf32 && not (Pmg.Fs.Runtime.Switches.setTf32 true) then "TF32" ]
    else
        []

/// NHWC strides for an NCHW tensor (same shape, same values).
let channelsLast (x: torch.Tensor) : torch.Tensor =
    use nhwc = x.permute(0L, 2L, 3L, 1L).contiguous ()
    nhwc.permute (0L, 3L, 1L, 2L)

/// Gives every 4-d parameter (the convolution weights) NHWC strides, in place. Call before the optimizer is
/// created: flat storage keeps the strides it finds.
let toChannelsLast (net: torch.nn.Module) =
    use _ = torch.no_grad ()
    for p in net.parameters () do
        if p.dim () = 4L then
            use nhwc = channelsLast p
            p.set_ nhwc |> ignore

/// The layout a network input should have under this engine.
let inputLayout (engine: Engine) (x: torch.Tensor) : torch.Tensor =
    if engine.ChannelsLast && x.dim () = 4L then channelsLast x else x.alias ()

/// A host tensor on the device: from pinned memory without blocking on CUDA (the caching host allocator keeps the
/// pinned block until the copy is done), a plain copy otherwise.
let upload (engine: Engine) (device: torch.Device) (x: torch.Tensor) : torch.Tensor =
    if isCuda device && engine.PinnedCopies then
        use pinned = x.pin_memory ()
        pinned.``to`` (device, non_blocking = true)
    else
        x.``to`` device
