#!/usr/bin/env bash
# Train one stage:  bash scripts/train.sh --stage N [--config FILE.yaml] [--resume] [key=value ...]
# One process per GPU (NPROC=N to choose; one process with the gloo backend on a CPU-only
# machine), launched by torchrun; DeepSpeed runs inside each process.
# Several machines: run the same command on every node with NNODES, NODE_RANK (0 on the first),
# MASTER_ADDR (the first node's address) and optionally MASTER_PORT (default 29500) set.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
nproc=${NPROC:-$("$python" -c "import torch; print(max(1, torch.cuda.device_count()))")}
if [ "${NNODES:-1}" -gt 1 ]; then
  nodes=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on each node}"
         --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first node}" --master_port "${MASTER_PORT:-29500}")
else
  nodes=(--standalone)
fi
exec "$python" -m torch.distributed.run "${nodes[@]}" --nproc_per_node "$nproc" "$root/code/train.py" "$@"
