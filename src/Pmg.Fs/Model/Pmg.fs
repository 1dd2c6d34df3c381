/// The PMG network: a backbone and S granularity heads on its last S stages, plus a classifier on the
/// concatenation of the heads' pooled features.
module Pmg.Fs.Model.Pmg

open TorchSharp
open type TorchSharp.torch
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

/// Names of the heads' outputs by the backbone stage they read ("stage3", "stage4", "stage5" for PMG-ResNet).
let headNames (config: Config) : string list =
    let stages = Backbone.stages (Backbone.find config.Backbone) |> List.length
    [ for k in stages - config.Heads + 1 .. stages -> sprintf "stage%d" k ]

/// Logits of every head, then concat. `Combined` is the sum of all of them (the paper's ensemble).
type Outputs =
    { Heads: Tensor list
      Concat: Tensor }

    member o.Combined = o.Heads @ [ o.Concat ] |> List.reduce Pmg.Fs.Runtime.Scalars.add
    member o.Of(id: HeadId) =
        match id with
        | Granularity i -> o.Heads.[i]
        | Concat -> o.Concat

type Network(config: Config) as this =
    inherit nn.Module<Tensor, Outputs>("PMG")
    let spec = Backbone.find config.Backbone
    let allStages = Backbone.stages spec
    do
        if config.Heads < 1 || config.Heads > List.length allStages - 1 then
            raise (ConfigError(sprintf "Heads must be 1..%d for %s, got %d" (List.length allStages - 1) spec.Name config.Heads))
        if config.Classes < 1 then
            raise (ConfigError(sprintf "Classes must be positive, got %d" config.Classes))

    // Stage positions (1-based) of the heads: the last S of L.
    let headStages = [ List.length allStages - config.Heads + 1 .. List.length allStages ]
    let stageOf k = allStages.[k - 1]
    let features = Backbone.create spec
    let blockOut = config.Head.BlockChannels
    let concatClassifier = Heads.classifier config.Head (blockOut * config.Heads) config.Classes
    let blocks = headStages |> List.map (fun k -> Heads.convBlock config.Head (stageOf k).Channels)
    let classifiers = headStages |> List.map (fun _ -> Heads.classifier config.Head blockOut config.Classes)

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
    /// The stages the heads read, in head order.
    member _.HeadStages = headStages |> List.map stageOf

    /// Pooled features of each head from the backbone's stage outputs.
    member _.Pooled(stagesOut: Tensor list) : Tensor list =
        List.map2 (fun k (block: nn.Module<Tensor, Tensor>) -> block.forward stagesOut.[k - 1] |> Heads.globalMaxPool) headStages blocks

    /// All heads' logits and concat's, from the stage outputs.
    member this.FromStages(stagesOut: Tensor list) : Outputs =
        let pooled = this.Pooled stagesOut
        { Heads = List.map2 (fun (c: nn.Module<Tensor, Tensor>) p -> c.forward p) classifiers pooled
          Concat = concatClassifier.forward (torch.cat (Array.ofList pooled, 1L)) }

    override this.forward(x) = this.FromStages(features.ForwardStages x)

    /// Only what head `i` needs: the backbone up to its stage, its block and its classifier.
    member _.ForwardHead(x: Tensor, i: int) : Tensor =
        let k = headStages.[i]
        let stagesOut = features.ForwardStages(x, k)
        blocks.[i].forward stagesOut.[k - 1] |> Heads.globalMaxPool |> classifiers.[i].forward

    /// Parameters of the backbone and of everything else (the new layers), for the two learning rates.
    member _.BackboneParameters() = features.parameters ()
    member _.HeadParameters() =
        seq {
            yield! concatClassifier.parameters ()
            for b in blocks do yield! b.parameters ()
            for c in classifiers do yield! c.parameters ()
        }

let create (config: Config) = new Network(config)
