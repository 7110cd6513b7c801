#!/usr/bin/env bash
# The small default (SmolLM2-135M-Instruct) on one GPU, the full published schedule (5 epochs of
# 64, bf16), one tuning variant a call (each fits the device tool's 10-minute limit):
#   bash bench/small_gpu.sh VARIANT [key=value overrides for train.sh ...]
# VARIANT: full_lr3e-4 full fine-tuning at lr 3e-4 (small.yaml as is: the small default)
#          full        full fine-tuning at lr 1e-4
#          published   LoRA r32/α32/0.1 on q/k/v/o, lr 5e-4 (small.yaml + small_published.yaml)
#          all_linear  the published LoRA on every linear layer of the decoder
#          rank128     the published LoRA at r128/α128 (α/r = 1 as published)
#          lr2e-3      the published LoRA at lr 2e-3
#          all_linear_lr2e-3   all-linear LoRA at lr 2e-3
# Several variants at once on one GPU (a 135M model leaves it mostly idle): bench/small_gpu_sweep.sh.
# Writes $OUT/small_<VARIANT>.json (the compare_runs.py row), its log, training metrics and reports.
# Inputs on the GPU machine: wheels in .whl/ (deepspeed, decord, soundfile + their dependencies, gguf)
# and the GGUF: GGUF=FILE, or its parts in build/gguf_parts/part_* (the builder checks the sha256
# of the joined file). The converted folder stays under pretrained_checkpoint/ for the next call.
set -euo pipefail
variant=${1:?"usage: bash bench/small_gpu.sh full_lr3e-4|full|published|all_linear|rank128|lr2e-3|all_linear_lr2e-3 [key=value ...]"}
shift
OUT=${OUT:-/tmp/small_gpu_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/small_gpu_$variant.log") 2>&1
t0=$SECONDS; phase() { echo "=== [$((SECONDS - t0)) s] $*"; }
lora=(--config small_published)
case $variant in
  full_lr3e-4) extra=() ;;
  full) extra=(train.learning_rate=0.0001) ;;
  published) extra=("${lora[@]}") ;;
  all_linear) extra=("${lora[@]}" "model.lora.target_modules=[all-linear]") ;;
  rank128) extra=("${lora[@]}" model.lora.r=128 model.lora.alpha=128) ;;
  lr2e-3) extra=("${lora[@]}" train.learning_rate=0.002) ;;
  all_linear_lr2e-3) extra=("${lora[@]}" "model.lora.target_modules=[all-linear]" train.learning_rate=0.002) ;;
  *) echo "unknown variant $variant" >&2; exit 2 ;;
esac

phase "install wheels"
source bench/device_env.sh
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

phase "build tiny ImageBind and the small default"
source bench/small_build.sh

run=/tmp/small_runs/$variant
phase "train: $variant (${extra[*]:-small.yaml as is} $*)"
rm -rf "$run"
PYTHON=python3 NPROC=1 bash scripts/train.sh --stage 3 --config small model.dtype=bf16 train.micro_batch_size=64 \
  train.gradient_accumulation_steps=1 train.output_dir="$run" "${extra[@]}" "$@"

phase "inference: test (free), test (constrained, top 5), training queries"
for split in test train; do
  python3 code/inference.py --ckpt "$run/final" --split $split --output "$run/predictions_$split.json"
done
python3 code/inference.py --ckpt "$run/final" --split test inference.constrained=true inference.top_k=5 \
  --output "$run/predictions_test_constrained.json"

phase "evaluation"
python3 code/evaluate.py --ckpt "$run/final" --predictions "$run/predictions_train.json" \
  --output-dir "$run/eval_train" --title "small default, $variant, training queries"
python3 code/evaluate.py --ckpt "$run/final" --labels free constrained \
  --predictions "$run/predictions_test.json" "$run/predictions_test_constrained.json" \
  --output-dir "$run/eval_test" --title "small default, $variant, test queries"
python3 bench/compare_runs.py "$variant=$run" --json "$OUT/small_$variant.json"
mkdir -p "$OUT/$variant"
cp -r "$run/metrics.jsonl" "$run/config.yaml" "$run/eval_test" "$run/eval_train" "$OUT/$variant/"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
phase "end"
