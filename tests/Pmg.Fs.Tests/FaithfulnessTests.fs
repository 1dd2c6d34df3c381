/// Where the paper recipe follows the reference implementation's behaviour: jigsaw cycles, BatchNorm over the two
/// GPUs' halves, partial batches skipped, and no accidental training from random weights.
module Pmg.Fs.Tests.FaithfulnessTests

open System
open System.IO
open Expecto
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Training
open Pmg.Fs.Tests.TestKit

/// Patch orders as arrays, one per row.
let private draws (draw: Jigsaw.Draw) (mode: Jigsaw.Permutation) (seed: int) (count: int) (n: int) : int64[][] =
    use gen = new torch.Generator(uint64 seed)
    [| for _ in 1..count do
           use p = Jigsaw.permutations gen mode draw 4 n
           let rows = int p.shape.[0]
           let all = p.data<int64>().ToArray()
           for r in 0 .. rows - 1 -> all.[r * n * n .. (r + 1) * n * n - 1] |]

/// The cycle containing 0 covers every cell: the permutation is one n*n-cycle.
let private isOneCycle (p: int64[]) =
    let rec walk (i: int64) steps = if i = 0L && steps > 0 then steps else walk p.[int i] (steps + 1)
    walk p.[0] 1 = p.Length

[<Tests>]
let tests =
    testList
        "faithful"
        [ test "cycle jigsaws move every patch: one n*n-cycle, for the batch and per sample" {
              for n in [ 2; 4; 8 ] do
                  for mode in [ Jigsaw.PerBatch; Jigsaw.PerSample ] do
                      for p in draws Jigsaw.Cycle mode 3 50 n do
                          Expect.equal (Array.sort p) (Array.init (n * n) int64) "a permutation"
                          Expect.isFalse (p |> Array.indexed |> Array.exists (fun (i, v) -> int64 i = v)) (sprintf "no fixed point (n=%d): %A" n p)
                          Expect.isTrue (isOneCycle p) (sprintf "one cycle (n=%d): %A" n p)
          }

          test "at n = 2 every cycle draw is one of the six 4-cycles, each about a sixth of the time" {
              let ps = draws Jigsaw.Cycle Jigsaw.PerSample 11 600 2
              let counts = ps |> Array.countBy id
              Expect.equal counts.Length 6 (sprintf "six distinct orders: %A" (Array.map fst counts))
              // Chi-square with 5 degrees of freedom: 20.5 is its 0.999 quantile, so a uniform draw fails this one
              // time in a thousand; a uniform permutation (24 orders) or a biased cycle fails it at once.
              let expected = float ps.Length / 6.0
              let chi2 = counts |> Array.sumBy (fun (_, c) -> (float c - expected) ** 2.0 / expected)
              Expect.isLessThan chi2 20.5 (sprintf "chi-square %.1f for counts %A" chi2 (Array.map snd counts))
          }

          test "uniform jigsaws, the option, do keep patches in place sometimes" {
              let ps = draws Jigsaw.Uniform Jigsaw.PerSample 5 200 2
              // A uniform permutation of 4 cells has a fixed point with probability 15/24: 200 draws without one
              // would happen with probability (9/24)^200.
              Expect.isTrue (ps |> Array.exists (fun p -> p |> Array.indexed |> Array.exists (fun (i, v) -> int64 i = v))) "some fixed point"
          }

          test "BatchNorm over groups of 8 normalises each half of 16 on its own, running statistics from the first" {
              use _ = torch.NewDisposeScope()
              torch.manual_seed 4L |> ignore
              let grouped = Layers.batchNorm2d 3L 0.1
              let plain = Layers.batchNorm2d 3L 0.1
              grouped.Group <- Some 8
              let x = torch.randn([| 16L; 3L; 5L; 5L |]).mul(torch.tensor 3.0f).add(torch.tensor 1.0f)
              let y = grouped.forward x
              // By hand: each half normalised with its own mean and biased variance (weight 1, bias 0).
              let half (t: torch.Tensor) =
                  let mean = t.mean([| 0L; 2L; 3L |], keepdim = true)
                  let var = t.var([| 0L; 2L; 3L |], unbiased = false, keepdim = true)
                  t.sub(mean).div(var.add(torch.tensor 1e-5f).sqrt ())
              let expected = torch.cat([| half (x.narrow(0L, 0L, 8L)); half (x.narrow(0L, 8L, 8L)) |], 0L)
              // float32 normalisation of O(1) values: 1e-5 absolute is a few ulps of the results.
              Expect.isTrue (y.allclose(expected, rtol = 0.0, atol = 1e-5)) "each half by itself"
              Expect.isFalse (y.allclose(plain.forward x, rtol = 0.0, atol = 1e-3)) "not the whole batch's normalisation"
              // Running mean after one step: 0.9 * 0 + 0.1 * (the first half's mean).
              let firstMean = x.narrow(0L, 0L, 8L).mean([| 0L; 2L; 3L |])
              Expect.isTrue (grouped.running_mean.allclose(firstMean.mul(torch.tensor 0.1f), rtol = 0.0, atol = 1e-6)) "first half's statistics"
          }

          test "the paper recipe skips a partial last batch, as the reference does; the option trains it" {
              let trained (dropLast: bool) =
                  let data = { Data.Synthetic.Config.Default with Classes = 2; TrainPerClass = 5; TestPerClass = 1; ImageSize = 16 }
                  let e =
                      { Experiment.paper 2 (Experiment.Embedded data) with
                          Model = { Pmg.Config.Paper 2 with Backbone = "resnet18"; Head = { FeatureSize = 16; BlockChannels = 32; BlockBnMomentum = 0.1 } }
                          Weights = Backbone.Scratch
                          BatchSize = 4
                          Epochs = 1
                          Workers = 1
                          Input = { Resize = 16; Crop = 16; Padding = 0 }
                          DropLast = dropLast }
                  use dir = new TempDir "droplast"
                  let summary = Run.train e dir.Path false Trainer.Hooks.None
                  // The throughput counts the images trained: 10 images in batches of 4, 4 and 2.
                  let r = List.head summary.History
                  r.ImagesPerSecond * r.Seconds
              Expect.floatClose Accuracy.medium (trained true) 8.0 "the two full batches"
              Expect.floatClose Accuracy.medium (trained false) 10.0 "every batch"
          }

          test "offline with an empty cache, the paper recipe is refused naming torchvision's file; --pretrained none trains" {
              let root = FgvcMini.dataset "CUB_200_2011"
              use dir = new TempDir "refuse"
              let out = Path.Combine(dir.Path, "run")
              let refused = pmg [ "train"; "--dataset"; "cub"; "--root"; root; "--epochs"; "1"; "--batch-size"; "4"; "--out"; out ]
              Expect.notEqual refused.Code 0 "refused"
              // The suite runs offline with an empty PyTorch cache (Main.fs).
              Expect.stringContains refused.Err "random weights" "names the other choice"
              Expect.stringContains refused.Err "--pretrained none" "and its flag"
              Expect.stringContains refused.Err "resnet50-19c8e357.pth" "names the file"
              Expect.isFalse (Directory.Exists out) "nothing written"
              let ok =
                  pmg [ "train"; "--dataset"; "cub"; "--root"; root; "--pretrained"; "none"; "--backbone"; "resnet18"; "--epochs"; "1"
                        "--image-size"; "32"; "--batch-size"; "4"; "--workers"; "1"; "--out"; out ]
              Expect.equal ok.Code 0 ok.Err
              let config = File.ReadAllText(Path.Combine(out, "config.json"))
              Expect.stringContains config "\"Weights\": \"Scratch\"" "config.json records the weights"
          } ]
