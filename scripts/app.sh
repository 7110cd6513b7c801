#!/usr/bin/env bash
# The Gradio demo:  bash scripts/app.sh [--ckpt ckpt/tiny/final] [--port 7860] [--share no] [--max-upload-mb 20]
# (--help lists the rest). Installs the project into .venv first, like run_tiny.sh.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# A subshell, because setup.sh cds to the repo root: relative --ckpt paths stay relative to the caller.
(source "$root/scripts/setup.sh")
exec "$root/.venv/bin/python" "$root/code/app.py" "$@"
