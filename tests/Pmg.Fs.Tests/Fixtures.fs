module Pmg.Fs.Tests.Fixtures

open System
open System.IO

/// The project's shared/ folder: beside the repository (../shared), found by walking up from here.
let shared () =
    let rec up (dir: DirectoryInfo) =
        if isNull dir then
            failwithf "shared/fixtures not found above %s: tests expect the shared/ folder beside the repository" Environment.CurrentDirectory
        else
            let c = Path.Combine(dir.FullName, "shared")
            if Directory.Exists(Path.Combine(c, "fixtures")) then c else up dir.Parent
    up (DirectoryInfo AppContext.BaseDirectory)

/// The miniature FGVC datasets.
let root () = Path.Combine(shared (), "fixtures", "fgvc-mini")
