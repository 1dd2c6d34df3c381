/// Images named on the command line: files, or `embedded:test:5` / `embedded:train:5` for an image of the
/// embedded dataset (so the commands can be tried without any data).
module Pmg.Cli.Inputs

open Pmg.Fs.Data

let loadImage (name: string) =
    match name.Split ':' with
    | [| "embedded"; split; index |] ->
        let split =
            match split with
            | "train" -> Synthetic.Train
            | "test" -> Synthetic.Test
            | other -> failwithf "%s: the split is train or test, not %s" name other
        Synthetic.render Synthetic.Config.Default split (int index)
    | _ -> Images.load { Path = name; Label = 0; Box = None; TrimBottom = 0 } false
