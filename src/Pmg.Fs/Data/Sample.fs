namespace Pmg.Fs.Data

/// A pixel box in the original image: top-left corner, width and height.
type Box = { X: int; Y: int; Width: int; Height: int }

/// One labelled image of a dataset and how to cut it before the transforms.
type Sample =
    { /// The image file.
      Path: string
      /// 0-based class index into the dataset's Classes.
      Label: int
      /// Object box, used only with --crop-to-box.
      Box: Box option
      /// Rows removed from the bottom before anything else (FGVC-Aircraft's 20-pixel copyright banner).
      TrimBottom: int }

/// A file that cannot be used, and why.
type Problem = { File: string; Problem: string }

/// A dataset resolved from its on-disk layout: class names, both splits, and what could not be used.
type DatasetIndex =
    { /// Display name, e.g. "CUB-200-2011" or "FGVC-Aircraft (variant)".
      Name: string
      /// Full path of the dataset root.
      Root: string
      /// Class names; a sample's Label indexes this array.
      Classes: string[]
      /// The training split (trainval for FGVC-Aircraft).
      Train: Sample[]
      /// The test split.
      Test: Sample[]
      /// Files and entries left out of both splits, and why.
      Problems: Problem list }
