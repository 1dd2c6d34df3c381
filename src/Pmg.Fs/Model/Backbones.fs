/// Building any backbone of the registry: the one place that knows every family's module.
module Pmg.Fs.Model.Backbones

open Pmg.Fs.Model.Backbone

/// Builds the backbone a spec describes, with freshly initialised weights.
let create (spec: Spec) : Features =
    match spec.Family with
    | ResNet(block, layers) -> new ResNet.Net(spec, block, layers)
    | Vgg convs -> new Vgg.Net(spec, convs)
    | ConvNeXt c -> ConvNeXt.create spec c
    | Swin c -> Swin.create spec c
