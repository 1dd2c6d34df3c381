/// Pictures of what a network sees: Grad-CAM of every head for an image, and the jigsaw inputs of one progressive
/// iteration; and the report that compares runs. Outputs never overwrite an input or a run's own files.
module Pmg.Fs.App.Views

open System
open System.IO
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Data
open Pmg.Fs.Visual

/// One preprocessed image (1, 3, crop, crop) on `device`, from its name (a file or embedded:test:N).
let private inputOf (spec: Transforms.Spec) (device: torch.Device) (name: string) : torch.Tensor =
    use image = Embedded.load name
    Render.toInput spec device image

/// The file name a view of `image` gets in `folder`: "embedded:test:3" becomes "embedded-test-3-cam.png".
let camFile (folder: string) (image: string) : string =
    Path.Combine(folder, (Path.GetFileNameWithoutExtension image).Replace(':', '-') + "-cam.png")

/// What a Grad-CAM montage shows.
type Cam =
    { /// The montage written.
      File: string
      /// The class explained.
      Class: int
      /// Its name.
      Name: string
      /// The combined prediction's probability of that class.
      Probability: float
      /// Whether the class was chosen by the caller (else: the predicted class).
      Chosen: bool }

/// Grad-CAM of every head of a loaded model for one image (a file or embedded:test:N), explaining `cls` or the
/// predicted class, as a PNG montage in `folder`.
let cam (m: ModelFiles.Loaded) (names: string[]) (image: string) (cls: int option) (folder: string) : Cam =
    use _ = torch.NewDisposeScope()
    let spec = ModelFiles.spec m.Description
    let out = camFile folder image
    use _ = RunFolder.guardOutput [ m.Path; image ] out
    let x = inputOf spec m.Device image
    let e = GradCam.forNetwork m.Net x cls
    use input = Render.ofInput spec.Mean spec.Std x
    let name = if e.Class < names.Length then names.[e.Class] else sprintf "class %d" e.Class
    let verb = if cls.IsSome then "explaining" else "predicted"
    let title = sprintf "%s: Grad-CAM, %s %s (class %d)" (Path.GetFileName image) verb name e.Class
    Render.camMontage title names input e out
    { File = out; Class = e.Class; Name = name; Probability = e.Combined; Chosen = cls.IsSome }

/// The jigsaw inputs of one progressive iteration of `e`'s schedule for an image, as a PNG montage; returns each
/// step's name and grid.
let jigsaw (e: Experiment.Experiment) (image: string) (seed: int) (out: string) : (string * int) list =
    use _ = RunFolder.guardOutput [ image ] out
    let spec = Transforms.Spec.test e.Input.Resize e.Input.Crop
    let steps = Render.stepLabels e.Schedule
    use _ = torch.NewDisposeScope()
    let x = inputOf spec (Runtime.Device.torch Runtime.Cpu) image
    let title = sprintf "%s: the inputs of one progressive training iteration" (Path.GetFileName image)
    Render.jigsawMontage title spec.Mean spec.Std x steps (int64 seed) out
    steps

/// One Markdown report comparing runs (and its plot beside it), never written into a run's own files.
let report (runs: string list) (out: string) : unit =
    let plot = Path.Combine(Path.GetDirectoryName(Path.GetFullPath out), Path.GetFileNameWithoutExtension out + "-combined.png")
    use _ = RunFolder.guardOutputs runs [ out; plot ]
    Report.compare runs out
