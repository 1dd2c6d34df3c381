#!/bin/bash
# Issue 4's GPU checks in one device call (a few minutes on an H100). Pack the CLI first, on the dev machine:
#   ../shared/device/pack.sh src/Pmg.Cli/Pmg.Cli.fsproj
# then call the device tool with   command: bash scripts/gpu-check.sh   carry: [".devpack"]
# Everything it prints is also written under $OUT.
set -uo pipefail
out=${OUT:-/tmp/pmg-gpu-check}
mkdir -p "$out"
pmg() { bash .devpack/run.sh "$@"; }
step() { echo "== $*" | tee -a "$out/log.txt"; }

step "card"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
date -u +%F | tee -a "$out/gpu.txt"

paper="--device cuda --backbone resnet50 --batch-size 16 --image-size 448 --classes 200 --iterations 10 --warmup 3"

step "training iteration, one child process per cumulative change"
timeout 300 bash -c "$(declare -f pmg); pmg bench $paper --ladder" 2>&1 | tee "$out/ladder.txt"

step "inference"
for p in fp32 bf16; do
    timeout 90 bash -c "$(declare -f pmg); pmg bench $paper --mode eval --precision $p" 2>&1 | tee "$out/eval-$p.txt"
done

step "end to end: two epochs of the embedded dataset on the GPU, bf16"
timeout 120 bash -c "$(declare -f pmg); pmg train --device cuda --precision bf16 --epochs 2 --warmup-epochs 1 --out $out/run" 2>&1 | tail -12 | tee "$out/train.txt"
rm -f "$out"/run/*.ckpt
