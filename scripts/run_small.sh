#!/usr/bin/env bash
# The published recipe on the real small LLM (SmolLM2-135M-Instruct, frozen, LoRA r32 on q/k/v/o;
# RECIPE=default runs small.yaml's full fine-tuning instead), shortened for a CPU: build the small
# default (if absent) → stage-3 training for STEPS steps of 16 (default 60; the full schedule is
# 5 epochs of 64: bench/small_gpu.sh) → inference on a
# sample of the test split (free, constrained) and of training queries → evaluation → one table next to
# the tiny default (ckpt/tiny, from scripts/run_tiny.sh, if there) and the most-frequent-tool baseline.
# RUN_DIR (default ckpt/small) is replaced on every run. Extra arguments go to training as
# key=value overrides (e.g. model.lora.r=64). MAX_TRAIN_S (default 360) stops training early on a
# slower machine, so the whole run stays within about 15 minutes on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
cd "$root"
run=${RUN_DIR:-ckpt/small}
case ${RECIPE:-published} in
  published) layers=(--config small --config small_published); label="small default, published LoRA" ;;
  default) layers=(--config small); label="small default, full fine-tuning" ;;
  *) echo "RECIPE=${RECIPE}: use published or default" >&2; exit 2 ;;
esac
start=$SECONDS
python -m toollmm.tiny     # the tiny ImageBind the projector reads
python -m toollmm.small    # converts the GGUF once (about 50 s)
rm -rf "$run"
bash scripts/train.sh --stage 3 "${layers[@]}" train.output_dir="$run" train.max_steps="${STEPS:-60}" \
  train.gradient_accumulation_steps=1 train.max_time_s="${MAX_TRAIN_S:-360}" "$@"
# Free generation of a 135M model took 3.6 s a query on a shared 2-core CPU: SAMPLE (default 60) of the 393 test
# queries and half as many training queries, spread evenly over every file and modality (SAMPLE=0:
# all). Top-k beam search is left to the GPU run (bench/small_gpu.sh).
sample=${SAMPLE:-60}
python code/inference.py --ckpt "$run/final" --split test --sample "$sample" --output "$run/predictions_test.json"
python code/inference.py --ckpt "$run/final" --split train --sample $((sample / 2)) --output "$run/predictions_train.json"
python code/inference.py --ckpt "$run/final" --split test --sample "$sample" inference.constrained=true \
  --output "$run/predictions_test_constrained.json"
python code/evaluate.py --ckpt "$run/final" --predictions "$run/predictions_train.json" \
  --output-dir "$run/eval_train" --title "$label, training queries"
python code/evaluate.py --ckpt "$run/final" --labels free constrained \
  --predictions "$run/predictions_test.json" "$run/predictions_test_constrained.json" \
  --output-dir "$run/eval_test" --title "$label, test queries"
python - "$run" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
print(f"training: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
      f"{rows[-1]['elapsed_s']:.0f} s ({rows[-1]['elapsed_s'] / len(rows):.1f} s a step of 16)")
PY
echo
python bench/compare_runs.py "tiny default (full FT from scratch)=${TINY_RUN_DIR:-ckpt/tiny}" \
  "$label ($(basename "$run"))=$run" --json "$run/comparison.json"
echo "small run done in $((SECONDS - start)) s; reports under $run/eval_test and $run/eval_train"
