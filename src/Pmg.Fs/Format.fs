/// How numbers are written for people and files, one way each: culture-invariant, so a run's files read the same
/// on every machine.
module Pmg.Fs.Format

open System
open System.Globalization

/// Up to six decimals, no exponent for ordinary values: metrics.csv, reports.
let number (x: float) = x.ToString("0.######", CultureInfo.InvariantCulture)

/// An accuracy in [0, 1] as a right-aligned percentage (" 42.3%"); "-" for NaN (nothing measured).
let percent (x: float) =
    if Double.IsNaN x then "-" else (100.0 * x).ToString("0.0", CultureInfo.InvariantCulture).PadLeft 5 + "%"
