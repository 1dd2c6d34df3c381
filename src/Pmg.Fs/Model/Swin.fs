/// torchvision's Swin Transformer (v1, as torchvision 0.14 computes it) as PMG's five stages (see Backbone.stages):
/// the patch embedding (features.0), then features.1, features.2+3, features.4+5 and features.6+7. Module and
/// parameter names are torchvision's, so its ImageNet files (swin_t-704ceda3.pth, ...) load strictly. Inside the
/// stages tensors are NHWC as torchvision's; the stage outputs PMG reads are NCHW.
module Pmg.Fs.Model.Swin

open System.Collections.Generic
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch
open type TorchSharp.torch.nn
// torch.int64 and friends would shadow the conversion functions.
open Microsoft.FSharp.Core.Operators
open Pmg.Fs.Runtime
open Pmg.Fs.Model.Backbone

/// torchvision's patch size: the stem's kernel and stride.
let private patch = 4L

/// The MLP's hidden width over its input width (torchvision's mlp_ratio).
let private mlpRatio = 4L

// ---------------------------------------------------------------------------------------------------
// Index arithmetic, on the host.

/// torchvision's relative_position_index for a w x w window: for tokens i = (hi, wi) and j = (hj, wj) of the window
/// (row-major), the row of the bias table, (hi - hj + w - 1) * (2w - 1) + (wi - wj + w - 1); N x N values, flattened.
let internal relativeIndex (w: int) : int64[] =
    let n = w * w
    [| for i in 0 .. n - 1 do
           for j in 0 .. n - 1 do
               int64 ((i / w - j / w + w - 1) * (2 * w - 1) + (i % w - j % w + w - 1)) |]

/// torchvision's attention mask for shifted windows over a padded pH x pW map (window w, shifts sh and sw): for
/// each window (row-major) and token pair, 0 where both tokens come from the same region of the rolled map, -100
/// where they do not. As torchvision's slices, a side not shifted is one region.
let internal shiftMask (pH: int) (pW: int) (w: int) (sh: int) (sw: int) : float32[] =
    let region size s p =
        if s = 0 then 0
        elif p < size - w then 0
        elif p < size - s then 1
        else 2
    let label r c = region pH sh r * 3 + region pW sw c
    let across = pW / w
    let windows = (pH / w) * across
    let n = w * w
    [| for win in 0 .. windows - 1 do
           let r0, c0 = (win / across) * w, (win % across) * w
           for i in 0 .. n - 1 do
               let li = label (r0 + i / w) (c0 + i % w)
               for j in 0 .. n - 1 do
                   if li = label (r0 + j / w) (c0 + j % w) then 0.0f else -100.0f |]

/// The side padded to a multiple of the window.
let internal padded (side: int64) (w: int64) = side + (w - side % w) % w

// ---------------------------------------------------------------------------------------------------
// Modules. Children are registered by torchvision's names ("0", "2", "attn", ...). TorchSharp also registers a
// module's Module-typed fields under their field names when it walks the tree, so a child whose name is not its
// field's ("0", "3") is held in an array, which it does not register.

/// features.0: Conv 4x4 stride 4, then LayerNorm over channels in NHWC (torchvision's Permute is features.0.1).
type private PatchEmbed(dim: int64) as this =
    inherit Module<Tensor, Tensor>("PatchEmbed")
    let parts: Module<Tensor, Tensor>[] = [| Conv2d(3L, dim, patch, stride = patch); LayerNorm(dim) |]
    do
        this.register_module ("0", parts.[0])
        this.register_module ("2", parts.[1])

    /// The patch convolution (features.0.0).
    member _.Conv = parts.[0]

    override _.forward(x) =
        use _ = NewDisposeScope()
        use y = parts.[0].forward x
        use nhwc = y.permute(0L, 2L, 3L, 1L)
        (parts.[1].forward nhwc).MoveToOuterDisposeScope()

/// torchvision's MLP: Linear (mlp.0), GELU (exact), Dropout 0, Linear (mlp.3), Dropout 0.
type private Mlp(dim: int64) as this =
    inherit Module<Tensor, Tensor>("MLP")
    let fc: Linear[] = [| Linear(dim, dim * mlpRatio); Linear(dim * mlpRatio, dim) |]
    do
        this.register_module ("0", fc.[0])
        this.register_module ("3", fc.[1])

    override _.forward(x) =
        use _ = NewDisposeScope()
        use h = fc.[0].forward x
        use g = functional.gelu h
        (fc.[1].forward g).MoveToOuterDisposeScope()

/// Shifted-window multi-head self-attention with relative position bias (torchvision's ShiftedWindowAttention):
/// the map is padded to window multiples, rolled by -shift (unless the padded map is no larger than the window
/// on that side), split into windows, attended within each window (with the shift's mask), and put back.
type private WindowAttention(dim: int64, heads: int64, window: int, shift: int) as this =
    inherit Module<Tensor, Tensor>("ShiftedWindowAttention")
    let w = int64 window
    let n = w * w
    let qkv = Linear(dim, dim * 3L)
    let proj = Linear(dim, dim)
    let table = Parameter(zeros ((2L * w - 1L) * (2L * w - 1L), heads))
    let masks = Dictionary<struct (int64 * int64 * string * ScalarType), Tensor>()
    do
        this.register_parameter ("relative_position_bias_table", table)
        this.register_buffer ("relative_position_index", tensor (relativeIndex window, dtype = ScalarType.Int64))
        this.register_module ("qkv", qkv)
        this.register_module ("proj", proj)

    /// The bias table and its index, looked up by name: moving the module to a device replaces them.
    member _.Table = this.get_parameter "relative_position_bias_table"
    member _.Index = this.get_buffer "relative_position_index"
    /// The shift of this block's windows (0 or half the window) on maps larger than the window.
    member _.Shift = shift

    /// The shifts torchvision uses on a padded pH x pW map: none on a side no larger than the window.
    member _.Shifts(pH: int64, pW: int64) = (if w >= pH then 0L else int64 shift), (if w >= pW then 0L else int64 shift)

    /// The mask for a padded map, (1, windows, 1, N, N) in the attention's dtype and device, built once per size.
    member private _.Mask(pH: int64, pW: int64, sh: int64, sw: int64, like: Tensor) : Tensor =
        let key = struct (pH, pW, like.device.ToString(), like.dtype)
        match masks.TryGetValue key with
        | true, m -> m
        | _ ->
            use _ = NewDisposeScope()
            let windows = (pH / w) * (pW / w)
            use host = (tensor (shiftMask (int pH) (int pW) window (int sh) (int sw))).reshape(1L, windows, 1L, n, n)
            let m = host.to_type(like.dtype).``to``(like.device).DetachFromDisposeScope()
            masks.[key] <- m
            m

    override this.forward(x) =
        use _ = NewDisposeScope()
        let b, h, wd, c = x.shape.[0], x.shape.[1], x.shape.[2], x.shape.[3]
        let pH, pW = padded h w, padded wd w
        let xp = if pH <> h || pW <> wd then functional.pad (x, [| 0L; 0L; 0L; pW - wd; 0L; pH - h |]) else x.alias ()
        let sh, sw = this.Shifts(pH, pW)
        let shifted = sh > 0L || sw > 0L
        let xs = if shifted then xp.roll ([| -sh; -sw |], [| 1L; 2L |]) else xp
        let nh, nw = pH / w, pW / w
        let windows = nh * nw
        let tokens = xs.view(b, nh, w, nw, w, c).permute(0L, 1L, 3L, 2L, 4L, 5L).reshape(b * windows, n, c)
        let qkv5 = (qkv.forward tokens).reshape(b * windows, n, 3L, heads, c / heads).permute(2L, 0L, 3L, 1L, 4L)
        let q = Ops.scale (1.0 / sqrt (float (c / heads))) (qkv5.select (0L, 0L))
        let k, v = qkv5.select (0L, 1L), qkv5.select (0L, 2L)
        let bias = this.Table.index_select(0L, this.Index).view(n, n, heads).permute(2L, 0L, 1L).contiguous().unsqueeze (0L)
        let attn = Ops.add (q.matmul (k.transpose (-2L, -1L))) bias
        let attn =
            if shifted then
                let mask = this.Mask(pH, pW, sh, sw, attn)
                (Ops.add (attn.view (b, windows, heads, n, n)) mask).view (-1L, heads, n, n)
            else
                attn
        let probs = functional.softmax (attn, -1L)
        let y = proj.forward ((probs.matmul v).transpose(1L, 2L).reshape (b * windows, n, c))
        let y = y.view(b, nh, nw, w, w, c).permute(0L, 1L, 3L, 2L, 4L, 5L).reshape (b, pH, pW, c)
        let y = if shifted then y.roll ([| sh; sw |], [| 1L; 2L |]) else y
        let y = if pH <> h || pW <> wd then y.narrow(1L, 0L, h).narrow(2L, 0L, wd).contiguous () else y
        y.MoveToOuterDisposeScope()

    override _.Dispose(disposing) =
        if disposing then
            for m in masks.Values do
                m.Dispose()
            masks.Clear()
        base.Dispose disposing

/// One Swin block (torchvision's SwinTransformerBlock): x + sd(attn(norm1 x)), then + sd(mlp(norm2 x)), where sd is
/// stochastic depth in "row" mode with drop probability `drop` while training.
type private Block(dim: int64, heads: int64, window: int, shift: int, drop: float, depth: Layers.StochasticDepth) as this =
    inherit Module<Tensor, Tensor>("SwinTransformerBlock")
    let norm1 = LayerNorm(dim)
    let attn = new WindowAttention(dim, heads, window, shift)
    let norm2 = LayerNorm(dim)
    let mlp = new Mlp(dim)
    do
        this.register_module ("norm1", norm1)
        this.register_module ("attn", attn)
        this.register_module ("norm2", norm2)
        this.register_module ("mlp", mlp)

    /// The block's attention (features.s.i.attn).
    member _.Attn = attn

    /// Stochastic depth (Layers.StochasticDepth), in training mode only.
    member private this.Depth(t: Tensor) : Tensor = if this.training && drop > 0.0 then depth.Rows(drop, t) else t

    override this.forward(x) =
        use _ = NewDisposeScope()
        let x = Ops.add x (this.Depth(attn.forward (norm1.forward x)))
        (Ops.add x (this.Depth(mlp.forward (norm2.forward x)))).MoveToOuterDisposeScope()

/// torchvision's PatchMerging: pad odd sides, concatenate each 2x2 neighbourhood's tokens in the order (0,0),
/// (1,0), (0,1), (1,1) (row, column), LayerNorm over the 4C channels, then a Linear to 2C without bias.
type private PatchMerging(dim: int64) as this =
    inherit Module<Tensor, Tensor>("PatchMerging")
    let reduction = Linear(4L * dim, 2L * dim, hasBias = false)
    let norm = LayerNorm(4L * dim)
    do
        this.register_module ("reduction", reduction)
        this.register_module ("norm", norm)

    override _.forward(x) =
        use _ = NewDisposeScope()
        let b, h, w, c = x.shape.[0], x.shape.[1], x.shape.[2], x.shape.[3]
        let x = if h % 2L = 1L || w % 2L = 1L then functional.pad (x, [| 0L; 0L; 0L; w % 2L; 0L; h % 2L |]) else x
        let h, w = h + h % 2L, w + w % 2L
        // (B, H/2, row, W/2, column, C) -> (B, H/2, W/2, column, row, C): channel blocks in the order row + 2 column.
        let merged = x.view(b, h / 2L, 2L, w / 2L, 2L, c).permute(0L, 1L, 3L, 4L, 2L, 5L).reshape (b, h / 2L, w / 2L, 4L * c)
        (reduction.forward (norm.forward merged)).MoveToOuterDisposeScope()

// ---------------------------------------------------------------------------------------------------
// The eval-mode computation as ONNX operators (opset 17). Sizes are read from the tensors (Shape), so one graph
// pads, shifts and masks as the forward does for whatever size it is given; the static parts (window, heads,
// widths, the relative position index) are constants.

/// Operators over NHWC tensors, written through a graph builder.
type private Emitter(b: Graph.IBuilder) =
    let node op inputs attributes = b.Node(op, inputs, attributes)

    member _.Node(op: string, inputs: string list, attributes: (string * Graph.Attribute) list) = node op inputs attributes
    /// A 1-d int64 constant.
    member _.Ints(xs: int64 list) = node "Constant" [] [ "value_ints", Graph.Ints xs ]
    /// A scalar float constant.
    member _.Float(v: float32) = node "Constant" [] [ "value_float", Graph.Float v ]
    /// Dimension `d` of `x` as a 1-d tensor of one element.
    member _.Dim(x: string, d: int64) = node "Shape" [ x ] [ "start", Graph.Int d; "end", Graph.Int(d + 1L) ]
    member _.Concat(xs: string list) = node "Concat" xs [ "axis", Graph.Int 0L ]
    member _.Reshape(x: string, shape: string) = node "Reshape" [ x; shape ] []
    member _.Transpose(x: string, perm: int64 list) = node "Transpose" [ x ] [ "perm", Graph.Ints perm ]
    member _.Slice(x: string, starts: string, ends: string, axes: int64 list) = node "Slice" [ x; starts; ends; node "Constant" [] [ "value_ints", Graph.Ints axes ] ] []
    member _.Add(a: string, c: string) = node "Add" [ a; c ] []
    member _.Sub(a: string, c: string) = node "Sub" [ a; c ] []
    member _.Mul(a: string, c: string) = node "Mul" [ a; c ] []
    member _.Div(a: string, c: string) = node "Div" [ a; c ] []
    member _.Mod(a: string, c: string) = node "Mod" [ a; c ] []
    /// LayerNorm over the last dimension, eps 1e-5, with the weights under `key`.
    member _.LayerNorm(x: string, key: string) = Graph.layerNormLast b (key + ".") 1e-5 x
    /// A Linear over the last dimension (weights under `key`).
    member _.Linear(x: string, key: string, bias: bool) = Graph.linearLast b (key + ".") bias x
    /// GELU, exact.
    member _.Gelu(x: string) = Graph.gelu b x
    /// torch.roll of `x` by `shift` (a 1-d tensor, 0 <= shift <= size) on `axis`, whose length is `size`.
    member this.Roll(x: string, shift: string, size: string, axis: int64) =
        // Rolled by k: the last k entries first. `shift` counts forward (torch.roll's positive shift).
        let cut = this.Sub(size, shift)
        let big = this.Ints [ System.Int64.MaxValue ]
        this.Concat2(this.Slice(x, cut, big, [ axis ]), this.Slice(x, this.Ints [ 0L ], cut, [ axis ]), axis)
    member _.Concat2(a: string, c: string, axis: int64) = node "Concat" [ a; c ] [ "axis", Graph.Int axis ]
    /// A cast to int64 (ONNX's type 7).
    member _.Int64(x: string) = node "Cast" [ x ] [ "to", Graph.Int 7L ]
    member this.Unsqueeze(x: string, axes: int64 list) = node "Unsqueeze" [ x; this.Ints axes ] []
    /// The stored weight `key`.
    member _.Weight(key: string) = b.Weight key
    /// Scalar int64 constants 0 and 1.
    member _.Scalar0 = node "Constant" [] [ "value_int", Graph.Int 0L ]
    member _.Scalar1 = node "Constant" [] [ "value_int", Graph.Int 1L ]

/// A block's attention (weights under `key`, "...attn") over x (B, H, W, C).
let private emitAttention (o: Emitter) (key: string) (x: string) (dim: int64) (heads: int64) (window: int) (shift: int) : string =
    let w = int64 window
    let n = w * w
    let wT = o.Ints [ w ]
    let batch, h, wd = o.Dim(x, 0L), o.Dim(x, 1L), o.Dim(x, 2L)
    let padB, padR = o.Mod(o.Sub(wT, o.Mod(h, wT)), wT), o.Mod(o.Sub(wT, o.Mod(wd, wT)), wT)
    let zero = o.Ints [ 0L ]
    let xp = o.Node("Pad", [ x; o.Concat [ o.Ints [ 0L; 0L; 0L; 0L; 0L ]; padB; padR; zero ] ], [])
    let pH, pW = o.Add(h, padB), o.Add(wd, padR)
    // torchvision's shift, dropped on a side whose padded length is no larger than the window.
    let sideShift (side: string) = o.Mul(o.Int64(o.Node("Greater", [ side; wT ], [])), o.Ints [ int64 shift ])
    let sh, sw = sideShift pH, sideShift pW
    let rolled (y: string) (back: bool) =
        if shift = 0 then y
        else
            let by (s: string) (size: string) = if back then s else o.Sub(size, s)
            o.Roll(o.Roll(y, by sh pH, pH, 1L), by sw pW, pW, 2L)
    let xs = rolled xp false
    let nh, nw = o.Div(pH, wT), o.Div(pW, wT)
    let tokens =
        o.Reshape(o.Transpose(o.Reshape(xs, o.Concat [ batch; nh; wT; nw; wT; o.Ints [ dim ] ]), [ 0L; 1L; 3L; 2L; 4L; 5L ]), o.Ints [ -1L; n; dim ])
    let qkv = o.Transpose(o.Reshape(o.Linear(tokens, key + ".qkv", true), o.Ints [ -1L; n; 3L; heads; dim / heads ]), [ 2L; 0L; 3L; 1L; 4L ])
    let part i = o.Node("Gather", [ qkv; o.Node("Constant", [], [ "value_int", Graph.Int i ]) ], [ "axis", Graph.Int 0L ])
    let q = o.Mul(part 0L, o.Float(float32 (1.0 / sqrt (float (dim / heads)))))
    let attn = o.Node("MatMul", [ q; o.Transpose(part 1L, [ 0L; 1L; 3L; 2L ]) ], [])
    let bias =
        let index = o.Ints(List.ofArray (relativeIndex window))
        let rows = o.Node("Gather", [ o.Weight(key + ".relative_position_bias_table"); index ], [ "axis", Graph.Int 0L ])
        o.Transpose(o.Reshape(rows, o.Ints [ n; n; heads ]), [ 2L; 0L; 1L ])
    let attn = o.Add(attn, bias)
    let attn =
        if shift = 0 then attn
        else
            // Region labels of the rolled map, 3 x row region + column region, as torchvision's slices: a side not
            // shifted is one region.
            let labels (size: string) (s: string) =
                let at = o.Node("Range", [ o.Scalar0; o.Node("Squeeze", [ size ], []); o.Scalar1 ], [])
                let past (edge: string) = o.Int64(o.Node("GreaterOrEqual", [ at; o.Node("Squeeze", [ o.Sub(size, edge) ], []) ], []))
                let shifted = o.Int64(o.Node("Greater", [ s; zero ], []))
                o.Mul(o.Add(past wT, past s), shifted)
            let grid = o.Add(o.Mul(o.Unsqueeze(labels pH sh, [ 1L ]), o.Ints [ 3L ]), o.Unsqueeze(labels pW sw, [ 0L ]))
            let perWindow = o.Reshape(o.Transpose(o.Reshape(grid, o.Concat [ nh; wT; nw; wT ]), [ 0L; 2L; 1L; 3L ]), o.Ints [ -1L; n ])
            let same = o.Node("Equal", [ o.Unsqueeze(perWindow, [ 1L ]); o.Unsqueeze(perWindow, [ 2L ]) ], [])
            let mask = o.Unsqueeze(o.Node("Where", [ same; o.Float 0.0f; o.Float -100.0f ], []), [ 1L ])
            let byImage = o.Reshape(attn, o.Concat [ batch; o.Ints [ -1L; heads; n; n ] ])
            o.Reshape(o.Add(byImage, mask), o.Ints [ -1L; heads; n; n ])
    let probs = o.Node("Softmax", [ attn ], [ "axis", Graph.Int -1L ])
    let y = o.Node("MatMul", [ probs; part 2L ], [])
    let y = o.Linear(o.Reshape(o.Transpose(y, [ 0L; 2L; 1L; 3L ]), o.Ints [ -1L; n; dim ]), key + ".proj", true)
    let y = o.Reshape(o.Transpose(o.Reshape(y, o.Concat [ batch; nh; nw; wT; wT; o.Ints [ dim ] ]), [ 0L; 1L; 3L; 2L; 4L; 5L ]), o.Concat [ batch; pH; pW; o.Ints [ dim ] ])
    let y = rolled y true
    o.Slice(y, o.Ints [ 0L; 0L ], o.Concat [ h; wd ], [ 1L; 2L ])

/// A block (weights under `key`, "features.s.i") over x (B, H, W, C), eval mode.
let private emitBlock (o: Emitter) (key: string) (x: string) (dim: int64) (heads: int64) (window: int) (shift: int) : string =
    let x = o.Add(x, emitAttention o (key + ".attn") (o.LayerNorm(x, key + ".norm1")) dim heads window shift)
    let hidden = o.Gelu(o.Linear(o.LayerNorm(x, key + ".norm2"), key + ".mlp.0", true))
    o.Add(x, o.Linear(hidden, key + ".mlp.3", true))

/// Patch merging (weights under `key`) over x (B, H, W, C).
let private emitMerging (o: Emitter) (key: string) (x: string) (dim: int64) : string =
    let two = o.Ints [ 2L ]
    let batch, h, w = o.Dim(x, 0L), o.Dim(x, 1L), o.Dim(x, 2L)
    let padB, padR = o.Mod(h, two), o.Mod(w, two)
    let xp = o.Node("Pad", [ x; o.Concat [ o.Ints [ 0L; 0L; 0L; 0L; 0L ]; padB; padR; o.Ints [ 0L ] ] ], [])
    let h2, w2 = o.Div(o.Add(h, padB), two), o.Div(o.Add(w, padR), two)
    let merged =
        o.Reshape(o.Transpose(o.Reshape(xp, o.Concat [ batch; h2; two; w2; two; o.Ints [ dim ] ]), [ 0L; 1L; 3L; 4L; 2L; 5L ]), o.Concat [ batch; h2; w2; o.Ints [ 4L * dim ] ])
    o.Linear(o.LayerNorm(merged, key + ".norm"), key + ".reduction", false)

/// A Swin Transformer whose ForwardStages returns the five stages' outputs (NCHW). `norm` and `head` are
/// torchvision's ImageNet classifier: PMG does not use them, but they are kept so that ImageNet state_dicts load
/// strictly.
type Net(spec: Spec, config: SwinConfig) as this =
    inherit Features(spec.Name)
    let stageList = stages spec
    let dims = [ for i in 0..3 -> int64 config.EmbedDim <<< i ]
    let total = List.sum config.Depths
    let depth = new Layers.StochasticDepth(torch.random.initial_seed ())
    let stem = [| new PatchEmbed(dims.[0]) |]
    let blockStages =
        let mutable id = 0
        [ for s in 0..3 ->
              [ for i in 0 .. config.Depths.[s] - 1 ->
                    let p = Layers.StochasticDepth.Probability(config.StochasticDepth, total, id)
                    id <- id + 1
                    new Block(dims.[s], int64 config.Heads.[s], config.Window, (if i % 2 = 0 then 0 else config.Window / 2), p, depth) ] ]
    let merges = [ for s in 0..2 -> new PatchMerging(dims.[s]) ]
    let stageModules = blockStages |> List.map (fun bs -> new ModuleList<Module>(bs |> List.map (fun b -> b :> Module) |> Array.ofList))
    let features =
        new ModuleList<Module>(
            [| stem.[0] :> Module
               stageModules.[0]
               merges.[0]
               stageModules.[1]
               merges.[1]
               stageModules.[2]
               merges.[2]
               stageModules.[3] |]
        )
    let norm = LayerNorm(List.last dims)
    let head = spec.ImageNetClassifier |> Option.map (fun classes -> Linear(List.last dims, int64 classes)) |> Option.toObj
    do
        this.register_module ("features", features)
        this.register_module ("norm", norm)
        if not (isNull head) then this.register_module ("head", head)
        // torchvision's initialisation: the bias tables, then every Linear, truncated normal (std 0.02), biases 0.
        use _ = no_grad ()
        for b in List.concat blockStages do
            Layers.truncNormal 0.02 b.Attn.Table
        for m in this.modules () do
            match m with
            | :? Linear as l ->
                Layers.truncNormal 0.02 l.weight
                if not (isNull l.bias) then l.bias.zero_ () |> ignore
            | _ -> ()

    /// Stage s (0-based), NHWC: the patch merging that precedes it (stages 1..3), then its blocks.
    let runStage (s: int) (x: Tensor) : Tensor =
        use _ = NewDisposeScope()
        let x = if s = 0 then x else merges.[s - 1].forward x
        (blockStages.[s] |> List.fold (fun (y: Tensor) (b: Block) -> b.forward y) x).MoveToOuterDisposeScope()

    /// NHWC stage outputs up to stage `upTo` (the stem is stage 1).
    let forwardNhwc (x: Tensor) (upTo: int) : Tensor list =
        let first = stem.[0].forward x
        [ 0 .. upTo - 2 ] |> List.scan (fun y s -> runStage s y) first

    /// The patch embedding, then stage1..stage4.
    override _.Stages = stageList

    /// Outputs (NCHW) of the stem, then of stage1.. up to stage `upTo` (1-based; the stem is stage 1).
    override _.ForwardStages(x: Tensor, upTo: int) : Tensor list =
        use _ = NewDisposeScope()
        forwardNhwc x (max 1 (min upTo 5))
        |> List.map (fun y -> y.permute(0L, 3L, 1L, 2L).contiguous().MoveToOuterDisposeScope())

    /// The stages as ONNX operators (eval mode), each output NCHW.
    override _.EmitStages(b, prefix, x) =
        let o = Emitter(b)
        let key = prefix + "features."
        let stem = Graph.emit b (key + "0.0.") (stem.[0].Conv) x
        let first = o.LayerNorm(o.Transpose(stem, [ 0L; 2L; 3L; 1L ]), key + "0.2")
        let stageOut (s: int) (y: string) =
            let index = 2 * s + 1
            let y = if s = 0 then y else emitMerging o (sprintf "%s%d" key (index - 1)) y dims.[s - 1]
            blockStages.[s]
            |> List.indexed
            |> List.fold (fun y (i, blk: Block) -> emitBlock o (sprintf "%s%d.%d" key index i) y dims.[s] (int64 config.Heads.[s]) config.Window blk.Attn.Shift) y
        let nhwc = [ 0..3 ] |> List.scan (fun y s -> stageOut s y) first
        nhwc |> List.map (fun y -> o.Transpose(y, [ 0L; 3L; 1L; 2L ]))

    /// Reseeds stochastic depth's generator.
    override _.Reseed(seed: int64) = depth.Reseed seed

    /// The ImageNet classifier path, as torchvision's forward: the final LayerNorm, average pooling, `head`
    /// (the pooled features where the backbone keeps no classifier).
    override this.forward(x) =
        use _ = NewDisposeScope()
        let last = forwardNhwc x 5 |> List.last
        let pooled = (norm.forward last).mean([| 1L; 2L |])
        (if isNull head then pooled else head.forward pooled).MoveToOuterDisposeScope()

    override _.Dispose(disposing) =
        if disposing then (depth :> System.IDisposable).Dispose()
        base.Dispose disposing

/// Builds a Swin backbone with freshly initialised weights (torchvision's initialisation, from the global generator).
let create (spec: Spec) (config: SwinConfig) : Features = new Net(spec, config)
