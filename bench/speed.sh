#!/usr/bin/env bash
# Stage-3 training speed on one GPU, both configurations side by side in one run, on a
# random-init Vicuna-7B (or -13B) of the published shape and the bundled ToolMMBench rows at
# their real lengths (ImageBind features cached before the timed loop):
#   (a) bench/speed_published.yaml: fp16, ZeRO-2, CPU-offloaded Adam, micro-batch 4 × accumulation 4
#   (b) bench/speed_fast.yaml: bf16, SDPA, Adam on the GPU, packed rows, micro-batch 64
# Run from the repo root on the device with .whl and .devdata carried (bench/README.md):
#   STEPS=40 PRESET=vicuna-7b bash bench/speed.sh
# Writes $OUT/{published,fast}/{metrics.jsonl,summary.json} and prints one table.
# Two GPUs: NPROC=2 bash bench/speed.sh (DeepSpeed data parallel; compare with NPROC=1).
set -euo pipefail
OUT=${OUT:-/tmp/speed_out}; mkdir -p "$OUT"
STEPS=${STEPS:-40}
PRESET=${PRESET:-vicuna-7b}
LLM=/tmp/$PRESET
PARAMS=$([ "$PRESET" = vicuna-13b ] && echo 13.0e9 || echo 6.74e9)
export PYTHONUNBUFFERED=1 NPROC=${NPROC:-1}
exec > >(tee "$OUT/speed.log") 2>&1
[ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/code
python3 -m toollmm.tiny --data-dir .devdata/data
[ -f "$LLM/config.json" ] || python3 bench/make_random_llm.py --preset "$PRESET" --out "$LLM" --tokenizer pretrained_checkpoint/LLM_ckpt/tiny_llama
layers=(--config code/config/tiny.yaml --config bench/gpu_smoke.yaml)
python3 code/extract_features.py --split train "${layers[@]}" >/dev/null  # cache first: not timed
for setting in published fast; do
  rm -rf "/tmp/speed_$setting"
  PYTHON=python3 bash scripts/train.sh --stage 3 "${layers[@]}" --config "bench/speed_$setting.yaml" model.llm_path="$LLM" \
    train.output_dir="/tmp/speed_$setting" train.max_steps="$STEPS" train.max_time_s=420 train.epochs=5 "$@"
  mkdir -p "$OUT/$setting"; cp "/tmp/speed_$setting/metrics.jsonl" "/tmp/speed_$setting/config.yaml" "$OUT/$setting/"
  python3 bench/summarize_metrics.py "/tmp/speed_$setting/metrics.jsonl" --warmup 3 --params "$PARAMS" --json "$OUT/$setting/summary.json"
done
python3 - "$OUT" <<'PY'
import json, sys
rows = {s: json.load(open(f"{sys.argv[1]}/{s}/summary.json")) for s in ("published", "fast")}
keys = ["samples_per_s_over_span", "real_tokens_per_s", "mfu_4n", "peak_memory_gib", "loss_mean_first5", "loss_mean_last5"]
print(f"{'':26}" + "".join(f"{s:>14}" for s in rows))
for k in keys:
    print(f"{k:26}" + "".join(f"{rows[s].get(k, '-')!s:>14}" for s in rows))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
