#!/usr/bin/env bash
# Train one stage:  bash scripts/train.sh --stage N [--config FILE.yaml] [--resume] [key=value ...]
# One process per GPU (NPROC=N to choose; one process with the gloo backend on a CPU-only
# machine), launched by torchrun when there are several; DeepSpeed runs inside each process.
# Several machines: run the same command on every node with NNODES, NODE_RANK (0 on the first),
# MASTER_ADDR (the first node's address) and optionally MASTER_PORT (default 29500) set.
# Or, from the first node only, HOSTFILE=path (DeepSpeed's format, a line "host slots=GPUs" per
# node; needs passwordless ssh to each): DeepSpeed's launcher starts every node's processes.
# DS_LAUNCHER_ARGS adds launcher flags, e.g. "--no_ssh --node_rank N" run on each node of a
# cluster without ssh (then MASTER_ADDR names the first node).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
if [ -n "${HOSTFILE:-}" ]; then
  # DeepSpeed's launcher would fall back to this machine alone, silently, on a missing hostfile.
  [ -f "$HOSTFILE" ] || { echo "HOSTFILE=$HOSTFILE: no such file (DeepSpeed's format: a line \"host slots=GPUs\" per node)" >&2; exit 2; }
  # --no_local_rank: each process reads LOCAL_RANK from its environment, as under torchrun.
  read -ra launcher_args <<< "${DS_LAUNCHER_ARGS:-}"
  exec "$python" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_local_rank "${launcher_args[@]}" \
    ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} --master_port "${MASTER_PORT:-29500}" "$root/code/train.py" "$@"
fi
# Without nvidia-smi (installed with the NVIDIA driver) there is no GPU to count: skip the probe,
# a Python start that imports torch. NPROC=N still chooses.
if [ -z "${NPROC:-}" ] && command -v nvidia-smi >/dev/null; then
  NPROC=$("$python" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
nproc=${NPROC:-1}
if [ "$nproc" -eq 1 ] && [ "${NNODES:-1}" -le 1 ]; then
  # One process needs no launcher: it sets up a one-rank group on a free port itself
  # (toollmm.engine), and torchrun's own Python start (torch imported again) is saved on every
  # launch. Rendezvous settings inherited from a surrounding job are dropped, as torchrun's
  # --standalone does: a stale MASTER_PORT may name a port that is still taken.
  exec env -u MASTER_ADDR -u MASTER_PORT -u RANK -u LOCAL_RANK -u WORLD_SIZE "$python" "$root/code/train.py" "$@"
fi
if [ "${NNODES:-1}" -gt 1 ]; then
  nodes=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on each node}"
         --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first node}" --master_port "${MASTER_PORT:-29500}")
else
  nodes=(--standalone)
fi
# torchrun, with a worker's failure ending as the worker's exit status: the worker has printed
# its one-line reason, and torchrun's own traceback of ChildFailedError would only bury it.
exec "$python" -c '
import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except ChildFailedError as err:
    code = err.get_first_failure()[1].exitcode  # the rank that failed first; torchrun then stopped the others
    sys.exit(code if code > 0 else 128 - code)  # a signal -N exits 128 + N, as a shell reports it
' "${nodes[@]}" --nproc_per_node "$nproc" "$root/code/train.py" "$@"
