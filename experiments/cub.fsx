// CUB-200-2011: PMG with the paper's recipe (ResNet50, ImageNet weights, 448 px, 200 epochs), or --smoke on a miniature.
//   dotnet fsi experiments/cub.fsx --root <CUB_200_2011> --pretrained resnet50-19c8e357.pth [--device cuda]
//   dotnet fsi experiments/cub.fsx --smoke --root <miniature or full dataset>
#load "Pmg.fsx"
#load "Common.fsx"

Common.run
    { Kind = "cub"
      Name = "CUB-200-2011"
      Fixture = "CUB_200_2011"
      RootVariable = "PMG_CUB_ROOT"
      PaperTop1 = Some 89.6
      Download = "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)" }
