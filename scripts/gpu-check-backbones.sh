#!/bin/bash
# One device call for the backbones and the NCCL backend (scripts/gpu-check.sh is the ResNet50 comparison with the
# reference): a smoke test, NCCL with one rank, two epochs of convnext_tiny and swin_t on the embedded dataset, then
# `pmg bench` of resnet50, convnext_tiny and swin_t at 448 px, batch 16, alternating round by round
# (scripts/bench-backbones.sh), fp32 then bf16.
#
# On the development machine, from the repository root:
#   ../shared/device/pack.sh src/Pmg.Cli/Pmg.Cli.fsproj     # .devpack/: the CLI, a .NET runtime, run.sh
#   rm -rf .devpack/*.nupkg .devpack/*.snupkg .devpack/app/imagenet .devpack/app/*onnxruntime*
#     (the device tool carries 64 MiB at most; these steps use neither the weights that ship nor ONNX Runtime)
# then one call of the device tool (`run`):
#   command: bash scripts/gpu-check-backbones.sh      carry: [".devpack"]      timeout_s: 540
# What comes back under $OUT: log.txt (everything printed).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
log="$out/log.txt"
pmg="bash .devpack/run.sh"
work=$(mktemp -d)

# name, time budget in seconds, command; each step's output goes to the log, then its exit status.
step() {
    local name=$1 budget=$2
    shift 2
    echo "== $name (at most $budget s): $*" | tee -a "$log"
    local start=$SECONDS
    timeout -k 5 "$budget" "$@" >>"$log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s" | tee -a "$log"
}

step card 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step smoke 60 $pmg bench --device cuda --backbone resnet18 --image-size 64 --batch-size 4 --iterations 1 --warmup 0 --classes 8
step nccl-smoke 90 $pmg train --device cuda --distributed nccl --backbone resnet18 --pretrained none --epochs 1 --image-size 32 --workers 4 --no-tensorboard --out "$work/nccl-run"
step convnext-train 120 $pmg train --device cuda --backbone convnext_tiny --pretrained none --epochs 2 --workers 4 --no-tensorboard --out "$work/convnext-run"
step swin-train 120 $pmg train --device cuda --backbone swin_t --pretrained none --epochs 2 --image-size 224 --resize 256 --workers 4 --no-tensorboard --out "$work/swin-run"
step bench-fp32 200 env PMG="$pmg" BENCH_FLAGS="--device cuda --batch-size 16 --iterations 10 --warmup 3 --precision fp32" scripts/bench-backbones.sh 2 448 "resnet50 convnext_tiny swin_t"
step bench-bf16 120 env PMG="$pmg" BENCH_FLAGS="--device cuda --batch-size 16 --iterations 10 --warmup 3 --precision bf16" scripts/bench-backbones.sh 1 448 "resnet50 convnext_tiny swin_t"
echo "== done after $SECONDS s" | tee -a "$log"
