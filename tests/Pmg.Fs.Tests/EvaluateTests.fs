/// Evaluation metrics on hand-made logits and confusion matrices, where the right answer is known by hand.
module Pmg.Fs.Tests.EvaluateTests

open Expecto
open TorchSharp
open Pmg.Fs.Training

let private count (t: torch.Tensor) = t.item<int64> () |> int

[<Tests>]
let tests =
    testList
        "evaluate"
        [ test "top-1 and top-5 count the label among the k highest logits" {
              use _ = torch.NewDisposeScope()
              // Six classes; the label ranks 1st, 2nd and 6th in the three rows.
              let logits =
                  torch.tensor (
                      array2D [ [ 9.0f; 1.0f; 2.0f; 3.0f; 4.0f; 5.0f ]
                                [ 1.0f; 8.0f; 9.0f; 2.0f; 3.0f; 4.0f ]
                                [ 6.0f; 5.0f; 4.0f; 3.0f; 2.0f; 1.0f ] ]
                  )
              let labels = torch.tensor [| 0L; 1L; 5L |]
              Expect.equal (count (Evaluate.correctTopK 1 logits labels)) 1 "top-1: the first row only"
              Expect.equal (count (Evaluate.correctTopK 2 logits labels)) 2 "top-2: the second row too"
              Expect.equal (count (Evaluate.correctTopK 5 logits labels)) 2 "top-5: the last row's label ranks 6th"
              Expect.equal (count (Evaluate.correctTopK 10 logits labels)) 3 "k above the class count: every label is in"
          }
          test "mean per-class accuracy weighs classes equally, unlike top-1" {
              // Class 0: 8 of 10 right; class 1: 1 of 2; class 2: no test image (left out of the mean).
              let a: Evaluate.Accuracy =
                  { Heads = []
                    Concat = 0.0
                    Combined = 9.0 / 12.0
                    CombinedTop5 = 1.0
                    Images = 12
                    Confusion = array2D [ [ 8; 2; 0 ]; [ 1; 1; 0 ]; [ 0; 0; 0 ] ]
                    Skipped = [] }
              Expect.floatClose Accuracy.veryHigh (Evaluate.meanPerClass a) ((0.8 + 0.5) / 2.0) "mean of 80% and 50%"
              Expect.isLessThan (Evaluate.meanPerClass a) a.Combined "the rare class pulls it down"
          }
          test "the results table names every head and puts top-5 on the combined row only" {
              let a: Evaluate.Accuracy =
                  { Heads = [ 0.25; 0.5 ]
                    Concat = 0.75
                    Combined = 0.875
                    CombinedTop5 = 1.0
                    Images = 8
                    Confusion = Array2D.zeroCreate 2 2
                    Skipped = [] }
              let rows = (Evaluate.table [ "stage4"; "stage5" ] a).Split '\n'
              Expect.equal rows.Length 6 "header, rule, two heads, concat, combined"
              Expect.stringContains rows.[2] "stage4" "first head"
              Expect.stringContains rows.[2] "25.0%" "its top-1"
              Expect.stringContains rows.[4] "75.0%" "concat"
              Expect.stringContains rows.[5] "87.5%" "combined top-1"
              Expect.stringContains rows.[5] "100.0%" "combined top-5"
              Expect.isFalse (rows.[4].Contains "100.0%") "no top-5 for concat"
          } ]
