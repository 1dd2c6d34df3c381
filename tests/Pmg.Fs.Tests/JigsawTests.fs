module Pmg.Fs.Tests.JigsawTests

open Expecto
open TorchSharp
open Pmg.Fs

/// A batch whose every pixel value is unique, so patches can be told apart.
let private distinct (b: int64) (h: int64) (w: int64) =
    let n = b * 3L * h * w
    torch.tensor(Array.init (int n) float32, dimensions = System.ReadOnlySpan [| b; 3L; h; w |])

/// The patches of one image as sorted lists of their values (row-major over the grid).
let private patches (n: int) (img: torch.Tensor) =
    let ph, pw = img.shape.[1] / int64 n, img.shape.[2] / int64 n
    [ for r in 0 .. n - 1 do
          for c in 0 .. n - 1 ->
              img.narrow(1L, int64 r * ph, ph).narrow(2L, int64 c * pw, pw).contiguous().data<float32>().ToArray() ]

let private gen seed = new torch.Generator(uint64 seed)

[<Tests>]
let tests =
    testList
        "jigsaw"
        [ test "every patch is kept: the output's patches are a permutation of the input's" {
              use _ = torch.NewDisposeScope()
              let x = distinct 2L 32L 32L
              for n in [ 2; 4; 8 ] do
                  let y = Jigsaw.shuffle (gen 1) Jigsaw.PerBatch Jigsaw.Cycle n x
                  for i in 0L .. 1L do
                      let before = patches n x.[i] |> List.map List.ofArray |> List.sort
                      let after = patches n y.[i] |> List.map List.ofArray |> List.sort
                      Expect.equal after before (sprintf "n=%d sample %d" n i)
                  Expect.isFalse (TestKit.same y x) (sprintf "n=%d actually moves patches" n)
          }
          test "n = 1 is the identity" {
              use _ = torch.NewDisposeScope()
              let x = distinct 2L 17L 23L
              Expect.isTrue (TestKit.same (Jigsaw.shuffle (gen 0) Jigsaw.PerBatch Jigsaw.Cycle 1 x) x) "unchanged"
          }
          test "same seed, same output; another seed, another output" {
              use _ = torch.NewDisposeScope()
              let x = distinct 3L 32L 32L
              let a = Jigsaw.shuffle (gen 7) Jigsaw.PerSample Jigsaw.Cycle 4 x
              let b = Jigsaw.shuffle (gen 7) Jigsaw.PerSample Jigsaw.Cycle 4 x
              let c = Jigsaw.shuffle (gen 8) Jigsaw.PerSample Jigsaw.Cycle 4 x
              Expect.isTrue (TestKit.same a b) "same seed"
              Expect.isFalse (TestKit.same a c) "different seed"
          }
          test "per batch: every sample gets the same permutation; per sample: they differ" {
              use _ = torch.NewDisposeScope()
              let one = distinct 1L 16L 16L
              let x = one.expand(6L, 3L, 16L, 16L).contiguous ()
              let batch = Jigsaw.shuffle (gen 3) Jigsaw.PerBatch Jigsaw.Cycle 4 x
              for i in 1L .. 5L do
                  Expect.isTrue (TestKit.same (batch.[i]) batch.[0L]) "same arrangement"
              let sample = Jigsaw.shuffle (gen 3) Jigsaw.PerSample Jigsaw.Cycle 4 x
              let distinctRows = [ for i in 0L .. 5L -> sample.[i].sum().item<float32> (), sample.[i].[0L, 0L, 0L].item<float32> () ] |> List.distinct
              Expect.isGreaterThan distinctRows.Length 1 "different arrangements"
          }
          test "sizes not divisible by n: the leftover border stays in place, the rest is a permutation" {
              use _ = torch.NewDisposeScope()
              let x = distinct 1L 35L 37L
              let y = Jigsaw.shuffle (gen 5) Jigsaw.PerBatch Jigsaw.Cycle 8 x
              Expect.sequenceEqual y.shape x.shape "shape kept"
              // 35 = 8*4 + 3 rows, 37 = 8*4 + 5 columns.
              Expect.isTrue (TestKit.same (y.narrow(2L, 32L, 3L)) (x.narrow (2L, 32L, 3L))) "bottom rows"
              Expect.isTrue (TestKit.same (y.narrow(3L, 32L, 5L)) (x.narrow (3L, 32L, 5L))) "right columns"
              let core (t: torch.Tensor) = t.[0L].narrow(1L, 0L, 32L).narrow(2L, 0L, 32L)
              let before = patches 8 (core x) |> List.map List.ofArray |> List.sort
              let after = patches 8 (core y) |> List.map List.ofArray |> List.sort
              Expect.equal after before "core patches permuted"
          }
          test "an image smaller than n pixels is returned unchanged" {
              use _ = torch.NewDisposeScope()
              let x = distinct 1L 5L 5L
              Expect.isTrue (TestKit.same (Jigsaw.shuffle (gen 0) Jigsaw.PerBatch Jigsaw.Cycle 8 x) x) "unchanged"
          } ]
