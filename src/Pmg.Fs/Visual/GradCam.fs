/// Grad-CAM (Selvaraju et al., 2017) of PMG's outputs: for a class c and the feature maps A (C x h x w) an output
/// reads, w_k = mean over h, w of d logit_c / d A_k, cam = relu(sum_k w_k A_k), computed with autograd.
module Pmg.Fs.Visual.GradCam

open TorchSharp
open type TorchSharp.torch
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators
open Pmg.Fs.Model

/// The map of one output for one class, at input resolution, scaled to [0, 1].
type HeadMap =
    { /// "stage3", "stage4", "stage5" or "concat".
      Head: string
      /// The explained class (0-based).
      Class: int
      /// Softmax probability of Class under this output's logits.
      Score: float
      /// Rows x columns of the input image.
      Map: float32[,]
      /// Rows x columns of the features the map was computed on (1 x 1 carries no spatial detail).
      Cells: int * int }

/// Every output's map for the class explained.
type Explanation =
    { /// The predicted class (argmax of combined logits) or the one asked for.
      Class: int
      /// Softmax probability of Class under the combined logits.
      Combined: float
      /// One map per granularity head, finest first, then concat's.
      Maps: HeadMap list }

let private toArray2D (t: Tensor) : float32[,] =
    let h, w = int t.shape.[t.shape.Length - 2], int t.shape.[t.shape.Length - 1]
    let v = Pmg.Fs.Runtime.Ops.hostFloats t
    Array2D.init h w (fun i j -> v.[i * w + j])

/// Raw (unscaled) Grad-CAM as a (1, 1, h, w) tensor. The features are copied into a fresh leaf so that the
/// gradient stops there and nothing accumulates into the network's parameters.
let private camTensor (features: Tensor) (logitsOf: Tensor -> Tensor) (cls: int) : Tensor =
    use _ = torch.enable_grad ()
    let a = features.detach().clone().requires_grad_ true
    let logits = logitsOf a
    let target = logits.select(0L, 0L).select(0L, int64 cls)
    let grads = torch.autograd.grad ([| target |], [| a |])
    let weights = grads.[0].mean ([| 2L; 3L |], keepdim = true)
    (weights * a).sum(1L, keepdim = true).relu().detach ()

/// Grad-CAM of `logitsOf` (features -> (1, classes) logits) for class `cls`, on features (1, C, h, w):
/// the h x w map, not rescaled.
let ofFeatures (features: Tensor) (logitsOf: Tensor -> Tensor) (cls: int) : float32[,] =
    use _ = torch.NewDisposeScope()
    camTensor features logitsOf cls |> toArray2D

/// Spread below this share of the peak counts as flat: interpolation leaves rounding noise on constant maps.
let private flatTolerance = 1e-4f

/// Bilinear upsampling to rows x cols, then min-max scaling to [0, 1]. A flat map (no evidence, or a 1 x 1
/// feature map) is all 0: it says nothing about where.
let private toImage (rows: int64) (cols: int64) (cam: Tensor) : float32[,] =
    let up = nn.functional.interpolate (cam, size = [| rows; cols |], mode = InterpolationMode.Bilinear, align_corners = false)
    let lo, hi = up.min().item<float32> (), up.max().item<float32> ()
    let m = toArray2D up
    let range = hi - lo
    if range <= flatTolerance * abs hi || range = 0.0f then Array2D.zeroCreate (Array2D.length1 m) (Array2D.length2 m)
    else m |> Array2D.map (fun v -> (v - lo) / range)

let private probability (logits: Tensor) (cls: int) =
    (logits.softmax 1L).select(0L, 0L).select(0L, int64 cls).item<float32> () |> float

/// Grad-CAM of every granularity head (on the backbone stage it reads) and of concat (on the last stage) for
/// `cls`, or the class the combined logits predict. `x` is one preprocessed image (1, 3, H, W) on the
/// network's device. Puts the network in eval mode.
let forNetwork (net: Pmg.Network) (x: Tensor) (cls: int option) : Explanation =
    net.eval ()
    use _ = torch.NewDisposeScope()
    let stagesOut =
        use _ = torch.no_grad ()
        net.Backbone.ForwardStages x
    let outputs =
        use _ = torch.no_grad ()
        net.FromStages stagesOut
    let cls = cls |> Option.defaultWith (fun () -> (outputs.Combined.argmax 1L).item<int64> () |> int)
    let classes = net.Config.Classes
    if cls < 0 || cls >= classes then
        invalidArg (nameof cls) (sprintf "class %d is outside 0..%d" cls (classes - 1))
    let replaced (index: int) (leaf: Tensor) = stagesOut |> List.mapi (fun j s -> if j = index then leaf else s)
    let rows, cols = x.shape.[2], x.shape.[3]
    let explain (name: string) (index: int) (pick: Pmg.Outputs -> Tensor) (logits: Tensor) =
        let cam = camTensor stagesOut.[index] (fun leaf -> replaced index leaf |> net.FromStages |> pick) cls
        { Head = name
          Class = cls
          Score = probability logits cls
          Map = toImage rows cols cam
          Cells = int cam.shape.[2], int cam.shape.[3] }
    // The head on stage l reads stagesOut.[l - 1]; concat is explained on the last stage.
    let heads =
        List.zip (Pmg.headNames net.Config) net.HeadStages
        |> List.mapi (fun i (name, (l, _)) -> explain name (l - 1) (fun o -> o.Heads.[i]) outputs.Heads.[i])
    let concat = explain "concat" (List.length stagesOut - 1) (fun o -> o.Concat) outputs.Concat
    { Class = cls; Combined = probability outputs.Combined cls; Maps = heads @ [ concat ] }
