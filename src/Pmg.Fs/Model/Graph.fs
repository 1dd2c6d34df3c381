/// The network as a graph of operators, written by the modules themselves: each block of this project says what
/// it computes (IExportable) from its own fields, and TorchSharp's layers inside a Sequential (Conv2d, Linear,
/// BatchNorm, ReLU, ELU, MaxPool2d) are read from their fields by one generic function. So the structure lives
/// once, in the modules; an exporter (Interop's ONNX writer) only maps the operators to its format. Operator and
/// attribute names are ONNX's (opset 17).
module Pmg.Fs.Model.Graph

open TorchSharp
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators

/// The value of an operator attribute.
type Attribute =
    /// One integer.
    | Int of int64
    /// A list of integers.
    | Ints of int64 list
    /// One float.
    | Float of float32

/// Where modules write their operators.
type IBuilder =
    /// Adds an operator `op` reading `inputs` (tensor names, in operator order); returns the name of its one output.
    abstract Node: op: string * inputs: string list * attributes: (string * Attribute) list -> string
    /// The name operators read a stored weight by, given its full state-dict key ("features.conv1.weight").
    abstract Weight: key: string -> string

/// A module that writes itself as operators.
type IExportable =
    /// Writes the module's eval-mode computation, its weights under state-dict `prefix` (empty, or ending with
    /// "."), reading `inputs`; returns the names of its outputs.
    abstract Emit: builder: IBuilder * prefix: string * inputs: string list -> string list

/// A module whose operators this project cannot write; the message names its type.
let private unsupported (m: torch.nn.Module) : 'a =
    invalidOp (sprintf "no operator form for the module %s (%s): implement Graph.IExportable on it" (m.GetName()) (m.GetType().Name))

/// Both spatial sides of a 2-d setting that TorchSharp may keep as one value.
let private sides (unset: int64) (xs: int64[]) : int64 list =
    match xs with
    | null
    | [||] -> [ unset; unset ]
    | [| a |] -> [ a; a ]
    | _ -> List.ofArray xs

/// ONNX's pads: the beginning of each side, then the end (PyTorch pads both ends alike).
let private pads (xs: int64[]) = let p = sides 0L xs in "pads", Ints(p @ p)

/// The state-dict name under which `parent` registered `child`.
let childName (parent: torch.nn.Module) (child: torch.nn.Module) : string =
    parent.named_children ()
    |> Seq.tryPick (fun struct (n, m) -> if obj.ReferenceEquals(m, child) then Some n else None)
    |> Option.defaultWith (fun () -> invalidOp (sprintf "%s is not a registered child of %s" (child.GetName()) (parent.GetName())))

/// Writes one module reading one tensor, its weights under `prefix`; returns its output. Modules of this project
/// write themselves (IExportable); TorchSharp's Sequential, Conv2d, Linear, BatchNorm (Layers.BatchNorm included),
/// ReLU, ELU and MaxPool2d are read from their fields (kernel, stride, padding, bias, eps, alpha).
let rec emit (b: IBuilder) (prefix: string) (m: torch.nn.Module) (x: string) : string =
    match box m with
    | :? IExportable as e ->
        match e.Emit(b, prefix, [ x ]) with
        | [ y ] -> y
        | ys -> invalidOp (sprintf "%s writes %d outputs where one is read" (m.GetName()) ys.Length)
    | :? Modules.Sequential as s ->
        s.named_children () |> Seq.fold (fun x struct (n, c) -> emit b (prefix + n + ".") c x) x
    | :? Modules.Conv2d as c ->
        // Every convolution of this project gives its padding as numbers (not "same").
        if c.groups <> 1L || sides 1L c.dilation |> List.exists ((<>) 1L) then unsupported m
        let weights = [ b.Weight(prefix + "weight") ] @ (if isNull c.bias then [] else [ b.Weight(prefix + "bias") ])
        b.Node(
            "Conv",
            x :: weights,
            [ "kernel_shape", Ints(sides 1L c.kernel_size); "strides", Ints(sides 1L c.stride); pads c.padding ]
        )
    | :? Modules.Linear as l ->
        let weights = [ b.Weight(prefix + "weight") ] @ (if isNull l.bias then [] else [ b.Weight(prefix + "bias") ])
        b.Node("Gemm", x :: weights, [ "transB", Int 1L ])
    | :? Modules.BatchNorm as n ->
        // Eval mode: the running statistics, which a norm without them or without weights does not hold.
        if not n.affine || not n.track_running_stats then unsupported m
        let stats = [ "weight"; "bias"; "running_mean"; "running_var" ] |> List.map (fun k -> b.Weight(prefix + k))
        b.Node("BatchNormalization", x :: stats, [ "epsilon", Float(float32 n.eps) ])
    | :? Modules.ReLU -> b.Node("Relu", [ x ], [])
    | :? Modules.ELU as e -> b.Node("Elu", [ x ], [ "alpha", Float(float32 e.alpha) ])
    | :? Modules.MaxPool2d as p ->
        if p.ceil_mode || sides 1L p.dilation |> List.exists ((<>) 1L) then unsupported m
        let stride = if isNull p.stride || p.stride.Length = 0 then p.kernel_size else p.stride
        b.Node("MaxPool", [ x ], [ "kernel_shape", Ints(sides 1L p.kernel_size); "strides", Ints(sides 1L stride); pads p.padding ])
    | _ -> unsupported m

/// Writes `child`, a registered child of `parent`, under its own name below `prefix`.
let emitChild (b: IBuilder) (prefix: string) (parent: torch.nn.Module) (child: torch.nn.Module) (x: string) : string =
    emit b (prefix + childName parent child + ".") child x

// ---- Operators the transformer-era backbones (ConvNeXt, Swin) share -----------------------------------------

/// A scalar float constant.
let floatConstant (b: IBuilder) (v: float) = b.Node("Constant", [], [ "value_float", Float(float32 v) ])

/// LayerNorm over the last axis, with the stored weight and bias under `prefix` (empty, or ending with ".").
let layerNormLast (b: IBuilder) (prefix: string) (epsilon: float) (x: string) =
    b.Node("LayerNormalization", [ x; b.Weight(prefix + "weight"); b.Weight(prefix + "bias") ], [ "axis", Int -1L; "epsilon", Float(float32 epsilon) ])

/// A Linear over the last axis of a tensor of any rank (Gemm takes matrices only): x W^T, plus the bias when `bias`.
let linearLast (b: IBuilder) (prefix: string) (bias: bool) (x: string) =
    let wT = b.Node("Transpose", [ b.Weight(prefix + "weight") ], [ "perm", Ints [ 1L; 0L ] ])
    let y = b.Node("MatMul", [ x; wT ], [])
    if bias then b.Node("Add", [ y; b.Weight(prefix + "bias") ], []) else y

/// GELU's exact form: x * 0.5 * (1 + erf(x / sqrt 2)) (opset 17 has no Gelu operator).
let gelu (b: IBuilder) (x: string) =
    let e = b.Node("Erf", [ b.Node("Div", [ x; floatConstant b (sqrt 2.0) ], []) ], [])
    let half = b.Node("Mul", [ x; floatConstant b 0.5 ], [])
    b.Node("Mul", [ half; b.Node("Add", [ e; floatConstant b 1.0 ], []) ], [])
