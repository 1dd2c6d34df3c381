module Pmg.Fs.Tests.ScheduleTests

open System
open Expecto
open Pmg.Fs
open Pmg.Fs.Model.Pmg

[<Tests>]
let tests =
    testList
        "schedule"
        [ test "the paper's schedule: 8, 4, 2 on the three heads, then concat on the whole image with weight 2" {
              let expected: Schedule.Step list =
                  [ { Head = Stage 3; Grid = 8; LossWeight = 1.0 }
                    { Head = Stage 4; Grid = 4; LossWeight = 1.0 }
                    { Head = Stage 5; Grid = 2; LossWeight = 1.0 }
                    { Head = Concat; Grid = 1; LossWeight = 2.0 } ]
              Expect.equal Schedule.paper expected "steps"
          }
          test "n = 2^(L-l+1) for other S" {
              let resnet = Model.Backbone.find "resnet50"
              Expect.equal (Schedule.progressive resnet 1 |> List.map _.Grid) [ 2; 1 ] "S = 1"
              Expect.equal (Schedule.progressive resnet 2 |> List.map _.Grid) [ 4; 2; 1 ] "S = 2"
              Expect.equal (Schedule.progressive resnet 4 |> List.map _.Grid) [ 16; 8; 4; 2; 1 ] "S = 4"
          }
          test "custom grids" {
              let s = Schedule.withGrids (Model.Backbone.find "resnet50") [ 6; 3; 1 ] 1.0
              Expect.equal (s |> List.map (fun x -> x.Grid, x.LossWeight)) [ 6, 1.0; 3, 1.0; 1, 1.0; 1, 1.0 ] "grids and weights"
              Expect.equal (s |> List.map (fun x -> Schedule.stepName x)) [ "stage3 6x6"; "stage4 3x3"; "stage5 whole"; "concat whole" ] "one name per head: the stage it reads"
          }
          test "cosine annealing: lr at epoch 0, half at mid, near zero at the end" {
              let lr = 0.002
              // float64 formulas evaluated two ways: a few ulps apart; Accuracy.veryHigh is 1e-9 relative.
              Expect.floatClose Accuracy.veryHigh (Schedule.cosine 200 lr 0) lr "epoch 0"
              Expect.floatClose Accuracy.veryHigh (Schedule.cosine 200 lr 100) (lr / 2.0) "mid"
              let last = Schedule.cosine 200 lr 199
              Expect.floatClose Accuracy.veryHigh last (lr / 2.0 * (Math.Cos(Math.PI * 199.0 / 200.0) + 1.0)) "last epoch"
              Expect.isLessThan last (lr * 1e-3) "close to zero"
              Expect.isTrue ([ 0..199 ] |> List.pairwise |> List.forall (fun (a, b) -> Schedule.cosine 200 lr a > Schedule.cosine 200 lr b)) "decreasing"
          } ]
