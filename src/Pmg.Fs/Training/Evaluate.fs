/// Evaluation: top-1 of every head, of concat and of the combined sum, top-5 of combined; per-class counts.
module Pmg.Fs.Training.Evaluate

open TorchSharp
open Pmg.Fs.Runtime
open Pmg.Fs.Model

/// Accuracies in [0, 1].
type Accuracy =
    { /// Top-1 of each granularity head, finest first.
      Heads: float list
      /// Top-1 of the classifier on the concatenated features.
      Concat: float
      /// Top-1 of the sum of every head's and concat's logits (the paper's ensemble).
      Combined: float
      /// Top-5 of the combined logits.
      CombinedTop5: float
      /// Images evaluated; every accuracy is 0 when there were none.
      Images: int
      /// Rows: true class, columns: combined prediction.
      Confusion: int[,]
      /// (file, reason) of each image left out because it could not be used; not counted in Images.
      Skipped: (string * string) list }

/// Correct top-k predictions in a batch, as a device scalar (no host sync).
let correctTopK (k: int) (logits: torch.Tensor) (labels: torch.Tensor) : torch.Tensor =
    let k = min k (int logits.shape.[1])
    let struct (_, top) = logits.topk (k, dim = 1)
    top.eq(labels.unsqueeze 1L).any(1L).sum ()

/// Where the forward of a network runs in bf16 (libtorch's autocast) for `Bf16`; nothing for `Fp32`.
let computeRegion (precision: Pmg.Fs.Experiment.Precision) (device: torch.Device) : System.IDisposable =
    match precision with
    | Pmg.Fs.Experiment.Bf16 -> Pmg.Fs.Runtime.Switches.autocastBf16 device
    | Pmg.Fs.Experiment.Fp32 -> { new System.IDisposable with member _.Dispose() = () }

/// Evaluates `net` in eval mode without gradients over batches of (images, labels) already on its device, the
/// forward in the given precision.
let run (precision: Pmg.Fs.Experiment.Precision) (net: Pmg.Network) (classes: int) (batches: seq<torch.Tensor * torch.Tensor>) : Accuracy =
    net.eval ()
    use _ = torch.no_grad ()
    let heads = net.Config.Heads
    // Running counts live on the device; read once at the end.
    let device = (net.parameters () |> Seq.head).device
    use counts = torch.zeros ([| int64 (heads + 3) |], dtype = torch.int64, device = device)
    use confusion = torch.zeros ([| int64 classes * int64 classes |], dtype = torch.int64, device = device)
    let mutable images = 0
    for x, y in batches do
        use _ = torch.NewDisposeScope()
        // The batch was made outside this scope: it is this iteration's to free.
        use x = x
        use y = y
        let out =
            use _ = computeRegion precision device
            net.forward x
        // Scores are compared and summed in fp32 whatever the forward ran in.
        let out: Pmg.Outputs = { Heads = out.Heads |> List.map (fun h -> h.to_type torch.float32); Concat = out.Concat.to_type torch.float32; Stages = out.Stages }
        let combined = out.Combined
        let correct =
            [| yield! out.Heads |> List.map (fun h -> correctTopK 1 h y)
               correctTopK 1 out.Concat y
               correctTopK 1 combined y
               correctTopK 5 combined y |]
        Ops.addInPlace counts (torch.stack correct) |> ignore
        let pred = combined.argmax 1L
        let cell = Ops.add (Ops.scalarInt (int64 classes) (fun (k: Scalar) -> y.mul k)) pred
        Ops.scalarInt 1L (fun one -> confusion.index_add_ (0L, cell, torch.ones_like pred, one)) |> ignore
        images <- images + int x.shape.[0]
    let c = (use host = counts.cpu () in host.data<int64>().ToArray())
    let m = (use host = confusion.cpu () in host.data<int64>().ToArray())
    let frac (n: int64) = if images = 0 then 0.0 else float n / float images
    { Heads = [ for i in 0 .. heads - 1 -> frac c.[i] ]
      Concat = frac c.[heads]
      Combined = frac c.[heads + 1]
      CombinedTop5 = frac c.[heads + 2]
      Images = images
      Confusion = Array2D.init classes classes (fun i j -> int m.[i * classes + j])
      Skipped = [] }

/// Mean of per-class accuracies (FGVC-Aircraft's official metric), from the confusion matrix.
let meanPerClass (a: Accuracy) : float =
    let n = Array2D.length1 a.Confusion
    let perClass =
        [ for i in 0 .. n - 1 do
              let total = Seq.sum (seq { for j in 0 .. n - 1 -> a.Confusion.[i, j] })
              if total > 0 then float a.Confusion.[i, i] / float total ]
    if perClass.IsEmpty then 0.0 else List.average perClass

/// The results table in Markdown: every head by name, concat, combined (with top-5).
let table (headNames: string list) (a: Accuracy) : string =
    let pct = Pmg.Fs.Format.percent
    let rows =
        [ yield! List.zip headNames a.Heads |> List.map (fun (name, acc) -> name, pct acc, "")
          "concat", pct a.Concat, ""
          "combined", pct a.Combined, pct a.CombinedTop5 ]
    [ "| output   | top-1  | top-5  |"
      "|----------|--------|--------|"
      yield! rows |> List.map (fun (name, t1, t5) -> sprintf "| %-8s | %s | %-6s |" name t1 t5) ]
    |> String.concat "\n"
