/// The experiment record and the rules that live with it: recipes, derived settings, validation, the differences a
/// resume refuses; and the one home of each TorchSharp workaround.
module Pmg.Fs.Tests.ExperimentTests

open System
open System.IO
open System.Text.RegularExpressions
open Expecto
open Pmg.Fs
open Pmg.Fs.Model
open Pmg.Fs.Tests.TestKit

let private paper = Experiment.paper 200 Experiment.embedded.Data

[<Tests>]
let tests =
    testList
        "experiment"
        [ test "the paper recipe is the paper's" {
              Expect.equal paper.Model.Backbone "resnet50" "backbone"
              Expect.equal (paper.Schedule |> List.map (fun s -> s.Grid, s.LossWeight)) [ 8, 1.0; 4, 1.0; 2, 1.0; 1, 2.0 ] "8/4/2, then concat x2"
              Expect.equal (paper.Optimizer.Lr, paper.Optimizer.BackboneLr) (0.002, 0.0002) "learning rates"
              Expect.equal (paper.Input.Resize, paper.Input.Crop, paper.Input.Padding) (550, 448, 8) "input"
              Expect.equal (paper.BatchSize, paper.Epochs) (16, 200) "batch, epochs"
              Expect.equal paper.BatchNormGroup (Some 8) "two GPUs' halves"
              Expect.isTrue paper.DropLast "partial batches skipped"
              Expect.equal paper.JigsawDraw Jigsaw.Cycle "cycles"
          }

          test "ConvNeXt and Swin refuse crops their strides or windows do not tile, naming the nearest sizes that fit" {
              let on backbone crop =
                  let e = paper |> Experiment.withBackbone backbone |> Experiment.withImageSize crop
                  Experiment.problems e |> List.filter (fst >> (=) Setting.ImageSize) |> List.map snd
              Expect.isEmpty (on "convnext_tiny" 448) "448 = 14 x 32"
              Expect.isEmpty (on "swin_t" 448) "every map of 448 px tiles into 7-token windows"
              Expect.isEmpty (on "swin_t" 224) "224 px too"
              Expect.isEmpty (on "resnet50" 450) "ResNets take any size"
              match on "convnext_tiny" 100 with
              | [ m ] -> Expect.stringContains m "use 96 px or 128 px" m
              | other -> failtestf "one problem expected, got %A" other
              match on "swin_t" 256 with
              | [ m ] ->
                  Expect.stringContains m "use 224 px or 448 px" m
                  Expect.stringContains m "swin_t" m
              | other -> failtestf "one problem expected, got %A" other
          }

          test "withLr sets the backbone's rate at the paper's tenth; withBackboneLr overrides it" {
              let e = Experiment.withLr 0.01 paper
              Expect.floatClose Accuracy.veryHigh e.Optimizer.BackboneLr 0.001 "lr / 10"
              Expect.equal (Experiment.withBackboneLr 0.5 e).Optimizer.BackboneLr 0.5 "explicit"
          }

          test "withImageSize keeps the recipe's resize ratio" {
              Expect.equal (Experiment.withImageSize 224 paper).Input.Resize 275 "550/448 of 224"
              let m = Experiment.embedded
              let e = Experiment.withImageSize (2 * m.Input.Crop) m
              Expect.equal e.Input.Resize (2 * m.Input.Resize) "the embedded recipe's own ratio"
          }

          test "withEpochs keeps warm-up below the epochs" {
              let e = Experiment.withEpochs 3 { paper with WarmupEpochs = 5 }
              Expect.equal (e.Epochs, e.WarmupEpochs) (3, 2) "clamped"
          }

          test "withHeads and withBackbone take the schedule from the stage list; withGrids checks the count" {
              Expect.equal ((Experiment.withHeads 2 paper).Schedule |> List.map _.Grid) [ 4; 2; 1 ] "S = 2"
              Expect.equal ((Experiment.withHeads 4 paper).Schedule |> List.map _.Grid) [ 16; 8; 4; 2; 1 ] "S = 4"
              Expect.equal ((Experiment.withGrids [ 6; 3; 1 ] paper).Schedule |> List.map (fun s -> s.Grid, s.LossWeight)) [ 6, 1.0; 3, 1.0; 1, 1.0; 1, 2.0 ] "grids"
              Expect.throws (fun () -> Experiment.withGrids [ 4; 2 ] paper |> ignore) "two grids for three heads"
              Expect.throws (fun () -> Experiment.withHeads 5 paper |> ignore) "no head on the stem"
              let vgg = Experiment.withBackbone "vgg16" paper
              Expect.equal (Pmg.headNames vgg.Model) [ "stage3"; "stage4"; "stage5" ] "heads named by stage"
          }

          test "the heads' stages come from the backbone's stage list: positions, channels, names" {
              let stages = Backbone.headStages (Backbone.find "resnet50") 3
              Expect.equal (stages |> List.map fst) [ 3; 4; 5 ] "the last three of five"
              Expect.equal (stages |> List.map (fun (_, s) -> s.Name, s.Channels)) [ "layer2", 512; "layer3", 1024; "layer4", 2048 ] "conv3_x..conv5_x"
              use net = Pmg.create (Pmg.Config.Paper 4)
              Expect.equal (net.HeadStages |> List.map fst) [ 3; 4; 5 ] "the network's"
              let weights = net.state_dict () |> Seq.map (fun kv -> kv.Key, kv.Value.shape) |> Map.ofSeq
              Expect.equal weights.["conv_block1.0.conv.weight"].[1] 512L "head 1 reads layer2's 512 channels"
              Expect.equal weights.["conv_block3.0.conv.weight"].[1] 2048L "head 3 reads layer4's 2048"
          }

          test "the optimizer's groups are the backbone's parameters and everything else" {
              use net = Pmg.create (Pmg.Config.Paper 4)
              let backbone = net.BackboneParameters() |> List.map fst
              let heads = net.HeadParameters() |> List.map fst
              Expect.isTrue (backbone |> List.forall (fun n -> n.StartsWith "features.")) "backbone names"
              Expect.isTrue (heads |> List.forall (fun n -> not (n.StartsWith "features."))) "head names"
              let all = [ for struct (n, _) in net.named_parameters () -> n ]
              Expect.equal (List.sort (backbone @ heads)) (List.sort all) "every parameter once"
          }

          test "validate lists every impossible setting at once" {
              let bad =
                  { paper with
                      Epochs = 0
                      BatchSize = 1
                      BatchNormGroup = Some 1
                      Input = { Resize = 10; Crop = 100; Padding = 0 }
                      Optimizer = { paper.Optimizer with Lr = 0.0 } }
              match (try Ok(Experiment.validate bad) with :? PmgException as e -> Error e.Error) with
              | Error(InvalidExperiment ps) ->
                  Expect.equal (ps |> List.map fst) [ Setting.Epochs; Setting.WarmupEpochs; Setting.BatchSize; Setting.BatchNormGroup; Setting.ImageSize; Setting.LearningRate ] (sprintf "epochs, warm-up, batch, BN group, crop, lr: %A" ps)
              | other -> failtestf "accepted or another error: %A" other
              Expect.equal (Experiment.validate paper) paper "a valid one unchanged"
          }

          test "differences names every field that changes what a run learns, nested ones by path" {
              Expect.isEmpty (Experiment.differences paper { paper with Workers = 7; Device = Runtime.Cuda None }) "speed only"
              let other = { (Experiment.withLr 0.1 paper) with BatchSize = 8; Model = { paper.Model with Heads = 2 } }
              Expect.equal (Experiment.differences paper other |> List.map (fun (f, _, _) -> f) |> List.sort) [ "BatchSize"; "Model.Heads"; "Optimizer.BackboneLr"; "Optimizer.Lr" ] "fields"
              Expect.contains (Experiment.differences paper other) ("BatchSize", "16", "8") "both values"
              // One folder spelled two ways is one value.
              let root = IO.Directory.CreateTempSubdirectory("pmg-root-").FullName
              let a = { paper with Data = Experiment.OnDisk { Kind = Data.Dataset.Kind.Cub; Root = root } }
              let b = { paper with Data = Experiment.OnDisk { Kind = Data.Dataset.Kind.Cub; Root = root + "/./" } }
              Expect.isEmpty (Experiment.differences a b) "trailing slash and ./ resolved"
          }

          test "the embedded main job is the paper's method from ImageNet weights" {
              let m = Experiment.embedded
              Expect.equal m.Weights Backbone.ImageNet "ImageNet weights"
              Expect.equal m.WarmupEpochs 0 "no warm-up stand-in"
              Expect.equal (m.Schedule |> List.map (fun s -> s.Grid, s.LossWeight)) [ 8, 1.0; 4, 1.0; 2, 1.0; 1, 2.0 ] "the paper's steps"
              Expect.equal m.Update Experiment.Progressive "one update per step"
              Expect.equal (Backbone.find m.Model.Backbone).ImageNet.IsSome true "its backbone's weights ship"
          }

          test "Recipes.Paper (the C# entry) is the paper's recipe with the class count read from the dataset" {
              let api = Api.Recipes.Paper("cub", FgvcMini.dataset FgvcMini.Cub.folder)
              let e = Json.deserialize<Experiment.Experiment> (api.ToJson())
              Expect.equal e.Model.Classes FgvcMini.Cub.classes.Length "classes from the dataset"
              Expect.equal e.Data (Experiment.OnDisk { Kind = Data.Dataset.parse "cub"; Root = Runtime.Files.resolve (FgvcMini.dataset FgvcMini.Cub.folder) }) "the dataset"
              let recipe = Experiment.paper e.Model.Classes e.Data
              Expect.equal { e with Data = recipe.Data } recipe "otherwise the paper's recipe"
          }

          test "TorchSharp's Scalar-passing spellings appear only in their one home (Runtime/Ops.fs, Model/Layers.fs)" {
              let root = repoRoot ()
              // Temporary Scalars handed to native code: implicit conversions of a literal, ToScalar, TorchSharp's own
              // BatchNorm and ELU. Each has a safe spelling in Ops or Layers.
              let unsafe =
                  [ Regex(@"\.(add|sub|mul|div|add_|sub_|mul_|div_|fill_|pow|clamp|clamp_)\(\s*-?[0-9][0-9_.]*[fLm]?\s*[,)]"), "a literal Scalar argument"
                    Regex(@"\.ToScalar\("), "ToScalar outside Ops"
                    Regex(@"\b(nn\.)?BatchNorm[123]d\s*\("), "TorchSharp's BatchNorm"
                    Regex(@"\bfunctional\.elu\b|\bELU\s*\("), "TorchSharp's ELU" ]
              let homes = set [ "Ops.fs"; "Layers.fs" ]
              let files =
                  [ "src"; "tests"; "experiments" ]
                  |> List.collect (fun d -> Directory.GetFiles(Path.Combine(root, d), "*.fs*", SearchOption.AllDirectories) |> List.ofArray)
                  |> List.filter (fun f -> not (f.Contains "/bin/" || f.Contains "/obj/") && not (homes.Contains(Path.GetFileName f)))
                  |> List.filter (fun f -> Path.GetFileName f <> "ExperimentTests.fs")
              let hits =
                  [ for f in files do
                        for i, line in File.ReadAllLines f |> Array.indexed do
                            let code = (line.Split("//").[0])
                            // A line marked [scalar-ok] uses an original on purpose (a test comparing against it).
                            for r, what in unsafe do
                                if r.IsMatch code && not (line.Contains "[scalar-ok]") then sprintf "%s:%d %s: %s" (Path.GetRelativePath(root, f)) (i + 1) what (line.Trim()) ]
              Expect.equal hits [] "use Runtime.Ops / Model.Layers"
          } ]
