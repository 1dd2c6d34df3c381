/// Batches of transformed images for training and evaluation, decoded in parallel ahead of use.
module Pmg.Fs.Data.Loader

open System
open System.Collections.Concurrent
open System.Diagnostics
open System.Threading
open System.Threading.Tasks
open SixLabors.ImageSharp
open SixLabors.ImageSharp.PixelFormats
open Pmg.Fs.Data.Transforms

/// Indexed images with labels. Load may throw (missing or corrupt file); the loader skips those.
type Source =
    { /// Number of samples; they are indexed 0 .. Count-1.
      Count: int
      /// The 0-based class of sample i.
      Label: int -> int
      /// A name for sample i in skip reports (its file path for dataset samples).
      Name: int -> string
      /// Decodes sample i; the caller disposes the image.
      Load: int -> Image<Rgb24> }

/// Size samples as CHW float32 (Size x 3 x Height x Width in Images) and their labels.
/// Skipped lists (name, error) for samples of this batch, or of empty batches before it, that failed.
type Batch =
    { /// Size x 3 x Height x Width normalised values, one CHW image after another.
      Images: float32[]
      /// The class of each image, in batch order.
      Labels: int64[]
      /// Number of images in the batch; 0 only for a final batch that carries skips.
      Size: int
      /// Image height in pixels (the transform's crop side).
      Height: int
      /// Image width in pixels (the transform's crop side).
      Width: int
      /// (sample name, error message) of each sample left out.
      Skipped: (string * string) list }

/// Tags keep the permutation's stream apart from every per-sample stream.
let private orderTag = -1

/// The visiting order of one epoch: a seeded Fisher-Yates shuffle, or 0..count-1.
let private order (count: int) (shuffle: bool) (seed: int) (epoch: int) : int[] =
    let idx = Array.init count id
    if shuffle then
        let rng = Random(Seeds.seed [ seed; epoch; orderTag ])
        for i in count - 1 .. -1 .. 1 do
            let j = rng.Next(i + 1)
            let t = idx[i]
            idx[i] <- idx[j]
            idx[j] <- t
    idx

/// The random stream of one sample in one epoch; independent of which thread runs it, and when.
let private sampleRng (seed: int) (epoch: int) (index: int) = Random(Seeds.seed [ seed; epoch; index ])

/// One batch being filled by the workers.
type private Slot(indices: int[], sampleLength: int) =
    let mutable remaining = indices.Length
    member val Indices = indices
    member val Images: float32[] = Array.zeroCreate (indices.Length * sampleLength)
    member val Errors: string option[] = Array.create indices.Length None
    member val Done = TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)
    /// Called once per sample by whichever worker finished it.
    member this.Finish() =
        if Interlocked.Decrement(&remaining) = 0 then this.Done.TrySetResult() |> ignore

/// Decodes and transforms one sample into its place in the slot; any failure becomes a skip.
let private fill (source: Source) (spec: Spec) (seed: int) (epoch: int) (slot: Slot) (position: int) =
    let index = slot.Indices[position]
    try
        try
            use img = source.Load index
            applyInto spec (sampleRng seed epoch index) img slot.Images (position * Spec.sampleLength spec)
        with e ->
            slot.Errors[position] <- Some e.Message
    finally
        slot.Finish()

/// The finished slot as a batch, with failed samples removed (order kept).
let private toBatch (source: Source) (spec: Spec) (slot: Slot) (carried: (string * string) list) : Batch =
    let len = Spec.sampleLength spec
    let kept = [| for p in 0 .. slot.Indices.Length - 1 do if slot.Errors[p].IsNone then p |]
    let images =
        if kept.Length = slot.Indices.Length then slot.Images
        else
            let dst = Array.zeroCreate (kept.Length * len)
            kept |> Array.iteri (fun k p -> Array.blit slot.Images (p * len) dst (k * len) len)
            dst
    let skipped =
        [ for p in 0 .. slot.Indices.Length - 1 do
              match slot.Errors[p] with
              | Some msg -> source.Name slot.Indices[p], msg
              | None -> () ]
    { Images = images
      Labels = kept |> Array.map (fun p -> int64 (source.Label slot.Indices[p]))
      Size = kept.Length
      Height = spec.Crop
      Width = spec.Crop
      Skipped = carried @ skipped }

/// One epoch of this process's parts of the batches: `part` = (rank, ranks) cuts every batch of the one order
/// (the same on every rank) as Collective.part says, so rank r gets exactly the images, crops and flips the single
/// process would give those positions. Every batch is yielded, an empty part too, so the ranks stay in step.
/// `part` = (0, 1) is `batches`.
let batchesPart (part: int * int) (source: Source) (spec: Spec) (batchSize: int) (shuffle: bool) (seed: int) (epoch: int)
                (workers: int) (prefetch: int) : seq<Batch> =
    if batchSize < 1 then invalidArg (nameof batchSize) "must be at least 1"
    let rank, ranks = part
    seq {
        let visit = order source.Count shuffle seed epoch
        let slots =
            visit
            |> Array.chunkBySize batchSize
            |> Array.map (fun whole ->
                let start, count = Pmg.Fs.Runtime.Collective.part whole.Length ranks rank
                Array.sub whole start count)
        let len = Spec.sampleLength spec
        let ahead = max 1 prefetch
        use cancel = new CancellationTokenSource()
        use work = new BlockingCollection<Slot * int>()
        let worker () =
            try
                for slot, position in work.GetConsumingEnumerable cancel.Token do
                    fill source spec seed epoch slot position
            with :? OperationCanceledException -> ()
        let threads =
            Array.init (max 1 workers) (fun _ -> Task.Factory.StartNew(worker, TaskCreationOptions.LongRunning))
        let created = Array.zeroCreate<Slot> slots.Length
        // Queues batch b's samples; done ahead of time so workers never wait on the consumer.
        let submit b =
            if b < slots.Length then
                let slot = Slot(slots[b], len)
                created[b] <- slot
                // An empty part has no sample to finish it.
                if slots[b].Length = 0 then slot.Done.TrySetResult() |> ignore
                for p in 0 .. slots[b].Length - 1 do work.Add((slot, p))
        try
            for b in 0 .. ahead - 1 do submit b
            let mutable carried = []
            for b in 0 .. slots.Length - 1 do
                let slot = created[b]
                slot.Done.Task.Wait()
                created[b] <- Unchecked.defaultof<_>
                submit (b + ahead)
                let batch = toBatch source spec slot carried
                let last = b = slots.Length - 1
                if ranks > 1 || batch.Size > 0 || (last && not batch.Skipped.IsEmpty) then
                    carried <- []
                    yield batch
                else
                    carried <- batch.Skipped
        finally
            cancel.Cancel()
            work.CompleteAdding()
            try Task.WaitAll threads with _ -> ()
    }

/// One epoch of batches (the last may be partial). Order is a permutation seeded by (seed, epoch)
/// when `shuffle`; each sample's augmentation draws from a Random seeded by (seed, epoch, index),
/// so batches are identical whatever `workers` is. `workers` threads decode and transform while up
/// to `prefetch` batches wait ahead of the consumer. A sample whose Load or transform throws is
/// left out and reported in Skipped; a batch left empty is not yielded, its skips move to the next
/// one (an epoch whose final batches all fail ends with a Size 0 batch carrying them). Disposing
/// the enumerator stops the workers.
let batches (source: Source) (spec: Spec) (batchSize: int) (shuffle: bool) (seed: int) (epoch: int)
            (workers: int) (prefetch: int) : seq<Batch> =
    batchesPart (0, 1) source spec batchSize shuffle seed epoch workers prefetch

/// A source over dataset samples: TrimBottom always applied, boxes only when `cropToBox`.
let fromSamples (samples: Sample[]) (cropToBox: bool) : Source =
    { Count = samples.Length
      Label = fun i -> samples[i].Label
      Name = fun i -> samples[i].Path
      Load = fun i -> Images.load samples[i] cropToBox }

/// Images per second for decoding and transforming `count` samples (cycling through `source`)
/// with `workers` threads, through the same pipeline as training.
let throughput (source: Source) (spec: Spec) (count: int) (workers: int) : float =
    if source.Count < 1 then invalidArg (nameof source) "empty source"
    let wrap i = i % source.Count
    let cycled =
        { Count = count
          Label = wrap >> source.Label
          Name = wrap >> source.Name
          Load = wrap >> source.Load }
    let benchBatch = 32
    let watch = Stopwatch.StartNew()
    let seen = batches cycled spec benchBatch false 0 0 workers (2 * max 1 workers) |> Seq.sumBy _.Size
    float seen / watch.Elapsed.TotalSeconds
