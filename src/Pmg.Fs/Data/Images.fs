/// Decoding image files into RGB pixels and cutting them as a Sample asks, before any transform.
module Pmg.Fs.Data.Images

open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open SixLabors.ImageSharp.Processing

/// The region of a width x height image that survives trimming `trimBottom` rows and, when given,
/// cutting to `box` (clamped to what is left). Fails when nothing would remain.
let region (width: int) (height: int) (trimBottom: int) (box: Box option) : Rectangle =
    if trimBottom < 0 then
        invalidArg (nameof trimBottom) $"negative row count {trimBottom}"
    let kept = height - trimBottom
    if kept <= 0 then
        failwith $"trimming {trimBottom} rows leaves nothing of a {width}x{height} image"
    match box with
    | None -> Rectangle(0, 0, width, kept)
    | Some b ->
        // Trimming removes rows at the bottom only, so box coordinates stay valid; clamp to what remains.
        let left = max 0 b.X
        let top = max 0 b.Y
        let right = min width (b.X + b.Width)
        let bottom = min kept (b.Y + b.Height)
        if right <= left || bottom <= top then
            failwith $"box {b} lies outside the {width}x{kept} image"
        Rectangle(left, top, right - left, bottom - top)

/// Applies TrimBottom and the optional box to `img`, in place (ImageSharp crops by replacing the
/// pixel buffer); returns the same image for piping. Nothing happens when the region is the whole image.
let cut (trimBottom: int) (box: Box option) (img: Image<Rgb24>) : Image<Rgb24> =
    let r = region img.Width img.Height trimBottom box
    if r.Width <> img.Width || r.Height <> img.Height then
        img.Mutate(fun ctx -> ctx.Crop r |> ignore)
    img

/// Decodes a file as 8-bit RGB; grayscale, palette and CMYK files are converted by the decoder.
let decode (path: string) : Image<Rgb24> = Image.Load<Rgb24> path

/// Decodes a sample's file and cuts it: TrimBottom always, the box only when `cropToBox`.
/// Throws for a missing or corrupt file; callers decide whether that is fatal.
let load (sample: Sample) (cropToBox: bool) : Image<Rgb24> =
    let img = decode sample.Path
    try
        cut sample.TrimBottom (if cropToBox then sample.Box else None) img
    with _ ->
        img.Dispose()
        reraise ()

/// Decodes an image file for prediction, or fails with an UnusableInput naming it and the reason.
let loadChecked (path: string) : Image<Rgb24> =
    if System.IO.Directory.Exists path then
        Pmg.Fs.Errors.input path (sprintf "%s is a folder: give image files (e.g. %s/*.jpg)" path path)
    if not (System.IO.File.Exists path) then Pmg.Fs.Errors.input path (sprintf "%s: no such file" path)
    try
        decode path
    with
    | :? UnknownImageFormatException ->
        Pmg.Fs.Errors.input path (sprintf "%s is not an image this program can read (JPEG, PNG, BMP, GIF, TIFF, WebP)" path)
    | :? InvalidImageContentException as e -> Pmg.Fs.Errors.input path (sprintf "%s is damaged: %s" path e.Message)
    | :? System.IO.IOException as e -> Pmg.Fs.Errors.input path (sprintf "%s cannot be read: %s" path e.Message)
