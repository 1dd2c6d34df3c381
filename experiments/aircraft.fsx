// FGVC-Aircraft: PMG with the paper's recipe (ResNet50, ImageNet weights, 448 px, 200 epochs); any `pmg train` flag changes it.
//   dotnet fsi experiments/aircraft.fsx --root <fgvc-aircraft-2013b> [--device cuda] [any pmg train flag]
//   (ResNet50 ImageNet weights: torchvision's file, fetched once into PyTorch's cache, or --pretrained FILE)
#load "Pmg.fsx"
#load "Common.fsx"

Common.run
    { Kind = "aircraft"
      Name = "FGVC-Aircraft"
      Fixture = "fgvc-aircraft-2013b"
      PaperTop1 = Some 93.4
      Download = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz)" }
