#!/usr/bin/env bash
# Creates .venv and installs the project (idempotent: skips pip when requirements are unchanged).
# Sourced by run_tiny.sh and test.sh; leaves the venv activated.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.toollmm-installed
want=$(cat requirements.txt requirements-test.txt requirements-reference.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt
  .venv/bin/python -m pip install -q --no-deps -r requirements-reference.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
