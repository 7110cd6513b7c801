#!/usr/bin/env bash
# Evaluation speed end to end: `code/inference.py` on a 7B checkpoint over the published
# evaluation size (2397 distinct requests: bench/make_eval_workload.py), loading included
# (process start → predictions written), free and constrained decoding.
# Run on the device after bench/speed.sh (its fast run leaves /tmp/speed_fast/final):
#   CKPT=/tmp/speed_fast/final BATCH=768 bash bench/eval_speed.sh [more inference.py flags or key=value overrides]
# Batches hold at most MAX_BATCH_TOKENS (65536) padded tokens of KV cache (32 GiB at 7B). Free
# generation stops at the stop string or inference.max_new_tokens=32 (the checkpoint of a 2-epoch speed
# run wrote ~21 tokens an answer); a constrained answer ends once the catalogue trie decides it.
# SPLIT=test answers the checkpoint config's test split instead of the workload file; DATA_DIR is
# the sample data folder the workload is built from (default data, the bundled one).
# Python bytecode is cached under PYTHONPYCACHEPREFIX (default /tmp/pycache) by an untimed warm-up.
# PROFILE=1: run under cProfile and print the 25 functions with the most host time.
# HIDE_PACKAGES=sklearn,scipy,pandas,torchao: the runs see those packages as not installed
# (bench/hide_packages.py), as in an install of this project's own requirements.
# CODE: the code folder whose inference.py runs (default code; another checkout's code/ gives a
# before/after pair on one machine and checkpoint).
# The constrained run's figures are printed beside their headline records (bench/headline.py).
set -euo pipefail
OUT=${OUT:-/tmp/eval_speed_out}; mkdir -p "$OUT"
CKPT=${CKPT:-/tmp/speed_fast/final}
BATCH=${BATCH:-768}
MODES=${MODES:-constrained free}
CODE=${CODE:-code}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-/tmp/site:$PWD/code}
if [ -n "${SPLIT:-}" ]; then
  workload=(--split "$SPLIT")
else
  python3 bench/make_eval_workload.py --data-dir "${DATA_DIR:-data}" --queries "${QUERIES:-2397}" --out /tmp/eval_workload.json
  workload=(--data /tmp/eval_workload.json)
fi
# Bytecode, as an installed environment has it (pip compiles it): the device image sets
# PYTHONDONTWRITEBYTECODE and ships none: compiling torch's and transformers' sources on every
# start, imports took 14-21 s instead of 5-8 s (H100 and H200 runs, 2026-11-26). One short untimed run fills the
# cache, modules imported only while loading and generating included; WARMUP=0 skips it.
unset PYTHONDONTWRITEBYTECODE
hide=(${HIDE_PACKAGES:+bench/hide_packages.py "$HIDE_PACKAGES"})
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}
if [ "${WARMUP:-1}" != 0 ]; then
  python3 "${hide[@]}" "$CODE/inference.py" --ckpt "$CKPT" "${workload[@]}" --limit 8 --output "$OUT/warmup.json" >/dev/null 2>&1 \
    || echo "warm-up run failed (the timed runs below will show why)"
fi
for mode in $MODES; do
  flag=inference.constrained=$([ "$mode" = constrained ] && echo true || echo false)
  start=$(date +%s.%N); echo "launch $(date +%T.%N)"  # against the log's times: imports before, exit after
  python3 ${PROFILE:+-m cProfile -o "$OUT/$mode.prof"} "${hide[@]}" "$CODE/inference.py" --ckpt "$CKPT" "${workload[@]}" inference.batch_size="$BATCH" \
    inference.max_batch_tokens="${MAX_BATCH_TOKENS:-65536}" inference.max_new_tokens=32 $flag --output "$OUT/predictions_$mode.json" "$@" 2>&1 \
    | tee "$OUT/$mode.log" | grep -E "starting|loaded in|featurized|answered|written|Error|error" || true
  end=$(date +%s.%N); echo "exited $(date +%T.%N)"
  python3 - "$OUT/predictions_$mode.json" "$start" "$end" "$mode" "$BATCH" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
seconds = float(sys.argv[3]) - float(sys.argv[2])
print(json.dumps({"mode": sys.argv[4], "batch_size": int(sys.argv[5]), "queries": len(rows),
                  "seconds_end_to_end": round(seconds, 2), "queries_per_s": round(len(rows) / seconds, 1)}))
PY
  if [ "$mode" = constrained ] && [ -z "${SPLIT:-}" ] && [ "${QUERIES:-2397}" = 2397 ]; then  # the headline's workload
    python3 bench/headline.py eval_2397_end_to_end_s "$(python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$start" "$end")"
    python3 bench/headline.py eval_constrained_queries_per_s --log "$OUT/$mode.log"
  fi
  [ -z "${PROFILE:-}" ] || python3 -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(25)" "$OUT/$mode.prof" | tail -40
done
