namespace Pmg.Fs.Runtime

/// Where tensors live.
type Device =
    /// The CPU.
    | Cpu
    /// A CUDA GPU: the current one, or the one with this index.
    | Cuda of index: int option

/// Parsing, naming and loading devices.
[<RequireQualifiedAccess>]
module Device =
    /// `cpu`, `cuda` or `cuda:N`.
    let parse (text: string) : Device =
        match text.Trim().ToLowerInvariant() with
        | "cpu" -> Cpu
        | "cuda" -> Cuda None
        | t when t.StartsWith "cuda:" ->
            match System.Int32.TryParse(t.Substring 5) with
            | true, i when i >= 0 -> Cuda(Some i)
            | _ -> Pmg.Fs.Errors.setting Pmg.Fs.Setting.Device (sprintf "device '%s': use cpu, cuda or cuda:N" text)
        | _ -> Pmg.Fs.Errors.setting Pmg.Fs.Setting.Device (sprintf "device '%s': use cpu, cuda or cuda:N" text)

    /// The torch name of a device: `cpu`, `cuda` or `cuda:N`; the inverse of `parse`.
    let text =
        function
        | Cpu -> "cpu"
        | Cuda None -> "cuda"
        | Cuda(Some i) -> sprintf "cuda:%d" i

    /// The native runtime a device needs: the CPU or the CUDA build of libtorch.
    let backend =
        function
        | Cpu -> Native.Cpu
        | Cuda _ -> Native.Cuda

    /// The torch device, with the native runtime it needs loaded first (so no caller has to remember to).
    let torch (d: Device) : TorchSharp.torch.Device =
        Native.ensure (backend d) |> ignore
        TorchSharp.torch.Device(text d)
