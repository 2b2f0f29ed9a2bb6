# The plumbing every exps/*.sh recipe shares, sourced first thing by each:
#   source "$(dirname "$0")/common.sh"
# It stops the recipe at the first failing command, runs it from the repository root, and gives:
#   setup_project      the .venv and the embedded data (scripts/setup.sh); with OPTIMIZER=adamw8bit
#                      also the optional 8-bit extra (requirements-8bit.txt) when it is missing
#   split_collection   an online recipe's released collection (GROUPS_PER_EPOCH prompts over all
#                      GPUs, UPDATES_PER_EPOCH optimizer steps) as COLLECT micro-batches of BATCH
#                      prompts per GPU and ACCUM micro-batches per step; exit 2 when NUM_PROCESSES
#                      x BATCH x UPDATES_PER_EPOCH does not divide it
#   launch_train ARGS  train.py ARGS --check_only true in one plain process first: a mistake
#                      (flag, path, data, tracker credentials) prints train.py's one-line error
#                      and the recipe exits with its code 2, before any launcher starts (through
#                      accelerate launch the same mistake printed accelerate's traceback, exit 1,
#                      once per process); then accelerate launch train.py ARGS with what the
#                      launcher needs: NUM_PROCESSES processes (default 1; --multi_gpu when more,
#                      since without it accelerate starts one process whatever --num_processes
#                      says), PRECISION (default no), or the accelerate yaml LAUNCH_CONFIG (e.g.
#                      configs/deepspeed_zero2.yaml; its distributed type then decides)
# PYTHON and ACCELERATE name the interpreter and the launcher (default: the project's .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-.venv/bin/python}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}

setup_project() {
  bash scripts/setup.sh
  if [ "${OPTIMIZER:-}" = adamw8bit ] && ! "$PYTHON" -c "import bitsandbytes" 2>/dev/null; then
    "$PYTHON" -m pip install -q -r requirements-8bit.txt
  fi
}

split_collection() {
  local per_step=$((NUM_PROCESSES * BATCH * UPDATES_PER_EPOCH))
  if [ $((GROUPS_PER_EPOCH % per_step)) != 0 ]; then
    echo "exps/$(basename "$0"): NUM_PROCESSES x BATCH x UPDATES_PER_EPOCH must divide GROUPS_PER_EPOCH ($GROUPS_PER_EPOCH)" >&2
    exit 2
  fi
  COLLECT=$((GROUPS_PER_EPOCH / (NUM_PROCESSES * BATCH)))  # micro-batches per GPU per collection
  ACCUM=$((COLLECT / UPDATES_PER_EPOCH))
}

launch_train() {
  "$PYTHON" train.py "$@" --check_only true
  # --quiet: a later failure shows train.py's own traceback without the launcher's around it.
  local launcher=(--num_processes "${NUM_PROCESSES:-1}" --num_machines 1
    --mixed_precision "${PRECISION:-no}" --dynamo_backend no --quiet)
  if [ -n "${LAUNCH_CONFIG:-}" ]; then
    launcher=(--config_file "$LAUNCH_CONFIG" "${launcher[@]}")
  elif [ "${NUM_PROCESSES:-1}" -gt 1 ]; then
    launcher+=(--multi_gpu --main_process_port 0)  # 0: a free port, so two runs never collide
  fi
  "$ACCELERATE" launch "${launcher[@]}" train.py "$@"
}
