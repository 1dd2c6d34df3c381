"""Checks that a .pth exported by Pmg.Fs, with its model description as an extra zip entry, still loads in
PyTorch: torch.load reads it, and the reference PMG model (scripts/ref_bench.py's copy of the reference's layers)
takes it with load_state_dict(strict=True). Prints the description and "strict load ok"; exits 1 otherwise.

    python3 scripts/check_pth_metadata.py FILE.pth BACKBONE CLASSES FEATURE_SIZE BLOCK_CHANNELS
"""

import json
import os
import sys
import zipfile

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_bench  # noqa: E402


class Pmg(ref_bench.PMG):
    """The reference's PMG with the heads' widths as parameters (the reference fixes 1024)."""

    def __init__(self, features, stage_channels, feature_size, width, classes):
        nn.Module.__init__(self)
        self.features = features
        c3, c4, c5 = stage_channels
        block = lambda c: nn.Sequential(ref_bench.BasicConv(c, feature_size, 1, 0), ref_bench.BasicConv(feature_size, width, 3, 1))
        self.conv_block1 = block(c3)
        self.classifier1 = ref_bench.classifier(width, feature_size, classes)
        self.conv_block2 = block(c4)
        self.classifier2 = ref_bench.classifier(width, feature_size, classes)
        self.conv_block3 = block(c5)
        self.classifier3 = ref_bench.classifier(width, feature_size, classes)
        self.classifier_concat = ref_bench.classifier(3 * width, feature_size, classes)


def main():
    path, backbone, classes, feature_size, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    with zipfile.ZipFile(path) as z:
        described = [n for n in z.namelist() if n.endswith("/pmg-fs.json")]
        if not described:
            print(f"{path}: no pmg-fs.json entry", file=sys.stderr)
            return 1
        description = json.loads(z.read(described[0]))
    print("description:", json.dumps(description["Network"]))
    state = torch.load(path, map_location="cpu")
    block, layers = ref_bench.BACKBONES[backbone]
    e = block.expansion
    net = Pmg(ref_bench.ResNet(block, layers), (128 * e, 256 * e, 512 * e), feature_size, width, classes)
    net.load_state_dict(state, strict=True)
    print(f"{len(state)} entries, strict load ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
