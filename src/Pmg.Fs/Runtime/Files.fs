/// Writing files so that a reader never sees half of one: the one atomic writer of the project (checkpoints,
/// run files, exported weights, the patched native library).
module Pmg.Fs.Runtime.Files

open System
open System.IO
open System.Text

/// The temporary name beside `path` while it is written: hidden, and marked with the writer's process id so
/// that a stale one (a killed writer) is recognisable.
let private tempFor (full: string) =
    Path.Combine(Path.GetDirectoryName full, sprintf ".%s.tmp-%d-%s" (Path.GetFileName full) Environment.ProcessId (Guid.NewGuid().ToString "N").[..7])

/// Writes `path` through a temporary file in the same folder, flushed to disk, then renamed over it: a kill or
/// a full disk during the write leaves the previous file whole.
let writeAtomically (path: string) (write: Stream -> unit) : unit =
    let full = Path.GetFullPath path
    Directory.CreateDirectory(Path.GetDirectoryName full) |> ignore
    let tmp = tempFor full
    try
        (use fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None)
         write fs
         fs.Flush true)
        File.Move(tmp, full, true)
    with _ ->
        if File.Exists tmp then File.Delete tmp
        reraise ()

/// Writes `text` to `path` as UTF-8 (no byte-order mark), atomically as `writeAtomically` does.
let writeTextAtomically (path: string) (text: string) : unit =
    writeAtomically path (fun s -> s.Write(ReadOnlySpan(Encoding.UTF8.GetBytes text)))

/// Writes `bytes` to `path`, atomically as `writeAtomically` does.
let writeBytesAtomically (path: string) (bytes: byte[]) : unit =
    writeAtomically path (fun s -> s.Write(ReadOnlySpan bytes))

/// Temporary files a killed writer left in `dir`; removes them and returns their names.
let removeStaleTemps (dir: string) : string list =
    if not (Directory.Exists dir) then []
    else
        [ for f in Directory.GetFiles(dir, ".*.tmp-*") do
              File.Delete f
              Path.GetFileName f ]
