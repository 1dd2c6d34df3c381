/// Training plots with ScottPlot from metrics.csv (read by header name, so columns may be added), and the
/// confusion matrix as a heatmap.
module Pmg.Fs.Visual.Plots

open System
open System.Globalization
open System.IO
open ScottPlot

let private width = 900
let private height = 520
let private squareSide = 720
/// Class names on the confusion matrix's axes up to this many classes; beyond, plain indices stay readable.
let private maxNamedClasses = 40
let private percent = 100.0
/// Total characters of class names that fit side by side under the confusion matrix; beyond, they turn upright.
let private maxLabelChars = 60
let private labelPixelsPerChar = 7
let private labelPadding = 40
let private maxLabelRoom = 260

/// metrics.csv as numeric columns, in file order.
type Metrics =
    { /// Column names, in file order.
      Header: string list
      /// Each column's values by name, one per row (NaN where a cell is not a number).
      Columns: Map<string, float[]> }

    /// Number of rows, counted in the "epoch" column (0 without one).
    member m.Rows = m.Columns |> Map.tryFind "epoch" |> Option.map Array.length |> Option.defaultValue 0
    /// The column, or None where the file has no column of that name.
    member m.TryColumn(name: string) = Map.tryFind name m.Columns
    /// The column, or a clear error naming the columns the file has.
    member m.Column(name: string) =
        match Map.tryFind name m.Columns with
        | Some c -> c
        | None -> failwithf "metrics.csv has no column %s (it has %s)" name (String.concat ", " m.Header)
    /// Columns whose names start with `prefix`, in file order.
    member m.Starting(prefix: string) = m.Header |> List.filter (fun h -> h.StartsWith prefix)

/// Parses metrics.csv's lines: a header, then one row per epoch. Cells that are not numbers read as NaN.
let parseMetrics (lines: string seq) : Metrics =
    let rows = lines |> Seq.filter (fun l -> l.Trim() <> "") |> List.ofSeq
    match rows with
    | [] -> { Header = []; Columns = Map.empty }
    | header :: body ->
        let names = header.Split ',' |> Array.map _.Trim() |> List.ofArray
        let cells = body |> List.map (fun l -> l.Split ',')
        let number (s: string) =
            match Double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture) with
            | true, v -> v
            | _ -> nan
        let column i = cells |> List.map (fun c -> if i < c.Length then number c.[i] else nan) |> Array.ofList
        { Header = names; Columns = names |> List.mapi (fun i n -> n, column i) |> Map.ofList }

/// Reads and parses a metrics.csv file.
let readMetrics (path: string) : Metrics = File.ReadAllLines path |> parseMetrics

let private save (plot: Plot) (w: int) (h: int) (path: string) =
    Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath path)) |> ignore
    plot.SavePng(path, w, h) |> ignore

let private lines (plot: Plot) (series: (string * float[] * float[]) list) =
    let palette = Palettes.Category10()
    series
    |> List.iteri (fun i (label, xs, ys) ->
        let s = plot.Add.Scatter(xs, ys, palette.GetColor i)
        s.LegendText <- label
        s.LineWidth <- 2f
        s.MarkerSize <- 5f)
    if not series.IsEmpty then plot.ShowLegend() |> ignore
    // Epochs are whole numbers.
    plot.Axes.Bottom.TickGenerator <- TickGenerators.NumericAutomatic(IntegerTicksOnly = true)

/// Mean training loss of each schedule step per epoch: the `loss_<step>` columns (loss_stage3_8x8 ...), each
/// labelled by its step.
let losses (m: Metrics) (path: string) : unit =
    use plot = new Plot()
    let epochs = m.Column "epoch"
    let series =
        m.Starting "loss_"
        |> List.map (fun col -> col.Substring("loss_".Length).Replace('_', ' '), epochs, m.Column col)
    lines plot series
    plot.Title "Training loss per schedule step"
    plot.XLabel "epoch"
    plot.YLabel "mean loss (weighted as trained)"
    save plot width height path

/// Test top-1 of every head (the `test_<head>` columns), concat and combined per epoch, in percent.
let accuracy (heads: string list) (m: Metrics) (path: string) : unit =
    use plot = new Plot()
    let epochs = m.Column "epoch"
    let pct (c: float[]) = c |> Array.map (fun v -> percent * v)
    let headSeries =
        heads |> List.choose (fun h -> m.TryColumn("test_" + h) |> Option.map (fun c -> h, epochs, pct c))
    lines plot (headSeries @ [ "concat", epochs, pct (m.Column "test_concat"); "combined", epochs, pct (m.Column "test_combined") ])
    plot.Axes.SetLimitsY(0.0, percent)
    plot.Title "Test top-1 accuracy"
    plot.XLabel "epoch"
    plot.YLabel "top-1 (%)"
    save plot width height path

/// Test combined top-1 per epoch of several runs, in one plot.
let compareCombined (runs: (string * Metrics) list) (path: string) : unit =
    use plot = new Plot()
    lines plot [ for name, m in runs -> name, m.Column "epoch", m.Column "test_combined" |> Array.map (fun v -> percent * v) ]
    plot.Axes.SetLimitsY(0.0, percent)
    plot.Title "Test top-1 of combined outputs"
    plot.XLabel "epoch"
    plot.YLabel "top-1 (%)"
    save plot width height path

/// Confusion matrix (rows: true class, columns: predicted) as a heatmap of row-normalised fractions, so that
/// classes with few test images are as visible as large ones.
let confusion (classes: string[]) (matrix: int[,]) (path: string) : unit =
    let n = Array2D.length1 matrix
    let rowTotal i = Seq.sum (seq { for j in 0 .. n - 1 -> matrix.[i, j] })
    let fractions =
        Array2D.init n n (fun i j ->
            let t = rowTotal i
            if t = 0 then 0.0 else float matrix.[i, j] / float t)
    use plot = new Plot()
    let map = plot.Add.Heatmap fractions
    map.Colormap <- Colormaps.Viridis()
    map.ManualRange <- Nullable(Range(0.0, 1.0))
    // ScottPlot centres cell (i, j) at x = j, y = n - 1 - i: row 0 on top, as a matrix is read.
    plot.Add.ColorBar map |> ignore
    if n <= maxNamedClasses then
        let name k = if k < classes.Length then classes.[k] else string k
        let centres = Array.init n float
        plot.Axes.Bottom.SetTicks(centres, Array.init n name)
        plot.Axes.Left.SetTicks(centres, Array.init n (fun k -> name (n - 1 - k)))
        let longest = Seq.init n (name >> String.length) |> Seq.max
        if n * longest > maxLabelChars then
            plot.Axes.Bottom.TickLabelStyle.Rotation <- 90f
            plot.Axes.Bottom.TickLabelStyle.Alignment <- Alignment.MiddleLeft
            // Upright labels need room the automatic layout does not reserve.
            plot.Axes.Bottom.MinimumSize <- float32 (min maxLabelRoom (labelPixelsPerChar * longest + labelPadding))
    plot.Axes.SetLimits(-0.5, float n - 0.5, -0.5, float n - 0.5)
    plot.Title "Confusion matrix, combined outputs (row-normalised)"
    plot.XLabel "predicted class"
    plot.YLabel "true class"
    save plot squareSide squareSide path
