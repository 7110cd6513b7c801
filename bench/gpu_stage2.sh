#!/usr/bin/env bash
# Stage 2 (decoder alignment) on one GPU with a random-init Vicuna-7B-shaped LLaMA, in one command.
# Run from the repo root on the GPU machine, with .whl/ carried (see bench/README.md):
#   bash bench/gpu_stage2.sh [key=value overrides]
# Env: OUT (results folder). Prints the step time and peak memory summary.
set -euo pipefail
OUT=${OUT:-/tmp/gpu_stage2_out}; mkdir -p "$OUT"
RUN=/tmp/gpu_stage2_run
LLM=/tmp/v7b_vocab
exec > >(tee "$OUT/gpu_stage2.log") 2>&1
t0=$SECONDS; phase() { echo "=== [$((SECONDS - t0)) s] $*"; }
phase "install wheels"
source bench/device_env.sh
layers=(--config tiny --config tiny_chain --config bench/gpu_stage2.yaml)
phase "tiny default (ImageBind, decoders' text encoders) + random Vicuna-7B with a 32000-token tokenizer"
python3 -m toollmm.tiny
[ -f "$LLM/config.json" ] || python3 bench/make_random_llm.py --preset vicuna-7b --out "$LLM" --train-tokenizer data
phase "caption embeddings"
python3 code/process_embeddings.py --stage 2 "${layers[@]}" --quiet
phase "stage 1 (input projector; a few steps, to chain from)"
rm -rf "$RUN"
PYTHON=python3 bash scripts/train.sh --stage 1 "${layers[@]}" model.llm_path="$LLM" train.output_dir="$RUN/stage_1" train.max_steps=3 "$@"
phase "stage 2"
PYTHON=python3 bash scripts/train.sh --stage 2 "${layers[@]}" model.llm_path="$LLM" train.output_dir="$RUN/stage_2" \
  train.init_from="$RUN/stage_1/final" "$@"
phase "summary"
for stage in stage_1 stage_2; do
  mkdir -p "$OUT/$stage"; cp "$RUN/$stage/metrics.jsonl" "$RUN/$stage/held_out.json" "$RUN/$stage/config.yaml" "$OUT/$stage/" 2>/dev/null || true
done
python3 bench/summarize_metrics.py "$RUN/stage_2/metrics.jsonl" --warmup 3 --json "$OUT/summary.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
phase "end"
