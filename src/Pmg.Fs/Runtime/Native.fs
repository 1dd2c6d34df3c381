/// Loads libtorch and TorchSharp's native glue before the first TorchSharp call, working around what this
/// machine's system libraries and CPU need, and picks up a CUDA libtorch from an existing folder.
module Pmg.Fs.Runtime.Native

open System
open System.IO
open System.Runtime.InteropServices
open System.Runtime.Intrinsics.X86
open System.Security.Cryptography

/// Which native backend to bring up.
type Backend =
    /// The CPU build of libtorch, from the NuGet package or PMG_LIBTORCH.
    | Cpu
    /// A CUDA build of libtorch, from PMG_LIBTORCH or a Python PyTorch install.
    | Cuda

/// What `ensure` found and did, for logs and the run manifest.
type Loaded =
    { /// The backend that was brought up.
      Backend: Backend
      /// The folder libtorch was loaded from.
      LibTorchDir: string
      /// The full path of TorchSharp's native glue library as loaded: the original, or its patched copy in the cache.
      LibTorchSharp: string
      /// The GLIBCXX_3.4.32 requirement was marked weak because the system libstdc++ lacks it.
      PatchedGlibcxx: bool
      /// oneDNN convolutions were turned off because this CPU's cache sizes are unreadable (SIGFPE in backward).
      MkldnnDisabled: bool }



let private fail msg : 'a = Pmg.Fs.Errors.fail (Pmg.Fs.NativeRuntime msg)

/// True on Linux x64, the platform whose libtorch package (libtorch-cpu-linux-x64) the library references and the
/// only one where this module loads libtorch itself, with its work-arounds (the GLIBCXX weak-version edit of the
/// glue, the CPUID check that turns oneDNN off, PMG_LIBTORCH, a CUDA libtorch from a Python install). On Windows,
/// macOS and other processors TorchSharp's own loading is used untouched: it finds the libtorch package the app
/// references (libtorch-cpu-win-x64, libtorch-cpu-osx-arm64, ...).
let ownLoading: bool =
    RuntimeInformation.IsOSPlatform OSPlatform.Linux && RuntimeInformation.ProcessArchitecture = Architecture.X64

let private libTorchSharpName = "libLibTorchSharp.so"
let private cpuPackage = "libtorch-cpu-linux-x64"
let private nativeSubdir = Path.Combine("runtimes", "linux-x64", "native")

// ---------------------------------------------------------------------------------------------------
// Finding the files: the app folder (CLI, tests), its runtimes/ folder, or the NuGet cache (dotnet fsi).

let private nugetRoot () =
    match Environment.GetEnvironmentVariable "NUGET_PACKAGES" with
    | null
    | "" -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".nuget", "packages")
    | p -> p

let private torchSharpVersion () =
    let v = typeof<TorchSharp.torch>.Assembly.GetName().Version
    sprintf "%d.%d.%d" v.Major v.Minor v.Build

let private candidateDirs (package: string) (version: string) =
    let baseDir = AppContext.BaseDirectory
    let asmDir = Path.GetDirectoryName(typeof<TorchSharp.torch>.Assembly.Location)
    [ baseDir
      Path.Combine(baseDir, nativeSubdir)
      // the NuGet layout: <root>/<package>/<version>/lib/net8.0/TorchSharp.dll
      Path.GetFullPath(Path.Combine(asmDir, "..", "..", "..", "..", package, version, nativeSubdir))
      Path.Combine(nugetRoot (), package, version, nativeSubdir) ]

let private findIn (dirs: string list) (file: string) =
    dirs |> List.tryFind (fun d -> File.Exists(Path.Combine(d, file)))

// ---------------------------------------------------------------------------------------------------
// ELF: mark one symbol-version requirement weak (vna_flags |= VER_FLG_WEAK) so a missing version is not fatal.

let private shtGnuVerneed = 0x6ffffffeu
let private verFlgWeak = 0x2us

/// Returns the bytes with the requirement `version` marked weak, or None when the file does not need it.
let markVersionWeak (version: string) (elf: byte[]) : byte[] option =
    let u16 (o: int) = BitConverter.ToUInt16(elf, o)
    let u32 (o: int) = BitConverter.ToUInt32(elf, o)
    let u64 (o: int) = BitConverter.ToUInt64(elf, o)

    if elf.Length < 64 || elf.[0] <> 0x7fuy || elf.[1] <> byte 'E' || elf.[4] <> 2uy || elf.[5] <> 1uy then
        fail "not a little-endian 64-bit ELF file"

    let shoff = int (u64 0x28)
    let shentsize = int (u16 0x3A)
    let shnum = int (u16 0x3C)
    let section i = shoff + i * shentsize
    let cstring (o: int) =
        let e = Array.IndexOf(elf, 0uy, o)
        Text.Encoding.ASCII.GetString(elf, o, e - o)

    let copy = Array.copy elf
    let mutable patched = false

    for i in 0 .. shnum - 1 do
        let sh = section i
        if u32 (sh + 4) = shtGnuVerneed then
            let offset = int (u64 (sh + 0x18))
            let strtab = int (u64 (section (int (u32 (sh + 0x28))) + 0x18))
            let mutable vn = offset
            let mutable more = true
            while more do
                let count = int (u16 (vn + 2))
                let mutable aux = vn + int (u32 (vn + 8))
                for _ in 1..count do
                    if cstring (strtab + int (u32 (aux + 8))) = version then
                        let flags = u16 (aux + 4) ||| verFlgWeak
                        BitConverter.GetBytes(flags).CopyTo(copy, aux + 4)
                        patched <- true
                    aux <- aux + int (u32 (aux + 12))
                let next = int (u32 (vn + 12))
                if next = 0 then more <- false else vn <- vn + next

    if patched then Some copy else None

let private glibcxxVersion = "GLIBCXX_3.4.32"

/// Folders the patched copy may live in, in order: $XDG_CACHE_HOME, ~/.cache, then the temp folder (a read-only
/// or missing home must not stop every command).
let private cacheDirs () =
    let xdg = Environment.GetEnvironmentVariable "XDG_CACHE_HOME"
    let home = Environment.GetFolderPath Environment.SpecialFolder.UserProfile
    [ if not (String.IsNullOrEmpty xdg) then xdg
      if not (String.IsNullOrEmpty home) then Path.Combine(home, ".cache")
      Path.GetTempPath() ]
    |> List.map (fun root -> Path.Combine(root, "pmg-fs", "native"))

/// A patched copy beside nothing of the original, keyed by its hash; written to a temp file and moved so that
/// two processes starting together never load a half-written library. An existing copy in any cache folder is
/// used; otherwise the first folder that takes the write.
let private patchedCopy (original: string) =
    let bytes = File.ReadAllBytes original
    let hash = Convert.ToHexString(SHA256.HashData bytes).[..15].ToLowerInvariant()
    let targets = cacheDirs () |> List.map (fun d -> Path.Combine(d, hash, libTorchSharpName))
    match targets |> List.tryFind File.Exists with
    | Some existing -> existing
    | None ->
        let patched =
            match markVersionWeak glibcxxVersion bytes with
            | None -> fail (sprintf "%s failed to load but does not require %s" original glibcxxVersion)
            | Some p -> p
        let written =
            targets
            |> List.tryFind (fun target ->
                try
                    Files.writeBytesAtomically target patched
                    true
                with
                // Files.writeAtomically words folder problems as OutputFailed; the next folder is tried.
                | :? Pmg.Fs.PmgException
                | :? IOException
                | :? UnauthorizedAccessException -> false)
        match written with
        | Some target -> target
        | None ->
            fail (
                sprintf "the system's libstdc++ lacks %s, so a patched copy of %s is needed, but none of %s is writable: set XDG_CACHE_HOME (or TMPDIR) to a writable folder"
                    glibcxxVersion libTorchSharpName (targets |> List.map (Path.GetDirectoryName >> Path.GetDirectoryName) |> String.concat ", ")
            )

// ---------------------------------------------------------------------------------------------------
// oneDNN: its AVX2/AVX-512 convolution backward divides by the cache sizes it reads with CPUID; on VMs whose
// CPU reports none, that is a SIGFPE. Turning mkldnn off there costs speed, not correctness; elsewhere it stays
// on (3x faster for small convolutions). PMG_MKLDNN=on|off overrides the check.

/// CPUID as a function (leaf, subleaf) -> (eax, ebx, ecx, edx), so the decision below can be tested with
/// recorded processors.
type CpuId = int -> int -> struct (int * int * int * int)

/// True when the cache sizes that oneDNN reads are absent: Intel's leaf 4, or AMD's leaf 0x8000001D (which needs
/// the topology extensions). Some hypervisors hide them; oneDNN then divides by zero.
let noCacheSizes (cpuid: CpuId) : bool =
    let struct (_, ebx, ecx, edx) = cpuid 0 0
    let vendor =
        [| ebx; edx; ecx |] |> Array.collect BitConverter.GetBytes |> Text.Encoding.ASCII.GetString
    let cacheType (leaf: int) = let struct (eax, _, _, _) = cpuid leaf 0 in eax &&& 0x1f
    match vendor with
    | "GenuineIntel" -> cacheType 4 = 0
    | "AuthenticAMD"
    | "HygonGenuine" ->
        let struct (maxExt, _, _, _) = cpuid (int 0x80000000u) 0
        let struct (_, _, extFeatures, _) = cpuid (int 0x80000001u) 0
        let topoext = (extFeatures >>> 22) &&& 1 = 1
        not (topoext && uint32 maxExt >= 0x8000001Du && cacheType (int 0x8000001Du) <> 0)
    | _ -> false

/// This machine's answer.
let cpuReportsNoCacheSizes () =
    X86Base.IsSupported && noCacheSizes (fun leaf sub -> X86Base.CpuId(leaf, sub))

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type private GlobalContextFn = delegate of unit -> nativeint

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type private SetFlagFn = delegate of nativeint * [<MarshalAs(UnmanagedType.U1)>] flag: bool -> unit

/// Calls one of at::Context's `void setX(bool)` methods on libtorch's global context.
let private setContextFlagIn (torchCpu: nativeint) (setterSymbol: string) (value: bool) =
    let ctx = NativeLibrary.GetExport(torchCpu, "_ZN2at13globalContextEv")
    let setter = NativeLibrary.GetExport(torchCpu, setterSymbol)
    let context = Marshal.GetDelegateForFunctionPointer<GlobalContextFn>(ctx).Invoke()
    Marshal.GetDelegateForFunctionPointer<SetFlagFn>(setter).Invoke(context, value)

let private disableMkldnn (torchCpu: nativeint) =
    setContextFlagIn torchCpu "_ZN2at7Context20setUserEnabledMkldnnEb" false

let private mkldnnWanted () =
    match Environment.GetEnvironmentVariable "PMG_MKLDNN" with
    | "0" | "off" -> Some false
    | "1" | "on" -> Some true
    | _ -> None

// ---------------------------------------------------------------------------------------------------
// CUDA libtorch: PMG_LIBTORCH, else the torch/lib folder of a Python PyTorch install.

/// Pythons that may hold a CUDA PyTorch: `python3` on PATH first, then the active virtual environment, then venvs
/// under /opt, /srv and the home folder (a GPU machine often has PyTorch only in such a venv, e.g.
/// /opt/torch/.venv, while the system python3 has none).
let private pythonCandidates () =
    let venvsUnder (root: string) =
        try
            if Directory.Exists root then
                Directory.GetDirectories root
                |> Array.sort
                |> Array.collect (fun d -> [| Path.Combine(d, ".venv", "bin", "python3"); Path.Combine(d, "venv", "bin", "python3") |])
                |> List.ofArray
            else []
        with _ -> []
    let home = Environment.GetFolderPath Environment.SpecialFolder.UserProfile
    [ yield "python3"
      match Environment.GetEnvironmentVariable "VIRTUAL_ENV" with
      | null | "" -> ()
      | v -> yield Path.Combine(v, "bin", "python3")
      for root in [ "/opt"; "/srv"; home ] do
          if not (String.IsNullOrEmpty root) then
              yield Path.Combine(root, ".venv", "bin", "python3")
              yield! venvsUnder root ]
    |> List.distinct
    |> List.filter (fun p -> p = "python3" || File.Exists p)

/// Asks one python for its torch/lib folder: Ok folder (holding libtorch_cuda.so), or Error with what it said.
let private askPython (python: string) : Result<string, string> =
    try
        let psi =
            Diagnostics.ProcessStartInfo(
                python,
                "-c \"import torch,os;print(os.path.join(os.path.dirname(torch.__file__),'lib'))\"",
                RedirectStandardOutput = true,
                RedirectStandardError = true
            )
        use p = Diagnostics.Process.Start psi
        // Both streams at once: reading one to its end while the other fills its pipe would hang.
        let err = p.StandardError.ReadToEndAsync()
        let out = p.StandardOutput.ReadToEnd().Trim()
        if not (p.WaitForExit 60000) then
            Error(sprintf "%s: no answer within 60 s" python)
        elif p.ExitCode <> 0 then
            // The last line of a traceback says why (ModuleNotFoundError: No module named 'torch', ...).
            let last = err.Result.Trim().Split('\n') |> Array.last
            Error(sprintf "%s: %s" python last)
        elif not (File.Exists(Path.Combine(out, "libtorch_cuda.so"))) then
            Error(sprintf "%s: its torch (%s) is not a CUDA build (no libtorch_cuda.so)" python out)
        else
            Ok out
    with e ->
        Error(sprintf "%s: %s" python e.Message)

/// The first candidate python's CUDA torch/lib folder, or what each one said.
let private pythonTorchLib () : Result<string, string list> =
    let rec first tried = function
        | [] -> Error(List.rev tried)
        | python :: rest ->
            match askPython python with
            | Ok dir -> Ok dir
            | Error why -> first (why :: tried) rest
    first [] (pythonCandidates ())

let private cudaLibTorchDir () =
    match Environment.GetEnvironmentVariable "PMG_LIBTORCH" with
    | null
    | "" ->
        match pythonTorchLib () with
        | Ok d -> d
        | Error tried ->
            fail (
                "a CUDA device needs a CUDA build of libtorch 2.10 or later (the CUDA TorchSharp packages are not used \
                 here). Set PMG_LIBTORCH to its lib folder (the one holding libtorch_cuda.so), or install PyTorch with \
                 CUDA for python3 or in a venv so that its torch/lib folder can be found. Pythons tried:\n  "
                + String.concat "\n  " tried
            )
    | d when not (File.Exists(Path.Combine(d, "libtorch_cuda.so"))) ->
        fail (sprintf "PMG_LIBTORCH=%s holds no libtorch_cuda.so: point it at the lib folder of a CUDA libtorch." d)
    | d -> d

// ---------------------------------------------------------------------------------------------------
// The version of the libtorch actually loaded: TorchSharp reports the 2.10.0.0 it was built against, whatever
// PMG_LIBTORCH or a PyTorch install brought in.

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type private ShowConfigFn = delegate of result: nativeint -> nativeint

/// TORCH_VERSION from at::show_config(), the build summary libtorch keeps of itself (as torch.__config__.show()).
/// It returns a std::string, which the x86-64 ABI returns through a buffer the caller passes; libstdc++'s string
/// starts with its character pointer and length. The string's heap buffer is left to the process (read once).
let private versionFromShowConfig (torchCpu: nativeint) =
    match NativeLibrary.TryGetExport(torchCpu, "_ZN2at11show_configB5cxx11Ev") with
    | false, _ -> None
    | true, f ->
        let buffer = Marshal.AllocHGlobal 64
        try
            Marshal.GetDelegateForFunctionPointer<ShowConfigFn>(f).Invoke buffer |> ignore
            let text = Marshal.PtrToStringUTF8(Marshal.ReadIntPtr buffer, int (Marshal.ReadInt64(buffer, 8)))
            let m = Text.RegularExpressions.Regex.Match(text, @"TORCH_VERSION=([^,\s]+)")
            if m.Success then Some m.Groups.[1].Value else None
        finally
            Marshal.FreeHGlobal buffer

/// The full version with its local tag (2.11.0+cu130) where the lib folder is a Python install's torch/lib
/// (torch/version.py) or a libtorch archive's lib (libtorch/build-version).
let private versionFromFiles (libDir: string) =
    let parent = Path.GetDirectoryName(Path.GetFullPath(libDir).TrimEnd(Path.DirectorySeparatorChar))
    let read (file: string) = if File.Exists file then Some(File.ReadAllText file) else None
    let fromPy =
        read (Path.Combine(parent, "version.py"))
        |> Option.bind (fun t ->
            let m = Text.RegularExpressions.Regex.Match(t, @"__version__\s*=\s*['""]([^'""]+)['""]")
            if m.Success then Some m.Groups.[1].Value else None)
    fromPy |> Option.orElse (read (Path.Combine(parent, "build-version")) |> Option.map (fun t -> t.Trim()))

// ---------------------------------------------------------------------------------------------------

let private loadFrom (dir: string) (file: string) =
    let path = Path.Combine(dir, file)
    try
        NativeLibrary.Load path
    with e ->
        fail (sprintf "cannot load %s: %s" path e.Message)

let mutable private loaded: Loaded option = None
let mutable private torchCpuHandle = 0n
let private gate = obj ()

let private bringUpLinux (backend: Backend) =
    let torchVersion = "2.10.0"
    let libDir =
        match backend, Environment.GetEnvironmentVariable "PMG_LIBTORCH" with
        | Cuda, _ -> cudaLibTorchDir ()
        | Cpu, d when not (String.IsNullOrEmpty d) -> d
        | Cpu, _ ->
            match findIn (candidateDirs cpuPackage torchVersion) "libtorch_cpu.so" with
            | Some d -> d
            | None ->
                fail (
                    sprintf
                        "libtorch_cpu.so not found beside the app nor in the NuGet cache (%s). Run `dotnet tool restore && dotnet paket restore`."
                        (nugetRoot ())
                )

    let glue =
        match findIn (candidateDirs "torchsharp" (torchSharpVersion ())) libTorchSharpName with
        | Some d -> Path.Combine(d, libTorchSharpName)
        | None -> fail (sprintf "%s not found beside the app nor in the NuGet cache." libTorchSharpName)

    // Dependencies first, by full path, so that the glue's DT_NEEDED entries resolve to these.
    loadFrom libDir "libc10.so" |> ignore
    if backend = Cuda then loadFrom libDir "libc10_cuda.so" |> ignore
    let torchCpu = loadFrom libDir "libtorch_cpu.so"
    torchCpuHandle <- torchCpu
    if backend = Cuda then loadFrom libDir "libtorch_cuda.so" |> ignore
    loadFrom libDir "libtorch.so" |> ignore

    let glueUsed, patched =
        match NativeLibrary.TryLoad glue with
        | true, _ -> glue, false
        | false, _ ->
            let copy = patchedCopy glue
            loadFrom (Path.GetDirectoryName copy) libTorchSharpName |> ignore
            copy, true

    let noMkldnn =
        match mkldnnWanted () with
        | Some wanted -> not wanted
        | None -> cpuReportsNoCacheSizes ()
    if noMkldnn then disableMkldnn torchCpu

    if backend = Cuda then
        TorchSharp.torch.InitializeDeviceType TorchSharp.DeviceType.CUDA
        if not (TorchSharp.torch.cuda.is_available ()) then
            let v = (try versionFromShowConfig torchCpu with _ -> None) |> Option.orElse (versionFromFiles libDir)
            fail (sprintf "libtorch %s from %s loaded, but it sees no CUDA device." (defaultArg v "(version unknown)") libDir)

    { Backend = backend
      LibTorchDir = libDir
      LibTorchSharp = glueUsed
      PatchedGlibcxx = patched
      MkldnnDisabled = noMkldnn }

/// Elsewhere than Linux x64: TorchSharp loads the libtorch package the app references, as it does without this
/// library; nothing is patched and oneDNN keeps libtorch's default. libtorch_cpu's handle is taken where the
/// platform's loader finds it already loaded, for `export` (on Windows C++ names are mangled otherwise, so the
/// switches that need them report themselves unavailable).
let private bringUpTorchSharp (backend: Backend) =
    try
        TorchSharp.torch.InitializeDeviceType(if backend = Cuda then TorchSharp.DeviceType.CUDA else TorchSharp.DeviceType.CPU)
    with e ->
        fail (
            sprintf
                "TorchSharp could not load libtorch on %s %s: %s. This library references libtorch for Linux x64 only; reference the libtorch package for this platform in the app (libtorch-cpu-win-x64 or libtorch-cpu-osx-arm64, the version TorchSharp names)."
                RuntimeInformation.OSDescription (string RuntimeInformation.ProcessArchitecture) e.Message
        )
    if backend = Cuda && not (TorchSharp.torch.cuda.is_available ()) then
        fail "libtorch loaded, but it sees no CUDA device."
    match NativeLibrary.TryLoad("torch_cpu", typeof<TorchSharp.torch>.Assembly, Nullable()) with
    | true, h -> torchCpuHandle <- h
    | false, _ -> ()
    { Backend = backend
      LibTorchDir = "(found by TorchSharp)"
      LibTorchSharp = "LibTorchSharp (loaded by TorchSharp)"
      PatchedGlibcxx = false
      MkldnnDisabled = false }

let private bringUp (backend: Backend) =
    if ownLoading then bringUpLinux backend else bringUpTorchSharp backend

/// Brings the native backend up once per process; later calls return what the first did. A CPU request is
/// served by a CUDA backend already loaded; CUDA after CPU fails (one backend per process). Call before any
/// TorchSharp function.
let ensure (backend: Backend) : Loaded =
    lock gate (fun () ->
        match loaded with
        | Some l when l.Backend = backend || backend = Cpu -> l
        | Some l -> fail (sprintf "the %A backend is already loaded from %s; use one backend per process" l.Backend l.LibTorchDir)
        | None ->
            let l = bringUp backend
            loaded <- Some l
            l)

/// What `ensure` did, if it ran.
let current () = loaded

let private handle () =
    if torchCpuHandle = 0n && loaded.IsSome then fail "libtorch_cpu's functions cannot be reached on this platform"
    if torchCpuHandle = 0n then fail "libtorch is not loaded yet: call Runtime.Native.ensure first"
    torchCpuHandle

// Read once, after ensure.
let mutable private version: string option = None

/// The loaded libtorch's version, e.g. "2.11.0+cu130" or "2.10.0"; "unknown" where it cannot be read, "not loaded"
/// before `ensure`.
let libTorchVersion () : string =
    lock gate (fun () ->
        match version, loaded with
        | Some v, _ -> v
        | None, None -> "not loaded"
        | None, Some _ when not ownLoading ->
            // show_config's std::string is read with libstdc++'s layout, Linux's; elsewhere TorchSharp's figure.
            let v = TorchSharp.torch.__version__
            version <- Some v
            v
        | None, Some l ->
            let fromBinary = try versionFromShowConfig torchCpuHandle with _ -> None
            let v =
                match versionFromFiles l.LibTorchDir, fromBinary with
                // The file's tag adds the CUDA flavour; the binary's own figure wins where they disagree.
                | Some f, Some b when f.StartsWith b -> f
                | _, Some b -> b
                | Some f, None -> f
                | None, None -> "unknown"
            version <- Some v
            v)

/// The address of a function exported by the loaded libtorch_cpu, by its C++ mangled name: for the switches
/// TorchSharp does not expose (see Runtime.Switches).
let export (symbol: string) : nativeint =
    match NativeLibrary.TryGetExport(handle (), symbol) with
    | true, f -> f
    | false, _ ->
        fail (
            sprintf "libtorch_cpu exports no %s: libtorch %s from %s is not a version this project knows"
                symbol (libTorchVersion ()) (loaded |> Option.map (fun l -> l.LibTorchDir) |> Option.defaultValue "?")
        )

/// Sets one of at::Context's boolean switches (e.g. "_ZN2at7Context17setBenchmarkCuDNNEb"); false where this
/// libtorch does not export that setter (another version: the switch is a speed option, not worth failing for).
let trySetContextFlag (setterSymbol: string) (value: bool) : bool =
    match NativeLibrary.TryGetExport(handle (), setterSymbol) with
    | true, _ ->
        setContextFlagIn (handle ()) setterSymbol value
        true
    | false, _ -> false
