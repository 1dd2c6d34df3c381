/// Starting weights from PyTorch's hub cache, downloaded from a loopback HTTP server of the test's own (never the
/// real host): first use downloads and checks the hash, later uses read the cache, a damaged or cut-off file is
/// never kept or used, two processes at once end with one file, offline is one line with the fix. Also a Pmg.Fs
/// checkpoint as starting weights, and the native-library cache under a home that cannot be written.
module Pmg.Fs.Tests.WeightsTests

open System
open System.Diagnostics
open System.IO
open System.Net
open System.Net.Sockets
open System.Security.Cryptography
open System.Threading
open System.Threading.Tasks
open Expecto
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Interop
open Pmg.Fs.Tests.TestKit

/// Serves `files` by name on 127.0.0.1 at a free port. `cutAfter` bytes: the response announces the whole length,
/// sends that many bytes, then drops the connection. `chunkDelay` ms between 64 KiB chunks (a slow server).
type private Server(files: Map<string, byte[]>, cutAfter: int option, chunkDelay: int) =
    let port =
        let l = new TcpListener(IPAddress.Loopback, 0)
        l.Start()
        let p = (l.LocalEndpoint :?> IPEndPoint).Port
        l.Stop()
        p
    let listener = new HttpListener()
    do
        listener.Prefixes.Add(sprintf "http://127.0.0.1:%d/" port)
        listener.Start()
    let requests = ref 0
    let serve (ctx: HttpListenerContext) =
        Interlocked.Increment(&requests.contents) |> ignore
        try
            match files.TryFind(Path.GetFileName ctx.Request.Url.AbsolutePath) with
            | None ->
                ctx.Response.StatusCode <- 404
                ctx.Response.Close()
            | Some bytes ->
                ctx.Response.ContentLength64 <- bytes.LongLength
                let limit = defaultArg cutAfter bytes.Length
                let mutable sent = 0
                while sent < limit do
                    let n = min (64 * 1024) (limit - sent)
                    ctx.Response.OutputStream.Write(bytes, sent, n)
                    ctx.Response.OutputStream.Flush()
                    sent <- sent + n
                    if chunkDelay > 0 then Thread.Sleep chunkDelay
                if limit < bytes.Length then ctx.Response.Abort() else ctx.Response.Close()
        with _ ->
            ()
    let loop =
        Thread(
            (fun () ->
                while listener.IsListening do
                    try
                        let ctx = listener.GetContext()
                        ThreadPool.QueueUserWorkItem(fun _ -> serve ctx) |> ignore
                    with _ ->
                        ()),
            IsBackground = true
        )
    do loop.Start()
    member _.BaseUrl = sprintf "http://127.0.0.1:%d/models" port
    member _.Requests = requests.Value
    interface IDisposable with
        member _.Dispose() =
            try
                listener.Stop()
                listener.Close()
            with _ ->
                ()

let private sha256 (bytes: byte[]) = Convert.ToHexString(SHA256.HashData bytes).ToLowerInvariant()

/// A file name as torchvision names its files: stem, "-", the first 8 hex digits of the SHA-256.
let private hashedName (stem: string) (bytes: byte[]) = sprintf "%s-%s.pth" stem ((sha256 bytes).Substring(0, 8))

/// Options for a cache under `dir`, downloading from `server`.
let private optionsFor (dir: string) (server: Server) : Hub.Options =
    { CacheDir = Path.Combine(dir, "torch", "hub", "checkpoints"); Offline = false; BaseUrl = Some server.BaseUrl }

/// resnet18 whose torchvision download is `file` (the registry's entry with another name).
let private resnet18As (file: string) : Backbone.Spec =
    { Backbone.find "resnet18" with
        Torchvision = Some { Url = "https://download.pytorch.org/models/" + file; File = file; Megabytes = 1 } }

/// Random bytes of a given size, the same for a seed.
let private blob (seed: int) (size: int) =
    let b = Array.zeroCreate<byte> size
    Random(seed).NextBytes b
    b

let private errorOf (f: unit -> 'a) : PmgError =
    try
        f () |> ignore
        failwith "expected an error"
    with :? PmgException as e ->
        e.Error

let private filesIn (dir: string) =
    if Directory.Exists dir then Directory.GetFiles dir |> Array.map Path.GetFileName |> Array.sort else [||]

/// A torchvision-keyed resnet18 state_dict (random weights) as .pth bytes, made once.
let private servedResnet18 =
    lazy
        (use dir = new TempDir "weights-src"
         torch.manual_seed 23L |> ignore
         use net = Backbones.create (Backbone.find "resnet18")
         let file = dir.File "resnet18.pth"
         StateDict.write file [ for kv in net.state_dict () -> kv.Key, kv.Value ]
         File.ReadAllBytes file)

let private smallHead = { Heads.FeatureSize = 16; Heads.BlockChannels = 32; Heads.BlockBnMomentum = 0.1 }

let private network () =
    Pmg.create { Backbone = "resnet18"; Classes = 3; Heads = 3; Head = smallHead }

let private sameState (expected: (string * torch.Tensor) list) (actual: torch.nn.Module) =
    let got = actual.state_dict ()
    for k, e in expected do
        if got.ContainsKey k then
            Expect.isTrue (TestKit.same e (got.[k])) (sprintf "%s equals the served tensor" k)

[<Tests>]
let tests =
    testList
        "weights"
        [ test "every torchvision backbone names its official file with a hash prefix; resnet50 is the reference's file" {
              for KeyValue(name, spec) in Backbone.registry do
                  match spec.Torchvision with
                  | Some d ->
                      Expect.equal d.Url ("https://download.pytorch.org/models/" + d.File) (sprintf "%s: official URL" name)
                      Expect.isTrue (d.File.StartsWith(name + "-")) (sprintf "%s: torchvision's name" name)
                      Expect.isSome (Hub.hashPrefix d.File) (sprintf "%s: a hash prefix" name)
                      Expect.isGreaterThan d.Megabytes 10 (sprintf "%s: a size" name)
                  | None -> Expect.isSome spec.ImageNet (sprintf "%s: weights from somewhere" name)
              Expect.equal (Backbone.find "resnet50").Torchvision.Value.File "resnet50-19c8e357.pth" "the reference's resnet50"
              Expect.isNone (Backbone.find "resnet18-mlnet").Torchvision "resnet18-mlnet keeps its packaged weights"
              Expect.equal (Hub.hashPrefix "resnet50-19c8e357.pth") (Some "19c8e357") "torch.hub's prefix"
              Expect.isNone (Hub.hashPrefix "best.pth") "no prefix, no check"
          }

          test "the cache is PyTorch's: TORCH_HOME, else XDG_CACHE_HOME/torch, else ~/.cache/torch; PMG_OFFLINE and the mirror" {
              let env (vars: (string * string) list) = fun name -> vars |> List.tryFind (fst >> (=) name) |> Option.map snd
              let o = Hub.optionsOf (env [ "TORCH_HOME", "/t"; "XDG_CACHE_HOME", "/x"; "PMG_OFFLINE", "1" ])
              Expect.equal o.CacheDir "/t/hub/checkpoints" "TORCH_HOME first"
              Expect.isTrue o.Offline "PMG_OFFLINE=1"
              let o = Hub.optionsOf (env [ "XDG_CACHE_HOME", "/x"; "PMG_OFFLINE", "0" ])
              Expect.equal o.CacheDir "/x/torch/hub/checkpoints" "then XDG_CACHE_HOME"
              Expect.isFalse o.Offline "PMG_OFFLINE=0"
              let home = Environment.GetFolderPath Environment.SpecialFolder.UserProfile
              Expect.equal (Hub.optionsOf (env [])).CacheDir (Path.Combine(home, ".cache", "torch", "hub", "checkpoints")) "then ~/.cache"
              let o = Hub.optionsOf (env [ "PMG_WEIGHTS_URL", "http://mirror/m/" ])
              Expect.equal (Hub.urlOf o (Backbone.find "resnet50").Torchvision.Value) "http://mirror/m/resnet50-19c8e357.pth" "a mirror"
          }

          test "a first resolution downloads into the cache with progress, loads the served state_dict, and a second reads the cache" {
              let bytes = servedResnet18.Force()
              let name = hashedName "resnet18" bytes
              use server = new Server(Map [ name, bytes ], None, 0)
              use dir = new TempDir "weights-first"
              let o = optionsFor dir.Path server
              let spec = resnet18As name
              Expect.equal (Hub.statusWith o spec Backbone.ImageNet) (Hub.WillDownload(server.BaseUrl + "/" + name, Path.Combine(o.CacheDir, name), 1)) "will be downloaded"
              // What a download killed earlier left behind (its process is gone): removed by the next one.
              Directory.CreateDirectory o.CacheDir |> ignore
              File.WriteAllBytes(Path.Combine(o.CacheDir, sprintf ".%s.tmp-%d-deadbeef" name Int32.MaxValue), bytes.[.. 1000])
              let reports = Collections.Concurrent.ConcurrentQueue<WeightsDownloadEventArgs>()
              let handler = EventHandler<WeightsDownloadEventArgs>(fun _ e -> if e.Url.StartsWith server.BaseUrl then reports.Enqueue e)
              WeightsDownloads.Progress.AddHandler handler
              use net = network ()
              let r =
                  try
                      ImageNet.loadBackboneWith o spec net Backbone.ImageNet
                  finally
                      WeightsDownloads.Progress.RemoveHandler handler
              let r = Expect.wantSome r "a file"
              Expect.equal r.Source Hub.Downloaded "downloaded"
              Expect.equal r.Path (Path.Combine(o.CacheDir, name)) "into PyTorch's cache"
              Expect.equal r.Sha256 (sha256 bytes) "its SHA-256"
              Expect.equal (filesIn o.CacheDir) [| name |] "one file, no temporary or lock left"
              Expect.equal server.Requests 1 "one request"
              let last = reports |> Seq.last
              Expect.isTrue last.Completed "a last report"
              Expect.equal last.Bytes bytes.LongLength "every byte"
              Expect.equal last.TotalBytes bytes.LongLength "the size"
              Expect.isTrue (reports |> Seq.pairwise |> Seq.forall (fun (a, b) -> a.Bytes <= b.Bytes)) "bytes only grow"
              let served = StateDict.read r.Path
              sameState served net.Backbone
              Expect.isTrue (served |> List.exists (fun (k, _) -> k = "layer4.1.bn2.running_var")) "a torchvision key"
              // Second use: from the cache, no request.
              use again = network ()
              let r2 = Expect.wantSome (ImageNet.loadBackboneWith o spec again Backbone.ImageNet) "a file"
              Expect.equal r2.Source Hub.Cached "from the cache"
              Expect.equal r2.Sha256 r.Sha256 "the same file"
              Expect.equal server.Requests 1 "no second request"
              sameState served again.Backbone
              Expect.equal (Hub.statusWith o spec Backbone.ImageNet) (Hub.InCache r.Path) "status: cached"
              served |> List.iter (snd >> _.Dispose())
          }

          test "a cached file whose hash is not its name's is refused by name, never downloaded over" {
              let good = blob 1 200_000
              let name = hashedName "resnet18" good
              use server = new Server(Map [ name, good ], None, 0)
              use dir = new TempDir "weights-bad"
              let o = optionsFor dir.Path server
              Directory.CreateDirectory o.CacheDir |> ignore
              let cached = Path.Combine(o.CacheDir, name)
              // A cut-off copy: the first half.
              File.WriteAllBytes(cached, good.[.. good.Length / 2])
              match errorOf (fun () -> Hub.resolveWith o (resnet18As name) Backbone.ImageNet) with
              | WeightsUnavailable m ->
                  Expect.stringContains m cached "names the file"
                  Expect.stringContains m "SHA-256" "says why"
                  Expect.stringContains m "delete it" "says the fix"
                  Expect.isFalse (m.Contains "\n") "one line"
              | e -> failtestf "expected WeightsUnavailable, got %A" e
              Expect.equal server.Requests 0 "no request"
              Expect.equal (File.ReadAllBytes cached).Length (good.Length / 2 + 1) "left as it was"
              Expect.isTrue (Hub.statusWith o (resnet18As name) Backbone.ImageNet).IsProblem "status says so too"
          }

          test "a served file whose hash is not its name's is refused and not kept" {
              let bytes = blob 2 150_000
              let name = "resnet18-0123abcd.pth"
              use server = new Server(Map [ name, bytes ], None, 0)
              use dir = new TempDir "weights-wrong"
              let o = optionsFor dir.Path server
              match errorOf (fun () -> Hub.resolveWith o (resnet18As name) Backbone.ImageNet) with
              | WeightsUnavailable m ->
                  Expect.stringContains m (server.BaseUrl + "/" + name) "names the URL"
                  Expect.stringContains m "0123abcd" "the expected prefix"
                  Expect.stringContains m (Path.Combine(o.CacheDir, name)) "where to put the file"
              | e -> failtestf "expected WeightsUnavailable, got %A" e
              Expect.equal (filesIn o.CacheDir) [||] "nothing kept"
          }

          test "a server that stops mid-file leaves no file in the cache" {
              let bytes = blob 3 600_000
              let name = hashedName "resnet18" bytes
              use server = new Server(Map [ name, bytes ], Some 250_000, 0)
              use dir = new TempDir "weights-cut"
              let o = optionsFor dir.Path server
              match errorOf (fun () -> Hub.resolveWith o (resnet18As name) Backbone.ImageNet) with
              | WeightsUnavailable m ->
                  Expect.stringContains m (server.BaseUrl + "/" + name) "names the URL"
                  Expect.stringContains m "random weights" "the other choice"
                  Expect.isFalse (m.Contains "\n") "one line"
              | e -> failtestf "expected WeightsUnavailable, got %A" e
              Expect.equal (filesIn o.CacheDir) [||] "no file, no temporary, no lock"
              // A refused request (nothing listens) says so the same way.
              let gone = { o with BaseUrl = Some "http://127.0.0.1:9/models" }
              match errorOf (fun () -> Hub.resolveWith gone (resnet18As name) Backbone.ImageNet) with
              | WeightsUnavailable m -> Expect.stringContains m "http://127.0.0.1:9/models/" "names the URL"
              | e -> failtestf "expected WeightsUnavailable, got %A" e
          }

          test "two first resolutions at once end with one good file" {
              let bytes = blob 4 1_500_000
              let name = hashedName "resnet18" bytes
              use server = new Server(Map [ name, bytes ], None, 5)
              use dir = new TempDir "weights-twice"
              let o = optionsFor dir.Path server
              let spec = resnet18As name
              use start = new Barrier(2)
              let one () =
                  Task.Run(fun () ->
                      start.SignalAndWait()
                      Hub.resolveWith o spec Backbone.ImageNet)
              let results = Task.WhenAll([| one (); one () |]).Result |> Array.map Option.get
              Expect.equal (filesIn o.CacheDir) [| name |] "one file, no temporary or lock left"
              Expect.equal (sha256 (File.ReadAllBytes(Path.Combine(o.CacheDir, name)))) (sha256 bytes) "the whole file"
              for r in results do
                  Expect.equal r.Sha256 (sha256 bytes) "each got the good file"
              Expect.isLessThanOrEqual server.Requests 2 "at most one download each"
          }

          test "offline with an empty cache fails in one line naming the URL, the path and random weights" {
              use dir = new TempDir "weights-offline"
              let o: Hub.Options = { CacheDir = Path.Combine(dir.Path, "hub", "checkpoints"); Offline = true; BaseUrl = None }
              for name in [ "resnet50"; "resnet34"; "vgg16" ] do
                  let spec = Backbone.find name
                  let d = spec.Torchvision.Value
                  use net = Pmg.create { Backbone = name; Classes = 3; Heads = 3; Head = smallHead }
                  match errorOf (fun () -> ImageNet.loadBackboneWith o spec net Backbone.ImageNet) with
                  | WeightsUnavailable m ->
                      Expect.stringContains m d.Url "the URL"
                      Expect.stringContains m (Path.Combine(o.CacheDir, d.File)) "the exact path"
                      Expect.stringContains m "random weights" "the other choice"
                      Expect.isFalse (m.Contains "\n") "one line"
                      Expect.isFalse (m.Contains "--") "no command-line flag in the library's words"
                  | e -> failtestf "expected WeightsUnavailable, got %A" e
                  match Hub.statusWith o spec Backbone.ImageNet with
                  | Hub.Unavailable m -> Expect.stringContains m d.File "status names the file"
                  | s -> failtestf "expected Unavailable, got %A" s
              Expect.equal (filesIn o.CacheDir) [||] "nothing written"
              // This test process runs with PMG_OFFLINE=1 (Main.fs): the default options never reach the network.
              Expect.isTrue (Hub.options ()).Offline "the suite is offline"
              match Hub.statusWith o (Backbone.find "resnet18-mlnet") Backbone.ImageNet with
              | Hub.InPackage _ -> ()
              | s -> failtestf "packaged weights need no network, got %A" s
              Expect.equal (Hub.statusWith o (Backbone.find "resnet50") Backbone.Scratch) Hub.NoWeights "random weights need nothing"
          }

          test "a Pmg.Fs checkpoint gives its backbone as starting weights; a damaged one is refused by name" {
              use dir = new TempDir "weights-ckpt"
              torch.manual_seed 5L |> ignore
              use source = network ()
              let ckpt = dir.File "best.ckpt"
              let c: Training.Checkpoint.Checkpoint =
                  { Experiment = Experiment.embedded
                    Progress = progress 1
                    Model = [ for kv in source.state_dict () -> kv.Key, kv.Value.detach().clone () ]
                    Optimizer = [] }
              Training.Checkpoint.save ckpt c
              torch.manual_seed 6L |> ignore
              use net = network ()
              let r = Expect.wantSome (ImageNet.loadBackboneWith (Hub.options ()) (Backbone.find "resnet18") net (Backbone.File ckpt)) "a file"
              Expect.equal r.Source Hub.Given "the file given"
              Expect.equal r.Sha256 (sha256 (File.ReadAllBytes ckpt)) "its SHA-256"
              sameState [ for kv in source.Backbone.state_dict () -> kv.Key, kv.Value ] net.Backbone
              // Cut off, or with model.bin's bytes changed: refused naming the file, in one line.
              let bytes = File.ReadAllBytes ckpt
              let cut = dir.File "cut.ckpt"
              File.WriteAllBytes(cut, bytes.[.. bytes.Length * 6 / 10])
              let flipped = dir.File "flipped.ckpt"
              let copy = Array.copy bytes
              // model.bin is stored uncompressed after the two JSON parts: a byte a third of the way in is its.
              let at = bytes.Length / 3
              copy.[at] <- copy.[at] ^^^ 0xFFuy
              File.WriteAllBytes(flipped, copy)
              for file in [ cut; flipped ] do
                  use other = network ()
                  match errorOf (fun () -> ImageNet.loadBackbone other (Backbone.File file)) with
                  | ModelFile(path, m) ->
                      Expect.equal path file "the file"
                      Expect.stringContains m file "named in the message"
                      Expect.isFalse (m.Contains "\n") "one line"
                  | e -> failtestf "expected ModelFile, got %A" e
          }

          test "a home that cannot be written does not stop the command: the native cache falls back to the temp folder" {
              use dir = new TempDir "weights-home"
              let blocker = dir.File "a-file"
              File.WriteAllText(blocker, "")
              // Folders under a regular file can be neither made nor written, even by root.
              let run (tmp: string) =
                  let o =
                      pmgWith
                          [ "HOME", Path.Combine(blocker, "home")
                            "XDG_CACHE_HOME", Path.Combine(blocker, "cache")
                            "TMPDIR", tmp
                            "DOTNET_CLI_HOME", dir.Path ]
                          [ "jigsaw"; "embedded:test:3"; "--image-size"; "32"; "--out"; dir.File "j.png" ]
                  o.Code, o.Err
              let tmp = dir.File "tmp"
              Directory.CreateDirectory tmp |> ignore
              let code, err = run tmp
              Expect.equal code 0 (sprintf "runs with an unwritable home: %s" err)
              match Runtime.Native.current () with
              | Some l when l.PatchedGlibcxx ->
                  Expect.isNonEmpty (Directory.GetFiles(tmp, "*.so", SearchOption.AllDirectories)) "the patched copy went to the temp folder"
                  let code, err = run (Path.Combine(blocker, "tmp"))
                  Expect.equal code 1 "nothing writable"
                  Expect.stringContains err "XDG_CACHE_HOME" "names the fix"
              | _ -> () // This machine's libstdc++ loads the glue as it is: no copy is written anywhere.
          } ]

/// RELIABILITY.md's rows 400-499 (run by ReliabilityTests): starting weights as a user meets them. The suite runs
/// offline with an empty PyTorch cache of its own (Main.fs), as a machine without internet would.
let cases: Test list =
    [ test "starting weights: offline, a damaged cache file, a PMG checkpoint whole and cut" {
          use tmp = new TempDir "rel-weights"
          let cub = FgvcMini.dataset "CUB_200_2011"
          let out = tmp.File "run"
          let resnet50 = (Backbone.find "resnet50").Torchvision.Value
          Reliability.tryCase 400 "`train --dataset cub` (ResNet50 from ImageNet) offline, PyTorch's cache empty" tmp.Path
              [ "train"; "--dataset"; "cub"; "--root"; cub; "--epochs"; "1"; "--batch-size"; "4"; "--out"; out ]
              1 [ resnet50.Url; Path.Combine((Hub.options ()).CacheDir, resnet50.File); "random weights" ] "nothing written"
          |> ignore
          Expect.isFalse (Directory.Exists out) "no run folder"
          // A cut-off copy in the cache (the suite's own TORCH_HOME; no other test uses resnet101's file).
          let resnet101 = (Backbone.find "resnet101").Torchvision.Value
          let cached = Path.Combine((Hub.options ()).CacheDir, resnet101.File)
          Directory.CreateDirectory(Path.GetDirectoryName cached) |> ignore
          File.WriteAllBytes(cached, blob 7 4096)
          let o =
              pmg [ "train"; "--dataset"; "cub"; "--root"; cub; "--backbone"; "resnet101"; "--epochs"; "1"; "--batch-size"; "4"; "--out"; out ]
          Expect.equal o.Code 1 o.Err
          for m in [ cached; "SHA-256"; "delete it" ] do
              Expect.stringContains o.Err m (sprintf "names %s" m)
          // The suite's TORCH_HOME is a temporary folder: the row shows it by its name.
          let torchHome = Path.GetDirectoryName(Path.GetDirectoryName((Hub.options ()).CacheDir))
          Reliability.record 401
              { Reliability.Row.Case = "`train --backbone resnet101` with a damaged copy of its file in PyTorch's cache"
                Exit = o.Code
                Says = Reliability.says tmp.Path (o.Err.Replace(torchHome, "$TORCH_HOME"))
                Kept = "the cached file, untouched" }
          Expect.equal (File.ReadAllBytes cached) (blob 7 4096) "not downloaded over, not deleted"
          Expect.isFalse (Directory.Exists out) "no run folder"
          let ckpt = trainedCheckpoint ()
          let cut = tmp.File "cut.ckpt"
          File.WriteAllBytes(cut, (File.ReadAllBytes ckpt).[.. 100_000])
          Reliability.tryCase 402 "`train --pretrained CUT.ckpt` (a PMG checkpoint cut off)" tmp.Path
              [ "train"; "--backbone"; "resnet18"; "--pretrained"; cut; "--epochs"; "1"; "--image-size"; "24"; "--out"; out ]
              1 [ cut; "damaged" ] "nothing written"
          |> ignore
          Expect.isFalse (Directory.Exists out) "no run folder"
          let o =
              pmg [ "train"; "--backbone"; "resnet18"; "--pretrained"; ckpt; "--epochs"; "1"; "--image-size"; "24"; "--batch-size"; "32"
                    "--workers"; "1"; "--out"; out ]
          Expect.equal o.Code 0 o.Err
          // Its output holds timings: the row says what it did.
          Reliability.record 403
              { Reliability.Row.Case = "`train --pretrained RUN/best.ckpt` (a PMG checkpoint's backbone)"
                Exit = o.Code
                Says = "(trains from the checkpoint's backbone)"
                Kept = "the run" }
          Expect.stringContains (File.ReadAllText(Path.Combine(out, "config.json"))) "best.ckpt" "config.json names the weights"
      } ]
