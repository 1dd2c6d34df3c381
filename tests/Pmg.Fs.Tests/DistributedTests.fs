/// Data-parallel training over Open MPI: `mpirun -np 2 pmg train --distributed mpi` against one process with the
/// BatchNorm group set to the per-rank batch (losses and weights to float tolerance, the ranks identical), a rank
/// killed or hung mid-epoch (the other stops, named, in bounded time; the run folder resumes), and the pure rules
/// the backends share (the batch split, the gradient weights, the NCCL id's bytes). The mpirun tests are skipped,
/// with the install line, where mpirun is missing.
module Pmg.Fs.Tests.DistributedTests

open System
open System.Diagnostics
open System.IO
open Expecto
open SixLabors.ImageSharp
open Pmg.Fs
open Pmg.Fs.Data
open Pmg.Fs.Runtime
open Pmg.Fs.Tests.TestKit

/// mpirun on PATH, if any.
let private mpirun: Lazy<string option> =
    lazy
        (Environment.GetEnvironmentVariable("PATH").Split(':')
         |> Array.map (fun d -> Path.Combine(d, "mpirun"))
         |> Array.tryFind File.Exists)

let private needMpirun () =
    match mpirun.Force() with
    | Some m -> m
    | None -> skiptest "mpirun is not installed: apt-get install openmpi-bin (Open MPI) to run the distributed tests"

/// Every run here trains in float64 (the PMG_TEST_FLOAT64 hook): at this size (8 images a batch, 4 a rank, 32 px
/// from random weights) training amplifies rounding so much that two float32 runs of one process with one and
/// with two threads differ by percents after a few steps; in float64 the same comparisons agree to 1e-8.
let private float64 = "PMG_TEST_FLOAT64", "1"

/// `mpirun -np k pmg args` with the environment variables in `env` passed to every rank, one thread each.
let private mpi (k: int) (env: (string * string) list) (args: string list) : Outcome =
    let launcher = needMpirun ()
    let env = ("OMP_NUM_THREADS", "1") :: float64 :: env
    let exported = env |> List.collect (fun (name, _) -> [ "-x"; name ])
    runWith
        launcher
        ([ "--allow-run-as-root"; "--oversubscribe"; "-np"; string k ] @ exported
         @ [ "dotnet"; Path.Combine(AppContext.BaseDirectory, "pmg.dll") ] @ args)
        None
        env
        []

/// 2 classes, 8 training and 2 test images each, 32 px: an epoch is two batches of 8.
let private dataset =
    lazy
        (let root = Path.Combine(processTempDir "mpi-data", "data")
         let count split = if split = "train" then 8 else 2
         folderDataset root [ "a"; "b" ] count (fun dir split c i ->
             use img = Synthetic.renderClass 32 (if c = "a" then 0 else 1) (i * 11 + count split)
             img.SaveAsPng(Path.Combine(dir, sprintf "%d.png" i)))
         root)

/// Epochs of ResNet18 from random weights on the small dataset, a patch order per image (so each rank takes its
/// own rows of the batch's draws).
let private trainFor (epochs: int) (out: string) =
    [ "train"; "--dataset"; "folder"; "--root"; dataset.Force(); "--backbone"; "resnet18"; "--pretrained"; "none"
      "--epochs"; string epochs; "--image-size"; "32"; "--batch-size"; "8"; "--workers"; "1"; "--per-sample-jigsaw"
      "--no-tensorboard"; "--out"; out ]

/// Every weight and buffer a rank wrote through the PMG_TEST_WEIGHTS_TO hook.
/// Two epochs: a run that commits one and can be cut in the second.
let private trainArgs = trainFor 2

let private weightsOf (dir: string) (rank: int) : float[] =
    let bytes = File.ReadAllBytes(Path.Combine(dir, sprintf "rank-%d.bin" rank))
    let values = Array.zeroCreate<float> (bytes.Length / 8)
    Buffer.BlockCopy(bytes, 0, values, 0, bytes.Length)
    values

/// metrics.csv's loss and training-accuracy columns, row by row.
let private trainingColumns (run: string) : float[][] =
    let lines = File.ReadAllLines(Path.Combine(run, "metrics.csv"))
    let header = lines.[0].Split ','
    let wanted = header |> Array.indexed |> Array.filter (fun (_, h) -> h.StartsWith "loss_" || h = "train_acc") |> Array.map fst
    lines.[1..] |> Array.map (fun l -> let cells = l.Split ',' in wanted |> Array.map (fun i -> float cells.[i]))

let private fail (what: string) (o: Outcome) =
    failwithf "%s failed (%d):\n%s\n%s" what o.Code o.Out o.Err

/// A distributed run of `epochs`: (run folder, weights folder).
let private distributed (epochs: int) (dir: string) =
    let run, weights = Path.Combine(dir, "run"), Path.Combine(dir, "weights")
    Directory.CreateDirectory weights |> ignore
    let o = mpi 2 [ "PMG_TEST_WEIGHTS_TO", weights ] (trainFor epochs run @ [ "--distributed"; "mpi" ])
    if o.Code <> 0 then fail "mpirun -np 2 pmg train" o
    run, weights

/// The two-epoch distributed run, made once.
let private distributedRun = lazy (distributed 2 (processTempDir "mpi-run"))

let private close (tolerance: float) (a: float[]) (b: float[]) (what: string) =
    Expect.equal a.Length b.Length (what + ": as many values")
    let worst = Array.map2 (fun (x: float) y -> abs (x - y) / (1.0 + abs x)) a b |> Array.max
    Expect.isLessThan worst tolerance (sprintf "%s: largest relative difference %g" what worst)

let private launched =
    testSequenced
    <| testList
        "distributed training (mpirun)"
        [ test "two ranks train as one process whose BatchNorm groups are the per-rank batch, and end identical" {
              // One epoch (two batches, eight updates): further on, even one process with one thread and with two
              // threads part by more than 1e-3 in float64 at this size; here they agree to 1e-8.
              use dir = new TempDir "mpi-equal"
              let run, weights = distributed 1 (dir.File "mpi")
              let singleWeights = dir.File "weights"
              Directory.CreateDirectory singleWeights |> ignore
              let o =
                  pmgWith
                      [ "PMG_TEST_WEIGHTS_TO", singleWeights; "OMP_NUM_THREADS", "1"; float64 ]
                      (trainFor 1 (dir.File "single") @ [ "--bn-group"; "4" ])
              if o.Code <> 0 then fail "pmg train --bn-group 4" o
              let one, two = trainingColumns (dir.File "single"), trainingColumns run
              Expect.equal two.Length 1 "one epoch in the distributed run's metrics"
              close 1e-6 one.[0] two.[0] "losses and training accuracy"
              let rank0, rank1 = weightsOf weights 0, weightsOf weights 1
              close 1e-6 (weightsOf singleWeights 0) rank0 "weights and running statistics, one process vs rank 0"
              Expect.sequenceEqual rank1 rank0 "both ranks end with the same weights and buffers, bit for bit"
              // The comparison tells BatchNorm's groups apart: one process normalising the whole batch of 8 is
              // another training, far outside the tolerance.
              let whole = dir.File "whole"
              let o = pmgWith [ "OMP_NUM_THREADS", "1"; float64 ] (trainFor 1 whole @ [ "--bn-group"; "none" ])
              if o.Code <> 0 then fail "pmg train --bn-group none" o
              let worst = Array.map2 (fun (a: float) b -> abs (a - b)) (trainingColumns whole).[0] two.[0] |> Array.max
              Expect.isGreaterThan worst 1e-3 "the whole batch's BatchNorm trains differently"
          }

          test "a rank killed mid-epoch stops the run, named, in bounded time; the folder resumes to the uninterrupted result" {
              let _, uninterrupted = distributedRun.Force()
              use dir = new TempDir "mpi-kill"
              let run, weights = dir.File "run", dir.File "weights"
              Directory.CreateDirectory weights |> ignore
              let clock = Stopwatch.StartNew()
              let o =
                  mpi 2 [ "PMG_TEST_KILL_AT", "epoch-2-batch-2"; "PMG_TEST_KILL_RANK", "1"; "PMG_COLLECTIVE_TIMEOUT", "60" ] (trainArgs run @ [ "--distributed"; "mpi" ])
              Expect.notEqual o.Code 0 (sprintf "the launch fails: %s %s" o.Out o.Err)
              Expect.isLessThan clock.Elapsed.TotalSeconds 600.0 "within bounded time"
              Expect.stringContains (o.Out + o.Err) "rank 1" "the message names the rank that died"
              Expect.isTrue (File.Exists(Path.Combine(run, "last.ckpt"))) "epoch 1 was committed"
              let resumed = mpi 2 [ "PMG_TEST_WEIGHTS_TO", weights ] (trainArgs run @ [ "--distributed"; "mpi"; "--resume" ])
              if resumed.Code <> 0 then fail "the resume" resumed
              Expect.equal (trainingColumns run).Length 2 "both epochs in metrics.csv"
              Expect.sequenceEqual (weightsOf weights 0) (weightsOf uninterrupted 0) "the resumed run ends where the uninterrupted one did"
              Expect.sequenceEqual (weightsOf weights 1) (weightsOf weights 0) "the ranks agree after the resume"
          }

          test "a rank that hangs makes the other fail with its own message after the collective timeout" {
              use dir = new TempDir "mpi-hang"
              let clock = Stopwatch.StartNew()
              let o =
                  mpi 2 [ "PMG_TEST_KILL_AT", "epoch-1-batch-2"; "PMG_TEST_KILL_RANK", "1"; "PMG_TEST_KILL_HOW", "stop"; "PMG_COLLECTIVE_TIMEOUT", "10" ] (trainArgs (dir.File "run") @ [ "--distributed"; "mpi" ])
              Expect.notEqual o.Code 0 "the launch fails"
              Expect.isLessThan clock.Elapsed.TotalSeconds 300.0 "within bounded time"
              Expect.stringContains o.Err "rank 0 of 2" "rank 0 names itself"
              Expect.stringContains o.Err "did not complete within 10 s" "and the wait"
              Expect.isFalse (o.Err.Contains "   at ") "no stack trace"
          }

          test "resuming with another number of processes is refused, naming both" {
              let run, _ = distributedRun.Force()
              let o = pmgWith [ float64 ] (trainArgs run @ [ "--resume" ])
              Expect.equal o.Code 1 (sprintf "refused: %s" o.Err)
              Expect.stringContains o.Err "Ranks" "names the setting"
          } ]

let private rules =
    testList
        "distributed rules"
        [ test "a batch is split as torch.chunk splits it, every image in exactly one part" {
              for n in 0..20 do
                  for k in 1..5 do
                      let parts = [ for r in 0 .. k - 1 -> Collective.part n k r ]
                      Expect.equal (parts |> List.sumBy snd) n (sprintf "%d over %d: every image once" n k)
                      parts |> List.pairwise |> List.iter (fun ((s, c), (s', _)) -> Expect.equal (s + c) s' "parts follow each other")
                      let c = (n + k - 1) / k
                      Expect.isTrue (parts |> List.forall (fun (_, m) -> m <= c)) "at most ceil(n/k) a part"
              Expect.equal [ for r in 0..1 -> Collective.part 16 2 r ] [ 0, 8; 8, 8 ] "16 over 2: 8 + 8"
              Expect.equal [ for r in 0..1 -> Collective.part 9 2 r ] [ 0, 5; 5, 4 ] "9 over 2: 5 + 4"
              Expect.equal [ for r in 0..3 -> Collective.part 3 4 r ] [ 0, 1; 1, 1; 2, 1; 3, 0 ] "3 over 4: the last part empty"
          }

          test "the gradient weights of the parts sum to one (the mean over the whole batch)" {
              for n in 2..17 do
                  for k in 1..4 do
                      let total = [ for r in 0 .. k - 1 -> Collective.gradientWeight (snd (Collective.part n k r)) n ] |> List.sum
                      Expect.floatClose Accuracy.veryHigh total 1.0 (sprintf "%d over %d" n k)
              Expect.equal (Collective.gradientWeight 8 16) 0.5 "equal parts: 1/K"
          }

          test "buffers longer than one MPI count go in 32-bit chunks that cover them exactly" {
              let cover (count: int64) (most: int64) =
                  let cs = Collective.chunks count most
                  Expect.equal (cs |> List.sumBy (snd >> int64)) count "every element once"
                  Expect.isTrue (cs |> List.forall (fun (_, n) -> int64 n <= most && n > 0)) "each within the limit"
                  cs |> List.pairwise |> List.iter (fun ((o, n), (o', _)) -> Expect.equal (o + int64 n) o' "in order")
              cover 0L 5L
              cover 10L 5L
              cover 11L 5L
              cover ((1L <<< 31) + 3L) (1L <<< 30)
          }

          test "the NCCL bootstrap: the unique id survives its byte form, datatypes map to NCCL's codes" {
              let id = Array.init Collective.ncclIdBytes (fun i -> byte (i * 7 + 3))
              Expect.sequenceEqual (Collective.ncclIdRoundTrip id) id "128 bytes there and back"
              Expect.throwsT<TrainingException> (fun () -> Collective.ncclIdRoundTrip [| 1uy; 2uy |] |> ignore) "a short id is refused"
              Expect.equal (Collective.ncclType TorchSharp.torch.ScalarType.Float32) 7 "ncclFloat32"
              Expect.equal (Collective.ncclType TorchSharp.torch.ScalarType.Float64) 8 "ncclFloat64"
              Expect.equal (Collective.ncclType TorchSharp.torch.ScalarType.Int64) 4 "ncclInt64"
          }

          test "the backends parse, and K is checked against the batch" {
              Expect.equal (Collective.parse "MPI") (Some Collective.Mpi) "mpi"
              Expect.equal (Collective.parse "nccl") (Some Collective.Nccl) "nccl"
              Expect.equal (Collective.parse "none") None "none"
              Expect.throwsT<InvalidSettingsException> (fun () -> Collective.parse "gloo" |> ignore) "an unknown backend"
              let e = { Experiment.embedded with BatchSize = 16 }
              Expect.isEmpty (Experiment.problems { e with Ranks = Some 2 }) "16 over 2"
              Expect.isNonEmpty (Experiment.problems { e with Ranks = Some 9 }) "16 over 9 leaves a process one image"
              Expect.isNonEmpty (Experiment.problems { e with Collective = Some Collective.Nccl }) "NCCL on the CPU"
              Expect.isNonEmpty (Experiment.differences { e with Ranks = Some 2 } e) "K is part of what a run learns"
              Expect.isEmpty (Experiment.differences { e with Collective = Some Collective.Mpi } e) "the backend is not"
          }

          test "the command refuses an unknown backend and NCCL on the CPU, naming the flag" {
              let unknown = pmg [ "train"; "--distributed"; "gloo"; "--epochs"; "1" ]
              Expect.equal unknown.Code 2 (sprintf "a bad value: %s" unknown.Err)
              Expect.stringContains unknown.Err "--distributed" "names the flag"
              let cpu = pmg [ "train"; "--distributed"; "nccl"; "--epochs"; "1" ]
              Expect.equal cpu.Code 2 (sprintf "NCCL on the CPU: %s" cpu.Err)
              Expect.stringContains cpu.Err "CUDA" "says what NCCL needs"
          }

          test "the C# door: WithDistributed sets the backend, refuses an unknown one" {
              let e = Api.Recipes.Embedded
              Expect.equal e.Distributed "none" "one process by default"
              Expect.equal (e.WithDistributed("MPI").Distributed) "mpi" "mpi"
              Expect.equal (e.WithDistributed("nccl").Distributed) "nccl" "nccl"
              Expect.equal (e.WithDistributed("mpi").WithDistributed("none").Distributed) "none" "and back"
              Expect.throwsT<InvalidSettingsException> (fun () -> e.WithDistributed "gloo" |> ignore) "an unknown backend"
          }

          test "each rank's part of a batch holds exactly the images, crops and flips of those positions in the whole batch" {
              let data = Synthetic.create { Synthetic.Config.Default with Classes = 3; TrainPerClass = 7; TestPerClass = 1; ImageSize = 20 }
              let spec = { Transforms.Spec.train 20 16 with Padding = 2 }
              let whole = Loader.batches data.Train spec 8 true 5 1 1 2 |> List.ofSeq
              for k in [ 2; 3 ] do
                  let parts = [ for r in 0 .. k - 1 -> Loader.batchesPart (r, k) data.Train spec 8 true 5 1 1 2 |> List.ofSeq ]
                  for p in parts do
                      Expect.equal p.Length whole.Length "every rank sees every batch, an empty part too"
                  whole
                  |> List.iteri (fun b w ->
                      let pieces = parts |> List.map (fun p -> p.[b])
                      Expect.sequenceEqual (pieces |> Seq.collect (fun p -> p.Labels)) w.Labels (sprintf "batch %d over %d: labels" b k)
                      Expect.sequenceEqual (pieces |> Seq.collect (fun p -> p.Images)) w.Images (sprintf "batch %d over %d: pixels" b k))
          } ]

[<Tests>]
let tests = testList "distributed" [ rules; launched ]
