/// The paper's image transforms (torchvision Resize / RandomCrop / RandomHorizontalFlip / ToTensor /
/// Normalize, or Resize / CenterCrop for evaluation) as a value, applied straight into CHW float32.
module Pmg.Fs.Data.Transforms

open System
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open SixLabors.ImageSharp.Processing

/// How one image becomes a network input.
type Spec =
    { /// Side of the square the image is resized to (ignoring aspect ratio, like Resize((s, s))).
      Resize: int
      /// Side of the square crop taken from the resized image.
      Crop: int
      /// Zero border added on every side before a random crop (training only).
      Padding: int
      /// Random horizontal flip with probability 1/2 (training only).
      Flip: bool
      /// Random crop (and flip) when true; centre crop otherwise.
      Train: bool
      /// Per-channel mean and standard deviation applied after scaling pixels to [0, 1].
      Mean: float32[]
      /// Per-channel standard deviation, one value per RGB channel.
      Std: float32[] }

/// Ready-made transform specs and the paper's sizes.
[<RequireQualifiedAccess>]
module Spec =
    /// The paper's sizes: resize to 550, crop 448, pad 8 for the random crop.
    let paperResize = 550
    /// The paper's crop side in pixels (448).
    let paperCrop = 448
    /// The paper's padding for the random crop in pixels (8).
    let paperPadding = 8
    /// PMG normalises every channel with mean 0.5 and std 0.5, mapping [0, 1] to [-1, 1].
    let halfNormalisation = 0.5f

    let private half () = Array.create 3 halfNormalisation

    /// Resize, random crop with zero padding, random flip, normalise.
    let train (resize: int) (crop: int) : Spec =
        { Resize = resize; Crop = crop; Padding = paperPadding; Flip = true; Train = true
          Mean = half (); Std = half () }

    /// Resize, centre crop, normalise; deterministic.
    let test (resize: int) (crop: int) : Spec =
        { Resize = resize; Crop = crop; Padding = 0; Flip = false; Train = false
          Mean = half (); Std = half () }

    /// The paper's training and evaluation transforms.
    let paperTrain = train paperResize paperCrop
    /// The paper's evaluation transform: resize 550, centre crop 448.
    let paperTest = test paperResize paperCrop

    /// Floats in one transformed image (3 x Crop x Crop).
    let sampleLength (spec: Spec) = 3 * spec.Crop * spec.Crop

let private channels = 3
let private levels = 256
let private maxLevel = 255.0

/// Where the crop window starts and whether it is mirrored; the only random part of a transform.
type private Placement = { Top: int; Left: int; Mirror: bool }

/// torchvision CenterCrop's offset: round half to even, as Python's round; negative when the crop
/// is larger than the image (the outside is zero-filled, like its padding).
let private centreOffset (size: int) (crop: int) =
    let spare = size - crop
    if spare >= 0 then int (Math.Round(float spare / 2.0, MidpointRounding.ToEven))
    else -((-spare) / 2)

/// Draws the placement in torchvision's order: crop row, crop column, then the flip coin.
let private place (spec: Spec) (rng: Random) (height: int) (width: int) : Placement =
    if not spec.Train then
        { Top = centreOffset height spec.Crop; Left = centreOffset width spec.Crop; Mirror = false }
    else
        // RandomCrop pads by Padding on every side and picks uniformly among all windows that fit;
        // if even the padded image is too small, fall back to centring (torchvision would throw).
        let offset size =
            let spare = size + 2 * spec.Padding - spec.Crop
            if spare >= 0 then rng.Next(spare + 1) - spec.Padding else centreOffset size spec.Crop
        let top = offset height
        let left = offset width
        let mirror = spec.Flip && rng.NextDouble() < 0.5
        { Top = top; Left = left; Mirror = mirror }

/// Per-channel table from 8-bit level to normalised value, computed in double so that the end
/// points map exactly (0 -> -1 and 255 -> 1 with mean = std = 0.5).
let private lookup (spec: Spec) : float32[][] =
    Array.init channels (fun c ->
        let mean = float spec.Mean[c]
        let std = float spec.Std[c]
        Array.init levels (fun v -> float32 ((float v / maxLevel - mean) / std)))

/// ImageSharp splits one resize over all cores by default; callers (the loader) parallelise over
/// images instead, where one thread per image scales better and avoids oversubscription.
let private serial =
    let c = Configuration.Default.Clone()
    c.MaxDegreeOfParallelism <- 1
    c

/// Resizes to Resize x Resize with a bilinear (triangle) filter that widens when shrinking, as
/// PIL's bilinear does; an image already of that size is used as is, so its pixels stay exact.
let private resized (spec: Spec) (img: Image<Rgb24>) : Image<Rgb24> =
    if img.Width = spec.Resize && img.Height = spec.Resize then img
    else
        let options =
            ResizeOptions(
                Size = Size(spec.Resize, spec.Resize),
                Mode = ResizeMode.Stretch,
                Sampler = KnownResamplers.Triangle)
        img.Clone(serial, fun ctx -> ctx.Resize options |> ignore)

/// Copies the placed window of `src` into `dest` at `offset` as CHW, zero pixels outside `src`.
let private write (spec: Spec) (tables: float32[][]) (p: Placement) (src: Image<Rgb24>)
                  (dest: float32[]) (offset: int) =
    let crop = spec.Crop
    let plane = crop * crop
    let r, g, b = tables[0], tables[1], tables[2]
    let padRow (rowStart: int) (x: int) =
        dest[rowStart + x] <- r[0]
        dest[rowStart + plane + x] <- g[0]
        dest[rowStart + 2 * plane + x] <- b[0]
    src.ProcessPixelRows(fun rows ->
        for y in 0 .. crop - 1 do
            let sy = p.Top + y
            let rowStart = offset + y * crop
            if sy < 0 || sy >= rows.Height then
                for x in 0 .. crop - 1 do padRow rowStart x
            else
                let row = rows.GetRowSpan sy
                for x in 0 .. crop - 1 do
                    // The flip mirrors the cropped window, so it maps x to the window's far side.
                    let sx = p.Left + (if p.Mirror then crop - 1 - x else x)
                    if sx < 0 || sx >= row.Length then padRow rowStart x
                    else
                        let px = row[sx]
                        let i = rowStart + x
                        dest[i] <- r[int px.R]
                        dest[i + plane] <- g[int px.G]
                        dest[i + 2 * plane] <- b[int px.B])

let private validate (spec: Spec) =
    if spec.Resize <= 0 || spec.Crop <= 0 || spec.Padding < 0 then
        invalidArg (nameof spec) $"bad sizes in {spec}"
    if spec.Mean.Length <> channels || spec.Std.Length <> channels then
        invalidArg (nameof spec) "Mean and Std need one value per RGB channel"

/// Transforms `img` (left untouched) and writes the 3 x Crop x Crop CHW result into `dest` from
/// `offset`, so a batch can be filled without copies. Uses `rng` only when spec.Train.
let applyInto (spec: Spec) (rng: Random) (img: Image<Rgb24>) (dest: float32[]) (offset: int) : unit =
    validate spec
    if offset < 0 || offset + Spec.sampleLength spec > dest.Length then
        invalidArg (nameof dest) "destination too small for one transformed image"
    let src = resized spec img
    try
        let p = place spec rng src.Height src.Width
        write spec (lookup spec) p src dest offset
    finally
        if not (obj.ReferenceEquals(src, img)) then src.Dispose()

/// Transforms `img` into a new CHW float32 array of length 3 x Crop x Crop.
let apply (spec: Spec) (rng: Random) (img: Image<Rgb24>) : float32[] =
    let dest = Array.zeroCreate (Spec.sampleLength spec)
    applyInto spec rng img dest 0
    dest
