/// What a model file says about itself: everything needed to rebuild the network and feed it (the network's
/// config, the class names, the input preprocessing). Exports carry it (a .pth as an extra entry of its zip, a
/// .safetensors in its `__metadata__`, an ONNX model in its metadata), so loading an exported file needs no
/// settings; files without it (the reference's .pth) are described from their state_dict's shapes
/// (StateDict.inferConfig).
module Pmg.Fs.Interop.Description

open Pmg.Fs.Model

/// How an image becomes the network's input.
type Input =
    { /// Both sides resized to this (bilinear), then the centre Crop x Crop.
      Resize: int
      /// Side of the square centre crop the network takes, in pixels.
      Crop: int
      /// Per RGB channel, subtracted from pixels scaled to [0, 1].
      Mean: float32[]
      /// Per RGB channel, the divisor applied after subtracting Mean.
      Std: float32[] }

/// A model file's description of itself.
type ModelDescription =
    { /// The network's shape: backbone, heads, head widths, classes.
      Network: Pmg.Config
      /// Class names, one per class, in output order.
      Classes: string[]
      /// The preprocessing the network was trained with.
      Input: Input }

/// The name of the description: the metadata key (ONNX, safetensors) and the zip entry's stem (.pth).
let key = "pmg-fs"

/// The test-time input of this project for a resize and a crop (its normalisation).
let input (resize: int) (crop: int) : Input =
    let spec = Pmg.Fs.Data.Transforms.Spec.test resize crop
    { Resize = resize; Crop = crop; Mean = spec.Mean; Std = spec.Std }

/// A description of `net`, with class names (numbers where `classes` does not hold one per class).
let describe (net: Pmg.Network) (classes: string[]) (input: Input) : ModelDescription =
    let n = net.Config.Classes
    { Network = net.Config
      Classes = (if classes.Length = n then classes else Array.init n string)
      Input = input }

/// The description as JSON.
let toJson (d: ModelDescription) : string = Pmg.Fs.Json.serialize d

/// Reads a description written by toJson; a damaged one is refused naming the file `path`.
let ofJson (path: string) (text: string) : ModelDescription =
    let d =
        try
            Pmg.Fs.Json.deserialize<ModelDescription> text
        with e ->
            Pmg.Fs.Errors.modelFile path (sprintf "%s holds a damaged model description (%s): export it again from its checkpoint" path e.Message)
    if box d = null || box d.Network = null || isNull d.Classes || box d.Input = null || d.Classes.Length <> d.Network.Classes then
        Pmg.Fs.Errors.modelFile path (sprintf "%s holds an incomplete model description: export it again from its checkpoint" path)
    d
