// Stanford Dogs: PMG with the paper's recipe (ResNet50, ImageNet weights, 448 px, 200 epochs); any `pmg train` flag changes it.
//   dotnet fsi experiments/dogs.fsx --root <stanford_dogs> [--device cuda] [any pmg train flag]
//   (ResNet50 ImageNet weights: torchvision's file, fetched once into PyTorch's cache, or --pretrained FILE)
#load "Pmg.fsx"
#load "Common.fsx"

Common.run
    { Kind = "dogs"
      Name = "Stanford Dogs"
      Fixture = "stanford_dogs"
      PaperTop1 = None
      Download = "http://vision.stanford.edu/aditya86/ImageNetDogs/ (images.tar, annotation.tar, lists.tar)" }
