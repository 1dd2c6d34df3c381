/// JSON for records and unions (config.json, checkpoints, CLI output), one set of options for the project.
module Pmg.Fs.Json

open System.Text.Json
open System.Text.Json.Serialization

/// Heads by the name used everywhere ("stage3", "concat"). Files written before heads were named by stage hold
/// {"Granularity": i}: read as the head on stage i + 3, which is right for every five-stage backbone with three heads
/// (any other case is caught by the experiment's validation).
type private HeadIdConverter() =
    inherit JsonConverter<Pmg.Fs.Model.Pmg.HeadId>()

    override _.Read(reader, _, _) =
        match reader.TokenType with
        | JsonTokenType.String ->
            let name = reader.GetString()
            match Pmg.Fs.Model.Pmg.tryOutput name with
            | Some h -> h
            | None -> raise (JsonException(sprintf "unknown output '%s' (stage3, stage4, ..., concat)" name))
        | JsonTokenType.StartObject ->
            use doc = JsonDocument.ParseValue(&reader)
            match doc.RootElement.TryGetProperty "Granularity" with
            | true, v -> Pmg.Fs.Model.Pmg.Stage(v.GetInt32() + 3)
            | _ -> raise (JsonException "a head is \"stage<N>\" or \"concat\"")
        | _ -> raise (JsonException "a head is \"stage<N>\" or \"concat\"")

    override _.Write(writer, value, _) = writer.WriteStringValue(Pmg.Fs.Model.Pmg.outputName value)

let private make (indented: bool) =
    // NaN and infinities (a diverged model's scores) are written as "NaN"/"Infinity" rather than failing.
    let o = JsonSerializerOptions(WriteIndented = indented, NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals)
    // FSharpLu-like: fieldless cases as strings ("Fp32"), others as {"Case": fields}, options unwrapped.
    o.Converters.Add(HeadIdConverter())
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
