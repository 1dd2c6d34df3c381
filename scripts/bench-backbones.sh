#!/usr/bin/env bash
# Times one PMG training iteration (all progressive steps) per backbone, alternating the backbones round by round
# so that a drift of the machine's speed hits them alike; prints one line per run and, per size, each backbone's
# median over the rounds and its ratio to resnet50 (the paper's) round by round.
#   scripts/bench-backbones.sh [ROUNDS] [SIZES] [BACKBONES]
#   PMG="dotnet src/Pmg.Cli/bin/Release/net10.0/pmg.dll" scripts/bench-backbones.sh 2 "224 448" "resnet50 convnext_tiny swin_t"
# Extra `pmg bench` flags go in BENCH_FLAGS (default: batch 2, 2 timed iterations after 1 warm-up, 200 classes).
set -euo pipefail
rounds=${1:-2}
sizes=${2:-"224 448"}
backbones=${3:-"resnet50 convnext_tiny swin_t"}
pmg=${PMG:-pmg}
flags=${BENCH_FLAGS:-"--batch-size 2 --iterations 2 --warmup 1"}
log=$(mktemp)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for size in $sizes; do
    for round in $(seq 1 "$rounds"); do
        for b in $backbones; do
            # shellcheck disable=SC2086
            ms=$($pmg bench --backbone "$b" --image-size "$size" $flags | sed -n 's/^ms per iteration (median): //p')
            echo "$size $round $b $ms" | tee -a "$log"
        done
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| backbone | px | ms / iteration (median of rounds) | ratio to resnet50, per round |"
echo "| --- | --- | --- | --- |"
awk '
    { ms[$1, $3, $2] = $4; if (!(($1, $3) in seen)) { seen[$1, $3] = 1; order[++n] = $1 SUBSEP $3 }; r = ($2 > r ? $2 : r) }
    END {
        for (i = 1; i <= n; i++) {
            split(order[i], k, SUBSEP); size = k[1]; b = k[2]
            for (j = 1; j <= r; j++) v[j] = ms[size, b, j]
            # Insertion sort: POSIX awk has no sort.
            for (j = 2; j <= r; j++) { x = v[j]; for (l = j - 1; l >= 1 && v[l] > x; l--) v[l + 1] = v[l]; v[l + 1] = x }
            med = (r % 2 ? v[(r + 1) / 2] : (v[r / 2] + v[r / 2 + 1]) / 2)
            ratios = ""
            for (j = 1; j <= r; j++) ratios = ratios sprintf("%s%.2fx", (j > 1 ? ", " : ""), ms[size, b, j] / ms[size, "resnet50", j])
            printf "| %s | %s | %.0f | %s |\n", b, size, med, ratios
        }
    }' "$log"
rm -f "$log"
