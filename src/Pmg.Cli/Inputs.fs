/// Images named on the command line: files, or `embedded:test:5` / `embedded:train:5` for an image of the
/// embedded dataset (so the commands can be tried without any data).
module Pmg.Cli.Inputs

open System.IO
open Pmg.Fs.Data

/// An image that cannot be used, with the reason in words that name it.
exception ImageError of string

let loadImage (name: string) =
    match name.Split ':' with
    | [| "embedded"; split; index |] ->
        let split =
            match split with
            | "train" -> Synthetic.Train
            | "test" -> Synthetic.Test
            | other -> raise (ImageError(sprintf "%s: the split is train or test, not %s" name other))
        match System.Int32.TryParse index with
        | true, i when i >= 0 -> Synthetic.render Synthetic.Config.Default split i
        | _ -> raise (ImageError(sprintf "%s: the index must be a number 0 or more" name))
    | _ when Directory.Exists name -> raise (ImageError(sprintf "%s is a folder: give image files (e.g. %s/*.jpg)" name name))
    | _ when not (File.Exists name) -> raise (ImageError(sprintf "%s: no such file" name))
    | _ ->
        try
            Images.load { Path = name; Label = 0; Box = None; TrimBottom = 0 } false
        with
        | :? SixLabors.ImageSharp.UnknownImageFormatException ->
            raise (ImageError(sprintf "%s is not an image this program can read (JPEG, PNG, BMP, GIF, TIFF, WebP)" name))
        | :? SixLabors.ImageSharp.InvalidImageContentException as e ->
            raise (ImageError(sprintf "%s is damaged: %s" name e.Message))
