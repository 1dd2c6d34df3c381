/// The PMG network: a backbone and S granularity heads on its last S stages, plus a classifier on the
/// concatenation of the heads' pooled features.
module Pmg.Fs.Model.Pmg

open TorchSharp
open type TorchSharp.torch
open Pmg.Fs.Runtime
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators

/// Which output of the network a step trains.
type HeadId =
    /// The i-th granularity head (0 = the finest, on the earliest chosen stage).
    | Granularity of int
    | Concat

/// Everything that fixes the network's shape.
type Config =
    { Backbone: string
      Classes: int
      /// Heads sit on the last `Heads` stages of the backbone (S in the paper).
      Heads: int
      Head: Heads.Config }

    static member Paper(classes: int) =
        { Backbone = "resnet50"; Classes = classes; Heads = 3; Head = Heads.Config.Paper }

exception ConfigError of string

/// The stages the heads read, with their positions (Backbone.headStages for the config).
let headStages (config: Config) = Backbone.headStages (Backbone.find config.Backbone) config.Heads

/// Names of the heads' outputs by the position of the stage they read ("stage3", "stage4", "stage5" for PMG-ResNet,
/// the paper's conv3_x..conv5_x).
let headNames (config: Config) : string list = headStages config |> List.map (fun (l, _) -> sprintf "stage%d" l)

/// Logits of every head, then concat. `Combined` is the sum of all of them (the paper's ensemble).
type Outputs =
    { Heads: Tensor list
      Concat: Tensor }

    member o.Combined = o.Heads @ [ o.Concat ] |> List.reduce Ops.add
    member o.Of(id: HeadId) =
        match id with
        | Granularity i -> o.Heads.[i]
        | Concat -> o.Concat

type Network(config: Config) as this =
    inherit nn.Module<Tensor, Outputs>("PMG")
    let spec = Backbone.find config.Backbone
    do
        if config.Classes < 1 then
            raise (ConfigError(sprintf "Classes must be positive, got %d" config.Classes))
    let heads = headStages config
    let features = Backbone.create spec
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

    member _.Config = config
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
          Concat = concatClassifier.forward (torch.cat (Array.ofList pooled, 1L)) }

    override this.forward(x) = this.FromStages(features.ForwardStages x)

    /// Only what head `i` needs: the backbone up to its stage, its block and its classifier.
    member _.ForwardHead(x: Tensor, i: int) : Tensor =
        let l = fst heads.[i]
        let stagesOut = features.ForwardStages(x, l)
        blocks.[i].forward stagesOut.[l - 1] |> Heads.globalMaxPool |> classifiers.[i].forward

    /// Parameters of the backbone and of everything else (the new layers), for the two learning rates, by name.
    member _.BackboneParameters() : (string * Modules.Parameter) list =
        [ for struct (n, p) in features.named_parameters () -> "features." + n, p ]

    member this.HeadParameters() : (string * Modules.Parameter) list =
        let backbone = this.BackboneParameters() |> List.map fst |> set
        [ for struct (n, p) in this.named_parameters () do
              if not (backbone.Contains n) then n, p ]

let create (config: Config) = new Network(config)
