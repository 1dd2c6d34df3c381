/// scripts/ref_bench.py, the reference PyTorch benchmark that GPU figures are compared with, must keep working:
/// its own --check (a tiny CPU configuration: layer layout, jigsaw, one training iteration) runs here with the
/// first python that has torch.
module Pmg.Fs.Tests.RefBenchTests

open System
open System.IO
open System.Diagnostics
open Expecto

let private root () =
    let rec up (d: DirectoryInfo) =
        if isNull d then failwith "repository root not found"
        elif File.Exists(Path.Combine(d.FullName, "Pmg.Fs.sln")) then d.FullName
        else up d.Parent
    up (DirectoryInfo AppContext.BaseDirectory)

/// Runs a program; exit code and both streams, or None when it cannot start or outlasts `seconds`.
let private run (program: string) (args: string list) (seconds: int) =
    try
        let psi = ProcessStartInfo(program, RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = root ())
        for a in args do
            psi.ArgumentList.Add a
        use p = Process.Start psi
        let out = p.StandardOutput.ReadToEndAsync()
        let err = p.StandardError.ReadToEndAsync()
        if p.WaitForExit(seconds * 1000) then
            Some(p.ExitCode, out.Result, err.Result)
        else
            p.Kill true
            Some(-1, out.Result, err.Result + sprintf "\n(killed after %d s)" seconds)
    with _ ->
        None

// Debian's python3-torch lives in /usr/bin/python3; `python3` on PATH may be another python without it.
let private pythons = [ "/usr/bin/python3"; "python3"; "/opt/torch/.venv/bin/python3" ]

let private withTorch () =
    pythons
    |> List.tryFind (fun py ->
        match run py [ "-c"; "import torch" ] 60 with
        | Some(0, _, _) -> true
        | _ -> false)

[<Tests>]
let tests =
    testList
        "reference benchmark"
        [ test "scripts/ref_bench.py --check passes" {
              match withTorch () with
              | None -> skiptestf "no python with torch found (tried %s): the reference benchmark is not checked here" (String.concat ", " pythons)
              | Some py ->
                  match run py [ Path.Combine("scripts", "ref_bench.py"); "--check" ] 240 with
                  | None -> failtestf "%s could not run scripts/ref_bench.py" py
                  | Some(code, out, err) ->
                      Expect.equal code 0 (sprintf "%s scripts/ref_bench.py --check:\n%s%s" py out err)
                      Expect.stringContains out "all checks passed" "the check's summary line"
          } ]
