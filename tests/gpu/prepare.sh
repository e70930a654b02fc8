#!/usr/bin/env bash
# Prepare, on a machine with network and ../shared, what a GPU session carries along:
#   .whl/gpu/   wheels the GPU image lacks (CPython 3.12, manylinux x86-64)
#   .gpu-data/  a small real-data bundle: clip shards of ../shared/data/train-videos, a few
#               davis-mini sequences (+ OSVOS results), davis-multi and the golden files, laid out as ../shared
#               (check.sh sets DULEARN_SHARED to it, so the test fixtures find it)
# Usage: bash tests/gpu/prepare.sh          (then run tests/gpu/check.sh on the GPU machine)
# Both folders are git-ignored; together they stay under ~55 MiB (the tree that travels is 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."

SHARED=${DULEARN_SHARED:-../shared}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WHEELS=.whl/gpu
BUNDLE=.gpu-data
SEQUENCES=${GPU_DAVIS_SEQUENCES:-car-shadow libby drift-straight}
# Pure-python packages the GPU image lacks (its numpy, pyyaml, cloudpickle, typing-extensions do).
# av and wandb stay behind: the GPU check needs neither (no module imports them at load time).
PACKAGES=${GPU_WHEELS:-webdataset==1.0.2 braceexpand==0.1.7 submitit==1.5.4}

[ -d "$SHARED/data" ] || { echo "error: $SHARED/data is absent (set DULEARN_SHARED)"; exit 1; }

echo "== wheels -> $WHEELS"
mkdir -p "$WHEELS"
for pkg in $PACKAGES; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "$pkg"
done
ls "$WHEELS"

echo "== shards of $SHARED/data/train-videos -> $BUNDLE/shards"
# Every 2nd frame at short side 256 keeps all 30 videos in ~25 MB; train with data.frame_gap=1
# (= the paper's gap 2 on the source frames).
rm -rf "$BUNDLE/shards"
OMP_NUM_THREADS=1 "$PY" shards/build.py videos "$SHARED/data/train-videos" --out "$BUNDLE/shards" \
    --short-side 256 --quality 80 --frame-stride 2 --shard-clips 4 --workers 2 2>&1 | tail -n 1

echo "== davis-mini ($SEQUENCES) with their OSVOS results, davis-multi, golden files -> $BUNDLE/shared"
DAVIS=$BUNDLE/shared/data/davis-mini
rm -rf "$BUNDLE/shared"
mkdir -p "$DAVIS/JPEGImages/480p" "$DAVIS/Annotations/480p" "$DAVIS/ImageSets/2017" "$BUNDLE/shared/golden" \
    "$BUNDLE/shared/data/davis-mini-osvos"
for seq in $SEQUENCES; do
    cp -r "$SHARED/data/davis-mini/JPEGImages/480p/$seq" "$DAVIS/JPEGImages/480p/"
    cp -r "$SHARED/data/davis-mini/Annotations/480p/$seq" "$DAVIS/Annotations/480p/"
    cp -r "$SHARED/data/davis-mini-osvos/$seq" "$BUNDLE/shared/data/davis-mini-osvos/"
    echo "$seq" >>"$DAVIS/ImageSets/2017/val.txt"
done
cp -r "$SHARED/data/davis-multi" "$BUNDLE/shared/data/"  # the propagation benchmark's video
cp "$SHARED"/golden/*.pt "$BUNDLE/shared/golden/"

echo "== sizes"
du -sh "$WHEELS" "$BUNDLE/shards" "$BUNDLE/shared"
carried=$(du -sm "$WHEELS" "$BUNDLE" | awk '{s += $1} END {print s}')
tree=$(git ls-files -z -co --exclude-standard | du -cm --files0-from=- | tail -n 1 | cut -f1)
echo "carried: ${carried} MiB; working tree that travels besides: ${tree} MiB; limit 64 MiB"
if [ $((carried + tree)) -gt 62 ]; then
    echo "error: ${carried} + ${tree} MiB is too close to the 64 MiB limit (fewer GPU_DAVIS_SEQUENCES?)"
    exit 1
fi
echo "carry: [\"$WHEELS\", \"$BUNDLE\"]"
echo "command: bash tests/gpu/check.sh \$OUT"
