// Stanford Dogs: PMG with the paper's recipe (ResNet50, ImageNet weights, 448 px, 200 epochs), or --smoke on a miniature.
//   dotnet fsi experiments/dogs.fsx --root <stanford_dogs> --pretrained resnet50-19c8e357.pth [--device cuda]
//   dotnet fsi experiments/dogs.fsx --smoke --root <miniature or full dataset>
#load "Pmg.fsx"
#load "Common.fsx"

Common.run
    { Kind = "dogs"
      Name = "Stanford Dogs"
      Fixture = "stanford_dogs"
      RootVariable = "PMG_DOGS_ROOT"
      PaperTop1 = None
      Download = "http://vision.stanford.edu/aditya86/ImageNetDogs/ (images.tar, annotation.tar, lists.tar)" }
