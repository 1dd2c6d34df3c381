#!/usr/bin/env bash
# The pmg dotnet tool as a user installs it, from the folder feed that `dotnet pack` fills (.devpack/ until the
# package is published): install into a fresh folder, print its version, predict an embedded test image with a
# checkpoint. Without a checkpoint it trains a small one with the installed tool first (1 epoch, resnet18 at
# 32 px from random weights: about half a minute on two cores). Exits non-zero when a step or a check fails.
#
#   samples/tool/run.sh [CHECKPOINT]        (FEED and VERSION from the environment, default: .devpack/ and the
#                                            version in Directory.Build.props)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
feed=${FEED:-$repo/.devpack}
version=${VERSION:-$(sed -n 's:.*<Version>\(.*\)</Version>.*:\1:p' "$repo/Directory.Build.props" | head -n 1)}
work=$(mktemp -d "${TMPDIR:-/tmp}/pmg-tool-sample-XXXXXX")
trap 'rm -rf "$work"' EXIT

fail() { echo "FAILED: $*" >&2; exit 1; }

echo "+ dotnet tool install --tool-path <tmp>/tools --add-source $feed pmg --version $version"
dotnet tool install --tool-path "$work/tools" --add-source "$feed" pmg --version "$version"
pmg="$work/tools/pmg"

echo "+ pmg --version"
"$pmg" --version | tee "$work/version.txt"
head -n 1 "$work/version.txt" | grep -q "^pmg $version (commit " || fail "pmg --version does not start with 'pmg $version (commit ...)'"
grep -q "^libtorch " "$work/version.txt" || fail "pmg --version names no loaded libtorch"

checkpoint=${1:-}
if [ -z "$checkpoint" ]; then
    echo "+ pmg train --epochs 1 --backbone resnet18 --pretrained none --image-size 32 --batch-size 32 --out <tmp>/run"
    "$pmg" train --epochs 1 --backbone resnet18 --pretrained none --image-size 32 --batch-size 32 --out "$work/run"
    checkpoint="$work/run/best.ckpt"
fi

echo "+ pmg predict --checkpoint $checkpoint embedded:test:3"
"$pmg" predict --checkpoint "$checkpoint" embedded:test:3 | tee "$work/predict.txt"
[ "$(head -n 1 "$work/predict.txt")" = "embedded:test:3" ] || fail "predict: the first line is not the image"
[ "$(grep -c "class" "$work/predict.txt")" -eq 5 ] || fail "predict: not five classes listed"
echo "tool sample: pmg $version installed from the feed, --version and predict checked"
