module Pmg.Cli.Program
[<EntryPoint>]
let main argv = 0
