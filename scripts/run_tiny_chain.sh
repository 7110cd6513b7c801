#!/usr/bin/env bash
# The three training stages chained on the embedded tiny default and the bundled caption pairs:
#   caption embeddings (the tiny decoders' text encoders) → stage 1 (encoder alignment) →
#   stage 2 (decoder alignment, held-out caption MSE before/after) → stage 3 (tool selection +
#   X → text + text → X instructions), each stage starting from the previous one's checkpoint.
# RUN_DIR (default ckpt/tiny_chain) is replaced on every run. Extra key=value arguments go to
# every stage (e.g. train.max_steps=3 for a smoke run).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
cd "$root"
run=${RUN_DIR:-ckpt/tiny_chain}
layers=(--config tiny --config tiny_chain)
start=$SECONDS
python -m toollmm.tiny
rm -rf "$run"
python code/process_embeddings.py --stage 2 "${layers[@]}"
bash scripts/train.sh --stage 1 "${layers[@]}" train.output_dir="$run/stage_1" train.epochs=${STAGE1_EPOCHS:-20} "$@"
bash scripts/train.sh --stage 2 "${layers[@]}" train.output_dir="$run/stage_2" train.init_from="$run/stage_1/final" \
  train.epochs=${STAGE2_EPOCHS:-60} "$@"
bash scripts/train.sh --stage 3 --config any_to_any "${layers[@]}" train.output_dir="$run/stage_3" \
  train.init_from="$run/stage_2/final" train.epochs=${STAGE3_EPOCHS:-1} "$@"
python - "$run" <<'PY'
import json, sys
run = sys.argv[1]
for stage in (1, 2, 3):
    rows = [json.loads(line) for line in open(f"{run}/stage_{stage}/metrics.jsonl")]
    print(f"stage {stage}: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, {rows[-1]['elapsed_s']:.0f} s")
held = json.load(open(f"{run}/stage_2/held_out.json"))
print(f"stage 2, {held['examples']} held-out captions: " + ", ".join(
    f"{k} {held['before'][k]:.4f} -> {held['after'][k]:.4f}" for k in sorted(held['after']) if k.startswith("mse_")))
PY
echo "chain done in $((SECONDS - start)) s; checkpoints under $run"
