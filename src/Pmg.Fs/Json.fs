/// JSON for records and unions (config.json, checkpoints, CLI output), one set of options for the project.
module Pmg.Fs.Json

open System.Text.Json
open System.Text.Json.Serialization

let private make (indented: bool) =
    // NaN and infinities (a diverged model's scores) are written as "NaN"/"Infinity" rather than failing.
    let o = JsonSerializerOptions(WriteIndented = indented, NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals)
    // FSharpLu-like: fieldless cases as strings ("Fp32"), others as {"Case": fields}, options unwrapped.
    o.Converters.Add(JsonFSharpConverter(JsonUnionEncoding.FSharpLuLike))
    o

let private indented = make true
let private compact = make false

/// Indented JSON, with the project's options (unions FSharpLu-like, NaN and infinities as named literals).
let serialize<'T> (value: 'T) : string = JsonSerializer.Serialize<'T>(value, indented)
/// Reads JSON written by `serialize` or `line`.
let deserialize<'T> (text: string) : 'T = JsonSerializer.Deserialize<'T>(text, indented)

/// One line, for JSON-lines output.
let line<'T> (value: 'T) : string = JsonSerializer.Serialize<'T>(value, compact)
