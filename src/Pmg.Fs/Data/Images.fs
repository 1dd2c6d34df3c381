/// Decoding image files into RGB pixels and cutting them as a Sample asks, before any transform.
module Pmg.Fs.Data.Images

open System
open System.IO
open Pmg.Fs
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

/// How a usable image stores its colours (the pipeline converts every one to 8-bit RGB).
type Colour =
    /// Three colour channels (RGB, palette, or YCbCr JPEG).
    | Rgb
    /// One grey channel, with or without alpha.
    | Gray
    /// A CMYK (or YCCK) JPEG.
    | Cmyk

/// What the verdict learnt of a usable image file.
type Info =
    { /// The format the content is in, whatever the file's extension ("JPEG", "PNG", "WebP", ...).
      Format: string
      /// Width in pixels.
      Width: int
      /// Height in pixels.
      Height: int
      /// How it stores its colours.
      Colour: Colour }

/// The most pixels an image may have (100 megapixels): a header that claims more is refused before the decoder
/// allocates anything, since a lying header would otherwise cost gigabytes of grey.
let maxPixels = 100_000_000L

// The verdict's reasons for files that are not there as images; the fix for them is not a new download.
let private missing = "missing image file"
let private folder = "a folder, not an image file"
let private brokenLinkReason = "a symbolic link that loops or leads nowhere"

/// What the user can do about an unusable image, said after the reason: for a file given alone, or for one of
/// a dataset's files (which can also be removed from the dataset).
let private fixFor (inDataset: bool) (reason: string) =
    let orRemove = if inDataset then ", or remove it from the dataset" else ""
    if reason = missing then "check the path" + orRemove
    elif reason = folder then "give image files (e.g. FOLDER/*.jpg)"
    elif reason = brokenLinkReason then "point it at an image" + (if inDataset then " or remove it" else "")
    else "re-download or re-export it" + orRemove

// A format's structure, read from its bytes before decoding: ImageSharp 2.1 fills a cut-off JPEG scan or PNG
// stream with grey instead of failing, so completeness is checked here, from the format's own end markers and
// lengths. Each check returns the size the header claims, or why the file cannot be used.
module private Structure =

    let u16be (b: byte[]) i = (int b[i] <<< 8) ||| int b[i + 1]
    let u32be (b: byte[]) i = (int64 b[i] <<< 24) ||| (int64 b[i + 1] <<< 16) ||| (int64 b[i + 2] <<< 8) ||| int64 b[i + 3]
    let u16le (b: byte[]) i = int b[i] ||| (int b[i + 1] <<< 8)
    let u32le (b: byte[]) i = int64 b[i] ||| (int64 b[i + 1] <<< 8) ||| (int64 b[i + 2] <<< 16) ||| (int64 b[i + 3] <<< 24)
    let i32le (b: byte[]) i = int (u32le b i)
    let starts (b: byte[]) (at: int) (text: string) =
        b.Length >= at + text.Length && Seq.forall (fun k -> b[at + k] = byte text[k]) [ 0 .. text.Length - 1 ]

    /// The format the content is in, by its signature; None for none of those (ImageSharp may still know it: TGA
    /// has no signature).
    let sniff (b: byte[]) : string option =
        if b.Length >= 3 && b[0] = 0xFFuy && b[1] = 0xD8uy && b[2] = 0xFFuy then Some "JPEG"
        elif b.Length >= 8 && b[0] = 0x89uy && starts b 1 "PNG\r\n\026\n" then Some "PNG"
        elif starts b 0 "GIF87a" || starts b 0 "GIF89a" then Some "GIF"
        elif starts b 0 "BM" && b.Length >= 14 then Some "BMP"
        elif starts b 0 "RIFF" && starts b 8 "WEBP" then Some "WebP"
        elif starts b 0 "II*\000" || starts b 0 "MM\000*" then Some "TIFF"
        elif b.Length >= 2 && b[0] = byte 'P' && b[1] >= byte '1' && b[1] <= byte '6' then Some "PBM"
        else None

    // A JPEG ends with EOI (FF D9); some writers append padding after it, so look in the last few KiB.
    let private trailerWindow = 4096

    /// Walks a JPEG's marker segments up to the first scan: the frame's size and sampling, then EOI at the end.
    let jpeg (b: byte[]) : Result<int * int, string> =
        let n = b.Length
        let rec walk pos (frame: (int * int * int * int * bool) option) =
            if pos + 4 > n then Error "the file ends inside its header (cut off)"
            elif b[pos] <> 0xFFuy then Error(sprintf "no JPEG marker at byte %d (damaged header)" pos)
            else
                let marker = int b[pos + 1]
                if marker = 0xFF then walk (pos + 1) frame // fill byte
                elif marker = 0x01 || (marker >= 0xD0 && marker <= 0xD7) then walk (pos + 2) frame
                else
                    let length = u16be b (pos + 2)
                    if length < 2 || pos + 2 + length > n then Error "the file ends inside its header (cut off)"
                    elif marker = 0xDA then
                        match frame with
                        | None -> Error "no frame header before the image data (damaged header)"
                        | Some(w, h, hmax, vmax, huffman) -> Ok(w, h, hmax, vmax, huffman, pos + 2 + length)
                    elif marker >= 0xC0 && marker <= 0xCF && marker <> 0xC4 && marker <> 0xC8 && marker <> 0xCC then
                        if length < 8 then Error "a frame header too short (damaged header)"
                        else
                            let h = u16be b (pos + 5)
                            let w = u16be b (pos + 7)
                            let comps = int b[pos + 9]
                            let sampling =
                                [ for c in 0 .. comps - 1 do
                                      let at = pos + 10 + 3 * c + 1
                                      if at < pos + 2 + length then int (b[at] >>> 4), int (b[at] &&& 0x0Fuy) ]
                            let hmax = sampling |> List.map fst |> List.fold max 1
                            let vmax = sampling |> List.map snd |> List.fold max 1
                            // SOF9-SOF15 are arithmetic-coded: no bit-per-block minimum holds for them.
                            walk (pos + 2 + length) (Some(w, h, hmax, vmax, marker < 0xC8))
                    else walk (pos + 2 + length) frame
        match walk 2 None with
        | Error e -> Error e
        | Ok(w, h, hmax, vmax, huffman, scanStart) ->
            let window = min trailerWindow (n - scanStart)
            let tail = ReadOnlySpan(b, n - window, window)
            if tail.LastIndexOf(ReadOnlySpan [| 0xFFuy; 0xD9uy |]) < 0 then
                Error "no JPEG end-of-image marker: the file is cut off"
            elif w = 0 || h = 0 then Error(sprintf "its header says %dx%d pixels" w h)
            else
                // Huffman coding spends at least one bit on every block of a scan, and each MCU holds a block.
                let mcus = int64 ((w + 8 * hmax - 1) / (8 * hmax)) * int64 ((h + 8 * vmax - 1) / (8 * vmax))
                let scanBits = 8L * int64 (n - scanStart)
                if huffman && scanBits < mcus then
                    Error(sprintf "its header says %dx%d pixels but it holds only %d bytes of image data" w h (n - scanStart))
                else Ok(w, h)

    // Deflate expands at most about 1032-fold; the margin covers zlib's framing and filter bytes.
    let private deflateRatio = 1100L

    /// Walks a PNG's chunks to IEND, every chunk whole: the size from IHDR, checked against the compressed data.
    let png (b: byte[]) : Result<int * int, string> =
        let n = b.Length
        let rec walk pos (ihdr: (int64 * int64 * int * int) option) (idat: int64) =
            if pos + 12 > n then Error "no IEND chunk: the file is cut off"
            else
                let length = u32be b pos
                let kind = Text.Encoding.ASCII.GetString(b, pos + 4, 4)
                if length > int64 (n - pos - 12) then Error(sprintf "its %s chunk is cut off" kind)
                else
                    let data = pos + 8
                    let next = pos + 12 + int length
                    match kind with
                    | "IHDR" when length >= 13L ->
                        let w = u32be b data
                        let h = u32be b (data + 4)
                        walk next (Some(w, h, int b[data + 8], int b[data + 9])) idat
                    | "IDAT" -> walk next ihdr (idat + length)
                    | "IEND" ->
                        match ihdr with
                        | None -> Error "no IHDR header chunk (damaged header)"
                        | Some(w, h, depth, colourType) -> Ok(w, h, depth, colourType, idat)
                    | _ -> walk next ihdr idat
        match walk 8 None 0L with
        | Error e -> Error e
        | Ok(w, h, depth, colourType, idat) ->
            let channels = match colourType with 0 | 3 -> 1 | 2 -> 3 | 4 -> 2 | _ -> 4
            let rowBytes = (w * int64 channels * int64 depth + 7L) / 8L + 1L
            if w = 0L || h = 0L || w > int64 Int32.MaxValue || h > int64 Int32.MaxValue then
                Error(sprintf "its header says %dx%d pixels" w h)
            elif idat = 0L then Error "no image data (no IDAT chunk)"
            elif w * h <= maxPixels && h * rowBytes > deflateRatio * idat + 65536L then
                Error(sprintf "its header says %dx%d pixels but it holds only %d bytes of image data" w h idat)
            else Ok(int w, int h)

    let gif (b: byte[]) : Result<int * int, string> =
        if b.Length < 14 then Error "the file ends inside its header (cut off)"
        else
            // The trailer byte 0x3B ends the stream; some writers pad after it.
            let tail = b[max 0 (b.Length - 16) ..]
            if not (Array.contains 0x3Buy tail) then Error "no GIF trailer: the file is cut off"
            else Ok(u16le b 6, u16le b 8)

    let bmp (b: byte[]) : Result<int * int, string> =
        if b.Length < 26 then Error "the file ends inside its header (cut off)"
        else
            let offset = u32le b 10
            let headerSize = u32le b 14
            let w, h, bpp, compression =
                if headerSize = 12L then u16le b 18, u16le b 20, (if b.Length >= 26 then u16le b 24 else 0), 0L
                elif b.Length >= 34 then i32le b 18, abs (i32le b 22), u16le b 28, u32le b 30
                else 0, 0, 0, 0L
            if w <= 0 || h <= 0 then Error(sprintf "its header says %dx%d pixels" w h)
            elif (compression = 0L || compression = 3L || compression = 6L) && bpp > 0 then
                // Uncompressed rows are padded to 4 bytes; every row must be there.
                let stride = (int64 w * int64 bpp + 31L) / 32L * 4L
                if offset + stride * int64 h > int64 b.Length then
                    Error(sprintf "its header says %dx%d pixels but the file holds only %d bytes of them (cut off)" w h (int64 b.Length - offset))
                else Ok(w, h)
            else Ok(w, h)

    let webp (b: byte[]) : Result<int * int, string> =
        if b.Length < 32 then Error "the file ends inside its header (cut off)"
        elif u32le b 4 + 8L > int64 b.Length then Error "the file is shorter than its RIFF header says (cut off)"
        elif starts b 12 "VP8X" then Ok(int (u32le b 24 &&& 0xFFFFFFL) + 1, int ((u32le b 27) &&& 0xFFFFFFL) + 1)
        elif starts b 12 "VP8L" then
            let bits = u32le b 21
            Ok(int (bits &&& 0x3FFFL) + 1, int ((bits >>> 14) &&& 0x3FFFL) + 1)
        elif starts b 12 "VP8 " then Ok(u16le b 26 &&& 0x3FFF, u16le b 28 &&& 0x3FFF)
        else Error "no VP8, VP8L or VP8X chunk (damaged header)"

// Decoders that keep only the first frame of an animation: training and prediction see one picture.
let private configuration =
    let c = Configuration.Default.Clone()
    c.ImageFormatsManager.SetDecoder(Formats.Gif.GifFormat.Instance, Formats.Gif.GifDecoder(DecodingMode = Metadata.FrameDecodingMode.First))
    c.ImageFormatsManager.SetDecoder(Formats.Tiff.TiffFormat.Instance, Formats.Tiff.TiffDecoder(DecodingMode = Metadata.FrameDecodingMode.First))
    c

let private colourOf (image: Image) =
    let jpeg = image.Metadata.GetJpegMetadata()
    let png = image.Metadata.GetPngMetadata()
    match Option.ofNullable jpeg.ColorType, Option.ofNullable png.ColorType with
    | Some Formats.Jpeg.JpegColorType.Luminance, _ -> Gray
    | Some Formats.Jpeg.JpegColorType.Cmyk, _ -> Cmyk
    | _, Some Formats.Png.PngColorType.Grayscale
    | _, Some Formats.Png.PngColorType.GrayscaleWithAlpha -> Gray
    | _ -> Rgb

let private firstLine (text: string) =
    let line = text.Split('\n').[0].Trim()
    if line.Length > 160 then line.Substring(0, 157) + "..." else line

/// The one verdict on an image's bytes: the content's format (sniffed, whatever the name says), its structure
/// whole (a JPEG's end marker, a PNG's chunks to IEND, a BMP's rows, a WebP's RIFF length), its size within
/// `maxPixels` and within what the file can hold, then a full decode to 8-bit RGB (first frame). Ok with the
/// image (the caller disposes it) and what was learnt; Error with the reason, in words without the file's name.
let decodeBytes (bytes: byte[]) : Result<Image<Rgb24> * Info, string> =
    let format = Structure.sniff bytes
    let structure =
        match format with
        | Some "JPEG" -> Structure.jpeg bytes
        | Some "PNG" -> Structure.png bytes
        | Some "GIF" -> Structure.gif bytes
        | Some "BMP" -> Structure.bmp bytes
        | Some "WebP" -> Structure.webp bytes
        | _ ->
            // TIFF, PBM and TGA: the decoder's own header reader gives the size.
            try
                use stream = new MemoryStream(bytes, false)
                match Image.Identify(configuration, stream) with
                | null when bytes.Length = 0 -> Error "an empty file"
                | null -> Error "not an image (neither JPEG, PNG, GIF, BMP, WebP, TIFF, TGA nor PBM)"
                | info -> Ok(info.Width, info.Height)
            with ex -> Error(sprintf "a damaged header (%s)" (firstLine ex.Message))
    match structure with
    | Error e -> Error e
    | Ok(w, h) when int64 w * int64 h > maxPixels ->
        Error(sprintf "its header says %dx%d pixels, over the limit of %d megapixels" w h (maxPixels / 1_000_000L))
    | Ok _ ->
        try
            let image = Image.Load<Rgb24>(configuration, bytes)
            let name = match format with Some f -> f | None -> "TGA"
            Ok(image, { Format = name; Width = image.Width; Height = image.Height; Colour = colourOf image })
        with
        | :? UnknownImageFormatException -> Error "not an image (neither JPEG, PNG, GIF, BMP, WebP, TIFF, TGA nor PBM)"
        | :? OutOfMemoryException -> Error "too large to decode"
        | ex -> Error(sprintf "cannot be decoded (%s)" (firstLine ex.Message))

/// Reads a file and gives the verdict of `decodeBytes`, or the reason the file cannot be read (missing, a
/// folder, a symlink loop, no permission).
let read (path: string) : Result<Image<Rgb24> * Info, string> =
    // Looked at only when reading fails: the happy path costs one read.
    let brokenLink () =
        try
            let info = FileInfo path
            not (isNull info.LinkTarget)
            && (match info.ResolveLinkTarget true with
                | null -> true
                | target -> not (File.Exists target.FullName || Directory.Exists target.FullName))
        with _ -> true
    let bytes =
        try
            Ok(File.ReadAllBytes path)
        with
        | :? FileNotFoundException
        | :? DirectoryNotFoundException ->
            Error(if brokenLink () then brokenLinkReason else missing)
        | :? UnauthorizedAccessException when Directory.Exists path -> Error folder
        | :? UnauthorizedAccessException -> Error "not readable (permission denied)"
        | :? IOException when Directory.Exists path -> Error folder
        | :? IOException when brokenLink () -> Error brokenLinkReason
        | :? IOException as e -> Error(sprintf "not readable (%s)" (firstLine e.Message))
    match bytes with
    | Error e -> Error e
    | Ok bytes -> decodeBytes bytes

/// The verdict alone: Ok with what was learnt of a usable image, or Error with the reason it cannot be used.
let verdict (path: string) : Result<Info, string> =
    read path |> Result.map (fun (image, info) -> image.Dispose(); info)

/// The reason and the fix, as messages about an unusable image of a dataset say them.
let explain (reason: string) : string = sprintf "%s; %s" reason (fixFor true reason)

/// Decodes a file as 8-bit RGB through the verdict; grayscale, palette and CMYK files are converted.
/// Raises an UnusableInput error naming the file, the reason and the fix.
let loadChecked (path: string) : Image<Rgb24> =
    match read path with
    | Ok(image, _) -> image
    | Error reason ->
        let fix = (fixFor false reason).Replace("FOLDER", path.TrimEnd('/'))
        Errors.input path (sprintf "%s: %s; %s" path reason fix)

/// Decodes a sample's file through the verdict and cuts it: TrimBottom always, the box only when `cropToBox`.
/// Raises an UnusableInput error for a file the verdict refuses; callers decide whether that is fatal.
let load (sample: Sample) (cropToBox: bool) : Image<Rgb24> =
    let img =
        match read sample.Path with
        | Ok(image, _) -> image
        // The loader reports the file's path beside the message.
        | Error reason -> Errors.input sample.Path (explain reason)
    try
        cut sample.TrimBottom (if cropToBox then sample.Box else None) img
    with _ ->
        img.Dispose()
        reraise ()
