"""Writes the Swin Transformer test fixtures under tests/Pmg.Fs.Tests/data/swin/ from torchvision's own
SwinTransformer (torchvision 0.14, torch 1.13), for SwinTests.fs to compare the F# backbone (src/Pmg.Fs/Model/Swin.fs)
against without Python:

- tiny-state.pth: the state_dict of a tiny torchvision SwinTransformer (patch 4, embed_dim 8, depths [2, 2, 2, 1],
  heads [1, 2, 2, 4], window 4, 10 classes; torch.manual_seed(0)), saved by torch.save.
- tiny-io.pth: for two inputs, "64" (2x3x64x64: maps 16, 8, 4, 2, so shifted windows with their mask, a map as
  large as the window, which is not shifted, and one smaller than it, padded) and "80" (2x3x80x80: maps 20, 10, 5,
  3, so padding to window multiples with shifted windows, and patch merging of an odd size), the input ("N.input",
  float16 so it is small and exact: the model ran on its float32 values), every stage output in NCHW ("N.stem",
  "N.stage1" .. "N.stage4": features.0, 1, 3, 5, 7) and the classifier's logits ("N.logits"), all in eval mode.
- keys.txt: "model key dtype shape" for every state_dict entry of torchvision's swin_t, swin_s and swin_b
  (weights=None), so the registry's networks are checked to load torchvision's ImageNet files as they are.

Rerun from the repository root with Debian's torch (not a pyenv python):

    /usr/bin/python3 scripts/fixtures_swin.py
"""

import os

import torch
from torchvision.models import swin_b, swin_s, swin_t
from torchvision.models.swin_transformer import SwinTransformer

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "Pmg.Fs.Tests", "data", "swin")


def tiny() -> SwinTransformer:
    torch.manual_seed(0)
    m = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=8,
        depths=[2, 2, 2, 1],
        num_heads=[1, 2, 2, 4],
        window_size=[4, 4],
        stochastic_depth_prob=0.2,
        num_classes=10,
    )
    # Fresh LayerNorms are the identity and qkv/proj biases zero: give every parameter some spread so the
    # comparison sees each of them.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if "relative_position_bias_table" in name:
                p.mul_(20.0)
    return m.eval()


def stages(m: SwinTransformer, x: torch.Tensor):
    outs = {}
    names = {0: "stem", 1: "stage1", 3: "stage2", 5: "stage3", 7: "stage4"}
    y = x
    for i, layer in enumerate(m.features):
        y = layer(y)
        if i in names:
            outs[names[i]] = y.permute(0, 3, 1, 2).contiguous()
    return outs


def main():
    os.makedirs(OUT, exist_ok=True)
    m = tiny()
    torch.save(m.state_dict(), os.path.join(OUT, "tiny-state.pth"))
    io = {}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for size in (64, 80):
            x = torch.randn(2, 3, size, size, generator=g).half()
            xf = x.float()
            io[f"{size}.input"] = x
            for k, v in stages(m, xf).items():
                io[f"{size}.{k}"] = v
            io[f"{size}.logits"] = m(xf)
    torch.save(io, os.path.join(OUT, "tiny-io.pth"))
    with open(os.path.join(OUT, "keys.txt"), "w") as f:
        for name, build in (("swin_t", swin_t), ("swin_s", swin_s), ("swin_b", swin_b)):
            for k, v in build(weights=None).state_dict().items():
                f.write(f"{name} {k} {str(v.dtype).replace('torch.', '')} {'x'.join(str(d) for d in v.shape)}\n")
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    main()
