/// The command line's habits that .NET and Unix users expect: -h, --version, --flag=value, one-line usage errors
/// that point at the command's help, counts in the singular for one.
module Pmg.Fs.Tests.CliHabitsTests

open System
open System.Text.RegularExpressions
open Argu
open Expecto
open Pmg.Cli

let private lines (s: string) =
    s.Split('\n', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)

[<Tests>]
let tests =
    testList
        "cli habits"
        [ test "-h is --help, for pmg and for a command" {
              for args, usage in [ [ "-h" ], "USAGE: pmg "; [ "train"; "-h" ], "USAGE: pmg train"; [ "predict"; "-h" ], "USAGE: pmg predict" ] do
                  let o = TestKit.pmg args
                  Expect.equal o.Code 0 (sprintf "pmg %s exits 0: %s" (String.concat " " args) o.Err)
                  Expect.stringContains o.Out usage (sprintf "pmg %s prints the usage" (String.concat " " args))
          }

          test "pmg --version names the version, the commit and the libtorch that loads" {
              let o = TestKit.pmg [ "--version" ]
              Expect.equal o.Code 0 o.Err
              let v = typeof<Pmg.Fs.Runtime.Native.Loaded>.Assembly.GetName().Version
              let version = sprintf "%d.%d.%d" v.Major v.Minor v.Build
              let out = lines o.Out
              Expect.equal out.Length 3 (sprintf "three lines:\n%s" o.Out)
              // The commit comes from git at build time; a build from a source archive has none to give.
              Expect.isTrue (Regex.IsMatch(out.[0], sprintf @"^pmg %s \(commit ([0-9a-f]{40}|unknown)\)$" (Regex.Escape version))) out.[0]
              Expect.stringStarts out.[1] (sprintf "Pmg.Fs %s, TorchSharp 0.107" version) out.[1]
              Expect.isTrue (Regex.IsMatch(out.[2], @"^libtorch 2\.\d+\.\d+\S* from \S")) out.[2]
          }

          test "--flag=value is --flag value" {
              Expect.equal (Program.normalise [| "train"; "--epochs=1"; "--out=runs/a=b"; "-h"; "--resume" |])
                  [| "train"; "--epochs"; "1"; "--out"; "runs/a=b"; "--help"; "--resume" |] "split at the first ="
              let parsed = ArgumentParser.Create<Args.Command>().ParseCommandLine(Program.normalise [| "train"; "--epochs=1"; "--lr=0.5" |])
              match parsed.GetSubCommand() with
              | Args.Train t ->
                  Expect.equal (t.GetResult Args.TrainArgs.Epochs) 1 "--epochs=1"
                  Expect.equal (t.GetResult Args.TrainArgs.Lr) 0.5 "--lr=0.5"
              | other -> failtestf "parsed as %A" other
              // The same refusal, spelt both ways: the value reached the flag's own check.
              let equals = TestKit.pmg [ "train"; "--epochs=0" ]
              let spaced = TestKit.pmg [ "train"; "--epochs"; "0" ]
              Expect.equal (equals.Code, equals.Err) (spaced.Code, spaced.Err) "--epochs=0 is --epochs 0"
              Expect.stringContains equals.Err "--epochs: epochs 0" "the flag's own message"
          }

          test "a bad flag value is one line that points at the command's help, exit 2" {
              for args, flag, help in [ [ "train"; "--lr"; "abc" ], "--lr", "pmg train --help"
                                        [ "eval"; "--checkpoint"; "x.ckpt"; "--batch-size"; "many" ], "--batch-size", "pmg eval --help"
                                        [ "train"; "--no-such-flag" ], "--no-such-flag", "pmg train --help" ] do
                  let o = TestKit.pmg args
                  let shown = String.concat " " args
                  Expect.equal o.Code 2 (sprintf "pmg %s exits 2" shown)
                  Expect.equal (lines o.Err).Length 1 (sprintf "pmg %s: one line, not the usage:\n%s" shown o.Err)
                  Expect.stringContains o.Err help (sprintf "pmg %s points at its help" shown)
                  Expect.stringContains o.Err flag "names the flag"
                  Expect.equal o.Out "" "nothing on stdout"
          }

          test "help texts: export writes ONNX too; counts are singular for one" {
              let o = TestKit.pmg [ "--help" ]
              // Argu wraps the text: compare it as one line.
              let text = Regex.Replace(o.Out, @"\s+", " ")
              let export = text.Substring(text.IndexOf " export ")
              Expect.stringContains (export.Substring(0, 200)) "ONNX" "pmg --help: export also writes ONNX"
              Expect.equal (Args.counted 1 "epoch") "1 epoch" "one epoch"
              Expect.equal (Args.counted 8 "epoch") "8 epochs" "eight epochs"
              Expect.equal (Args.counted 1 "class") "1 class" "one class"
              Expect.equal (Args.counted 200 "class") "200 classes" "200 classes"
          } ]
