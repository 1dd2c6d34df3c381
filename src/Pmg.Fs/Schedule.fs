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
     |> List.map (fun (l, _) -> { Head = Stage l; Grid = 1 <<< (stages - l + 1); LossWeight = 1.0 }))
    @ [ { Head = Concat; Grid = 1; LossWeight = 2.0 } ]

/// PMG as published: ResNet50's five stages, three heads (8, 4, 2, then concat x2).
let paper = progressive (Backbone.find "resnet50") 3

/// A schedule with chosen grids for the heads on the last `grids.Length` stages of a backbone (finest head first),
/// then concat with `concatWeight`.
let withGrids (spec: Backbone.Spec) (grids: int list) (concatWeight: float) : Step list =
    (List.zip (Backbone.headStages spec grids.Length) grids |> List.map (fun ((l, _), n) -> { Head = Stage l; Grid = n; LossWeight = 1.0 }))
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

/// A step's name: its output and its input, e.g. "stage3 8x8" or "concat whole".
let stepName (s: Step) : string =
    let input = if s.Grid <= 1 then "whole" else sprintf "%dx%d" s.Grid s.Grid
    sprintf "%s %s" (outputName s.Head) input

/// A step's name as a column or tag: "stage3_8x8", "concat_whole".
let stepKey (s: Step) : string = (stepName s).Replace(' ', '_')

/// Cosine annealing per epoch, as the reference: lr/2 * (cos(pi * (t mod T) / T) + 1).
let cosine (epochs: int) (baseLr: float) (epoch: int) : float =
    let t = float (epoch % epochs) / float epochs
    baseLr / 2.0 * (Math.Cos(Math.PI * t) + 1.0)
