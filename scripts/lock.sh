#!/usr/bin/env bash
# Refresh requirements.lock: resolve requirements.txt and every optional extra afresh in a
# scratch venv (the newest releases within their ranges), write the exact versions, then
# rebuild .venv from the new lock and run the whole test suite on it. Commit the lock only
# when the suite passes.
#   bash scripts/lock.sh
# TORCH_VERSION (default: the lock's current torch) picks the torch the lock is made with.
set -euo pipefail
cd "$(dirname "$0")/.."

torch_version=${TORCH_VERSION:-$(sed -n 's/^torch==//p' requirements.lock 2>/dev/null || true)}
torch_version=${torch_version:-2.13.0}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"${PYTHON:-python3}" -m venv "$scratch/venv"
py=$scratch/venv/bin/python
"$py" -m pip install -q "torch==$torch_version" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"$py" -c "import torch; print('torch==' + torch.__version__)" >"$scratch/torch.txt"
"$py" -m pip install -q -r requirements-dev.txt -r requirements-deepspeed.txt -c "$scratch/torch.txt"
{
  echo "# Exact versions the test suite last passed with; made by scripts/lock.sh, used as pip"
  echo "# constraints by scripts/setup.sh. torch carries no local build tag, so the same line"
  echo "# installs the CPU build on machines without a GPU and the CUDA build on GPU machines;"
  echo "# CUDA-only packages (nvidia-*, triton) follow torch's own pins and are not listed."
  "$py" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' |
    grep -vE '^(nvidia-|triton==|pip==|setuptools==|wheel==)' | LC_ALL=C sort -f
} >requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages); re-running the suite"
rm -f .venv/.installed-*
bash scripts/test.sh
