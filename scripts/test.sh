#!/usr/bin/env bash
# The test suite on CPU (GPU-marked tests are skipped without CUDA): bash scripts/test.sh [pytest args]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
cd "$root"
python -m toollmm.tiny
TOOLLMM_REQUIRE_REFERENCE=1 python -m pytest -q "$@"
