/// The embedded dataset's images, as the main job draws them: one function for the command line (`embedded:test:3`),
/// C# (`EmbeddedImages.Get`) and evaluation, so the same name is always the same pixels.
module Pmg.Fs.App.Embedded

open System
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open Pmg.Fs
open Pmg.Fs.Data

/// The drawing the main job trains and tests on (Experiment.embedded's).
let config: Synthetic.Config =
    match Experiment.embedded.Data with
    | Experiment.Embedded c -> c
    | Experiment.OnDisk _ -> invalidOp "the main job reads the embedded dataset"

/// Images in a split.
let count (split: Synthetic.Split) : int =
    config.Classes * (match split with Synthetic.Train -> config.TrainPerClass | Synthetic.Test -> config.TestPerClass)

let private splitName = function Synthetic.Train -> "train" | Synthetic.Test -> "test"

/// Image `index` of a split; an index outside the split is an InvalidSetting naming the range.
let image (split: Synthetic.Split) (index: int) : Image<Rgb24> =
    let n = count split
    if index < 0 || index >= n then
        Errors.setting Setting.Image (sprintf "embedded:%s:%d: the %s split has images 0..%d" (splitName split) index (splitName split) (n - 1))
    Synthetic.render config split index

/// The class of image `index` (the same in both splits).
let classOf (index: int) : int = Synthetic.label config index

/// The prefix of image names that refer to the embedded dataset.
let prefix = "embedded:"

/// `embedded:test:N` / `embedded:train:N` as a split and an index; None for any other name; a malformed embedded
/// name is an InvalidSetting that says the form.
let tryParse (name: string) : (Synthetic.Split * int) option =
    if not (name.StartsWith(prefix, StringComparison.OrdinalIgnoreCase)) then None
    else
        let form = "embedded:test:N or embedded:train:N"
        match name.Split ':' with
        | [| _; split; index |] ->
            let split =
                match split.ToLowerInvariant() with
                | "train" -> Synthetic.Train
                | "test" -> Synthetic.Test
                | other -> Errors.setting Setting.Image (sprintf "%s: the split is train or test, not '%s' (%s)" name other form)
            match Int32.TryParse index with
            | true, i when i >= 0 && i < count split -> Some(split, i)
            | true, i when i >= 0 ->
                Errors.setting Setting.Image (sprintf "%s: the %s split has images 0..%d" name (splitName split) (count split - 1))
            | _ -> Errors.setting Setting.Image (sprintf "%s: the index must be a number 0 or more (%s)" name form)
        | _ -> Errors.setting Setting.Image (sprintf "%s: write %s" name form)

/// An image named on a command line or in a call: `embedded:test:N`, or a file (decoded through the one verdict
/// every command uses, so an unusable file is refused with its reason).
let load (name: string) : Image<Rgb24> =
    match tryParse name with
    | Some(split, index) -> image split index
    | None -> Images.loadChecked name
