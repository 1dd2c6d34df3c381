/// SGD with momentum and weight decay over parameter groups, with PyTorch's update rule:
///   d = g + wd * p;  buf = momentum * buf + d (buf = d on the first step);  p -= lr * buf.
/// Our own so that its state (the momentum buffers) is plain named tensors that a checkpoint holds.
///
/// Every step updates every parameter, a parameter that took no part in the step counting as a zero gradient:
/// that is what the reference code did (PyTorch 1.x's zero_grad left zeros, not None), so weight decay and
/// momentum keep moving the other heads during a granularity step. It also makes a resumed run identical to an
/// uninterrupted one, whatever gradients existed before.
///
/// With `Flat` storage each group's parameters, gradients and momentum live in three flat tensors (the parameters
/// and their .grad become views of them), so a step is four kernels per group instead of several per parameter;
/// autograd accumulates into the existing .grad views in place.
module Pmg.Fs.Training.Sgd

open System.Collections.Generic
open TorchSharp
open Pmg.Fs
open Pmg.Fs.Runtime

/// A set of parameters sharing one learning rate schedule; the rate of each step is an argument of `step`.
type Group =
    { /// Group name; the trainer uses "heads" (the new layers) and "backbone".
      Name: string
      /// The group's parameters by name; the names key the momentum buffers and a checkpoint's optimizer state.
      Parameters: (string * Modules.Parameter) list
      /// Base learning rate, from which the rate function given to `step` derives each step's rate.
      BaseLr: float }

/// Momentum (0: none) and L2 weight decay (this times each weight is added to its gradient), for every group.
type Settings = { Momentum: float; WeightDecay: float }

/// Where parameters and gradients are kept.
type Storage =
    /// Each parameter its own tensor (a step is a few kernels per parameter).
    | PerParameter
    /// Each group's parameters and gradients as views of one flat tensor.
    | Flat

/// One group's flat tensors and where each parameter sits in them: (name, offset, sizes, strides).
type Slab =
    { /// Every parameter of the group, each at its offset; the parameters are views of it.
      Values: torch.Tensor
      /// The gradients, laid out like Values; each parameter's .grad is a view of it.
      Grads: torch.Tensor
      /// Each parameter's name, offset in elements, sizes and strides within Values and Grads.
      Slices: (string * int64 * int64[] * int64[]) list
      /// The momentum buffer, laid out like Values; None before the first step, and always with momentum 0.
      mutable Momentum: torch.Tensor option }

/// SGD over parameter groups, with its momentum buffers; made by `create`.
type Optimizer =
    { /// Momentum and weight decay, shared by every group.
      Settings: Settings
      /// The groups that have parameters, in the order given to `create`.
      Groups: Group list
      /// Flat storage: one slab per group, in the groups' order; empty for per-parameter storage.
      Slabs: Slab list
      /// Momentum buffers by parameter name (views of the slab's momentum with flat storage).
      Buffers: Dictionary<string, torch.Tensor> }

/// A view of `flat` with the sizes and strides of a parameter, `offset` elements in.
let private viewAt (flat: torch.Tensor) (offset: int64) (sizes: int64[]) (strides: int64[]) =
    flat.as_strided (sizes, strides, offset)

/// Every parameter's view starts at a multiple of this many elements (256 bytes in fp32). Packed end to end, a
/// head's Linear(512, classes) with a class count not divisible by 4 would leave every later parameter at an
/// offset that is not 16-byte aligned, which keeps CUDA kernels off their vectorised paths (and cuDNN/cuBLAS
/// off some algorithms) for those parameters and their gradients.
let slabAlignment = 64L

/// Where each of `sizes` (element counts) starts in a slab, each rounded up to `slabAlignment`, and, last, the
/// slab's total length.
let slabOffsets (sizes: int64 list) : int64 list =
    let up (n: int64) = (n + slabAlignment - 1L) / slabAlignment * slabAlignment
    sizes |> List.scan (fun offset n -> up (offset + n)) 0L

/// Moves a group's parameters into one flat tensor, keeping each parameter's strides (a channels-last weight
/// stays channels-last), and gives each a .grad view of a flat gradient tensor.
let private flatten (g: Group) : Slab =
    use _ = torch.no_grad ()
    let ps = g.Parameters |> List.map snd
    let first = List.head ps
    for name, p in g.Parameters do
        if p.dtype <> first.dtype || p.device.ToString() <> first.device.ToString() then
            Errors.fail (ModelFile("optimizer state", sprintf "group %s mixes dtypes or devices (%s); flat storage needs one of each" g.Name name))
        // Dense strides (contiguous in some dimension order) span exactly numel elements.
        let span = Array.fold2 (fun acc (size: int64) (stride: int64) -> acc + (size - 1L) * stride) 1L p.shape (p.stride ())
        if span <> p.numel () then
            Errors.fail (ModelFile("optimizer state", sprintf "parameter %s is not dense; flat storage cannot hold it" name))
    let offsets = slabOffsets (ps |> List.map (fun p -> p.numel ()))
    let total = List.last offsets
    // Zeros, not empty: the padding then stays zero through weight decay and momentum (never NaN garbage).
    let values = (torch.zeros ([| total |], dtype = first.dtype, device = first.device)).DetachFromDisposeScope()
    let grads = (torch.zeros ([| total |], dtype = first.dtype, device = first.device)).DetachFromDisposeScope()
    let slices =
        List.zip g.Parameters (List.take ps.Length offsets)
        |> List.map (fun ((name, p), offset) ->
            let sizes, strides = p.shape, p.stride ()
            use v = viewAt values offset sizes strides
            v.copy_ p |> ignore
            p.set_ v |> ignore
            // .grad keeps its own reference to the view.
            use gv = viewAt grads offset sizes strides
            p.grad <- gv
            name, offset, sizes, strides)
    { Values = values; Grads = grads; Slices = slices; Momentum = None }

/// An optimizer over the groups that have parameters (empty ones are dropped); `Flat` storage moves the parameters into slabs here.
let create (storage: Storage) (settings: Settings) (groups: Group list) : Optimizer =
    let groups = groups |> List.filter (fun g -> not g.Parameters.IsEmpty)
    { Settings = settings
      Groups = groups
      Slabs = (match storage with Flat -> List.map flatten groups | PerParameter -> [])
      Buffers = Dictionary() }

/// Sets every gradient to zero in place, keeping the gradient tensors.
let zeroGrad (opt: Optimizer) =
    if opt.Slabs.IsEmpty then
        for g in opt.Groups do
            for _, p in g.Parameters do
                let grad = p.grad
                if not (isNull grad) then grad.zero_ () |> ignore
    else
        for s in opt.Slabs do
            s.Grads.zero_ () |> ignore

/// The momentum update in place (a new buffer on the first step); returns the direction to step along.
let private momentumOf (s: Settings) (existing: torch.Tensor option) (d: torch.Tensor) (keep: torch.Tensor -> unit) =
    if s.Momentum = 0.0 then
        d.alias ()
    else
        match existing with
        | Some buf -> Ops.scalar s.Momentum (fun m -> (Ops.addInPlace (buf.mul_ m) d).alias ())
        | None ->
            // Lives across batches: not owned by the caller's per-batch dispose scope.
            let buf = d.detach().clone().DetachFromDisposeScope()
            keep buf
            buf.alias ()

let private stepPerParameter (lr: Group -> float) (opt: Optimizer) =
    let s = opt.Settings
    for g in opt.Groups do
        for name, p in g.Parameters do
            let grad = p.grad
            use grad = if isNull grad then torch.zeros_like p else grad.alias ()
            use d = if s.WeightDecay <> 0.0 then Ops.scalar s.WeightDecay (fun wd -> grad.add (p, wd)) else grad.alias ()
            let existing = match opt.Buffers.TryGetValue name with | true, b -> Some b | _ -> None
            use update = momentumOf s existing d (fun buf -> opt.Buffers.[name] <- buf)
            Ops.scalar -(lr g) (fun rate -> p.add_ (update, rate)) |> ignore

let private nameViews (opt: Optimizer) (slab: Slab) (buf: torch.Tensor) =
    for name, offset, sizes, strides in slab.Slices do
        // Kept across batches: not owned by the caller's per-batch dispose scope.
        opt.Buffers.[name] <- (viewAt buf offset sizes strides).DetachFromDisposeScope()

let private stepFlat (lr: Group -> float) (opt: Optimizer) =
    let s = opt.Settings
    for g, slab in List.zip opt.Groups opt.Slabs do
        // The gradient tensor is rewritten by the next zeroGrad, so weight decay may go into it in place.
        if s.WeightDecay <> 0.0 then
            Ops.scalar s.WeightDecay (fun wd -> slab.Grads.add_ (slab.Values, wd)) |> ignore
        use update =
            momentumOf s slab.Momentum slab.Grads (fun buf ->
                slab.Momentum <- Some buf
                nameViews opt slab buf)
        Ops.scalar -(lr g) (fun rate -> slab.Values.add_ (update, rate)) |> ignore

/// One update of every parameter (no gradient = zero gradient), each group at the learning rate `lr` gives it.
let step (lr: Group -> float) (opt: Optimizer) =
    use _ = torch.no_grad ()
    if opt.Slabs.IsEmpty then stepPerParameter lr opt else stepFlat lr opt

/// The momentum buffers by parameter name, for a checkpoint.
let state (opt: Optimizer) : (string * torch.Tensor) list =
    [ for kv in opt.Buffers -> kv.Key, kv.Value ]

/// Restores momentum buffers saved by `state`; every name must belong to a parameter of this optimizer. With flat
/// storage a group's buffers are all saved or none (they are created together on the first step).
let restore (opt: Optimizer) (saved: (string * torch.Tensor) list) =
    let known = opt.Groups |> List.collect (fun g -> g.Parameters) |> Map.ofList
    for name, _ in saved do
        if not (known.ContainsKey name) then
            Errors.fail (ModelFile("optimizer state", sprintf "optimizer state names parameter '%s', which this model does not have" name))
    let saved = Map.ofList saved
    for KeyValue(_, b) in opt.Buffers do
        b.Dispose()
    opt.Buffers.Clear()
    for slab in opt.Slabs do
        slab.Momentum |> Option.iter (fun m -> m.Dispose())
    use _ = torch.no_grad ()
    if opt.Slabs.IsEmpty then
        for KeyValue(name, t) in saved do
            // The chain's temporaries belong to a scope: unreferenced, the GC could free one mid-call.
            use _ = torch.NewDisposeScope()
            opt.Buffers.[name] <- t.``to``(known.[name].device).detach().clone().DetachFromDisposeScope()
    else
        for g, slab in List.zip opt.Groups opt.Slabs do
            let present = g.Parameters |> List.filter (fun (n, _) -> saved.ContainsKey n) |> List.length
            if present = 0 then
                slab.Momentum <- None
            elif present < g.Parameters.Length then
                Errors.fail (ModelFile("optimizer state", sprintf "optimizer state holds %d of the %d momentum buffers of group %s; it must hold all or none" present g.Parameters.Length g.Name))
            else
                let buf = torch.zeros_like(slab.Values).DetachFromDisposeScope()
                nameViews opt slab buf
                for name, _, _, _ in slab.Slices do
                    opt.Buffers.[name].copy_ saved.[name] |> ignore
                slab.Momentum <- Some buf
