#!/usr/bin/env bash
# Open-set tool selection with the small default (SmolLM2-135M-Instruct, full schedule, bf16) on
# one GPU: 20% of the tools held out of training (data.split.unseen_tools=0.2), the tool retriever
# trained on the same rows, then top 5 on the test split by the model over the trained tools (the
# closed set), with 2 and 3 open-set slots, and the TF-IDF baseline, all in one evaluate.py report.
#   bash bench/small_open_set_gpu.sh [key=value overrides for train.sh ...]
# CONFIG=tiny runs the same steps on the tiny default (a CPU dry run: SKIP_WHEELS=1).
# A step whose output exists is skipped, so a call cut at the device's time limit resumes on a warm
# machine. Writes $OUT/small_open_set.log and $OUT/small_open_set.tar.gz (predictions, report,
# retriever recall, training metrics). Inputs as for bench/small_gpu.sh.
set -euo pipefail
OUT=${OUT:-/tmp/small_gpu_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/small_open_set.log") 2>&1
config=${CONFIG:-small}
t0=$SECONDS; phase() { echo "=== [$((SECONDS - t0)) s] $*"; }
split=(data.split.unseen_tools=0.2)

phase "install wheels"
source bench/device_env.sh
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
if [ "$config" = small ]; then
  phase "build tiny ImageBind and the small default"
  source bench/small_build.sh
  train_args=(model.dtype=bf16 train.micro_batch_size=64 train.gradient_accumulation_steps=1)
else
  python3 -m toollmm.tiny
  train_args=()
fi

run=/tmp/small_runs/open_set_$config
if [ ! -f "$run/final/config.yaml" ]; then
  phase "train: $config ${split[*]} ${train_args[*]} $*"
  rm -rf "$run"
  PYTHON=python3 NPROC=1 bash scripts/train.sh --stage 3 --config "$config" "${train_args[@]}" \
    train.output_dir="$run" "${split[@]}" "$@"
fi
ckpt=$run/final

phase "tool retriever"
[ -f "$ckpt/tool_retriever/test_recall.json" ] || python3 code/train_retriever.py --ckpt "$ckpt"

answer() {  # answer OUTPUT [key=value ...]: top 5 by beam search over the catalogue, test split
  local output=$run/$1; shift
  [ -f "$output" ] || python3 code/inference.py --ckpt "$ckpt" --split test --output "$output" \
    inference.constrained=true inference.top_k=5 "$@"
}
phase "answers: closed set"
answer closed.json inference.catalogue_tools=trained
phase "answers: open set, 3 slots"
answer open3.json inference.open_set_slots=3
phase "answers: open set, 2 slots"
answer open2.json inference.open_set_slots=2
phase "TF-IDF baseline"
[ -f "$run/tfidf.json" ] || python3 code/text_baseline.py --config "$config" "${split[@]}" --predictions "$run/tfidf.json"

phase "evaluation"
python3 code/evaluate.py --ckpt "$ckpt" --predictions "$run"/{closed,open2,open3,tfidf}.json \
  --labels closed-set open-2-slots open-3-slots tf-idf --output-dir "$run/eval_open_set" \
  --title "small default ($config), 20% of tools held out: closed set, open-set slots, TF-IDF"
tar -czf "$OUT/small_open_set.tar.gz" -C "$run" closed.json open2.json open3.json tfidf.json eval_open_set \
  metrics.jsonl config.yaml final/tool_retriever/test_recall.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
phase "end"
