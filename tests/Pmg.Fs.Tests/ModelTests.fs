module Pmg.Fs.Tests.ModelTests

open System.IO
open Expecto
open TorchSharp
open Pmg.Fs.Model

/// The reference model's state_dict keys, shapes and dtypes (data/pmg-resnet50-200-state-dict-keys.txt).
let private referenceKeys () =
    File.ReadAllLines(TestKit.dataFile "pmg-resnet50-200-state-dict-keys.txt")
    |> Array.filter (fun l -> l <> "" && not (l.StartsWith "#"))
    |> Array.map (fun l ->
        match l.Split ' ' with
        | [| k; shape; dtype |] -> k, (if shape = "scalar" then "" else shape), dtype
        | _ -> failwithf "bad fixture line %s" l)

let private shapeText (t: torch.Tensor) = t.shape |> Array.map string |> String.concat "x"

let private headShapes backbone size =
    use _ = torch.NewDisposeScope()
    use net = Pmg.create { Pmg.Config.Paper 7 with Backbone = backbone }
    net.eval ()
    use _ = torch.no_grad ()
    let out = net.forward (torch.zeros (2L, 3L, int64 size, int64 size))
    (out.Heads @ [ out.Concat ]) |> List.map (fun t -> t.shape)

[<Tests>]
let tests =
    testList
        "model"
        [ test "state_dict keys, shapes and dtypes equal the reference PMG-ResNet50 (200 classes)" {
              use net = Pmg.create (Pmg.Config.Paper 200)
              let ours =
                  net.state_dict ()
                  |> Seq.map (fun kv ->
                      let dtype = if kv.Value.dtype = torch.int64 then "int64" else "float32"
                      kv.Key, shapeText kv.Value, dtype)
                  |> Array.ofSeq
              let expected = referenceKeys ()
              Expect.equal ours.Length 412 "entry count"
              Expect.sequenceEqual (Array.sort ours) (Array.sort expected) "keys, shapes, dtypes"
          }
          test "conv-block BNs use momentum 0.01, classifiers use ELU" {
              use net = Pmg.create (Pmg.Config.Paper 5)
              let bns =
                  net.named_modules ()
                  |> Seq.filter (fun struct (n, _) -> n.StartsWith "conv_block" && n.EndsWith ".bn")
                  |> Seq.map (fun struct (_, m) -> (m :?> Modules.BatchNorm).momentum)
                  |> List.ofSeq
              Expect.equal bns.Length 6 "two BNs per conv block"
              for m in bns do
                  Expect.equal m (System.Nullable 0.01) "momentum"
              let elus =
                  net.named_modules () |> Seq.filter (fun struct (_, m) -> m :? Layers.Elu) |> Seq.length
              Expect.equal elus 4 "one ELU per classifier"
          }
          testList
              "head output shapes for every backbone"
              [ for b in Backbone.registry.Keys do
                    for size in [ 97; 224; 448 ] do
                        test (sprintf "%s at %d px" b size) {
                            let shapes = headShapes b size
                            Expect.equal shapes.Length 4 "three heads + concat"
                            for s in shapes do
                                Expect.sequenceEqual s [| 2L; 7L |] "logits (batch, classes)"
                        } ]
          test "our ELU equals torch's, values and gradients" {
              use _ = torch.NewDisposeScope()
              let x = torch.linspace(-4.0, 4.0, 101L).requires_grad_ true
              let x2 = x.detach().clone().requires_grad_ true
              let ours = Pmg.Fs.Runtime.Ops.elu x
              let theirs = torch.nn.functional.elu (x2, 1.0) // [scalar-ok] TorchSharp's own ELU is what ours is compared with
              // Elementwise on [-4, 4]: exp and expm1 are within an ulp or two of each other in fp32 (6e-8 relative)
              // on every vector width; 1e-6 absolute covers exp(x) - 1 against expm1 near 0.
              Expect.isTrue (ours.allclose (theirs, rtol = 1e-6, atol = 1e-6)) "values"
              ours.sum().backward ()
              theirs.sum().backward ()
              // The gradient exp(x) for x < 0 and 1 above, computed through different expressions: a few ulps.
              Expect.isTrue (x.grad.allclose (x2.grad, rtol = 1e-5, atol = 1e-6)) "gradients"
          }
          test "ForwardHead equals the full forward's head output in eval mode" {
              use _ = torch.NewDisposeScope()
              torch.manual_seed 3L |> ignore
              use net = Pmg.create { Pmg.Config.Paper 4 with Backbone = "resnet18" }
              net.eval ()
              use _ = torch.no_grad ()
              let x = torch.randn (2L, 3L, 64L, 64L)
              let full = net.forward x
              for i in 0..2 do
                  let h = net.ForwardHead(x, i)
                  // The same layers on the same input; only the kernels' blocking for a different call could reorder
                  // sums (a few ulps of logits of size ~1). 1e-4 relative, 1e-5 absolute near zero.
                  Expect.isTrue (h.allclose (full.Heads.[i], rtol = 1e-4, atol = 1e-5)) (sprintf "head %d" i)
          } ]

[<Tests>]
let vgg =
    testList
        "vgg16"
        [ test "VGG16 layers carry torchvision's names and shapes, without the fully connected classifier" {
              use net = Pmg.create { Pmg.Config.Paper 10 with Backbone = "vgg16" }
              let keys = net.Backbone.state_dict () |> Seq.map (fun kv -> kv.Key, kv.Value.shape) |> Map.ofSeq
              // torchvision vgg16: convs at features.0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28.
              let convs = [ 0; 2; 5; 7; 10; 12; 14; 17; 19; 21; 24; 26; 28 ]
              Expect.equal keys.Count (2 * convs.Length) "weight and bias of 13 convs"
              for i in convs do
                  Expect.isTrue (keys.ContainsKey(sprintf "features.%d.weight" i)) (sprintf "conv %d" i)
              Expect.sequenceEqual keys.["features.28.weight"] [| 512L; 512L; 3L; 3L |] "last conv"
              Expect.equal (net.HeadStages |> List.map (fun (_, s) -> s.Channels)) [ 256; 512; 512 ] "heads on blocks 3, 4, 5"
          }
          test "torchvision VGG16 weights load into the backbone, their fully connected classifier left aside" {
              use _ = torch.NewDisposeScope()
              use source = Pmg.create { Pmg.Config.Paper 10 with Backbone = "vgg16" }
              use dir = new TestKit.TempDir "vgg16"
              let file = dir.File "vgg16.pth"
              let entries =
                  [ yield! source.Backbone.state_dict () |> Seq.map (fun kv -> kv.Key, kv.Value)
                    "classifier.0.weight", torch.zeros (4L, 8L)
                    "classifier.0.bias", torch.zeros (4L) ]
              Expect.equal entries.Length 28 "26 conv tensors and torchvision's classifier"
              Pmg.Fs.Interop.StateDict.write file entries
              use target = Pmg.create { Pmg.Config.Paper 10 with Backbone = "vgg16" }
              Pmg.Fs.Interop.StateDict.loadPretrainedBackbone target file
              let a = source.Backbone.state_dict ()
              for kv in target.Backbone.state_dict () do
                  Expect.isTrue (TestKit.same kv.Value a.[kv.Key]) kv.Key
          } ]
