#!/usr/bin/env bash
# The main job on the embedded tiny default, from a fresh clone:
#   build tiny default (if absent) → stage-3 training → inference on the test split and on
#   training queries → evaluation next to the most-frequent-tool baseline.
# RUN_DIR (default ckpt/tiny) is replaced on every run. Extra arguments go to training as
# key=value overrides (e.g. train.epochs=1).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
cd "$root"
run=${RUN_DIR:-ckpt/tiny}
start=$SECONDS
python -m toollmm.tiny
rm -rf "$run"
bash scripts/train.sh --stage 3 --config tiny train.output_dir="$run" "$@"
for split in test train; do
  python code/inference.py --ckpt "$run/final" --split $split --output "$run/predictions_$split.json" 2>&1 \
    | tee "$run/inference_$split.log"
done
# The same test queries with decoding constrained to the tool catalogue, and the top 5 tools.
python code/inference.py --ckpt "$run/final" --split test inference.constrained=true inference.top_k=5 \
  --output "$run/predictions_test_constrained.json"
python code/evaluate.py --ckpt "$run/final" --predictions "$run/predictions_train.json" \
  --output-dir "$run/eval_train" --title "tiny default, training queries"
python code/evaluate.py --ckpt "$run/final" --labels free constrained \
  --predictions "$run/predictions_test.json" "$run/predictions_test_constrained.json" \
  --output-dir "$run/eval_test" --title "tiny default, test queries: free vs constrained decoding"
python - "$run" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
print(f"training: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
      f"token accuracy {rows[0]['token_accuracy']:.3f} -> {rows[-1]['token_accuracy']:.3f}, {rows[-1]['elapsed_s']:.0f} s")
PY
seconds=$((SECONDS - start))
echo "main job done in $seconds s; reports under $run/eval_test and $run/eval_train"
# Beside the measured headline figures (bench/results/headline.json; they name their machine).
python bench/headline.py cpu_tiny_inference_queries_per_s --log "$run/inference_test.log"
python bench/headline.py cpu_main_job_s "$seconds"
