/// Backbones as lists of stages. A backbone value says what each stage outputs (name, channels, reduction);
/// heads read their widths from it, so no width is typed twice. Module and parameter names follow
/// torchvision's (conv1, bn1, layer1.0.downsample.1, fc; VGG's features.0 ... features.28), so ImageNet weights
/// and the reference PMG checkpoints load by name.
module Pmg.Fs.Model.Backbone

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch
open type TorchSharp.torch.nn
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators
open Pmg.Fs.Runtime

/// What one stage of a backbone outputs.
type Stage =
    { /// The stage's name: "stem" and "layer1".."layer4" (ResNet), or "block1".."block5" (VGG).
      Name: string
      /// Channels of the stage's output.
      Channels: int
      /// Input size divided by this stage's output size.
      Reduction: int }

/// The residual block a ResNet is built of.
type Block =
    /// Two 3x3 convolutions (ResNet-18, -34); the block outputs its layer's width.
    | Basic
    /// 1x1, 3x3 and 1x1 convolutions (ResNet-50 and deeper); the block outputs four times its layer's width.
    | Bottleneck

/// A ConvNeXt's size (torchvision's `CNBlockConfig` list and stochastic depth).
type ConvNeXtConfig =
    { /// Blocks in each of the four stages.
      Depths: int list
      /// Channels of each of the four stages.
      Dims: int list
      /// Stochastic depth's drop probability of the last block; block i of n drops with probability p * i / (n - 1).
      StochasticDepth: float }

/// A Swin Transformer's size (torchvision's `SwinTransformer` arguments).
type SwinConfig =
    { /// Channels after the patch embedding; each stage doubles them.
      EmbedDim: int
      /// Blocks in each of the four stages.
      Depths: int list
      /// Attention heads in each of the four stages.
      Heads: int list
      /// Side of the attention window, in tokens.
      Window: int
      /// Stochastic depth's drop probability of the last block; block i of n drops with probability p * i / (n - 1).
      StochasticDepth: float }

/// A backbone's architecture and depth.
type Family =
    /// Block kind and how many blocks each of the four residual layers holds.
    | ResNet of block: Block * layers: int list
    /// How many 3x3 convolutions each of the five blocks holds (each block ends with a 2x2 max pool).
    | Vgg of convs: int list
    /// torchvision's ConvNeXt: depthwise 7x7 convolutions, LayerNorm, GELU, layer scale, stochastic depth.
    | ConvNeXt of ConvNeXtConfig
    /// torchvision's Swin Transformer (v1): shifted-window attention with relative position bias, patch merging.
    | Swin of SwinConfig

/// A file inside a NuGet package that the project restores (paket.dependencies): weights that ship without a
/// download.
type Packaged =
    { /// NuGet package id.
      Package: string
      /// Package version.
      Version: string
      /// Path inside the package folder.
      File: string }

/// torchvision's published ImageNet weights for a backbone: fetched once into PyTorch's hub cache (Interop/Hub.fs),
/// where the reference's own `torchvision.models.resnet50(pretrained=True)` keeps them too.
type Download =
    { /// The official URL; its last segment is the file name.
      Url: string
      /// The file name in the hub cache: torchvision's, ending in "-" and the first hex digits of its SHA-256.
      File: string
      /// The file's size in MiB, for "will be downloaded (98 MB)" before any request.
      Megabytes: int }

/// A backbone described as data.
type Spec =
    { /// Registry name, lower case (e.g. "resnet50").
      Name: string
      /// Architecture and depth.
      Family: Family
      /// Classes of the ImageNet classifier kept beside the stages (torchvision's `fc`) so that ImageNet and
      /// reference state_dicts load strictly; None where the weights' source has no classifier.
      ImageNetClassifier: int option
      /// ImageNet weights that ship with the project, if any.
      ImageNet: Packaged option
      /// torchvision's ImageNet weights for this backbone, downloaded on first use; None where torchvision has none.
      Torchvision: Download option }

/// Where a backbone's starting weights come from.
type Weights =
    /// Random initialisation from the seed.
    | Scratch
    /// The backbone's ImageNet weights: the ones that ship with the project (Spec.ImageNet), else torchvision's,
    /// from PyTorch's hub cache or downloaded into it (Spec.Torchvision).
    | ImageNet
    /// A file: a torchvision state_dict (.pth, .safetensors), a PMG checkpoint's backbone, or an ONNX ResNet.
    | File of path: string

let internal expansion =
    function
    | Basic -> 1
    | Bottleneck -> 4

let internal stemChannels = 64
let internal layerWidths = [ 64; 128; 256; 512 ]

let internal vggWidths = [ 64; 128; 256; 512; 512 ]

/// Reading and describing where a backbone's weights come from.
[<RequireQualifiedAccess>]
module Weights =
    /// The command-line spelling: `imagenet`, `none` (random initialisation), or a file.
    let parse (text: string) : Weights =
        match text.Trim().ToLowerInvariant() with
        | "imagenet" -> ImageNet
        | "none" | "scratch" -> Scratch
        | _ -> File text

    /// A short phrase for reports: "from scratch", "ImageNet weights", or "weights from" and the file name.
    let describe =
        function
        | Scratch -> "from scratch"
        | ImageNet -> "ImageNet weights"
        | File path -> sprintf "weights from %s" (System.IO.Path.GetFileName path)

/// A four-stage hierarchical backbone's stages: its stem at stride 4 (as wide as the first stage), then stages at
/// strides 4, 8, 16, 32.
let private hierarchical (widths: int list) : Stage list =
    { Name = "stem"; Channels = List.head widths; Reduction = 4 }
    :: (widths |> List.mapi (fun i w -> { Name = sprintf "stage%d" (i + 1); Channels = w; Reduction = 4 <<< i }))

/// The five stages (L = 5). ResNet: the stem (conv1, bn1, relu, maxpool) then layer1..layer4. VGG: its five
/// conv blocks, each ending with its max pool. ConvNeXt and Swin: the stem (patch embedding, stride 4), then
/// stage1..stage4 (each after the downsampling or patch merging that precedes it), at strides 4, 4, 8, 16, 32 as
/// ResNet's, so the heads sit on strides 8, 16 and 32 and the jigsaw grids stay 8, 4, 2.
let stages (spec: Spec) : Stage list =
    match spec.Family with
    | ResNet(block, _) ->
        let e = expansion block
        { Name = "stem"; Channels = stemChannels; Reduction = 4 }
        :: (layerWidths
            |> List.mapi (fun i w -> { Name = sprintf "layer%d" (i + 1); Channels = w * e; Reduction = 4 <<< max 0 i }))
    | Vgg _ -> vggWidths |> List.mapi (fun i w -> { Name = sprintf "block%d" (i + 1); Channels = w; Reduction = 2 <<< i })
    | ConvNeXt c -> hierarchical c.Dims
    | Swin c -> hierarchical [ for i in 0..3 -> c.EmbedDim <<< i ]

/// The stages PMG's granularity heads read: the last `heads` of the backbone's (S of L), each with its 1-based
/// position l, finest first. The network, the schedule, Grad-CAM, the jigsaw view and the optimizer groups all
/// take the heads from here.
let headStages (spec: Spec) (heads: int) : (int * Stage) list =
    let all = stages spec
    let l = List.length all
    if heads < 1 || heads > l - 1 then
        Pmg.Fs.Errors.setting Pmg.Fs.Setting.Heads (sprintf "heads %d: must be 1..%d for %s (heads sit on the last stages, never the stem)" heads (l - 1) spec.Name)
    all |> List.indexed |> List.skip (l - heads) |> List.map (fun (i, st) -> i + 1, st)

/// torchvision's files as the reference's torchvision (before 0.13) fetched them with `pretrained=True`: the
/// reference trains from resnet50-19c8e357.pth, so a run here starts from the same bytes. ConvNeXt and Swin: the
/// files of torchvision's IMAGENET1K_V1 weights.
let private torchvision (file: string) (megabytes: int) : Download option =
    Some { Url = "https://download.pytorch.org/models/" + file; File = file; Megabytes = megabytes }

/// The registry: every backbone this project knows, by name.
let registry: Map<string, Spec> =
    [ "resnet18", Basic, [ 2; 2; 2; 2 ], torchvision "resnet18-5c106cde.pth" 45
      "resnet34", Basic, [ 3; 4; 6; 3 ], torchvision "resnet34-333f7ec4.pth" 83
      "resnet50", Bottleneck, [ 3; 4; 6; 3 ], torchvision "resnet50-19c8e357.pth" 98
      "resnet101", Bottleneck, [ 3; 4; 23; 3 ], torchvision "resnet101-5d3b4d8f.pth" 170
      "resnet152", Bottleneck, [ 3; 8; 36; 3 ], torchvision "resnet152-b121ed2d.pth" 230 ]
    |> List.map (fun (n, b, l, w) ->
        n, { Name = n; Family = ResNet(b, l); ImageNetClassifier = Some 1000; ImageNet = None; Torchvision = w })
    |> List.append
        [ "vgg16",
          { Name = "vgg16"
            Family = Vgg [ 2; 2; 3; 3; 3 ]
            ImageNetClassifier = Some 1000
            ImageNet = None
            Torchvision = torchvision "vgg16-397923af.pth" 528 }
          for n, depths, dims, p, file, mb in
              [ "convnext_tiny", [ 3; 3; 9; 3 ], [ 96; 192; 384; 768 ], 0.1, "convnext_tiny-983f1562.pth", 109
                "convnext_small", [ 3; 3; 27; 3 ], [ 96; 192; 384; 768 ], 0.4, "convnext_small-0c510722.pth", 192
                "convnext_base", [ 3; 3; 27; 3 ], [ 128; 256; 512; 1024 ], 0.5, "convnext_base-6075fbad.pth", 338 ] do
              n,
              { Name = n
                Family = ConvNeXt { Depths = depths; Dims = dims; StochasticDepth = p }
                ImageNetClassifier = Some 1000
                ImageNet = None
                Torchvision = torchvision file mb }
          for n, embed, depths, heads, p, file, mb in
              [ "swin_t", 96, [ 2; 2; 6; 2 ], [ 3; 6; 12; 24 ], 0.2, "swin_t-704ceda3.pth", 108
                "swin_s", 96, [ 2; 2; 18; 2 ], [ 3; 6; 12; 24 ], 0.3, "swin_s-5e29d889.pth", 190
                "swin_b", 128, [ 2; 2; 18; 2 ], [ 4; 8; 16; 32 ], 0.5, "swin_b-68c6b09e.pth", 335 ] do
              n,
              { Name = n
                Family = Swin { EmbedDim = embed; Depths = depths; Heads = heads; Window = 7; StochasticDepth = p }
                ImageNetClassifier = Some 1000
                ImageNet = None
                Torchvision = torchvision file mb }
          // ML.NET's ImageNet "ResNet18" (exported from CNTK): basic blocks, but three in the last stage, so it is not
          // torchvision's resnet18. Its weights ship on NuGet; Interop/ImageNet.fs converts them.
          "resnet18-mlnet",
          { Name = "resnet18-mlnet"
            Family = ResNet(Basic, [ 2; 2; 2; 3 ])
            ImageNetClassifier = None
            ImageNet =
              Some
                  { Package = "Microsoft.ML.DnnImageFeaturizer.ResNet18"
                    Version = "0.23.1"
                    File = "tools/DnnImageModels/ResNet18Onnx/ResNet18.onnx" }
            Torchvision = None } ]
    |> Map.ofList

/// Looks a backbone up by name, with the valid names in the error.
let find (name: string) : Spec =
    match Map.tryFind (name.ToLowerInvariant()) registry with
    | Some s -> s
    | None ->
        Pmg.Fs.Errors.setting Pmg.Fs.Setting.Backbone (sprintf "unknown backbone '%s'; choose one of: %s" name (String.concat ", " registry.Keys))

/// A backbone as PMG uses it: its stages, and their outputs for an input.
[<AbstractClass>]
type Features(name: string) =
    inherit Module<Tensor, Tensor>(name)
    /// What each stage outputs, in order (see `stages`).
    abstract Stages: Stage list
    /// Outputs of stages 1..upTo (1-based), in order. Stopping early skips the deeper stages.
    abstract ForwardStages: x: Tensor * upTo: int -> Tensor list
    /// Outputs of every stage, in order.
    member this.ForwardStages(x: Tensor) = this.ForwardStages(x, List.length this.Stages)
    /// Writes the eval-mode computation as operators (weights under `prefix`, empty or ending with "."), reading
    /// `input`; returns every stage's output, in order.
    abstract EmitStages: builder: Graph.IBuilder * prefix: string * input: string -> string list
    /// Reseeds the backbone's training-only randomness (stochastic depth); the trainer calls it at every epoch
    /// start with the epoch's seed, so a resumed run draws what an uninterrupted one would. No-op where there is none.
    abstract Reseed: seed: int64 -> unit
    default _.Reseed _ = ()

