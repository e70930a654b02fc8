#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv (once), then runs the demo
# (synthetic shards -> a few minutes of training -> J&F of the trained vs the random-init
# network on held-out sequences, with overlay videos). Arguments go to the demo, e.g.
#   bash launch/demo.sh                 # synthetic video, no download
#   bash launch/demo.sh --data real     # ../shared/data (train-videos, davis-mini)
#   bash launch/demo.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import importlib.metadata as m; m.version('dulearn'); import torch, av, webdataset, accelerate" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
export WANDB_MODE="${WANDB_MODE:-offline}"
exec .venv/bin/python -m dulearn.demo "$@"
