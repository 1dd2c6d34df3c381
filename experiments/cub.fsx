// CUB-200-2011: PMG with the paper's recipe (ResNet50, ImageNet weights, 448 px, 200 epochs); any `pmg train` flag changes it.
//   dotnet fsi experiments/cub.fsx --root <CUB_200_2011> [--device cuda] [any pmg train flag]
//   (ResNet50 ImageNet weights: torchvision's file, fetched once into PyTorch's cache, or --pretrained FILE)
#load "Pmg.fsx"
#load "Common.fsx"

Common.run
    { Kind = "cub"
      Name = "CUB-200-2011"
      Fixture = "CUB_200_2011"
      PaperTop1 = Some 89.6
      Download = "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)" }
