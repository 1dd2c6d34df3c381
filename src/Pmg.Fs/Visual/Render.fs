/// Pictures of what the network sees, drawn with SkiaSharp: network inputs back as images, Grad-CAM overlays
/// with a jet-like colormap, and labelled montages saved as PNG. Text needs a font; where none is found the
/// montages are drawn without text (see `textAvailable`).
module Pmg.Fs.Visual.Render

open System
open System.IO
open SkiaSharp
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Visual

/// Share of the colormap in an overlay pixel.
let private overlayAlpha = 0.5f
/// Tiles are drawn at least this large (tiny training crops would leave no room for captions) and at most this
/// large (paper-sized crops would make very wide montages).
let private minTile = 192
let private maxTile = 448
let private margin = 8
let private captionSize = 14f
let private titleSize = 16f
let private lineGap = 4
let private background = SKColors.White
let private ink = SKColors.Black

let private lineHeight (size: float32) = int (Math.Ceiling(float size)) + lineGap

// ---------------------------------------------------------------------------------------------------
// Fonts

/// Where fonts usually live on Linux, for SkiaSharp builds without fontconfig.
let private fontDirs = [ "/usr/share/fonts"; "/usr/local/share/fonts"; "/usr/lib/fonts" ]
let private preferredFonts = [ "DejaVuSans.ttf"; "LiberationSans-Regular.ttf"; "NotoSans-Regular.ttf" ]

let private typeface: Lazy<SKTypeface option> =
    lazy
        (let usable (t: SKTypeface) = not (isNull t) && t.GlyphCount > 0
         let files () =
             let all =
                 fontDirs
                 |> List.filter Directory.Exists
                 |> List.collect (fun d -> Directory.GetFiles(d, "*.ttf", SearchOption.AllDirectories) |> List.ofArray)
             let rank (f: string) =
                 match List.tryFindIndex ((=) (Path.GetFileName f)) preferredFonts with
                 | Some i -> i
                 | None -> preferredFonts.Length
             all |> List.sortBy rank
         let candidates =
             seq {
                 // PMG_FONT names a font file explicitly.
                 match Environment.GetEnvironmentVariable "PMG_FONT" with
                 | null | "" -> ()
                 | f -> yield fun () -> SKTypeface.FromFile f
                 yield fun () -> SKTypeface.FromFamilyName "DejaVu Sans"
                 yield fun () -> SKTypeface.Default
                 for f in files () -> fun () -> SKTypeface.FromFile f
             }
         candidates
         |> Seq.tryPick (fun make ->
             try
                 let t = make ()
                 if usable t then Some t else None
             with _ ->
                 None))

/// Whether captions can be drawn: false when no usable font was found (montages then carry no text).
let textAvailable () = typeface.Force().IsSome

let private drawText (canvas: SKCanvas) (text: string) (x: float32) (baseline: float32) (size: float32) (maxWidth: float32) =
    match typeface.Force() with
    | None -> ()
    | Some face ->
        use font = new SKFont(face, size)
        use paint = new SKPaint(Color = ink, IsAntialias = true)
        // Long class names are cut to the tile's width rather than spilling over the next tile.
        let fitted =
            if font.MeasureText text <= maxWidth then text
            else
                let rec shorten (n: int) =
                    let t = text.Substring(0, n) + "…"
                    if n <= 1 || font.MeasureText t <= maxWidth then t else shorten (n - 1)
                shorten (text.Length - 1)
        canvas.DrawText(fitted, x, baseline, SKTextAlign.Left, font, paint)

// ---------------------------------------------------------------------------------------------------
// Images

/// An image as the network's input after the test transform `spec`: (1, 3, crop, crop) on `device`.
let toInput (spec: Pmg.Fs.Data.Transforms.Spec) (device: torch.Device) (image: SixLabors.ImageSharp.Image<SixLabors.ImageSharp.PixelFormats.Rgb24>) : torch.Tensor =
    let pixels = Pmg.Fs.Data.Transforms.apply spec (Random 0) image
    // Not disposed here: on the same device `to` may hand back this very tensor; the caller's scope frees it.
    torch.tensor(pixels, dimensions = ReadOnlySpan [| 1L; 3L; int64 spec.Crop; int64 spec.Crop |]).``to`` device

/// The captions and grids of a schedule's steps for `jigsawMontage`: "step 1: stage3" with its grid, ...
let stepLabels (schedule: Pmg.Fs.Schedule.Step list) : (string * int) list =
    schedule |> List.mapi (fun i s -> sprintf "step %d: %s" (i + 1) (Pmg.Fs.Model.Pmg.outputName s.Head), s.Grid)

/// A preprocessed network input (3, H, W) or (1, 3, H, W), normalised with `mean` and `std`, back as an image.
let ofInput (mean: float32[]) (std: float32[]) (x: torch.Tensor) : SKBitmap =
    use _ = torch.NewDisposeScope()
    let chw = if x.dim () = 4L then x.select (0L, 0L) else x
    let h, w = int chw.shape.[1], int chw.shape.[2]
    let v = Pmg.Fs.Runtime.Ops.hostFloats chw
    let plane = h * w
    let level (c: int) (i: int) = byte (Math.Clamp(MathF.Round((v.[c * plane + i] * std.[c] + mean.[c]) * 255f), 0f, 255f))
    let bmp = new SKBitmap(w, h, SKColorType.Rgba8888, SKAlphaType.Premul)
    for y in 0 .. h - 1 do
        for x in 0 .. w - 1 do
            let i = y * w + x
            bmp.SetPixel(x, y, SKColor(level 0 i, level 1 i, level 2 i))
    bmp

/// Jet-like colormap: blue (0) through cyan, yellow, to red (1).
let jet (v: float32) : SKColor =
    let v = Math.Clamp(v, 0f, 1f)
    let channel (centre: float32) = Math.Clamp(1.5f - abs (4f * v - centre), 0f, 1f)
    let b (f: float32) = byte (MathF.Round(f * 255f))
    SKColor(b (channel 3f), b (channel 2f), b (channel 1f))

/// `image` with `map` (rows x columns of the image, values in [0, 1]) blended over it in the colormap.
let overlay (image: SKBitmap) (map: float32[,]) : SKBitmap =
    if Array2D.length1 map <> image.Height || Array2D.length2 map <> image.Width then
        invalidArg (nameof map) (sprintf "map is %dx%d but the image is %dx%d" (Array2D.length1 map) (Array2D.length2 map) image.Height image.Width)
    let out = new SKBitmap(image.Width, image.Height, SKColorType.Rgba8888, SKAlphaType.Premul)
    let mix (a: byte) (b: byte) = byte (MathF.Round((1f - overlayAlpha) * float32 a + overlayAlpha * float32 b))
    for y in 0 .. image.Height - 1 do
        for x in 0 .. image.Width - 1 do
            let p = image.GetPixel(x, y)
            let c = jet map.[y, x]
            out.SetPixel(x, y, SKColor(mix p.Red c.Red, mix p.Green c.Green, mix p.Blue c.Blue))
    out

// ---------------------------------------------------------------------------------------------------
// Montages

/// One picture of a montage with the lines written under it.
type Tile = { Image: SKBitmap; Caption: string list }

let private tileSide (tiles: Tile list) =
    let largest = tiles |> List.map (fun t -> max t.Image.Width t.Image.Height) |> List.fold max 0
    Math.Clamp(largest, minTile, maxTile)

/// Width and height of a montage of `tiles` tiles of side `side` with `captionLines` lines under each.
let montageSize (tiles: int) (side: int) (captionLines: int) : int * int =
    let width = margin + tiles * (side + margin)
    let height = margin + lineHeight titleSize + margin + side + margin + captionLines * lineHeight captionSize + margin
    width, height

/// Draws `tiles` side by side under `title`, each scaled to a common square side, and writes a PNG.
let montage (title: string) (tiles: Tile list) (path: string) : unit =
    if tiles.IsEmpty then invalidArg (nameof tiles) "a montage needs at least one tile"
    let side = tileSide tiles
    let lines = tiles |> List.map (fun t -> t.Caption.Length) |> List.max
    let width, height = montageSize tiles.Length side lines
    use surface = SKSurface.Create(SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Premul))
    let canvas = surface.Canvas
    canvas.Clear background
    let top = margin + lineHeight titleSize
    drawText canvas title (float32 margin) (float32 (top - lineGap)) titleSize (float32 (width - 2 * margin))
    use sampling = new SKPaint(IsAntialias = true)
    tiles
    |> List.iteri (fun i t ->
        let left = margin + i * (side + margin)
        let y0 = top + margin
        use img = SKImage.FromBitmap t.Image
        // Nearest neighbour keeps small inputs' pixels visible rather than blurring them.
        canvas.DrawImage(img, SKRect.Create(float32 left, float32 y0, float32 side, float32 side), SKSamplingOptions(SKFilterMode.Nearest), sampling)
        t.Caption
        |> List.iteri (fun j line ->
            let baseline = y0 + side + margin + (j + 1) * lineHeight captionSize - lineGap
            drawText canvas line (float32 left) (float32 baseline) captionSize (float32 side)))
    use snapshot = surface.Snapshot()
    use data = snapshot.Encode(SKEncodedImageFormat.Png, 100)
    Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath path)) |> ignore
    File.WriteAllBytes(path, data.ToArray())

let private className (names: string[]) (k: int) =
    if k >= 0 && k < names.Length then names.[k] else sprintf "class %d" k

/// The Grad-CAM montage of one image: the input, then each output's map over it, with class name and score.
let camMontage (title: string) (classNames: string[]) (input: SKBitmap) (e: GradCam.Explanation) (path: string) : unit =
    let name = className classNames e.Class
    let overlays =
        e.Maps
        |> List.map (fun m ->
            { Image = overlay input m.Map
              Caption = [ sprintf "%s (%dx%d map)" m.Head (fst m.Cells) (snd m.Cells); sprintf "%s p=%.3f" (className classNames m.Class) m.Score ] })
    let first = { Image = input; Caption = [ "input"; sprintf "%s p=%.3f (combined)" name e.Combined ] }
    try
        montage title (first :: overlays) path
    finally
        for t in overlays do t.Image.Dispose()

/// One tile per schedule step: the input `x` (1, 3, H, W) as a step with an n x n jigsaw sees it (n = 1: the
/// whole image), drawn with one generator seeded by `seed`, as training draws its permutations.
let jigsawMontage (title: string) (mean: float32[]) (std: float32[]) (x: torch.Tensor) (steps: (string * int) list) (seed: int64) (path: string) : unit =
    use gen = new torch.Generator(uint64 seed)
    let tiles =
        steps
        |> List.map (fun (label, n) ->
            use shuffled = Jigsaw.shuffle gen Jigsaw.PerBatch Jigsaw.Cycle n x
            { Image = ofInput mean std shuffled
              Caption = [ label; (if n <= 1 then "whole image" else sprintf "%dx%d patches" n n) ] })
    try
        montage title tiles path
    finally
        for t in tiles do t.Image.Dispose()
