/// Console progress: a bar with ETA redrawn in place on a terminal, plain lines when output is redirected.
module Pmg.Cli.Progress

open System

let private width = 28
let private interactive = not Console.IsErrorRedirected

let private clock (t: TimeSpan) =
    if t.TotalHours >= 1.0 then sprintf "%d:%02d:%02d" (int t.TotalHours) t.Minutes t.Seconds
    else sprintf "%02d:%02d" t.Minutes t.Seconds

/// "label [#####.....] done/total elapsed<ETA"
let render (label: string) (fraction: float) (counter: string) (elapsed: TimeSpan) =
    let f = max 0.0 (min 1.0 fraction)
    let filled = int (f * float width)
    let eta = if f > 0.0 then TimeSpan.FromSeconds(elapsed.TotalSeconds * (1.0 - f) / f) else TimeSpan.Zero
    sprintf "%s [%s%s] %s %s<%s" label (String('#', filled)) (String('.', width - filled)) counter (clock elapsed) (clock eta)

/// Redraws the line on a terminal; elsewhere prints it only when `final`.
let show (line: string) (final: bool) =
    if interactive then
        eprintf "\r%s\x1b[K" line
        if final then eprintfn ""
    elif final then
        eprintfn "%s" line
