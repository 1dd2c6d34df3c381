namespace Pmg.Fs.Data

/// A pixel box in the original image: top-left corner, width and height.
type Box = { X: int; Y: int; Width: int; Height: int }

/// One labelled image of a dataset and how to cut it before the transforms.
type Sample =
    { Path: string
      Label: int
      /// Object box, used only with --crop-to-box.
      Box: Box option
      /// Rows removed from the bottom before anything else (FGVC-Aircraft's 20-pixel copyright banner).
      TrimBottom: int }

/// A file that cannot be used, and why.
type Problem = { File: string; Problem: string }

/// A dataset resolved from its on-disk layout: class names, both splits, and what could not be used.
type DatasetIndex =
    { Name: string
      Root: string
      Classes: string[]
      Train: Sample[]
      Test: Sample[]
      Problems: Problem list }
