/// Deterministic seeds from structured inputs (seed, epoch, index, ...): SplitMix64's finaliser folded over the
/// parts, so that nearby inputs give unrelated streams. The loader's order and crops and the embedded dataset's
/// pixels all come from here.
module Pmg.Fs.Data.Seeds

/// SplitMix64's finaliser.
let mix (x: uint64) =
    let mutable z = x + 0x9E3779B97F4A7C15UL
    z <- (z ^^^ (z >>> 30)) * 0xBF58476D1CE4E5B9UL
    z <- (z ^^^ (z >>> 27)) * 0x94D049BB133111EBUL
    z ^^^ (z >>> 31)

/// A 64-bit hash of the parts, in order.
let hash (parts: int list) : uint64 =
    parts |> List.fold (fun acc p -> mix (acc ^^^ uint64 (uint32 p))) 0UL

/// A non-negative 31-bit seed (System.Random's) from the parts.
let seed (parts: int list) : int = int (hash parts >>> 33)
