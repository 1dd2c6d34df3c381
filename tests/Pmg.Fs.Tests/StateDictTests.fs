module Pmg.Fs.Tests.StateDictTests

open System
open System.IO
open System.IO.Compression
open System.Text
open Expecto
open TorchSharp
open Pmg.Fs.Model
open Pmg.Fs.Interop

// Small heads and resnet18 keep these fast on two cores.
let private smallHead = { Heads.FeatureSize = 16; Heads.BlockChannels = 32; Heads.BlockBnMomentum = 0.01 }

let private network (classes: int) (seed: int64) =
    torch.manual_seed seed |> ignore
    Pmg.create { Backbone = "resnet18"; Classes = classes; Heads = 3; Head = smallHead }

/// A network whose BN running stats and counters have moved off their initial values.
let private trained (classes: int) (seed: int64) =
    let net = network classes seed
    net.train ()
    do
        use _ = torch.NewDisposeScope()
        net.forward (torch.randn (2L, 3L, 64L, 64L)) |> ignore
    net

let private withDir (f: string -> unit) =
    use d = new TestKit.TempDir "statedict"
    f d.Path

let private stateOf (m: torch.nn.Module) = [ for kv in m.state_dict () -> kv.Key, kv.Value ]

let private same (a: torch.Tensor) (b: torch.Tensor) =
    use _ = torch.NewDisposeScope()
    a.shape = b.shape && (a.cpu().eq (b.cpu ())).all().item<bool> ()

let private expectSame (expected: StateDict.Entries) (actual: StateDict.Entries) =
    Expect.equal (List.map fst actual) (List.map fst expected) "same keys in the same order"
    let got = dict actual
    for (k, e) in expected do
        let a = got.[k]
        Expect.equal a.dtype e.dtype (sprintf "%s dtype" k)
        Expect.equal a.shape e.shape (sprintf "%s shape" k)
        Expect.isTrue (same a e) (sprintf "%s values" k)

let private errorOf (f: unit -> unit) : string =
    try
        f ()
        failtest "expected a ModelFile error"
    with :? Pmg.Fs.PmgException as e ->
        match e.Error with
        | Pmg.Fs.ModelFile(_, msg) -> msg
        | other -> failtestf "another error: %A" other

/// A python3 that can import torch (Debian's python3-torch), if any.
let private pythonWithTorch: Lazy<string option> =
    lazy
        ([ "/usr/bin/python3"; "python3" ]
         |> List.tryFind (fun python ->
             try
                 (TestKit.run python [ "-c"; "import torch" ] None []).Code = 0
             with _ -> false))

/// A description of `net` with class names and a 72/64 px input.
let private describe (net: Pmg.Network) =
    Description.describe net (Array.init net.Config.Classes (sprintf "class %d")) (Description.input 72 64)

// Files written by Python's pickle in torch.save's layouts (fake torch globals, no torch needed): a tensor
// w = arange(12).view(3, 4), wt = a strided view of w's storage (offset 2, size 2x3, stride 1x2), n = int64 7,
// all keys under "module.". The zip wraps them as {"epoch", "state_dict", "optimizer"} under ckpt/; the
// legacy file is the pre-1.6 format of torchvision's resnet50-19c8e357.pth.
let private legacyFile =
    String.concat "" [
        "gAKKCmz8nEb5IGqoUBkugAJN6QMugAJ9cQAoWBAAAABwcm90b2NvbF92ZXJzaW9ucQFN6QNYDQAAAGxpdHRsZV9lbmRpYW5xAoh1"
        "LoACY2NvbGxlY3Rpb25zCk9yZGVyZWREaWN0CnEAKVJxAShYCAAAAG1vZHVsZS53cQJjdG9yY2guX3V0aWxzCl9yZWJ1aWxkX3Rl"
        "bnNvcgpxAygoWAcAAABzdG9yYWdlcQRjdG9yY2gKRmxvYXRTdG9yYWdlCnEFWAEAAAAwcQZYAwAAAGNwdXEHSwxOdHEIUUsASwNL"
        "BIZxCUsESwGGcQp0cQtScQxYCQAAAG1vZHVsZS53dHENaAMoKGgEaAVoBmgHSwxOdHEOUUsCSwJLA4ZxD0sBSwKGcRB0cRFScRJY"
        "CAAAAG1vZHVsZS5ucRNoAygoaARjdG9yY2gKTG9uZ1N0b3JhZ2UKcRRYAQAAADFxFWgHSwFOdHEWUUsAKSl0cRdScRh1LoACXXEA"
        "KFgBAAAAMHEBWAEAAAAxcQJlLgwAAAAAAAAAAAAAAAAAgD8AAABAAABAQAAAgEAAAKBAAADAQAAA4EAAAABBAAAQQQAAIEEAADBB"
        "AQAAAAAAAAAHAAAAAAAAAA==" ]

let private wrappedZip =
    String.concat "" [
        "UEsDBBQAAAAAAAdte118Yeg0mwEAAJsBAAANAAAAY2twdC9kYXRhLnBrbIACfXEAKFgFAAAAZXBvY2hxAUsDWAoAAABzdGF0ZV9k"
        "aWN0cQJjY29sbGVjdGlvbnMKT3JkZXJlZERpY3QKcQMpUnEEKFgIAAAAbW9kdWxlLndxBWN0b3JjaC5fdXRpbHMKX3JlYnVpbGRf"
        "dGVuc29yX3YyCnEGKChYBwAAAHN0b3JhZ2VxB2N0b3JjaApGbG9hdFN0b3JhZ2UKcQhYAQAAADBxCVgDAAAAY3B1cQpLDHRxC1FL"
        "AEsDSwSGcQxLBEsBhnENiWgDKVJxDnRxD1JxEFgJAAAAbW9kdWxlLnd0cRFoBigoaAdoCGgJaApLDHRxElFLAksCSwOGcRNLAUsC"
        "hnEUiWgDKVJxFXRxFlJxF1gIAAAAbW9kdWxlLm5xGGgGKChoB2N0b3JjaApMb25nU3RvcmFnZQpxGVgBAAAAMXEaaApLAXRxG1FL"
        "ACkpiWgDKVJxHHRxHVJxHnVYCQAAAG9wdGltaXplcnEffXEgKFgCAAAAbHJxIUc/uZmZmZmZmlgFAAAAc3RlcHNxIl1xIyhLAUsC"
        "ZXV1LlBLAwQUAAAAAAAHbXtd0Z5nVQIAAAACAAAADAAAAGNrcHQvdmVyc2lvbjMKUEsDBBQAAAAAAAdte114fWY+MAAAADAAAAAL"
        "AAAAY2twdC9kYXRhLzAAAAAAAACAPwAAAEAAAEBAAACAQAAAoEAAAMBAAADgQAAAAEEAABBBAAAgQQAAMEFQSwMEFAAAAAAAB217"
        "XXDW528IAAAACAAAAAsAAABja3B0L2RhdGEvMQcAAAAAAAAAUEsBAhQDFAAAAAAAB217XXxh6DSbAQAAmwEAAA0AAAAAAAAAAAAA"
        "AIABAAAAAGNrcHQvZGF0YS5wa2xQSwECFAMUAAAAAAAHbXtd0Z5nVQIAAAACAAAADAAAAAAAAAAAAAAAgAHGAQAAY2twdC92ZXJz"
        "aW9uUEsBAhQDFAAAAAAAB217XXh9Zj4wAAAAMAAAAAsAAAAAAAAAAAAAAIAB8gEAAGNrcHQvZGF0YS8wUEsBAhQDFAAAAAAAB217"
        "XXDW528IAAAACAAAAAsAAAAAAAAAAAAAAIABSwIAAGNrcHQvZGF0YS8xUEsFBgAAAAAEAAQA5wAAAHwCAAAAAA==" ]

// torch.save(model) as the reference does, of a DataParallel("module") around a module with a "features" child
// holding parameter w and buffer n (the w and n above).
let private wholeModule =
    String.concat "" [
        "UEsDBBQAAAAAACJte11CPRD6AAIAAAACAAAQAAAAYXJjaGl2ZS9kYXRhLnBrbIACY21vZGVsCk1vZHVsZQpxACmBcQF9cQIoWAgA"
        "AAB0cmFpbmluZ3EDiVgLAAAAX3BhcmFtZXRlcnNxBGNjb2xsZWN0aW9ucwpPcmRlcmVkRGljdApxBSlScQZYCAAAAF9idWZmZXJz"
        "cQdoBSlScQhYCAAAAF9tb2R1bGVzcQloBSlScQpYBgAAAG1vZHVsZXELaAApgXEMfXENKGgDiWgEaAUpUnEOaAdoBSlScQ9oCWgF"
        "KVJxEChYCAAAAGZlYXR1cmVzcRFoACmBcRJ9cRMoaAOJaARoBSlScRQoWAEAAAB3cRVjdG9yY2guX3V0aWxzCl9yZWJ1aWxkX3Rl"
        "bnNvcl92MgpxFigoWAcAAABzdG9yYWdlcRdjdG9yY2gKRmxvYXRTdG9yYWdlCnEYWAEAAAAwcRlYAwAAAGNwdXEaSwx0cRtRSwBL"
        "A0sEhnEcSwRLAYZxHYloBSlScR50cR9ScSBYBAAAAGJpYXNxIU51aAdoBSlScSJYAQAAAG5xI2gWKChoF2N0b3JjaApMb25nU3Rv"
        "cmFnZQpxJFgBAAAAMXElaBpLAXRxJlFLACkpiWgFKVJxJ3RxKFJxKXNoCWgFKVJxKnViWAQAAAByZWx1cStoACmBcSx9cS0oaAOJ"
        "aARoBSlScS5oB2gFKVJxL2gJaAUpUnEwdWJ1dWJzdWIuUEsDBBQAAAAAACJte13RnmdVAgAAAAIAAAAPAAAAYXJjaGl2ZS92ZXJz"
        "aW9uMwpQSwMEFAAAAAAAIm17XXh9Zj4wAAAAMAAAAA4AAABhcmNoaXZlL2RhdGEvMAAAAAAAAIA/AAAAQAAAQEAAAIBAAACgQAAA"
        "wEAAAOBAAAAAQQAAEEEAACBBAAAwQVBLAwQUAAAAAAAibXtdcNbnbwgAAAAIAAAADgAAAGFyY2hpdmUvZGF0YS8xBwAAAAAAAABQ"
        "SwECFAMUAAAAAAAibXtdQj0Q+gACAAAAAgAAEAAAAAAAAAAAAAAAgAEAAAAAYXJjaGl2ZS9kYXRhLnBrbFBLAQIUAxQAAAAAACJt"
        "e13RnmdVAgAAAAIAAAAPAAAAAAAAAAAAAACAAS4CAABhcmNoaXZlL3ZlcnNpb25QSwECFAMUAAAAAAAibXtdeH1mPjAAAAAwAAAA"
        "DgAAAAAAAAAAAAAAgAFdAgAAYXJjaGl2ZS9kYXRhLzBQSwECFAMUAAAAAAAibXtdcNbnbwgAAAAIAAAADgAAAAAAAAAAAAAAgAG5"
        "AgAAYXJjaGl2ZS9kYXRhLzFQSwUGAAAAAAQABADzAAAA7QIAAAAA" ]

let private expectSmall (entries: StateDict.Entries) =
    Expect.equal (List.map fst entries) [ "w"; "wt"; "n" ] "keys, module. stripped"
    let get k = entries |> List.find (fun (n, _) -> n = k) |> snd
    Expect.equal ((get "w").data<float32>().ToArray()) (Array.init 12 float32) "w"
    Expect.equal ((get "wt").data<float32>().ToArray()) [| 2.0f; 4.0f; 6.0f; 3.0f; 5.0f; 7.0f |] "wt"
    Expect.equal ((get "n").dtype, (get "n").item<int64> ()) (torch.int64, 7L) "n"

[<Tests>]
let tests =
    testList "state dict" [
        test "export then import gives identical tensors, running stats and counters included" {
            withDir (fun d ->
                let net = trained 5 1L
                let file = Path.Combine(d, "pmg.pth")
                StateDict.export net (describe net) file
                let fresh = network 5 2L
                StateDict.import fresh file
                let counter = stateOf fresh |> List.find (fun (k, _) -> k = "features.bn1.num_batches_tracked") |> snd
                Expect.equal counter.dtype torch.int64 "num_batches_tracked is int64"
                Expect.equal (counter.item<int64> ()) 1L "one training forward counted"
                expectSame (stateOf net) (stateOf fresh)
                Expect.isEmpty (Directory.GetFiles(d, "*.tmp")) "no temporary file left")
        }

        test "the .pth is a torch.save zip whose data.pkl names every key" {
            withDir (fun d ->
                let net = network 3 1L
                let file = Path.Combine(d, "pmg.pth")
                StateDict.export net (describe net) file
                use zip = ZipFile.OpenRead file
                let names = zip.Entries |> Seq.map _.FullName |> List.ofSeq
                Expect.equal names.Head "archive/data.pkl" "data.pkl first, under archive/"
                Expect.contains names "archive/version" "version record"
                let keys = stateOf net |> List.map fst
                for i in 0 .. keys.Length - 1 do
                    Expect.contains names (sprintf "archive/data/%d" i) "one storage per tensor"
                for e in zip.Entries do
                    Expect.equal e.CompressedLength e.Length (sprintf "%s stored uncompressed" e.FullName)
                use ms = new MemoryStream()
                do
                    use s = zip.GetEntry("archive/data.pkl").Open()
                    s.CopyTo ms
                let pkl = Encoding.UTF8.GetString(ms.ToArray())
                for k in keys @ [ "collections\nOrderedDict"; "torch._utils\n_rebuild_tensor_v2"; "torch\nLongStorage" ] do
                    Expect.stringContains pkl k (sprintf "data.pkl names %s" k))
        }

        test "keys prefixed with module. (DataParallel) load" {
            withDir (fun d ->
                let net = trained 4 3L
                let file = Path.Combine(d, "dp.pth")
                StateDict.write file (stateOf net |> List.map (fun (k, t) -> "module." + k, t))
                let read = StateDict.read file
                Expect.isTrue (read |> List.forall (fun (k, _) -> not (k.StartsWith "module."))) "prefix stripped"
                let fresh = network 4 4L
                StateDict.loadInto fresh read true
                expectSame (stateOf net) (stateOf fresh))
        }

        test "a different class count fails naming both counts" {
            withDir (fun d ->
                let file = Path.Combine(d, "five.pth")
                StateDict.export (network 5 1L) (describe (network 5 1L)) file
                let msg = errorOf (fun () -> StateDict.import (network 3 1L) file)
                Expect.stringContains msg "the file has 5 classes" "file's classes"
                Expect.stringContains msg "the model has 3" "model's classes"
                Expect.stringContains msg "build the model with 5 classes" "the fix, in the library's words"
                Expect.stringContains msg "classifier_concat.4.weight" "the mismatched key")
        }

        test "missing and unexpected keys are named; not strict ignores unexpected" {
            let net = network 3 1L
            let entries =
                stateOf net
                |> List.filter (fun (k, _) -> k <> "classifier2.1.bias")
                |> fun l -> l @ [ "bogus.weight", torch.zeros 3L ]
            let msg = errorOf (fun () -> StateDict.loadInto (network 3 2L) entries true)
            Expect.stringContains msg "classifier2.1.bias" "missing key named"
            Expect.stringContains msg "bogus.weight" "unexpected key named"
            Expect.stringContains msg "1 missing, 1 unexpected" "counts"
            let loose = network 3 2L
            StateDict.loadInto loose entries false
            let w = stateOf loose |> List.find (fun (k, _) -> k = "classifier1.4.weight") |> snd
            let e = stateOf net |> List.find (fun (k, _) -> k = "classifier1.4.weight") |> snd
            Expect.isTrue (same w e) "present keys loaded"
        }

        test "a pretrained torchvision-style backbone loads into a fresh network" {
            withDir (fun d ->
                let source = trained 3 5L
                let plain = Path.Combine(d, "resnet18.pth")
                StateDict.write plain (stateOf source.Backbone)
                Expect.isTrue (StateDict.read plain |> List.exists (fun (k, _) -> k = "layer1.0.conv1.weight")) "torchvision names"
                let fresh = network 3 6L
                StateDict.loadPretrainedBackbone fresh plain
                expectSame (stateOf source.Backbone) (stateOf fresh.Backbone)
                // A PMG checkpoint's backbone (features.*) also serves.
                let full = Path.Combine(d, "pmg.pth")
                StateDict.export source (describe source) full
                let other = network 3 7L
                StateDict.loadPretrainedBackbone other full
                expectSame (stateOf source.Backbone) (stateOf other.Backbone))
        }

        test "a backbone of another depth fails naming keys and the backbone" {
            withDir (fun d ->
                torch.manual_seed 1L |> ignore
                let file = Path.Combine(d, "resnet34.pth")
                StateDict.write file (stateOf (Backbones.create (Backbone.find "resnet34")))
                let msg = errorOf (fun () -> StateDict.loadPretrainedBackbone (network 3 1L) file)
                Expect.stringContains msg "layer1.2.conv1.weight" "unexpected key named"
                Expect.stringContains msg "on the resnet34 backbone" "hint")
        }

        test "a checkpoint wrapping the state_dict and a legacy torch.save file read" {
            withDir (fun d ->
                for (name, b64) in [ "wrapped.pth", wrappedZip; "legacy.pth", legacyFile ] do
                    let file = Path.Combine(d, name)
                    File.WriteAllBytes(file, Convert.FromBase64String b64)
                    expectSmall (StateDict.read file))
        }

        test "a whole pickled module reads as its state_dict" {
            withDir (fun d ->
                let file = Path.Combine(d, "model.pth")
                File.WriteAllBytes(file, Convert.FromBase64String wholeModule)
                let entries = StateDict.read file
                Expect.equal (List.map fst entries) [ "features.w"; "features.n" ] "module tree flattened, module. stripped"
                Expect.equal ((snd entries.[0]).data<float32>().ToArray()) (Array.init 12 float32) "w")
        }

        test "safetensors round trip keeps order, dtypes and values" {
            withDir (fun d ->
                let net = trained 3 8L
                let file = Path.Combine(d, "pmg.safetensors")
                StateDict.export net (describe net) file
                expectSame (stateOf net) (StateDict.read file)
                let fresh = network 3 9L
                StateDict.import fresh file
                expectSame (stateOf net) (stateOf fresh))
        }
    
        for ext in [ "pth"; "safetensors" ] do
            test (sprintf "an exported .%s describes itself: the network's config, class names and input come back" ext) {
                withDir (fun d ->
                    let net = network 3 4L
                    let file = Path.Combine(d, "pmg." + ext)
                    let described = describe net
                    StateDict.export net described file
                    let back = StateDict.readDescription file
                    Expect.isSome back "a description"
                    Expect.equal back.Value.Network net.Config "config"
                    Expect.equal back.Value.Classes described.Classes "class names"
                    Expect.equal back.Value.Input described.Input "input"
                    // The description does not get in the way of the weights.
                    let fresh = network 3 5L
                    StateDict.import fresh file
                    expectSame (stateOf net) (stateOf fresh)
                    // Without one (a reference file), there is none to read.
                    let plain = Path.Combine(d, "plain." + ext)
                    StateDict.write plain (stateOf net)
                    Expect.isNone (StateDict.readDescription plain) "a file without a description")
            }

        test "every registered backbone's PMG state_dict gives its config back from keys and shapes alone" {
            for name in Backbone.registry.Keys do
                let config: Pmg.Config = { Backbone = name; Classes = 6; Heads = (if name = "vgg16" then 2 else 3); Head = { smallHead with FeatureSize = 24; BlockChannels = 40 } }
                use net = Pmg.create config
                let inferred = StateDict.inferConfig "mem.pth" (stateOf net)
                Expect.equal inferred { config with Head = { config.Head with BlockBnMomentum = Heads.Config.Paper.BlockBnMomentum } } name
        }

        test "a state_dict that is no PMG network is refused naming the file" {
            let backboneOnly = stateOf (Backbones.create (Backbone.find "resnet18"))
            let msg = errorOf (fun () -> StateDict.inferConfig "weights.pth" backboneOnly |> ignore)
            Expect.stringContains msg "weights.pth" "names the file"
            Expect.stringContains msg "conv_block" "says what is missing"
        }

        test "PyTorch loads an exported .pth with its description and the reference model takes it strictly" {
            // Runs where python3 with torch is installed (Debian's python3-torch); the suite does not need it.
            match pythonWithTorch.Force() with
            | None -> ()
            | Some python ->
                withDir (fun d ->
                    let net = network 5 6L
                    let file = Path.Combine(d, "pmg.pth")
                    StateDict.export net (describe net) file
                    let script = Path.Combine(TestKit.repoRoot (), "scripts", "check_pth_metadata.py")
                    let o = TestKit.run python [ script; file; "resnet18"; "5"; "16"; "32" ] None []
                    Expect.equal o.Code 0 (o.Out + o.Err)
                    Expect.stringContains o.Out "strict load ok" o.Out)
        }
    ]
