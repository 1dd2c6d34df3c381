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
    | _ ->
        // Files get the one verdict training and `data` give them (content sniffed, truncation and lying headers
        // refused); its error names the file, the reason and the fix.
        try
            Images.loadChecked name
        with :? Pmg.Fs.PmgException as e ->
            raise (ImageError e.Message)
