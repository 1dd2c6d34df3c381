/// The embedded default dataset: procedural "birds" that share one global shape and colour
/// distribution and differ only in three small parts (wing marking, eye, tail tip), so a model
/// must attend to local detail. Deterministic: the same seed gives the same pixels. No files.
module Pmg.Fs.Data.Synthetic

open System
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats

/// Size and seed of the embedded dataset.
type Config =
    { /// Number of classes, 1 .. maxClasses.
      Classes: int
      /// Training images per class.
      TrainPerClass: int
      /// Test images per class.
      TestPerClass: int
      /// Side of the square images, in pixels; details are designed to be legible at 64.
      ImageSize: int
      /// Seed of every random choice; the same config renders the same pixels.
      Seed: int }

    /// 8 classes (the 2 x 2 x 2 first variants of each part), 40 + 15 images each, 64 pixels.
    static member Default =
        { Classes = 8; TrainPerClass = 40; TestPerClass = 15; ImageSize = 64; Seed = 2020 }

/// Which split an image belongs to; each draws its own images.
type Split =
    /// The training split.
    | Train
    /// The test split.
    | Test

// ---- Class definitions -------------------------------------------------------------------------

type private WingMark = StripeH | StripeV | WingSpots
type private EyeMark = Dot | Ring | Cross
type private TailMark = Fork | Band | TailSpot

type private Parts = { Wing: WingMark; Eye: EyeMark; Tail: TailMark }

let private wings = [| StripeH; StripeV; WingSpots |]
let private eyes = [| Dot; Ring; Cross |]
let private tails = [| Fork; Band; TailSpot |]

/// All part combinations, those using only the first two variants of every part first, so that
/// small class counts contrast each part in the same way.
let private combinations : Parts[] =
    [| for w in 0 .. wings.Length - 1 do
           for e in 0 .. eyes.Length - 1 do
               for t in 0 .. tails.Length - 1 do
                   (max w (max e t), (w, e, t)) |]
    |> Array.sort
    |> Array.map (fun (_, (w, e, t)) -> { Wing = wings[w]; Eye = eyes[e]; Tail = tails[t] })

/// The most classes a config may ask for.
let maxClasses = combinations.Length

let private className (p: Parts) =
    let wing = match p.Wing with StripeH -> "stripe-h" | StripeV -> "stripe-v" | WingSpots -> "wing-spots"
    let eye = match p.Eye with Dot -> "eye-dot" | Ring -> "eye-ring" | Cross -> "eye-cross"
    let tail = match p.Tail with Fork -> "tail-fork" | Band -> "tail-band" | TailSpot -> "tail-spot"
    $"{wing}/{eye}/{tail}"

// ---- Geometry, in bird units: the bird faces +x, y points down, 1 unit = 1 pixel at 64 pixels ---

let private referenceSize = 64.0

let private bodyHalfWidth, bodyHalfHeight = 13.0, 8.5
let private headX, headY, headRadius = 11.0, -7.0, 6.0
let private eyeX, eyeY, scleraRadius = 13.0, -8.2, 3.6
let private pupilRadius = 2.0
let private crossHalfLength, markHalfThickness = 3.0, 0.9
let private beak = [| (15.5, -8.8); (15.5, -5.2); (21.5, -6.5) |]
let private wingX, wingY, wingHalfWidth, wingHalfHeight = -2.0, -1.0, 8.0, 4.8
let private stripeRows = [| -1.7; 1.7 |]
let private stripeColumns = [| -4.0; 0.0; 4.0 |]
let private wingSpotRadius = 1.4
let private tailBaseX, tailBaseY = -11.0, -1.0
let private tailLength, tailBaseHalfWidth, tailTipHalfWidth = 12.5, 2.5, 5.0
let private forkDepth, forkSlope = 5.5, 0.7
let private bandFrom, bandTo = 3.2, 1.2
let private tailSpotBack, tailSpotRadius = 2.5, 1.7
let private legs = [| ((-3.0, 7.5), (-4.0, 12.5)); ((2.0, 7.5), (1.0, 12.5)) |]
let private legHalfThickness = 0.6

// ---- Nuisance: everything random, drawn independently of the class -----------------------------

let private minScale, maxScale = 1.15, 1.25
/// Position jitter and clutter sizes as fractions of the image side.
let private centreJitter = 0.03
let private minBlob, maxBlob = 0.06, 0.2
let private minBranch, maxBranch = 0.02, 0.045
let private maxTilt, maxTailAngle = 0.08, 0.35
let private minBlobs, maxBlobs = 0, 1
let private maxBranches = 0
let private noiseAmplitude = 10.0

type private Rgb = { R: float; G: float; B: float }

type private Clutter =
    | Blob of x: float * y: float * rx: float * ry: float * colour: Rgb
    | Branch of x0: float * y0: float * x1: float * y1: float * halfWidth: float * colour: Rgb

type private Nuisance =
    { CentreX: float
      CentreY: float
      /// Pixels per bird unit.
      Scale: float
      Tilt: float
      /// +1 facing right, -1 facing left.
      Facing: float
      TailAngle: float
      Body: Rgb
      Head: Rgb
      Wing: Rgb
      Beak: Rgb
      Legs: Rgb
      SkyTop: Rgb
      SkyBottom: Rgb
      /// Topmost first.
      Clutter: Clutter list
      NoiseKey: uint64 }

let private sclera = { R = 235.0; G = 233.0; B = 222.0 }
let private ink = { R = 22.0; G = 20.0; B = 26.0 }

let private uniform (rng: Random) lo hi = lo + (hi - lo) * rng.NextDouble()

let private hsv (h: float) (s: float) (v: float) : Rgb =
    let f k =
        let k = (k + h * 6.0) % 6.0
        255.0 * v * (1.0 - s * max 0.0 (min 1.0 (min k (4.0 - k))))
    { R = f 5.0; G = f 3.0; B = f 1.0 }

let private shade (factor: float) (c: Rgb) =
    let f x = min 255.0 (x * factor)
    { R = f c.R; G = f c.G; B = f c.B }


/// Draws every random choice, in a fixed order, from the nuisance seed alone.
let private nuisance (size: int) (seed: int) : Nuisance =
    let rng = Random(seed)
    let s = float size
    let u = uniform rng
    let colour () = hsv (u 0.0 1.0) (u 0.3 0.85) (u 0.5 0.95)
    let dull () = hsv (u 0.0 1.0) (u 0.1 0.5) (u 0.3 0.9)
    let centreX = s / 2.0 + u -centreJitter centreJitter * s
    let centreY = s / 2.0 + u -centreJitter centreJitter * s
    let scale = s / referenceSize * u minScale maxScale
    let tilt = u -maxTilt maxTilt
    let facing = if rng.Next 2 = 0 then 1.0 else -1.0
    let tailAngle = u -maxTailAngle maxTailAngle
    let body = colour ()
    let head = if rng.Next 2 = 0 then body else colour ()
    let wing = shade (if rng.Next 2 = 0 then u 0.7 0.85 else u 1.15 1.35) body
    let beakColour = hsv (u 0.05 0.15) (u 0.6 0.9) (u 0.7 1.0)
    let legColour = hsv (u 0.0 0.12) (u 0.1 0.4) (u 0.25 0.45)
    let skyTop = dull ()
    let skyBottom = dull ()
    let blobs =
        List.init (rng.Next(minBlobs, maxBlobs + 1)) (fun _ ->
            Blob(u 0.0 s, u 0.0 s, u minBlob maxBlob * s, u minBlob maxBlob * s, dull ()))
    let branches =
        List.init (rng.Next(maxBranches + 1)) (fun _ ->
            Branch(u 0.0 s, u 0.0 s, u 0.0 s, u 0.0 s, u minBranch maxBranch * s, dull ()))
    { CentreX = centreX; CentreY = centreY; Scale = scale; Tilt = tilt; Facing = facing
      TailAngle = tailAngle; Body = body; Head = head; Wing = wing; Beak = beakColour; Legs = legColour
      SkyTop = skyTop; SkyBottom = skyBottom; Clutter = List.rev (blobs @ branches)
      NoiseKey = uint64 (rng.NextInt64()) }

// ---- Rendering: a pure colour function per pixel -----------------------------------------------

let private sq (x: float) = x * x

let private inEllipse cx cy rx ry x y = sq ((x - cx) / rx) + sq ((y - cy) / ry) <= 1.0

let private near (ax, ay) (bx, by) halfWidth x y =
    let dx, dy = bx - ax, by - ay
    let t = max 0.0 (min 1.0 (((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy)))
    sq (x - ax - t * dx) + sq (y - ay - t * dy) <= sq halfWidth

let private inTriangle (pts: (float * float)[]) x y =
    let side (ax, ay) (bx, by) = (bx - ax) * (y - ay) - (by - ay) * (x - ax)
    let d1, d2, d3 = side pts[0] pts[1], side pts[1] pts[2], side pts[2] pts[0]
    not ((d1 < 0.0 || d2 < 0.0 || d3 < 0.0) && (d1 > 0.0 || d2 > 0.0 || d3 > 0.0))

let private eyeMark (mark: EyeMark) dx dy =
    match mark with
    | Dot -> sq dx + sq dy <= sq pupilRadius
    | Ring -> sq dx + sq dy > sq pupilRadius
    | Cross ->
        (abs dx <= markHalfThickness && abs dy <= crossHalfLength)
        || (abs dy <= markHalfThickness && abs dx <= crossHalfLength)

let private wingMark (mark: WingMark) dx dy =
    match mark with
    | StripeH -> stripeRows |> Array.exists (fun r -> abs (dy - r) <= markHalfThickness)
    | StripeV -> stripeColumns |> Array.exists (fun c -> abs (dx - c) <= markHalfThickness)
    | WingSpots -> stripeColumns |> Array.exists (fun c -> sq (dx - c) + sq dy <= sq wingSpotRadius)

/// The tail in its own frame: t runs from the base to the tip, s across it.
type private TailPart = Outside | Feathers | Mark

let private tail (mark: TailMark) t s =
    let halfWidth = tailBaseHalfWidth + (tailTipHalfWidth - tailBaseHalfWidth) * t / tailLength
    if t < 0.0 || t > tailLength || abs s > halfWidth then Outside
    else
        let fromTip = tailLength - t
        match mark with
        | Fork when fromTip < forkDepth && abs s < (forkDepth - fromTip) * forkSlope -> Outside
        | Band when fromTip <= bandFrom && fromTip >= bandTo -> Mark
        | TailSpot when sq (fromTip - tailSpotBack) + sq s <= sq tailSpotRadius -> Mark
        | _ -> Feathers

/// The bird's colour at a point in bird units, or None where the background shows.
let private bird (parts: Parts) (n: Nuisance) x y : Rgb option =
    let ex, ey = x - eyeX, y - eyeY
    if sq ex + sq ey <= sq scleraRadius then
        Some(if eyeMark parts.Eye ex ey then ink else sclera)
    elif sq (x - headX) + sq (y - headY) <= sq headRadius then Some n.Head
    elif inTriangle beak x y then Some n.Beak
    elif inEllipse wingX wingY wingHalfWidth wingHalfHeight x y then
        Some(if wingMark parts.Wing (x - wingX) (y - wingY) then ink else n.Wing)
    elif inEllipse 0.0 0.0 bodyHalfWidth bodyHalfHeight x y then Some n.Body
    else
        // The tail points backwards (-x), turned by the nuisance angle.
        let ux, uy = -cos n.TailAngle, -sin n.TailAngle
        let bx, by = x - tailBaseX, y - tailBaseY
        match tail parts.Tail (bx * ux + by * uy) (bx * -uy + by * ux) with
        | Mark -> Some ink
        | Feathers -> Some n.Wing
        | Outside when legs |> Array.exists (fun (a, b) -> near a b legHalfThickness x y) -> Some n.Legs
        | Outside -> None

let private background (n: Nuisance) (size: float) x y : Rgb =
    let fromTop = y / size
    let sky =
        { R = n.SkyTop.R + (n.SkyBottom.R - n.SkyTop.R) * fromTop
          G = n.SkyTop.G + (n.SkyBottom.G - n.SkyTop.G) * fromTop
          B = n.SkyTop.B + (n.SkyBottom.B - n.SkyTop.B) * fromTop }
    let covering =
        function
        | Blob(cx, cy, rx, ry, c) when inEllipse cx cy rx ry x y -> Some c
        | Branch(x0, y0, x1, y1, w, c) when near (x0, y0) (x1, y1) w x y -> Some c
        | _ -> None
    n.Clutter |> List.tryPick covering |> Option.defaultValue sky

/// Sensor-like noise that depends only on the pixel and the nuisance, never on drawing order.
let private noise (n: Nuisance) px py channel =
    let h = Seeds.mix (n.NoiseKey ^^^ Seeds.hash [ px; py; channel ])
    (float (h >>> 11) / float (1UL <<< 53) * 2.0 - 1.0) * noiseAmplitude

let private toByte (v: float) = byte (max 0.0 (min 255.0 (Math.Round v)))

/// Renders class `classIndex` (0 .. maxClasses-1) with every nuisance drawn from `nuisanceSeed`:
/// two classes with the same nuisance seed differ only where their part details differ.
let renderClass (size: int) (classIndex: int) (nuisanceSeed: int) : Image<Rgb24> =
    if classIndex < 0 || classIndex >= maxClasses then
        invalidArg (nameof classIndex) $"must be in 0..{maxClasses - 1}"
    let parts = combinations[classIndex]
    let n = nuisance size nuisanceSeed
    let side = float size
    let cosT, sinT = cos n.Tilt, sin n.Tilt
    let pixels =
        Array.init (size * size) (fun i ->
            let px, py = i % size, i / size
            // Pixel centre into bird units: undo translation, tilt, scale and facing.
            let x, y = float px + 0.5, float py + 0.5
            let dx, dy = x - n.CentreX, y - n.CentreY
            let bx = (cosT * dx + sinT * dy) / n.Scale * n.Facing
            let by = (-sinT * dx + cosT * dy) / n.Scale
            let c = bird parts n bx by |> Option.defaultWith (fun () -> background n side x y)
            Rgb24(toByte (c.R + noise n px py 0), toByte (c.G + noise n px py 1), toByte (c.B + noise n px py 2)))
    Image.LoadPixelData<Rgb24>(pixels, size, size)

let private splitTag = function Train -> 1 | Test -> 2

let private validate (config: Config) =
    if config.Classes < 1 || config.Classes > maxClasses then
        invalidArg (nameof config) $"Classes must be in 1..{maxClasses}"
    if config.TrainPerClass < 0 || config.TestPerClass < 0 then
        invalidArg (nameof config) "negative per-class counts"
    if config.ImageSize < 1 then invalidArg (nameof config) "ImageSize must be positive"

/// The class of image `index`: labels cycle through the classes so every prefix of a split is balanced.
let label (config: Config) (index: int) : int = index % config.Classes

/// Image `index` of a split.
let render (config: Config) (split: Split) (index: int) : Image<Rgb24> =
    validate config
    renderClass config.ImageSize (label config index) (Seeds.seed [ config.Seed; splitTag split; index ])

let private source (config: Config) (split: Split) (perClass: int) : Loader.Source =
    let tag = match split with Train -> "train" | Test -> "test"
    { Count = config.Classes * perClass
      Label = label config
      Name = fun i -> $"synthetic/{tag}/{i:D5}"
      Load = render config split }


/// The dataset described by `config`: class names and both splits, rendered on demand.
let create (config: Config) : {| Classes: string[]; Train: Loader.Source; Test: Loader.Source |} =
    validate config
    {| Classes = combinations[.. config.Classes - 1] |> Array.map className
       Train = source config Train config.TrainPerClass
       Test = source config Test config.TestPerClass |}
