/// The progressive training schedule as data, and the learning-rate schedule.
module Pmg.Fs.Schedule

open System
open Pmg.Fs.Model
open Pmg.Fs.Model.Pmg

/// One step of an iteration: which output is trained, on a jigsaw of Grid x Grid patches, with what loss weight.
/// Each step has its own forward, loss, backward and optimizer step.
type Step =
    { /// The output this step trains.
      Head: HeadId
      /// Patches per side of the jigsaw (1 = the whole image).
      Grid: int
      /// Factor on this step's loss.
      LossWeight: float }

/// The paper's schedule for heads on the last `heads` stages of a backbone of L stages: the head on stage l sees
/// n = 2^(L-l+1) patches a side; then concat sees the whole image with weight 2.
let progressive (spec: Backbone.Spec) (heads: int) : Step list =
    let stages = Backbone.stages spec |> List.length
    (Backbone.headStages spec heads
     |> List.mapi (fun i (l, _) -> { Head = Granularity i; Grid = 1 <<< (stages - l + 1); LossWeight = 1.0 }))
    @ [ { Head = Concat; Grid = 1; LossWeight = 2.0 } ]

/// PMG as published: ResNet50's five stages, three heads (8, 4, 2, then concat x2).
let paper = progressive (Backbone.find "resnet50") 3

/// A schedule with chosen grids for the heads (finest head first), then concat with `concatWeight`.
let withGrids (grids: int list) (concatWeight: float) : Step list =
    (grids |> List.mapi (fun i n -> { Head = Granularity i; Grid = n; LossWeight = 1.0 }))
    @ [ { Head = Concat; Grid = 1; LossWeight = concatWeight } ]

/// The steps an epoch runs, with their positions in the schedule: all of them, or during the first `warmup`
/// epochs only the concat step on whole images (a plain classifier). Warm-up stands in for ImageNet weights when
/// a backbone starts from scratch: jigsaw steps on random features only slow it down.
let stepsAt (warmup: int) (epoch: int) (schedule: Step list) : (int * Step) list =
    let indexed = List.indexed schedule
    if epoch < warmup then
        indexed |> List.filter (fun (_, s) -> s.Head = Concat) |> List.map (fun (i, s) -> i, { s with Grid = 1 })
    else
        indexed

/// Cosine annealing per epoch, as the reference: lr/2 * (cos(pi * (t mod T) / T) + 1).
let cosine (epochs: int) (baseLr: float) (epoch: int) : float =
    let t = float (epoch % epochs) / float epochs
    baseLr / 2.0 * (Math.Cos(Math.PI * t) + 1.0)
