"""Writes the ConvNeXt test fixtures under tests/Pmg.Fs.Tests/data/convnext/ from torchvision itself, so that
ConvNeXtTests compares Pmg.Fs's ConvNeXt with torchvision's without Python at test time:

- tiny-state-dict.pth: the state_dict of torchvision's `ConvNeXt` on a tiny config (CNBlockConfig dims 8, 16, 32, 64,
  depths 1, 1, 2, 1; 10 classes), its parameters randomised beyond torchvision's initialisation (layer scales near 1,
  LayerNorm weights near 1 with nonzero biases) so that every block changes its input visibly;
- tiny-io.pth: an input (2x3x40x56: odd sizes, so the strided convolutions floor as torchvision's) and, in eval mode,
  the five stage outputs PMG reads: stem = features[0](x), stage1 = features[1](stem),
  stage2 = features[3](features[2](stage1)), stage3 = features[5](features[4](...)), stage4 = features[7](features[6](...)),
  and the ImageNet-style classifier path's logits (avgpool, classifier);
- torchvision-keys.txt: key and shape of every state_dict entry of torchvision's convnext_tiny, convnext_small,
  convnext_base, swin_t, swin_s and swin_b (built with weights=None), one "model key shape" per line.

Rerun from the repository root with Debian's torch 1.13 and torchvision 0.14 (python3-torch, python3-torchvision):

    /usr/bin/python3 scripts/fixtures_convnext.py
"""

import os
from functools import partial

import torch
import torchvision
from torchvision.models import convnext as cn
from torchvision.models import convnext_base, convnext_small, convnext_tiny, swin_b, swin_s, swin_t

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "Pmg.Fs.Tests", "data", "convnext")


def tiny():
    torch.manual_seed(20261129)
    setting = [
        cn.CNBlockConfig(8, 16, 1),
        cn.CNBlockConfig(16, 32, 1),
        cn.CNBlockConfig(32, 64, 2),
        cn.CNBlockConfig(64, None, 1),
    ]
    model = cn.ConvNeXt(setting, stochastic_depth_prob=0.3, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1 and name.endswith("weight"):  # LayerNorm
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:  # convolutions and linear layers: a larger spread than 0.02, so the blocks matter
                p.copy_(0.2 * torch.randn_like(p))
    model.eval()
    return model


def main():
    os.makedirs(OUT, exist_ok=True)
    model = tiny()
    torch.save(model.state_dict(), os.path.join(OUT, "tiny-state-dict.pth"))
    x = torch.randn(2, 3, 40, 56)
    f = model.features
    with torch.no_grad():
        stem = f[0](x)
        s1 = f[1](stem)
        s2 = f[3](f[2](s1))
        s3 = f[5](f[4](s2))
        s4 = f[7](f[6](s3))
        logits = model(x)
    io = {"input": x, "stem": stem, "stage1": s1, "stage2": s2, "stage3": s3, "stage4": s4, "logits": logits}
    torch.save({k: v.contiguous() for k, v in io.items()}, os.path.join(OUT, "tiny-io.pth"))
    lines = [
        "# Keys and shapes of torchvision %s's state_dicts (weights=None), written by scripts/fixtures_convnext.py."
        % torchvision.__version__
    ]
    for name, build in [
        ("convnext_tiny", convnext_tiny),
        ("convnext_small", convnext_small),
        ("convnext_base", convnext_base),
        ("swin_t", swin_t),
        ("swin_s", swin_s),
        ("swin_b", swin_b),
    ]:
        for k, v in build().state_dict().items():
            lines.append("%s %s %s" % (name, k, "x".join(str(d) for d in v.shape) or "scalar"))
    with open(os.path.join(OUT, "torchvision-keys.txt"), "w") as out:
        out.write("\n".join(lines) + "\n")
    for n in sorted(os.listdir(OUT)):
        print(n, os.path.getsize(os.path.join(OUT, n)))


if __name__ == "__main__":
    main()
