#!/usr/bin/env bash
# The test suite on CPU (GPU-marked tests are skipped without CUDA): bash scripts/test.sh [pytest args]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
cd "$root"
python -m toollmm.tiny
# The demo's browser test drives Debian's Chromium (no browser download is possible).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y -q chromium >/dev/null || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium >/dev/null; } \
    || echo "could not install chromium: the browser test will be skipped"
fi
[ -x /usr/bin/chromium ] && export TOOLLMM_REQUIRE_BROWSER=1
# --durations: the log ends with the 20 slowest tests.
# The real-weights tests convert the small default once (about 50 s) and keep it under pretrained_checkpoint/.
TOOLLMM_REQUIRE_REFERENCE=1 TOOLLMM_REQUIRE_SMALL=1 python -m pytest -q --durations=20 "$@"
