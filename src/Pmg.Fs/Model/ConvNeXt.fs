/// torchvision's ConvNeXt as PMG's five stages (see Backbone.stages).
module Pmg.Fs.Model.ConvNeXt

open Pmg.Fs.Model.Backbone

/// Builds a ConvNeXt backbone with freshly initialised weights.
let create (spec: Spec) (config: ConvNeXtConfig) : Features =
    ignore config
    Pmg.Fs.Errors.setting Pmg.Fs.Setting.Backbone (sprintf "backbone %s is not built yet" spec.Name)
