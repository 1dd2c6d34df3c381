/// torchvision's Swin as PMG's five stages (see Backbone.stages).
module Pmg.Fs.Model.Swin

open Pmg.Fs.Model.Backbone

/// Builds a Swin backbone with freshly initialised weights.
let create (spec: Spec) (config: SwinConfig) : Features =
    ignore config
    Pmg.Fs.Errors.setting Pmg.Fs.Setting.Backbone (sprintf "backbone %s is not built yet" spec.Name)
