/// torchvision's VGG (no batch norm) as PMG's five stages: its five conv blocks.
module Pmg.Fs.Model.Vgg

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch
open type TorchSharp.torch.nn
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators
open Pmg.Fs.Runtime
open Pmg.Fs.Model.Backbone

/// torchvision's VGG without batch norm: `features` holds conv, relu (and a max pool closing each block) at the
/// same indices as torchvision's, so its ImageNet weights load by name. Its fully connected classifier is left
/// out: PMG does not use it, and it would be most of the parameters.
type Net(spec: Spec, convs: int list) as this =
    inherit Features(spec.Name)
    let stageList = stages spec
    let blocks =
        List.zip convs (List.map _.Channels stageList)
        |> List.scan (fun (inC, _) (n, width) ->
            width,
            [ for i in 0 .. n - 1 do
                  yield Conv2d((if i = 0 then int64 inC else int64 width), int64 width, 3L, padding = 1L) :> Module<Tensor, Tensor>
                  yield ReLU(true) :> Module<Tensor, Tensor>
              yield MaxPool2d(2L, stride = 2L) :> Module<Tensor, Tensor> ]) (3, [])
        |> List.tail
        |> List.map snd
    let features = Sequential(blocks |> List.concat |> Array.ofList)
    do this.RegisterComponents()

    /// The five conv blocks.
    override _.Stages = stageList

    /// The torchvision-named layers (referenced here so that RegisterComponents sees the field).
    member _.Layers = features

    /// Outputs of blocks 1..upTo (1-based), each taken after the block's max pool.
    override _.ForwardStages(x: Tensor, upTo: int) : Tensor list =
        blocks
        |> List.truncate upTo
        |> List.scan (fun (prev: Tensor) (layers: Module<Tensor, Tensor> list) -> layers |> List.fold (fun t l -> l.forward t) prev) x
        |> List.tail

    /// torchvision's layers in order; a stage's output is its block's max pool.
    override this.EmitStages(b, prefix, x) =
        let inner = prefix + Graph.childName this features + "."
        features.named_children ()
        |> Seq.fold
            (fun (y, outs) struct (n, m) ->
                let z = Graph.emit b (inner + n + ".") m y
                z, (if m :? MaxPool2d then outs @ [ z ] else outs))
            (x, [])
        |> snd

    /// The stage outputs' last, for shape checks.
    override this.forward(x) = this.ForwardStages x |> List.last

