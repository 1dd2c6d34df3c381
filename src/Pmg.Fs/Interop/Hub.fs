// Starting weights as PyTorch users get them: torchvision's ImageNet files live in PyTorch's hub cache
// ($TORCH_HOME/hub/checkpoints, else $XDG_CACHE_HOME/torch/hub/checkpoints, else ~/.cache/torch/hub/checkpoints),
// where the reference's `resnet50(pretrained=True)` leaves them too; a file missing there is downloaded once from
// torchvision's URL, streamed to a temporary file beside it, checked against the SHA-256 prefix in its name (as
// torch.hub's check_hash does) and renamed into place, so that a reader never sees half a file and two processes
// starting together both end with the one good file.
namespace Pmg.Fs

open System

/// How far a weights download has got; raised on the downloading thread, a few times a second and once at the end.
type WeightsDownloadEventArgs
    (url: string, path: string, bytes: int64, totalBytes: int64, bytesPerSecond: float, remaining: Nullable<TimeSpan>, completed: bool) =
    inherit EventArgs()
    /// Where the file comes from.
    member _.Url = url
    /// Where it will be once complete (in PyTorch's hub cache).
    member _.Path = path
    /// Bytes received so far.
    member _.Bytes = bytes
    /// The file's size, or -1 where the server does not say.
    member _.TotalBytes = totalBytes
    /// The mean rate since the download started.
    member _.BytesPerSecond = bytesPerSecond
    /// Time left at that rate; null where the size is unknown.
    member _.Remaining = remaining
    /// True on the last report, once every byte has arrived (before the hash check).
    member _.Completed = completed

/// Downloads of starting weights, for a progress bar. The library writes nothing to the console: the `pmg`
/// command subscribes and draws a bar; C# programs may subscribe too.
[<AbstractClass; Sealed>]
type WeightsDownloads private () =
    static let progress = Event<EventHandler<WeightsDownloadEventArgs>, WeightsDownloadEventArgs>()

    /// Raised as a download progresses.
    [<CLIEvent>]
    static member Progress = progress.Publish

    /// Raises a progress report.
    static member internal Report(e: WeightsDownloadEventArgs) = progress.Trigger(null, e)

namespace Pmg.Fs.Interop

open System
open System.Collections.Concurrent
open System.Diagnostics
open System.IO
open System.Net.Http
open System.Security.Cryptography
open System.Threading
open Pmg.Fs
open Pmg.Fs.Model

/// Finding, downloading and checking a backbone's starting weights (see the file's summary).
[<RequireQualifiedAccess>]
module Hub =

    /// Where weights are looked for and whether the network may be used.
    type Options =
        { /// PyTorch's hub cache: $TORCH_HOME/hub/checkpoints, else $XDG_CACHE_HOME/torch/hub/checkpoints, else
          /// ~/.cache/torch/hub/checkpoints.
          CacheDir: string
          /// No network access at all (PMG_OFFLINE=1): a file missing from the cache is an error.
          Offline: bool
          /// A folder URL that replaces torchvision's (PMG_WEIGHTS_URL): a mirror holding the same files under the
          /// same names. The tests point it at a loopback server of their own.
          BaseUrl: string option }

    /// Where a run's starting weights came from.
    type Source =
        /// Found in PyTorch's hub cache.
        | Cached
        /// Downloaded into PyTorch's hub cache now.
        | Downloaded
        /// Shipped in a NuGet package the project restores.
        | Packaged
        /// A file given by the user.
        | Given

    /// The file a run starts from, for its manifest.
    type Resolved =
        { /// The file's full path.
          Path: string
          /// The file's SHA-256, lower-case hex.
          Sha256: string
          /// Where it came from.
          Source: Source
          /// The URL it was (or would have been) downloaded from, for torchvision's files.
          Url: string option }

    /// What starting a run with some weights will involve, said before anything runs (a banner, C#'s Problems()).
    type Status =
        /// Random initial weights: nothing to load.
        | NoWeights
        /// torchvision's file is in PyTorch's hub cache (and its hash matches its name).
        | InCache of path: string
        /// The weights ship in a NuGet package the project restores.
        | InPackage of path: string
        /// A file given by the user, present.
        | GivenFile of path: string
        /// torchvision's file will be downloaded into the cache on first use.
        | WillDownload of url: string * path: string * megabytes: int
        /// The weights cannot be had (offline with an empty cache, a damaged cached file, a missing file or
        /// package): the message names the file and the fix.
        | Unavailable of message: string

        /// One line for a banner or a list of problems.
        member s.Text =
            match s with
            | NoWeights -> "random initial weights"
            | InCache p -> sprintf "ImageNet weights in PyTorch's cache: %s" p
            | InPackage p -> sprintf "ImageNet weights that ship: %s" p
            | GivenFile p -> sprintf "weights from %s" p
            | WillDownload(url, path, mb) -> sprintf "weights will be downloaded (%d MB) from %s to %s" mb url path
            | Unavailable m -> m

        /// True when a run would stop at its start for want of these weights.
        member s.IsProblem =
            match s with
            | Unavailable _ -> true
            | _ -> false

    // ---- Options -----------------------------------------------------------------------------------------

    let private nonEmpty (v: string) = if String.IsNullOrWhiteSpace v then None else Some v

    /// Options from environment variables read through `env` (None or empty: unset): TORCH_HOME, XDG_CACHE_HOME,
    /// PMG_OFFLINE (1, true or yes: no network), PMG_WEIGHTS_URL.
    let optionsOf (env: string -> string option) : Options =
        let env name = env name |> Option.bind nonEmpty
        let home = Environment.GetFolderPath Environment.SpecialFolder.UserProfile
        // torch expands a leading ~ in TORCH_HOME.
        let expand (p: string) = if p = "~" || p.StartsWith "~/" then home + p.Substring 1 else p
        let torchHome =
            match env "TORCH_HOME" with
            | Some h -> expand h
            | None -> Path.Combine(defaultArg (env "XDG_CACHE_HOME") (Path.Combine(home, ".cache")), "torch")
        { CacheDir = Path.GetFullPath(Path.Combine(torchHome, "hub", "checkpoints"))
          Offline =
            match env "PMG_OFFLINE" with
            | Some v -> List.contains (v.Trim().ToLowerInvariant()) [ "1"; "true"; "yes"; "on" ]
            | None -> false
          BaseUrl = env "PMG_WEIGHTS_URL" }

    /// Options from this process's environment.
    let options () : Options = optionsOf (Environment.GetEnvironmentVariable >> Option.ofObj)

    // ---- Hashes ------------------------------------------------------------------------------------------

    /// The hash prefix torch.hub checks a file against: the hex digits after the name's last '-' (at least 8).
    let hashPrefix (fileName: string) : string option =
        let stem = Path.GetFileNameWithoutExtension fileName
        match stem.LastIndexOf '-' with
        | -1 -> None
        | i ->
            let p = stem.Substring(i + 1)
            if p.Length >= 8 && p |> Seq.forall (fun c -> Char.IsAsciiHexDigitLower c || Char.IsAsciiDigit c) then Some p else None

    // Files are hashed once per process and version of the file (a run's status, resolution and manifest each ask).
    let private hashes = ConcurrentDictionary<struct (string * int64 * int64), string>()

    /// A file's SHA-256 (lower-case hex), remembered for the process while its size and time stay the same.
    let sha256 (path: string) : string =
        let fi = FileInfo(Path.GetFullPath path)
        hashes.GetOrAdd(
            struct (fi.FullName, fi.Length, fi.LastWriteTimeUtc.Ticks),
            fun _ ->
                use s = File.OpenRead fi.FullName
                Convert.ToHexString(SHA256.HashData s).ToLowerInvariant()
        )

    let private short (hash: string) = hash.Substring(0, min 8 hash.Length)

    // ---- Where files are ---------------------------------------------------------------------------------

    /// The URL of torchvision's file, or of the same name under the mirror that replaces it.
    let urlOf (o: Options) (d: Backbone.Download) : string =
        match o.BaseUrl with
        | Some b -> b.TrimEnd '/' + "/" + d.File
        | None -> d.Url

    /// Where the file lives in the hub cache.
    let cachePath (o: Options) (d: Backbone.Download) : string = Path.Combine(o.CacheDir, d.File)

    /// The NuGet global packages folder: NUGET_PACKAGES, else ~/.nuget/packages (paket restores there too).
    let private packagesRoot () =
        match Environment.GetEnvironmentVariable "NUGET_PACKAGES" with
        | null
        | "" -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".nuget", "packages")
        | p -> p

    /// The Pmg.Fs package and the pmg tool carry the file beside the app (imagenet/<package>/<version>/..., the
    /// cache's layout); a clone reads it from the NuGet cache.
    let private packagedPath (p: Backbone.Packaged) =
        let relative = Path.Combine(p.Package.ToLowerInvariant(), p.Version, p.File)
        let beside = Path.Combine(AppContext.BaseDirectory, "imagenet", relative)
        if File.Exists beside then beside else Path.Combine(packagesRoot (), relative)

    let private packageMissing (p: Backbone.Packaged) =
        sprintf "ImageNet weights not found at %s: they come from the NuGet package %s %s; restore the repository's packages (`dotnet tool restore && dotnet paket restore`) or give a weights file"
            (packagedPath p) p.Package p.Version

    /// A packaged file's path, or WeightsUnavailable naming the package and how to restore it.
    let packagedFile (p: Backbone.Packaged) : string =
        let file = packagedPath p
        if File.Exists file then file else Errors.fail (WeightsUnavailable(packageMissing p))

    let private random = "or train from random weights"

    let private offlineMessage (spec: Backbone.Spec) (url: string) (target: string) =
        sprintf "ImageNet weights for %s are not in PyTorch's cache and downloads are off (PMG_OFFLINE): download %s and put it at %s, %s"
            spec.Name url target random

    let private damagedMessage (path: string) (prefix: string) (actual: string) (url: string) =
        sprintf "%s is damaged or not the file its name promises: its SHA-256 starts %s, its name says %s; delete it to have it downloaded again, or replace it with %s"
            path (short actual) prefix url

    /// The cached file when its hash agrees with its name; Error with the message naming it otherwise.
    let private checkCached (path: string) (url: string) : Result<string, string> =
        let actual = sha256 path
        match hashPrefix (Path.GetFileName path) with
        | Some p when not (actual.StartsWith p) -> Error(damagedMessage path p actual url)
        | _ -> Ok actual

    // ---- Downloading -------------------------------------------------------------------------------------

    // Headers within this long; then no more than this long without a byte.
    let private connectTimeout = TimeSpan.FromSeconds 30.0
    let private stallTimeout = TimeSpan.FromSeconds 60.0

    let private client = lazy (new HttpClient(Timeout = Timeout.InfiniteTimeSpan))

    /// Streams `url` into `tmp`, reporting progress; raises on any failure (the caller words it).
    let private fetch (url: string) (target: string) (tmp: string) =
        use headers = new CancellationTokenSource(connectTimeout)
        use request = new HttpRequestMessage(HttpMethod.Get, url)
        use response =
            try
                client.Value.Send(request, HttpCompletionOption.ResponseHeadersRead, headers.Token)
            with :? OperationCanceledException ->
                raise (IOException(sprintf "no answer within %.0f s" connectTimeout.TotalSeconds))
        if not response.IsSuccessStatusCode then
            raise (IOException(sprintf "HTTP %d %s" (int response.StatusCode) response.ReasonPhrase))
        let total = if response.Content.Headers.ContentLength.HasValue then response.Content.Headers.ContentLength.Value else -1L
        use body = response.Content.ReadAsStream()
        use out = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None)
        let buffer = Array.zeroCreate<byte> (1 <<< 20)
        let clock = Stopwatch.StartNew()
        let mutable received = 0L
        let mutable lastReport = -1.0
        let report completed =
            let seconds = max clock.Elapsed.TotalSeconds 1e-3
            let rate = float received / seconds
            let remaining =
                if total > 0L && rate > 0.0 then Nullable(TimeSpan.FromSeconds(float (max 0L (total - received)) / rate)) else Nullable()
            WeightsDownloads.Report(WeightsDownloadEventArgs(url, target, received, total, rate, remaining, completed))
            lastReport <- clock.Elapsed.TotalSeconds
        report false
        let mutable reading = true
        while reading do
            use stall = new CancellationTokenSource(stallTimeout)
            let n =
                try
                    body.ReadAsync(Memory buffer, stall.Token).AsTask().GetAwaiter().GetResult()
                with :? OperationCanceledException ->
                    raise (IOException(sprintf "no data for %.0f s after %d bytes" stallTimeout.TotalSeconds received))
            if n = 0 then
                reading <- false
            else
                out.Write(buffer, 0, n)
                received <- received + int64 n
                if clock.Elapsed.TotalSeconds - lastReport >= 0.25 then report false
        if total >= 0L && received <> total then
            raise (IOException(sprintf "the connection ended after %d of %d bytes" received total))
        out.Flush true
        report true

    /// True for the IOException a FileShare.None open raises while another holder has the file: Windows'
    /// ERROR_SHARING_VIOLATION, or flock's EWOULDBLOCK (Linux 11, macOS 35) as .NET reports it on Unix.
    let private isSharingViolation (e: IOException) =
        (e.HResult &&& 0xFFFF) = 32 || (not (OperatingSystem.IsWindows()) && (e.HResult = 11 || (OperatingSystem.IsMacOS() && e.HResult = 35)))

    /// Holds the download lock of `target` (a lock file beside it, freed when the holder exits), or None once
    /// another process has put the file in place meanwhile. Waits while another process downloads it.
    let rec private lockFor (target: string) (waited: bool) : FileStream option =
        if File.Exists target then
            None
        else
            let lockPath = Path.Combine(Path.GetDirectoryName target, "." + Path.GetFileName target + ".lock")
            let held =
                try
                    Some(new FileStream(lockPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None, 1, FileOptions.DeleteOnClose))
                with :? IOException as e when isSharingViolation e ->
                    None
            match held with
            | Some _ -> held
            | None ->
                if not waited then Notices.Say(sprintf "waiting for another process that is downloading %s" target)
                Thread.Sleep 200
                lockFor target true

    /// Temporary files of this name whose writer is gone (a killed download).
    let private removeStale (target: string) =
        let dir = Path.GetDirectoryName target
        for f in Directory.GetFiles(dir, "." + Path.GetFileName target + ".tmp-*") do
            let alive =
                // .NAME.tmp-PID-RANDOM
                let name = Path.GetFileName f
                let rest = name.Substring(name.LastIndexOf ".tmp-" + 5)
                match rest.Split('-') |> Array.tryHead |> Option.map Int32.TryParse with
                | Some(true, pid) ->
                    try
                        use p = Process.GetProcessById pid
                        not p.HasExited
                    with _ ->
                        false
                | _ -> false
            if not alive then
                try
                    File.Delete f
                with _ ->
                    ()

    /// Downloads `url` to `target` unless it is there, the hash checked before the rename; raises
    /// WeightsUnavailable naming the URL, the path and the other choices.
    let private download (spec: Backbone.Spec) (url: string) (target: string) =
        let unavailable (why: string) : 'a =
            Errors.fail (
                WeightsUnavailable(
                    sprintf "ImageNet weights for %s could not be downloaded from %s (%s): download it where there is internet and put it at %s, %s"
                        spec.Name url why target random
                )
            )
        let dir = Path.GetDirectoryName target
        try
            Directory.CreateDirectory dir |> ignore
        with e ->
            unavailable (sprintf "the cache folder %s cannot be created: %s; set TORCH_HOME to a writable folder" dir e.Message)
        let held =
            try
                lockFor target false
            with
            | :? UnauthorizedAccessException as e -> unavailable (sprintf "the cache folder %s is not writable: %s; set TORCH_HOME to a writable folder" dir e.Message)
            | :? IOException as e -> unavailable (sprintf "the cache folder %s is not writable: %s; set TORCH_HOME to a writable folder" dir e.Message)
        match held with
        | None -> ()
        | Some held ->
            use _ = held
            // Another process may have finished between our look and our lock.
            if not (File.Exists target) then
                removeStale target
                let tmp = Path.Combine(dir, sprintf ".%s.tmp-%d-%s" (Path.GetFileName target) Environment.ProcessId ((Guid.NewGuid().ToString "N").Substring(0, 8)))
                try
                    try
                        fetch url target tmp
                    with
                    | :? HttpRequestException as e -> unavailable e.Message
                    | :? IOException as e -> unavailable e.Message
                    | :? UnauthorizedAccessException as e -> unavailable e.Message
                    let actual = sha256 tmp
                    match hashPrefix (Path.GetFileName target) with
                    | Some p when not (actual.StartsWith p) ->
                        unavailable (sprintf "the file received has SHA-256 %s..., not %s... as its name says; nothing was kept" (short actual) p)
                    | _ -> ()
                    // rename(2) replaces atomically: a reader sees no file or the whole one.
                    File.Move(tmp, target, true)
                finally
                    if File.Exists tmp then File.Delete tmp

    // ---- Resolving ---------------------------------------------------------------------------------------

    let private noneKnown (spec: Backbone.Spec) =
        let known = Backbone.registry |> Map.filter (fun _ s -> s.ImageNet.IsSome || s.Torchvision.IsSome) |> Map.keys |> String.concat ", "
        sprintf "no ImageNet weights are known for %s (they are for %s): give a weights file, %s" spec.Name known random

    let private given (path: string) : Resolved =
        if Directory.Exists path then Errors.modelFile path (sprintf "%s is a folder: give the weights file in it" path)
        if not (File.Exists path) then Errors.modelFile path (sprintf "weights file %s does not exist: check the path" path)
        { Path = Path.GetFullPath path; Sha256 = sha256 path; Source = Given; Url = None }

    /// The file `weights` means for `spec`, fetched into the cache if need be; None for random weights.
    /// Order for ImageNet weights: the package that ships them, else PyTorch's hub cache, else a download (not
    /// when offline). A cached file whose hash disagrees with its name is refused by name, never downloaded over.
    let resolveWith (o: Options) (spec: Backbone.Spec) (weights: Backbone.Weights) : Resolved option =
        match weights with
        | Backbone.Scratch -> None
        | Backbone.File path -> Some(given path)
        | Backbone.ImageNet ->
            match spec.ImageNet, spec.Torchvision with
            | Some p, _ ->
                let path = packagedFile p
                Some { Path = path; Sha256 = sha256 path; Source = Packaged; Url = None }
            | None, Some d ->
                let url = urlOf o d
                let target = cachePath o d
                let source =
                    if File.Exists target then Cached
                    elif o.Offline then Errors.fail (WeightsUnavailable(offlineMessage spec url target))
                    else
                        download spec url target
                        Downloaded
                match checkCached target url with
                | Ok hash -> Some { Path = target; Sha256 = hash; Source = source; Url = Some url }
                | Error m -> Errors.fail (WeightsUnavailable m)
            | None, None -> Errors.fail (WeightsUnavailable(noneKnown spec))

    /// `resolveWith` with the options of this process's environment.
    let resolve (spec: Backbone.Spec) (weights: Backbone.Weights) : Resolved option = resolveWith (options ()) spec weights

    /// What resolving would do, without the network and without downloading: for a banner or a list of problems.
    /// A cached file is hashed (once per process) so that a damaged one shows here rather than at the start.
    let statusWith (o: Options) (spec: Backbone.Spec) (weights: Backbone.Weights) : Status =
        match weights with
        | Backbone.Scratch -> NoWeights
        | Backbone.File path ->
            if File.Exists path then GivenFile(Path.GetFullPath path)
            else Unavailable(sprintf "weights file %s does not exist: check the path" path)
        | Backbone.ImageNet ->
            match spec.ImageNet, spec.Torchvision with
            | Some p, _ -> if File.Exists(packagedPath p) then InPackage(packagedPath p) else Unavailable(packageMissing p)
            | None, Some d ->
                let url, target = urlOf o d, cachePath o d
                if File.Exists target then
                    match checkCached target url with
                    | Ok _ -> InCache target
                    | Error m -> Unavailable m
                elif o.Offline then Unavailable(offlineMessage spec url target)
                else WillDownload(url, target, d.Megabytes)
            | None, None -> Unavailable(noneKnown spec)

    /// `statusWith` with the options of this process's environment.
    let status (spec: Backbone.Spec) (weights: Backbone.Weights) : Status = statusWith (options ()) spec weights
