/// The C# surface (namespace Pmg.Fs.Api) in plain .NET shapes: no public member takes or gives an F# type (list,
/// option, function, map, set, tuple, unit, or one of the library's records and unions). Checked by reflection over
/// the Pmg.Fs assembly, naming every offending member.
module Pmg.Fs.Tests.ApiSurfaceTests

open System
open System.Reflection
open Expecto
open Microsoft.FSharp.Core

/// Why a type is an F# shape to a C# caller, or None: FSharp.Core's types (FSharpList, FSharpOption,
/// FSharpValueOption, FSharpFunc, FSharpMap, FSharpSet, Unit, FSharpResult, ...), tuples (F# tuples are
/// System.Tuple and System.ValueTuple), and F# records and unions; looked for inside arrays, by-refs, pointers
/// and generic arguments (Task<FSharpList<_>>, Nullable<_>, IReadOnlyList<_>).
let rec fsharpShape (t: Type) : string option =
    if isNull t then None
    elif t.HasElementType then fsharpShape (t.GetElementType())
    elif t.IsGenericParameter then None
    else
        let name = if t.IsGenericType then t.GetGenericTypeDefinition().FullName else t.FullName
        let own =
            if t.Assembly = typeof<list<int>>.Assembly then
                Some(sprintf "%s is an F# type (FSharp.Core)" t.Name)
            elif not (isNull name) && (name.StartsWith "System.Tuple`" || name.StartsWith "System.ValueTuple`") then
                Some(sprintf "%s is a tuple" t.Name)
            else
                match t.GetCustomAttributes(typeof<CompilationMappingAttribute>, false) |> Array.tryHead with
                | Some(:? CompilationMappingAttribute as m) when m.SourceConstructFlags = SourceConstructFlags.RecordType ->
                    Some(sprintf "%s is an F# record" t.FullName)
                | Some(:? CompilationMappingAttribute as m) when m.SourceConstructFlags = SourceConstructFlags.SumType ->
                    Some(sprintf "%s is an F# union" t.FullName)
                | _ -> None
        match own with
        | Some _ -> own
        | None when t.IsGenericType -> t.GetGenericArguments() |> Array.tryPick fsharpShape
        | None -> None

let private publicMembers =
    BindingFlags.Public ||| BindingFlags.Instance ||| BindingFlags.Static ||| BindingFlags.DeclaredOnly

/// Every public member of `types` that takes or gives an F# shape, as "Type.Member: what and why"; a type that is
/// itself an F# record or union is named too (C# sees its compiler-made members and F# equality).
let offenders (types: Type seq) : string list =
    let memberOffences (t: Type) =
        let check (owner: string) (what: string) (ty: Type) =
            fsharpShape ty |> Option.map (fun why -> sprintf "%s.%s: %s %s" t.FullName owner what why) |> Option.toList
        let signature (m: MethodBase) =
            sprintf "%s(%s)" m.Name (m.GetParameters() |> Array.map (fun p -> p.ParameterType.Name) |> String.concat ", ")
        [ for c in t.GetConstructors publicMembers do
              for p in c.GetParameters() do
                  yield! check (signature c) (sprintf "parameter %s:" p.Name) p.ParameterType
          // Property and event accessors are checked as their property or event.
          for m in t.GetMethods publicMembers |> Array.filter (fun m -> not m.IsSpecialName) do
              yield! check (signature m) "returns" m.ReturnType
              for p in m.GetParameters() do
                  yield! check (signature m) (sprintf "parameter %s:" p.Name) p.ParameterType
          for p in t.GetProperties publicMembers do
              if (p.GetMethod <> null && p.GetMethod.IsPublic) || (p.SetMethod <> null && p.SetMethod.IsPublic) then
                  yield! check p.Name "property" p.PropertyType
                  for i in p.GetIndexParameters() do
                      yield! check p.Name (sprintf "index %s:" i.Name) i.ParameterType
          for f in t.GetFields publicMembers do
              yield! check f.Name "field" f.FieldType
          for e in t.GetEvents publicMembers do
              yield! check e.Name "event" e.EventHandlerType ]
    [ for t in types do
          match fsharpShape t with
          // Its members are the compiler's (equality, comparison, union cases): the type is what to change.
          | Some why when not t.IsGenericTypeDefinition -> yield sprintf "%s: the type itself: %s" t.FullName why
          | _ -> yield! memberOffences t ]

/// A type with every kind of F# shape, to show that the check finds each (a check that finds nothing proves nothing).
type FSharpShaped(items: int list) =
    member _.Items = items
    member _.First: int option = List.tryHead items
    member _.Map(f: int -> int) = List.map f items
    member _.Pair() = (1, "one")
    member _.Fine: Collections.Generic.IReadOnlyList<int> = List.toArray items :> _
    member _.Nested: Threading.Tasks.Task<Map<string, int>> = Threading.Tasks.Task.FromResult Map.empty

let private apiTypes () =
    typeof<Pmg.Fs.Runtime.Native.Loaded>.Assembly.GetExportedTypes()
    |> Array.filter (fun t -> t.Namespace = "Pmg.Fs.Api")

[<Tests>]
let tests =
    testList
        "api surface"
        [ test "the check names each F# shape of a type that has them" {
              let found = offenders [ typeof<FSharpShaped> ]
              let named (fragment: string) = found |> List.exists (fun s -> s.Contains fragment)
              for m in [ ".ctor(FSharpList`1): parameter items"; "Items: property FSharpList"; "First: property FSharpOption"
                         "Map(FSharpFunc`2): parameter f: FSharpFunc"; "Map(FSharpFunc`2): returns FSharpList"
                         "Pair(): returns Tuple"; "Nested: property FSharpMap" ] do
                  Expect.isTrue (named m) (sprintf "found %s in:\n%s" m (String.concat "\n" found))
              Expect.isFalse (named "Fine") "IReadOnlyList<int> is a plain .NET shape"
              Expect.equal (offenders [ typeof<Pmg.Fs.Model.Backbone.Spec> ] |> List.head |> fun s -> s.Contains "F# record") true
                  "a library record is named as one"
          }

          test "no public member of Pmg.Fs.Api exposes an F# type" {
              let types = apiTypes ()
              Expect.isNonEmpty types "Pmg.Fs.Api holds the C# surface"
              let found = offenders types
              Expect.isEmpty found (sprintf "%d members of Pmg.Fs.Api expose F# shapes to C#:\n  %s" found.Length (String.concat "\n  " found))
          } ]
