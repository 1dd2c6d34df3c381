/// The C# project's tests (tests/Pmg.Fs.CSharpTests, built with warnings as errors), run in this suite.
module Pmg.Fs.Tests.CSharpTests

open Expecto

[<Tests>]
let tests =
    // Sequenced: they train, and weight initialisation draws from libtorch's global generator.
    testSequenced
    <| testList
        "csharp"
        [ for t in Pmg.Fs.CSharpTests.CSharpTests.All -> testCase t.Key (fun () -> t.Value.Invoke().GetAwaiter().GetResult()) ]
