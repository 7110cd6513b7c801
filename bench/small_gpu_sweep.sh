#!/usr/bin/env bash
# Several small-default variants (bench/small_gpu.sh) trained and evaluated at the same time on one
# GPU: a 135M model keeps an H200 busy a fraction of each step, so concurrent runs cost little more
# wall time than one. Each variant still runs the full schedule; its log says if the time guard cut it.
#   bash bench/small_gpu_sweep.sh VARIANT [VARIANT ...] [-- key=value overrides for every variant]
set -euo pipefail
variants=(); overrides=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; overrides=("$@"); break; fi
  variants+=("$1"); shift
done
[ ${#variants[@]} -gt 0 ] || { echo "usage: bash bench/small_gpu_sweep.sh VARIANT [VARIANT ...] [-- key=value ...]" >&2; exit 2; }
OUT=${OUT:-/tmp/small_gpu_out}; mkdir -p "$OUT"
source bench/device_env.sh
python3 -m toollmm.tiny
if ! python3 -c "import sys; from pathlib import Path; from toollmm.small import LLM_DIR, is_built; sys.exit(not is_built(Path(LLM_DIR)))"; then
  gguf=${GGUF:-/tmp/SmolLM2-135M-Instruct.Q4_1.gguf}
  [ -f "$gguf" ] || cat build/gguf_parts/part_* > "$gguf"
  python3 -m toollmm.small --gguf "$gguf"
fi
pids=()
for variant in "${variants[@]}"; do
  SKIP_WHEELS=1 OUT="$OUT" bash bench/small_gpu.sh "$variant" "${overrides[@]}" > /dev/null 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then echo "${variants[$i]}: done"; else echo "${variants[$i]}: failed (see $OUT/small_gpu_${variants[$i]}.log)"; status=1; fi
done
for variant in "${variants[@]}"; do tail -n 3 "$OUT/small_gpu_$variant.log"; done
exit $status
