// Stanford Cars: PMG with the paper's recipe (ResNet50, ImageNet weights, 448 px, 200 epochs); any `pmg train` flag changes it.
//   dotnet fsi experiments/cars.fsx --root <stanford_cars> [--device cuda] [any pmg train flag]
//   (ResNet50 ImageNet weights: torchvision's file, fetched once into PyTorch's cache, or --pretrained FILE)
#load "Pmg.fsx"
#load "Common.fsx"

Common.run
    { Kind = "cars"
      Name = "Stanford Cars"
      Fixture = "stanford_cars"
      PaperTop1 = Some 95.1
      Download = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (cars_train.tgz, cars_test.tgz, car_devkit.tgz, cars_test_annos_withlabels.mat; the site is often offline, use a mirror with the same files)" }
