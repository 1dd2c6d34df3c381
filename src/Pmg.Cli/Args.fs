/// The command line, declared with Argu: one union per subcommand, and the parsing of flag values.
module Pmg.Cli.Args

open System
open Argu

/// A flag with a value it cannot take: exit code 2, like Argu's own usage errors.
exception BadFlag of string

/// The flag that sets a library setting, for messages.
let flagOf (s: Pmg.Fs.Setting) : string =
    match s with
    | Pmg.Fs.Setting.Dataset -> "--dataset"
    | Pmg.Fs.Setting.Root -> "--root"
    | Pmg.Fs.Setting.Level -> "--level"
    | Pmg.Fs.Setting.Backbone -> "--backbone"
    | Pmg.Fs.Setting.Weights -> "--pretrained"
    | Pmg.Fs.Setting.Epochs -> "--epochs"
    | Pmg.Fs.Setting.WarmupEpochs -> "--warmup-epochs"
    | Pmg.Fs.Setting.BatchSize -> "--batch-size"
    | Pmg.Fs.Setting.ImageSize -> "--image-size"
    | Pmg.Fs.Setting.Resize -> "--resize"
    | Pmg.Fs.Setting.Padding -> "--image-size"
    | Pmg.Fs.Setting.LearningRate -> "--lr"
    | Pmg.Fs.Setting.BackboneLearningRate -> "--backbone-lr"
    | Pmg.Fs.Setting.Heads -> "--heads"
    | Pmg.Fs.Setting.Grids -> "--grids"
    | Pmg.Fs.Setting.BatchNormGroup -> "--bn-group"
    | Pmg.Fs.Setting.Workers -> "--workers"
    | Pmg.Fs.Setting.Seed -> "--seed"
    | Pmg.Fs.Setting.Device -> "--device"
    | Pmg.Fs.Setting.Precision -> "--precision"
    | Pmg.Fs.Setting.Classes -> "--classes"
    | Pmg.Fs.Setting.TopK -> "--top-k"
    | Pmg.Fs.Setting.Image -> "IMAGE"
    | Pmg.Fs.Setting.Checkpoint -> "--checkpoint"
    | Pmg.Fs.Setting.ModelPath -> "--checkpoint"
    | Pmg.Fs.Setting.Output -> "--out"
    | Pmg.Fs.Setting.Resume -> "--resume"
    | Pmg.Fs.Setting.Format -> "--to"
    | Pmg.Fs.Setting.Engine -> "--engine"
    | Pmg.Fs.Setting.Iterations -> "--iterations"
    | Pmg.Fs.Setting.Init -> "--init"
    | Pmg.Fs.Setting.PatchOrder -> "--patch-order"
    | Pmg.Fs.Setting.PartialBatches -> "--partial-batches"
    | Pmg.Fs.Setting.Forward -> "--forward"
    | Pmg.Fs.Setting.Update -> "--update"
    | Pmg.Fs.Setting.Distributed -> "--distributed"
/// A count with its noun, singular for one: `counted 1 "epoch"` is "1 epoch", `counted 8 "class"` "8 classes".
let counted (n: int) (noun: string) : string =
    sprintf "%d %s%s" n noun (if n = 1 then "" elif noun.EndsWith "s" then "es" else "s")

/// A flag's value among named choices (case-insensitive).
let choose (flag: string) (choices: (string * 'T) list) (value: string) : 'T =
    match choices |> List.tryFind (fun (name, _) -> name = value.Trim().ToLowerInvariant()) with
    | Some(_, x) -> x
    | None -> raise (BadFlag(sprintf "%s %s: use %s" flag value (choices |> List.map fst |> String.concat " or ")))

/// A comma list of positive integers, e.g. `--grids 8,4,2`.
let positiveInts (flag: string) (value: string) : int list =
    value.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
    |> Array.map (fun s ->
        match Int32.TryParse s with
        | true, n when n >= 1 -> n
        | _ -> raise (BadFlag(sprintf "%s %s: give positive integers separated by commas, e.g. 8,4,2" flag value)))
    |> List.ofArray

/// An integer flag within bounds.
let within (flag: string) (lo: int) (hi: int) (value: int) : int =
    if value < lo || value > hi then raise (BadFlag(sprintf "%s %d: must be %d..%d" flag value lo hi))
    value

/// The device flag's value (a bad one is an InvalidSetting the CLI reports with the flag).
let device (value: string) : Pmg.Fs.Runtime.Device = Pmg.Fs.Runtime.Device.parse value

/// The flags that load a trained model (eval, predict, cam) say the same thing everywhere; Argu cannot share union
/// cases between commands, so the texts are shared instead.
module private LoadFlags =
    let paper = Pmg.Fs.Experiment.paper 2 Pmg.Fs.Experiment.embedded.Data
    let checkpoint = "a Pmg.Fs checkpoint (.ckpt) or a PyTorch state_dict (.pth) with the reference's key names."
    let backbone = sprintf "backbone of a .pth checkpoint (default %s)." paper.Model.Backbone
    let classes = "class count of a .pth checkpoint (default: read from it; checked against a .ckpt)."
    let imageSize = sprintf "crop size (default: the checkpoint's, %d for .pth)." paper.Input.Crop
    let device = "cpu (default), cuda or cuda:N."
    let images = "image files, or embedded:test:N / embedded:train:N."

type TrainArgs =
    | Dataset of name: string
    | Root of dir: string
    | Level of level: string
    | Backbone of name: string
    | Epochs of n: int
    | Warmup_Epochs of n: int
    | Batch_Size of n: int
    | Image_Size of px: int
    | Resize of px: int
    | Lr of lr: float
    | Backbone_Lr of lr: float
    | Heads of s: int
    | Grids of list: string
    | Per_Sample_Jigsaw
    | Patch_Order of draw: string
    | Bn_Group of images: string
    | Partial_Batches of mode: string
    | Forward of mode: string
    | Update of mode: string
    | Precision of p: string
    | Seed of n: int
    | Device of device: string
    | Pretrained of weights: string
    | Crop_To_Box
    | Init of file: string
    | Workers of n: int
    | Distributed of backend: string
    | Out of dir: string
    | Resume
    | No_Tensorboard

    interface IArgParserTemplate with
        member a.Usage =
            // Defaults are read from the recipes, so the help cannot drift from them.
            let p = Pmg.Fs.Experiment.paper 2 Pmg.Fs.Experiment.embedded.Data
            let m = Pmg.Fs.Experiment.embedded
            match a with
            | Dataset _ -> "embedded (default), cub, cars, aircraft, dogs or folder."
            | Root _ -> "dataset root folder (its official layout)."
            | Level _ -> "FGVC-Aircraft label level: variant (default), family or manufacturer."
            | Backbone _ ->
                sprintf "%s (default %s; %s on the embedded dataset)."
                    (Pmg.Fs.Model.Backbone.registry.Keys |> String.concat ", ") p.Model.Backbone m.Model.Backbone
            | Epochs _ -> sprintf "epochs (default %d; %d on the embedded dataset)." p.Epochs m.Epochs
            | Warmup_Epochs _ -> sprintf "first epochs train only the concat classifier on whole images (default %d)." p.WarmupEpochs
            | Batch_Size _ -> sprintf "batch size (default %d)." p.BatchSize
            | Image_Size _ ->
                sprintf "crop size in pixels (default %d; %d on the embedded dataset); the resize keeps the recipe's ratio (%d/%d)."
                    p.Input.Crop m.Input.Crop p.Input.Resize p.Input.Crop
            | Resize _ -> "resize before cropping (default: from the image size, see --image-size)."
            | Lr _ ->
                sprintf "learning rate of the new layers (default %g; %g on the embedded dataset); the backbone's follows at x%g."
                    p.Optimizer.Lr m.Optimizer.Lr Pmg.Fs.Experiment.backboneLrFactor
            | Backbone_Lr _ -> sprintf "learning rate of the backbone (default %g, or --lr x %g)." p.Optimizer.BackboneLr Pmg.Fs.Experiment.backboneLrFactor
            | Heads _ -> sprintf "number of granularity heads S (default %d)." p.Model.Heads
            | Grids _ -> "jigsaw grid per head, finest first, e.g. 8,4,2 (default 2^(L-l+1))."
            | Per_Sample_Jigsaw -> "one patch permutation per sample (default: one per batch, like the reference)."
            | Patch_Order _ ->
                sprintf "cycle (every patch moves, as the reference's cell swaps) or uniform (any permutation); default %s, %s on the embedded dataset."
                    ((sprintf "%A" p.JigsawDraw).ToLowerInvariant()) ((sprintf "%A" m.JigsawDraw).ToLowerInvariant())
            | Bn_Group _ ->
                sprintf "BatchNorm while training normalises groups of at most this many images, as the reference's two-GPU DataParallel (default %s; %s on the embedded dataset), or none (the whole batch)."
                    (p.BatchNormGroup |> Option.map string |> Option.defaultValue "none")
                    (m.BatchNormGroup |> Option.map string |> Option.defaultValue "none")
            | Partial_Batches _ -> "skip (a last batch smaller than the batch size is not trained, as the reference; default) or train."
            | Forward _ -> "full (every step runs the whole network, as the reference; the paper recipe's) or truncated (granularity steps run the backbone only up to their stage: same gradients, less work; the embedded default)."
            | Update _ -> "progressive (one optimizer step per schedule step, as the paper; default) or joint (all steps' losses summed, one optimizer step per iteration: the paper's ablation)."
            | Precision _ -> "fp32 (default) or bf16 (bf16 compute under libtorch's autocast, fp32 weights, gradients and optimizer state)."
            | Seed _ -> sprintf "random seed (default %d)." p.Seed
            | Device _ -> "cpu (default), cuda or cuda:N."
            | Pretrained _ -> "the backbone's starting weights: imagenet (default: torchvision's file, fetched once into PyTorch's hub cache and hash-checked; resnet18-mlnet's ship), none (random), or a file: a torchvision state_dict (.pth, .safetensors), a Pmg.Fs checkpoint (its backbone) or an ONNX ResNet. PMG_OFFLINE=1 forbids downloads."
            | Crop_To_Box -> "crop each image to its bounding box (CUB, Cars, Aircraft, Dogs)."
            | Init _ -> "start every weight from a whole trained PMG model (a .ckpt, or a reference .pth): fine-tuning on new data."
            | Workers _ -> "image decoding threads (default: cores - 1)."
            | Distributed _ -> "none (default), mpi or nccl: data-parallel over the processes `mpirun -np K` starts, each with the same flags; each trains its 1/K of every batch (BatchNorm per process), rank 0 writes the run. nccl: CUDA, one process per GPU (device cuda:LOCAL_RANK)."
            | Out _ -> "run directory (default runs/<dataset>-<backbone>-<time>); never overwritten."
            | No_Tensorboard -> "write no TensorBoard event files (they are written by default: tensorboard --logdir runs/)."
            | Resume -> "continue the run in --out (the same settings); a run killed at any moment continues, or completes its missing files."

type EvalArgs =
    | [<Mandatory>] Checkpoint of file: string
    | Dataset of name: string
    | Root of dir: string
    | Level of level: string
    | Backbone of name: string
    | Classes of n: int
    | Image_Size of px: int
    | Resize of px: int
    | Batch_Size of n: int
    | Device of device: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> LoadFlags.checkpoint
            | Dataset _ -> "dataset to evaluate on (default: the checkpoint's)."
            | Root _ -> "dataset root."
            | Level _ -> "FGVC-Aircraft label level."
            | Backbone _ -> LoadFlags.backbone
            | Classes _ -> LoadFlags.classes
            | Image_Size _ -> LoadFlags.imageSize
            | Resize _ -> "resize before the centre crop."
            | Batch_Size _ -> "batch size (default 16)."
            | Device _ -> LoadFlags.device

type PredictArgs =
    | Checkpoint of file: string
    | Onnx of file: string
    | Backbone of name: string
    | Classes of n: int
    | Image_Size of px: int
    | Resize of px: int
    | Top_K of k: int
    | Logits
    | Json
    | Device of device: string
    | [<MainCommand; Mandatory>] Images of image: string list

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> LoadFlags.checkpoint
            | Onnx _ -> "an ONNX model from `pmg export --to onnx`, run by ONNX Runtime (instead of --checkpoint)."
            | Backbone _ -> LoadFlags.backbone
            | Classes _ -> LoadFlags.classes
            | Image_Size _ -> LoadFlags.imageSize
            | Resize _ -> "resize before the centre crop; equal to --image-size keeps the pixels of an image of that size."
            | Top_K _ -> "classes to list (default 5)."
            | Logits -> "also print every head's logits."
            | Json -> "one JSON object per line."
            | Device _ -> LoadFlags.device
            | Images _ -> LoadFlags.images

type ExportArgs =
    | [<Mandatory>] Checkpoint of file: string
    | [<Mandatory>] To of format: string
    | [<Mandatory>] Out of file: string
    | Image_Size of px: int

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "a Pmg.Fs checkpoint."
            | To _ -> "pytorch (a state_dict the reference PMG model loads with strict=True) or onnx (the eval-mode network for ONNX Runtime: every head, concat and combined; dynamic batch; class names and preprocessing in its metadata)."
            | Out _ -> "output file (.pth or .onnx)."
            | Image_Size _ -> "onnx: the input size the graph is written for (default: the checkpoint's crop)."

type BenchArgs =
    | Device of device: string
    | Backbone of name: string
    | Batch_Size of n: int
    | Image_Size of px: int
    | Precision of p: string
    | Mode of mode: string
    | Iterations of k: int
    | Warmup of k: int
    | Classes of n: int
    | Engine of features: string
    | Ladder
    | Data
    | Workers of n: int

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Device _ -> "cpu (default) or cuda."
            | Backbone _ -> "backbone (default resnet50)."
            | Batch_Size _ -> "batch size (default 16)."
            | Image_Size _ -> sprintf "input size (default %d)." LoadFlags.paper.Input.Crop
            | Precision _ -> "fp32 (default) or bf16 (mixed: bf16 compute, fp32 weights and optimizer state)."
            | Engine _ -> "default (the device's), plain (none), or a comma list of flat, nhwc, benchmark, tf32, pinned."
            | Ladder -> "one child process per cumulative change (plain fp32, +flat, +benchmark/tf32, +nhwc, +bf16), then a table."
            | Mode _ -> "train (all progressive steps, default) or eval."
            | Iterations _ -> "timed iterations (default 10)."
            | Warmup _ -> "untimed iterations first (default 3)."
            | Classes _ -> "classes (default 200)."
            | Data -> "time JPEG decoding + augmentation instead of the network."
            | Workers _ -> "decoding threads for --data (default 1: per core)."

type DataArgs =
    | [<Mandatory>] Dataset of name: string
    | [<Mandatory>] Root of dir: string
    | Level of level: string
    | Json

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Dataset _ -> "cub, cars, aircraft, dogs or folder."
            | Root _ -> "dataset root folder."
            | Level _ -> "FGVC-Aircraft label level."
            | Json -> "print one JSON object."

type CamArgs =
    | [<Mandatory>] Checkpoint of file: string
    | [<Mandatory>] Out of dir: string
    | Class of k: int
    | Class_Names of file: string
    | Backbone of name: string
    | Classes of n: int
    | Image_Size of px: int
    | Device of device: string
    | [<MainCommand; Mandatory>] Images of image: string list

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> LoadFlags.checkpoint
            | Out _ -> "folder for the montages (<image>-cam.png)."
            | Class _ -> "class to explain (default: the class the combined logits predict)."
            | Class_Names _ -> "class names, one a line (default: classes.txt beside the checkpoint)."
            | Backbone _ -> LoadFlags.backbone
            | Classes _ -> LoadFlags.classes
            | Image_Size _ -> LoadFlags.imageSize
            | Device _ -> LoadFlags.device
            | Images _ -> LoadFlags.images

type JigsawArgs =
    | [<MainCommand; Mandatory>] Image of image: string
    | [<Mandatory>] Out of file: string
    | Heads of s: int
    | Grids of list: string
    | Image_Size of px: int
    | Seed of n: int

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Image _ -> "image file."
            | Out _ -> "PNG to write."
            | Heads _ -> "granularity steps S, with the paper's grids for them (default 3: 8, 4, 2, then the whole image)."
            | Grids _ -> "jigsaw grid per granularity step instead, finest first, e.g. 8,4,2 (the whole image is added)."
            | Image_Size _ -> sprintf "crop size (default %d)." LoadFlags.paper.Input.Crop
            | Seed _ -> "seed of the patch permutations (default 0)."

type ReportArgs =
    | [<MainCommand; Mandatory>] Runs of dir: string list
    | Out of file: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Runs _ -> "run directories (each with config.json and metrics.csv)."
            | Out _ -> "Markdown file to write (default report.md); the plot goes beside it."

type Command =
    | [<CliPrefix(CliPrefix.None)>] Train of ParseResults<TrainArgs>
    | [<CliPrefix(CliPrefix.None)>] Eval of ParseResults<EvalArgs>
    | [<CliPrefix(CliPrefix.None)>] Predict of ParseResults<PredictArgs>
    | [<CliPrefix(CliPrefix.None)>] Export of ParseResults<ExportArgs>
    | [<CliPrefix(CliPrefix.None)>] Bench of ParseResults<BenchArgs>
    | [<CliPrefix(CliPrefix.None)>] Data of ParseResults<DataArgs>
    | [<CliPrefix(CliPrefix.None)>] Cam of ParseResults<CamArgs>
    | [<CliPrefix(CliPrefix.None)>] Jigsaw of ParseResults<JigsawArgs>
    | [<CliPrefix(CliPrefix.None)>] Report of ParseResults<ReportArgs>

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Train _ -> "train PMG (on the embedded dataset unless --dataset is given)."
            | Eval _ -> "evaluate a checkpoint: top-1 of every head, concat, combined; top-5 of combined."
            | Predict _ -> "classify images with a checkpoint or an exported ONNX model (class names from classes.txt or the model)."
            | Export _ -> "write a checkpoint as a PyTorch state_dict (.pth, the reference's key names) or an ONNX model (.onnx, for ONNX Runtime)."
            | Bench _ -> "time training iterations or inference on synthetic tensors, or the data pipeline."
            | Data _ -> "inspect a dataset: counts and unusable images."
            | Cam _ -> "Grad-CAM of every head for images, as PNG montages."
            | Jigsaw _ -> "show the jigsaw inputs of each schedule step."
            | Report _ -> "compare run directories in one Markdown report."
