#!/usr/bin/env bash
# Set up the project on first use: a .venv with the stack (re-installed only when the
# requirements change), then the embedded data: the tiny random SD1.5-shaped model and toy
# Pick-a-Pic data the tests' fixtures mirror, and the toy preference pairs the shipped toy base
# (assets/toy-sd15) generates for exps/example.sh.
#   bash scripts/setup.sh          runtime stack + embedded assets
#   bash scripts/setup.sh --dev    the same plus pytest and ruff
# Versions are the exact ones in requirements.lock (the suite last passed with them; refresh
# with `bash scripts/lock.sh`); requirements.txt keeps the ranges for installs by hand.
# Machines without a GPU get the CPU build of torch (TORCH_VERSION, default the lock's; set
# TORCH_INDEX_URL to install it from a specific index, e.g. PyTorch's CPU wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=requirements.txt
[ "${1:-}" = "--dev" ] && requirements=requirements-dev.txt

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
py=.venv/bin/python
stamp=".venv/.installed-$(basename "$requirements" .txt)"
wanted=$(cat requirements*.txt requirements.lock | sha256sum | cut -d' ' -f1)
torch_version=${TORCH_VERSION:-$(sed -n 's/^torch==//p' requirements.lock)}
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  if ! "$py" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      "$py" -m pip install -q "torch==$torch_version"
    else
      "$py" -m pip install -q "torch==$torch_version" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    fi
  fi
  # The lock's versions, with torch pinned to the build just installed (or already there) so
  # no dependency swaps it for another build.
  constraint=$(mktemp)
  grep -v '^torch==' requirements.lock >"$constraint"
  "$py" -c "import torch; print('torch==' + torch.__version__)" >>"$constraint"
  "$py" -m pip install -q -r "$requirements" -c "$constraint"
  rm -f "$constraint"
  echo "$wanted" >"$stamp"
fi

# The builders skip finished outputs themselves; checking here first saves their import time.
[ -f build/tiny-sd15/model_index.json ] || "$py" scripts/build_tiny_model.py --out build/tiny-sd15
[ -f build/toy-data/kto/train_processed_v3.csv ] || "$py" scripts/build_toy_data.py --out build/toy-data
# Rebuilt when missing, built for another rule, or from an older builder or base (DATA_VERSION).
{ grep -qs '"version": 6,' build/toy-prefs/stats.json && grep -qs '"rule": "warm"' build/toy-prefs/stats.json; } ||
  "$py" scripts/build_toy_prefs.py --out build/toy-prefs --rule warm
