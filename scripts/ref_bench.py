#!/usr/bin/env python3
"""Reference benchmark: PMG as the authors' PyTorch code trains it, timed the way `pmg bench` times Pmg.Fs.

The network is the reference implementation's (Du et al., ECCV 2020; model.py, train.py, utils.py), rewritten
here from its description so that both programs can be timed on the same machine in the same call:

- backbone: ResNet in torchvision's layout (conv1 bn1 relu maxpool layer1..layer4, with the unused fc, as the
  reference keeps it), written out below so that no torchvision is needed;
- three heads on the outputs of layer2, layer3, layer4 (conv3_x..conv5_x): BasicConv 1x1 to 512 and BasicConv
  3x3 to 1024 (conv without bias, BatchNorm eps 1e-5 momentum 0.01, ReLU), a global max pool (the reference's
  MaxPool2d(56/28/14) at 448 px), then BN1d(1024), Linear(1024, 512), BN1d(512), ELU, Linear(512, classes);
  classifier_concat has the same structure on the 3072 concatenated features;
- one iteration is the reference's four progressive steps: jigsaw n=8 -> head 1, n=4 -> head 2, n=2 -> head 3,
  each zero_grad / forward of the whole network / cross-entropy / backward / SGD step, then the whole image ->
  concat output with loss x2; SGD momentum 0.9, weight decay 5e-4, backbone lr 0.0002, new layers 0.002;
- the jigsaw is the reference's loop of patch swaps with cell (0, 0).

Timing as `pmg bench`: synthetic tensors already on the device, `--warmup` iterations, then `--iterations` timed
ones, each synchronised; the median in ms. Memory: on CUDA the caching allocator's peak allocated bytes
(max_memory_allocated) and the growth of device memory in use over the run (mem_get_info, the figure `pmg bench`
can always read); on CPU the process's peak resident set.

Modes: `published` (fp32, NCHW, as the reference ran) and `tuned` (bf16 autocast, channels_last,
cudnn.benchmark). Runs on PyTorch 1.13 (Debian's python3-torch) and 2.x alike.

    python3 scripts/ref_bench.py --device cuda --mode tuned --batch-size 16 --image-size 448 --classes 200
    python3 scripts/ref_bench.py --check        # a tiny CPU self-test; exit status 1 when anything is off
"""

import argparse
import math
import os
import random
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

GIB = float(1 << 30)

# ---------------------------------------------------------------------------------------------------------------
# ResNet, torchvision's layout and initialisation (v1.5: the stride sits on the bottleneck's 3x3 convolution).


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Returns the five stage outputs (as the reference's modified torchvision ResNet does)."""

    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        # Unused by PMG but part of the reference's `features` (its parameters get no gradient).
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x1 = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x2 = self.layer1(x1)
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        x5 = self.layer4(x4)
        return x1, x2, x3, x4, x5


BACKBONES = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}

# ---------------------------------------------------------------------------------------------------------------
# PMG, the reference's model.py with its layer names (so a state_dict has the reference's 412 keys for ResNet50).


class BasicConv(nn.Module):
    def __init__(self, cin, cout, kernel_size, padding):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=1, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.01, affine=True)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def classifier(cin, feature_size, classes):
    return nn.Sequential(
        nn.BatchNorm1d(cin),
        nn.Linear(cin, feature_size),
        nn.BatchNorm1d(feature_size),
        nn.ELU(inplace=True),
        nn.Linear(feature_size, classes),
    )


class PMG(nn.Module):
    def __init__(self, features, stage_channels, feature_size, classes):
        super().__init__()
        self.features = features
        c3, c4, c5 = stage_channels
        width = 1024  # the reference's num_ftrs // 2 for ResNet50
        self.conv_block1 = nn.Sequential(BasicConv(c3, feature_size, 1, 0), BasicConv(feature_size, width, 3, 1))
        self.classifier1 = classifier(width, feature_size, classes)
        self.conv_block2 = nn.Sequential(BasicConv(c4, feature_size, 1, 0), BasicConv(feature_size, width, 3, 1))
        self.classifier2 = classifier(width, feature_size, classes)
        self.conv_block3 = nn.Sequential(BasicConv(c5, feature_size, 1, 0), BasicConv(feature_size, width, 3, 1))
        self.classifier3 = classifier(width, feature_size, classes)
        self.classifier_concat = classifier(3 * width, feature_size, classes)

    def forward(self, x):
        _, _, xf3, xf4, xf5 = self.features(x)
        # Global max pool: the reference's MaxPool2d(kernel 56 / 28 / 14) at 448 px, any size here.
        xl1 = torch.amax(self.conv_block1(xf3), dim=(2, 3))
        xl2 = torch.amax(self.conv_block2(xf4), dim=(2, 3))
        xl3 = torch.amax(self.conv_block3(xf5), dim=(2, 3))
        xc1 = self.classifier1(xl1)
        xc2 = self.classifier2(xl2)
        xc3 = self.classifier3(xl3)
        xcat = self.classifier_concat(torch.cat((xl1, xl2, xl3), -1))
        return xc1, xc2, xc3, xcat


def pmg(backbone, classes, feature_size=512):
    block, layers = BACKBONES[backbone]
    e = block.expansion
    return PMG(ResNet(block, layers), (128 * e, 256 * e, 512 * e), feature_size, classes)


# ---------------------------------------------------------------------------------------------------------------
# The reference's jigsaw (utils.py): n*n swaps of a cell with cell (0, 0), the cells in a shuffled order.


def jigsaw_generator(images, n):
    cells = [[a, b] for a in range(n) for b in range(n)]
    block = images.size(-1) // n
    random.shuffle(cells)
    jigsaws = images.clone()
    for i in range(n * n):
        x, y = cells[i]
        temp = jigsaws[..., 0:block, 0:block].clone()
        jigsaws[..., 0:block, 0:block] = jigsaws[..., x * block : (x + 1) * block, y * block : (y + 1) * block].clone()
        jigsaws[..., x * block : (x + 1) * block, y * block : (y + 1) * block] = temp
    return jigsaws


# ---------------------------------------------------------------------------------------------------------------
# One training iteration as the reference's train.py runs it.

STEPS = [(8, 0, 1.0), (4, 1, 1.0), (2, 2, 1.0), (1, 3, 2.0)]  # (jigsaw n, output index, loss weight)


def optimizer_for(net):
    backbone = list(net.features.parameters())
    ids = {id(p) for p in backbone}
    heads = [p for p in net.parameters() if id(p) not in ids]
    # The reference has eight groups (one per new module, the backbone last); two with the same rates here.
    return torch.optim.SGD(
        [{"params": heads, "lr": 0.002}, {"params": backbone, "lr": 0.0002}], lr=0.002, momentum=0.9, weight_decay=5e-4
    )


def train_iteration(net, opt, x, y, autocast):
    losses = []
    for n, head, weight in STEPS:
        # set_to_none=False keeps the zero gradients of PyTorch 1.x, which the reference was written for: every
        # parameter then moves in every step (momentum, weight decay), as in Pmg.Fs.
        opt.zero_grad(set_to_none=False)
        inputs = jigsaw_generator(x, n) if n > 1 else x
        with autocast():
            output = net(inputs)[head]
        loss = F.cross_entropy(output.float(), y) * weight
        loss.backward()
        opt.step()
        losses.append(loss)
        last = output
    # The reference's per-iteration log: four .item() reads and the concat output's correct count.
    _, predicted = torch.max(last.data, 1)
    correct = predicted.eq(y.data).cpu().sum()
    return [l.item() for l in losses], int(correct)


def eval_iteration(net, x, autocast):
    with torch.no_grad(), autocast():
        return net(x)


# ---------------------------------------------------------------------------------------------------------------


class Mode:
    def __init__(self, name, device):
        self.name = name
        self.tuned = name == "tuned"
        self.device = device

    def autocast(self):
        if self.tuned:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def layout(self, t):
        return t.contiguous(memory_format=torch.channels_last) if self.tuned and t.dim() == 4 else t


def device_used(device):
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def bench(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = Mode(args.mode, device)
    torch.backends.cudnn.benchmark = mode.tuned
    torch.manual_seed(0)
    random.seed(0)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    if cuda:
        torch.ones(1, device=device)
        sync()
        before = device_used(device)
    net = pmg(args.backbone, args.classes).to(device)
    if mode.tuned:
        net = net.to(memory_format=torch.channels_last)
    opt = optimizer_for(net)
    x = mode.layout(torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device))
    y = torch.randint(args.classes, (args.batch_size,), device=device)

    if args.eval:
        net.eval()
        once = lambda: eval_iteration(net, x, mode.autocast)
    else:
        net.train()
        once = lambda: train_iteration(net, opt, x, y, mode.autocast)

    for _ in range(args.warmup):
        once()
    sync()
    times = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        once()
        sync()
        times.append((time.perf_counter() - start) * 1000.0)
    ms = statistics.median(times)

    what = "eval" if args.eval else "train"
    steps = 1 if args.eval else len(STEPS)
    print(
        f"reference {what} {args.backbone} {args.device} {args.mode} batch {args.batch_size} "
        f"{args.image_size}x{args.image_size}, {args.classes} classes, {steps} steps/iteration, "
        f"{args.iterations} timed after {args.warmup} warm-up, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"ms per iteration (median): {ms:.1f}")
    if cuda:
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB")
        print(f"peak GPU memory growth: {(device_used(device) - before) / GIB:.2f} GiB")
    else:
        print("peak GPU memory allocated: n/a")
        print("peak GPU memory growth: n/a")
    # ru_maxrss is in KiB on Linux: the peak resident set, as .NET's PeakWorkingSet64 for `pmg bench`.
    print(f"peak host memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB:.2f} GiB")
    print(f"{args.batch_size * 1000.0 / ms:.1f} img/s")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# --check: a tiny configuration on the CPU that must hold before any timing is worth reading.


def check_jigsaw_is_permutation(n, size=32):
    """Each output cell must be exactly one input cell (all channels, the whole batch), every input cell used once;
    returns whether the order moved."""
    block = size // n
    images = torch.randn(2, 3, size, size)
    out = jigsaw_generator(images, n)
    cell = lambda t, a, b: t[..., a * block : (a + 1) * block, b * block : (b + 1) * block]
    inputs = [cell(images, a, b) for a in range(n) for b in range(n)]
    order = []
    for a in range(n):
        for b in range(n):
            found = [j for j, c in enumerate(inputs) if torch.equal(cell(out, a, b), c)]
            assert len(found) == 1, f"n={n}: output cell ({a},{b}) is not one input cell"
            order.append(found[0])
    assert sorted(order) == list(range(n * n)), f"n={n}: cells {sorted(order)} are not a permutation"
    return order != list(range(n * n))


def check(args):
    torch.manual_seed(0)
    random.seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    failures = []

    def expect(ok, what):
        print(("ok    " if ok else "FAIL  ") + what)
        if not ok:
            failures.append(what)

    moved = [check_jigsaw_is_permutation(n) for n in (2, 4, 8) for _ in range(3)]
    expect(any(moved), "jigsaw n=2,4,8: every output cell is one input cell, all cells used once, order shuffled")

    big = pmg("resnet50", 200)
    backbone = sum(p.numel() for p in big.features.parameters())
    expect(backbone == 25557032, f"ResNet50 features have torchvision's 25,557,032 parameters ({backbone:,})")
    keys = len(big.state_dict())
    expect(keys == 412, f"PMG-ResNet50 state_dict has the reference's 412 entries ({keys})")
    del big

    classes, batch, size = 3, 4, 64
    for backbone in ("resnet18", "resnet50"):
        net = pmg(backbone, classes)
        opt = optimizer_for(net)
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(classes, (batch,))
        net.train()
        outputs = net(x)
        expect(
            [tuple(o.shape) for o in outputs] == [(batch, classes)] * 4,
            f"{backbone}: four outputs of shape ({batch}, {classes})",
        )
        before = [p.detach().clone() for p in net.classifier3.parameters()]
        losses, correct = train_iteration(net, opt, x, y, Mode("published", torch.device("cpu")).autocast)
        expect(all(math.isfinite(l) for l in losses) and 0 <= correct <= batch, f"{backbone}: four finite losses {losses}")
        moved = any(not torch.equal(a, b) for a, b in zip(before, net.classifier3.parameters()))
        expect(moved, f"{backbone}: an iteration updates the heads")
    net.eval()
    with torch.no_grad():
        expect(all(torch.isfinite(o).all() for o in eval_iteration(net, x, Mode("published", x.device).autocast)), "eval outputs finite")

    # The tuned mode's pieces on the CPU (bf16 autocast, channels_last), one forward only: bf16 is slow on CPUs.
    tuned = Mode("tuned", torch.device("cpu"))
    net = pmg("resnet18", classes).to(memory_format=torch.channels_last)
    with tuned.autocast():
        out = net(tuned.layout(torch.randn(batch, 3, size, size)))
    expect(out[3].dtype == torch.bfloat16 and bool(torch.isfinite(out[3].float()).all()), "tuned: autocast runs the network in bf16")

    print(f"{len(failures)} failed" if failures else "all checks passed")
    return 1 if failures else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--mode", choices=["published", "tuned"], default="published")
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="resnet50")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--eval", action="store_true", help="time inference (one forward, no_grad) instead of training")
    p.add_argument("--check", action="store_true", help="tiny CPU self-test; exit status 1 when a check fails")
    args = p.parse_args(argv)
    if args.check:
        return check(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"ref_bench: --device {args.device} but torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 1
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
