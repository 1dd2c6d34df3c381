// Stanford Cars: PMG with the paper's recipe (ResNet50, ImageNet weights, 448 px, 200 epochs), or --smoke on a miniature.
//   dotnet fsi experiments/cars.fsx --root <stanford_cars> --pretrained resnet50-19c8e357.pth [--device cuda]
//   dotnet fsi experiments/cars.fsx --smoke --root <miniature or full dataset>
#load "Pmg.fsx"
#load "Common.fsx"

Common.run
    { Kind = "cars"
      Name = "Stanford Cars"
      Fixture = "stanford_cars"
      RootVariable = "PMG_CARS_ROOT"
      PaperTop1 = Some 95.1
      Download = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (cars_train.tgz, cars_test.tgz, car_devkit.tgz, cars_test_annos_withlabels.mat; the site is often offline, use a mirror with the same files)" }
