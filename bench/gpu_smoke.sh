#!/usr/bin/env bash
# Stage-3 (LoRA, bf16) training on a random-init Vicuna-7B-shaped LLaMA, on one GPU, in one command.
# Run from the repo root on the GPU machine, with wheels of the missing packages carried in .whl/:
#   bash bench/gpu_smoke.sh [key=value overrides for train.sh ...]
# Env: STEPS (default 60 optimizer steps), PRESET (vicuna-7b | vicuna-13b), OUT (results folder);
# for a local CPU dry run: SKIP_WHEELS=1 NUM_LAYERS=1 STEPS=7 bash bench/gpu_smoke.sh train.micro_batch_size=1 ...
# Prepare first: wheels of deepspeed, decord and soundfile (+ cffi, pycparser, typing_extensions) in
# .whl/ for the GPU machine's Python (see bench/README.md).
set -euo pipefail
OUT=${OUT:-/tmp/gpu_smoke_out}; mkdir -p "$OUT"
STEPS=${STEPS:-60}
PRESET=${PRESET:-vicuna-7b}
RUN=/tmp/gpu_smoke_run
LLM=/tmp/v7b
exec > >(tee "$OUT/gpu_smoke.log") 2>&1
t0=$SECONDS; phase() { echo "=== [$((SECONDS - t0)) s] $*"; }

phase "install wheels"
source bench/device_env.sh

phase "machine and versions"
nvidia-smi || true
python3 - <<'PY'
import sys, torch, transformers, peft, deepspeed, sentencepiece, safetensors, decord, soundfile, pydantic
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "| gpu",
      f"{torch.cuda.get_device_name(0)} {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB"
      if torch.cuda.is_available() else "none")
for m in (transformers, peft, deepspeed, sentencepiece, safetensors, decord, soundfile, pydantic):
    print(m.__name__, m.__version__)
PY

phase "build tiny tokenizer + ImageBind"
python3 -m toollmm.tiny

phase "build random $PRESET (bf16, on the GPU) into $LLM"
python3 bench/make_random_llm.py --preset "$PRESET" --out "$LLM" --tokenizer pretrained_checkpoint/LLM_ckpt/tiny_llama \
    ${NUM_LAYERS:+--num-layers $NUM_LAYERS}
ls -la "$LLM"; df -h /tmp | tail -1

phase "train stage 3: LoRA, bf16, $STEPS optimizer steps"
rm -rf "$RUN"
set -x
PYTHON=python3 bash scripts/train.sh --stage 3 --config tiny --config bench/gpu_smoke.yaml \
    model.llm_path="$LLM" train.output_dir="$RUN" train.max_steps="$STEPS" "$@"
set +x
phase "training done"
du -sh "$RUN"/* "$RUN"/resume/* 2>/dev/null || true

phase "summary"
cp "$RUN/metrics.jsonl" "$RUN/config.yaml" "$RUN/data_report.json" "$OUT/"
python3 bench/summarize_metrics.py "$RUN/metrics.jsonl" --warmup 5 --json "$OUT/summary.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
phase "end"
