/// SGD with momentum and weight decay over parameter groups, with PyTorch's update rule:
///   d = g + wd * p;  buf = momentum * buf + d (buf = d on the first step);  p -= lr * buf.
/// Our own so that its state (the momentum buffers) is plain named tensors that a checkpoint holds.
///
/// Every step updates every parameter, a parameter that took no part in the step counting as a zero gradient:
/// that is what the reference code did (PyTorch 1.x's zero_grad left zeros, not None), so weight decay and
/// momentum keep moving the other heads during a granularity step. It also makes a resumed run identical to an
/// uninterrupted one, whatever gradients existed before.
module Pmg.Fs.Training.Sgd

open TorchSharp
open Pmg.Fs.Runtime.Scalars

/// A set of parameters sharing one learning rate. `Lr` is mutable so the schedule can set it per epoch.
type Group =
    { Name: string
      Parameters: (string * Modules.Parameter) list
      BaseLr: float
      mutable Lr: float }

type Settings = { Momentum: float; WeightDecay: float }

type Optimizer =
    { Settings: Settings
      Groups: Group list
      /// Momentum buffers by parameter name, created on the first step.
      Buffers: System.Collections.Generic.Dictionary<string, torch.Tensor> }

let create (settings: Settings) (groups: Group list) : Optimizer =
    { Settings = settings
      Groups = groups
      Buffers = System.Collections.Generic.Dictionary() }

let zeroGrad (opt: Optimizer) =
    for g in opt.Groups do
        for _, p in g.Parameters do
            let grad = p.grad
            if not (isNull grad) then grad.zero_ () |> ignore

/// One update of every parameter (no gradient = zero gradient).
let step (opt: Optimizer) =
    use _ = torch.no_grad ()
    let s = opt.Settings
    for g in opt.Groups do
        for name, p in g.Parameters do
            let grad = p.grad
            use grad = if isNull grad then torch.zeros_like p else grad.alias ()
            do
                use d = if s.WeightDecay <> 0.0 then scalar s.WeightDecay (fun wd -> grad.add (p, wd)) else grad.alias ()
                let update =
                    if s.Momentum = 0.0 then
                        d.alias ()
                    else
                        match opt.Buffers.TryGetValue name with
                        | true, buf -> scalar s.Momentum (fun m -> (addInPlace (buf.mul_ m) d).alias ())
                        | false, _ ->
                            // Lives across batches: not owned by the caller's per-batch dispose scope.
                            let buf = d.detach().clone().DetachFromDisposeScope()
                            opt.Buffers.[name] <- buf
                            buf.alias ()
                use update = update
                scalar -g.Lr (fun lr -> p.add_ (update, lr)) |> ignore

/// Sets every group's learning rate from its base rate.
let setLr (schedule: float -> float) (opt: Optimizer) =
    for g in opt.Groups do
        g.Lr <- schedule g.BaseLr

/// The momentum buffers, for a checkpoint.
let state (opt: Optimizer) : (string * torch.Tensor) list =
    [ for kv in opt.Buffers -> kv.Key, kv.Value ]

/// Restores momentum buffers saved by `state`; every name must belong to a parameter of this optimizer.
let restore (opt: Optimizer) (saved: (string * torch.Tensor) list) =
    let known = opt.Groups |> List.collect (fun g -> g.Parameters |> List.map (fun (n, p) -> n, p)) |> Map.ofList
    opt.Buffers.Clear()
    for name, t in saved do
        match Map.tryFind name known with
        | None -> failwithf "optimizer state names parameter '%s', which this model does not have" name
        | Some p -> opt.Buffers.[name] <- t.``to``(p.device).detach().clone().DetachFromDisposeScope()
