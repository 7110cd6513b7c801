#!/usr/bin/env bash
# Train one stage:  bash scripts/train.sh --stage 3 [--config FILE.yaml] [--resume] [key=value ...]
# One process per GPU (NPROC=N to choose; one process with the gloo backend on a CPU-only
# machine), launched by torchrun; DeepSpeed runs inside each process.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
nproc=${NPROC:-$("$python" -c "import torch; print(max(1, torch.cuda.device_count()))")}
exec "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$root/code/train.py" "$@"
