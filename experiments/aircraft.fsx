// FGVC-Aircraft: PMG with the paper's recipe (ResNet50, ImageNet weights, 448 px, 200 epochs), or --smoke on a miniature.
//   dotnet fsi experiments/aircraft.fsx --root <fgvc-aircraft-2013b> --pretrained resnet50-19c8e357.pth [--device cuda]
//   dotnet fsi experiments/aircraft.fsx --smoke --root <miniature or full dataset>
#load "Pmg.fsx"
#load "Common.fsx"

Common.run
    { Kind = "aircraft"
      Name = "FGVC-Aircraft"
      Fixture = "fgvc-aircraft-2013b"
      RootVariable = "PMG_AIRCRAFT_ROOT"
      PaperTop1 = Some 93.4
      Download = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz)" }
