/// The PMG network: a backbone and S granularity heads on its last S stages, plus a classifier on the
/// concatenation of the heads' pooled features.
module Pmg.Fs.Model.Pmg

open TorchSharp
open type TorchSharp.torch
open Pmg.Fs.Runtime
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators

/// Which output of the network a step trains. Heads are named by the backbone stage they read, the same everywhere
/// (banner, config.json, metrics.csv, tables, report): `Stage 3` is "stage3", the paper's conv3_x head.
type HeadId =
    /// The granularity head on the backbone's stage at this 1-based position (3, 4, 5 for PMG-ResNet50).
    | Stage of int
    /// The classifier on the concatenated features of all heads.
    | Concat

/// Everything that fixes the network's shape.
type Config =
    { /// Backbone name from Backbone.registry (e.g. "resnet50").
      Backbone: string
      /// Number of classes predicted; at least 1.
      Classes: int
      /// Heads sit on the last `Heads` stages of the backbone (S in the paper).
      Heads: int
      /// Widths of the heads.
      Head: Heads.Config }

    /// The paper's network for `classes` classes: ResNet-50, three heads, the paper's head widths.
    static member Paper(classes: int) =
        { Backbone = "resnet50"; Classes = classes; Heads = 3; Head = Heads.Config.Paper }

/// The stages the heads read, with their positions (Backbone.headStages for the config).
let headStages (config: Config) = Backbone.headStages (Backbone.find config.Backbone) config.Heads

/// Names of the heads' outputs by the position of the stage they read ("stage3", "stage4", "stage5" for PMG-ResNet,
/// the paper's conv3_x..conv5_x).
let headNames (config: Config) : string list = headStages config |> List.map (fun (l, _) -> sprintf "stage%d" l)

/// The name of an output: "stage3" ... for granularity heads, "concat".
let outputName (id: HeadId) : string =
    match id with
    | Stage l -> sprintf "stage%d" l
    | Concat -> "concat"

/// The output a name gives ("stage3", "concat"), if any.
let tryOutput (name: string) : HeadId option =
    match name.Trim().ToLowerInvariant() with
    | "concat" -> Some Concat
    | n when n.StartsWith "stage" ->
        match System.Int32.TryParse(n.Substring 5) with
        | true, l -> Some(Stage l)
        | _ -> None
    | _ -> None

/// Logits of every head, then concat. `Combined` is the sum of all of them (the paper's ensemble).
type Outputs =
    { /// Logits (batch x classes) of each granularity head, finest first.
      Heads: Tensor list
      /// Logits (batch x classes) of the classifier on the concatenated head features.
      Concat: Tensor
      /// Backbone stage positions of Heads, in the same order.
      Stages: int list }

    /// Sum of every head's logits and concat's (the paper's ensemble); a new tensor on each access.
    member o.Combined = o.Heads @ [ o.Concat ] |> List.reduce Ops.add
    /// The logits of the output `id` names.
    member o.Of(id: HeadId) =
        match id with
        | Stage l ->
            match List.tryFindIndex ((=) l) o.Stages with
            | Some i -> o.Heads.[i]
            | None -> invalidArg (nameof id) (sprintf "no head reads stage %d (heads on stages %A)" l o.Stages)
        | Concat -> o.Concat

/// The PMG network; its module names are the reference implementation's, so reference checkpoints load by name.
type Network(config: Config) as this =
    inherit nn.Module<Tensor, Outputs>("PMG")
    let spec = Backbone.find config.Backbone
    do
        if config.Classes < 1 then
            Pmg.Fs.Errors.setting Pmg.Fs.Setting.Classes (sprintf "the number of classes must be at least 1, got %d" config.Classes)
    let heads = headStages config
    let features = Backbones.create spec
    let blockOut = config.Head.BlockChannels
    let concatClassifier = Heads.classifier config.Head (blockOut * config.Heads) config.Classes
    let blocks = heads |> List.map (fun (_, stage) -> Heads.convBlock config.Head stage.Channels)
    let classifiers = heads |> List.map (fun _ -> Heads.classifier config.Head blockOut config.Classes)

    do
        // Registration order and names follow the reference implementation's state_dict.
        this.register_module ("features", features)
        this.register_module ("classifier_concat", concatClassifier)
        List.zip blocks classifiers
        |> List.iteri (fun i (b, c) ->
            this.register_module (sprintf "conv_block%d" (i + 1), b)
            this.register_module (sprintf "classifier%d" (i + 1), c))

    /// The config the network was built from.
    member _.Config = config
    /// The backbone, registered as "features".
    member _.Backbone = features
    /// The stages the heads read, in head order, with their positions.
    member _.HeadStages = heads

    /// Pooled features of each head from the backbone's stage outputs.
    member _.Pooled(stagesOut: Tensor list) : Tensor list =
        List.map2 (fun (l, _) (block: nn.Module<Tensor, Tensor>) -> block.forward stagesOut.[l - 1] |> Heads.globalMaxPool) heads blocks

    /// All heads' logits and concat's, from the stage outputs.
    member this.FromStages(stagesOut: Tensor list) : Outputs =
        let pooled = this.Pooled stagesOut
        { Heads = List.map2 (fun (c: nn.Module<Tensor, Tensor>) p -> c.forward p) classifiers pooled
          Concat = concatClassifier.forward (torch.cat (Array.ofList pooled, 1L))
          Stages = List.map fst heads }

    /// Every head's logits and concat's for a batch of images (N, 3, H, W).
    override this.forward(x) = this.FromStages(features.ForwardStages x)

    /// The index of the head on stage position `l` (1-based), in head order.
    member _.HeadIndex(l: int) : int =
        match heads |> List.tryFindIndex (fun (p, _) -> p = l) with
        | Some i -> i
        | None -> invalidArg (nameof l) (sprintf "no head reads stage %d" l)

    /// Only what head `i` needs: the backbone up to its stage, its block and its classifier.
    member _.ForwardHead(x: Tensor, i: int) : Tensor =
        let l = fst heads.[i]
        let stagesOut = features.ForwardStages(x, l)
        blocks.[i].forward stagesOut.[l - 1] |> Heads.globalMaxPool |> classifiers.[i].forward

    // The eval-mode network as operators reading one image batch: outputs every head's logits (finest first),
    // concat's, then the combined sum (see Outputs).
    interface Graph.IExportable with
        member this.Emit(b, prefix, inputs) =
            let stagesOut = features.EmitStages(b, prefix + Graph.childName this features + ".", List.head inputs)
            let child (m: nn.Module) x = Graph.emitChild b prefix this m x
            // Global max pooling (Heads.globalMaxPool) as pooling, then (N, C, 1, 1) -> (N, C).
            let pooled =
                List.map2 (fun (l, _) block ->
                    let y = child block (List.item (l - 1) stagesOut)
                    b.Node("Flatten", [ b.Node("GlobalMaxPool", [ y ], []) ], [ "axis", Graph.Int 1L ])) heads blocks
            let logits = List.map2 child classifiers pooled
            let concat = child concatClassifier (b.Node("Concat", pooled, [ "axis", Graph.Int 1L ]))
            let all = logits @ [ concat ]
            all @ [ b.Node("Sum", all, []) ]

    /// Parameters of the backbone and of everything else (the new layers), for the two learning rates, by name.
    member _.BackboneParameters() : (string * Modules.Parameter) list =
        [ for struct (n, p) in features.named_parameters () -> "features." + n, p ]

    /// Parameters outside the backbone (conv blocks and classifiers, the new layers), by name.
    member this.HeadParameters() : (string * Modules.Parameter) list =
        let backbone = this.BackboneParameters() |> List.map fst |> set
        [ for struct (n, p) in this.named_parameters () do
              if not (backbone.Contains n) then n, p ]

/// Builds a network for a config, with freshly initialised weights.
let create (config: Config) = new Network(config)
