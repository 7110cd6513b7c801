#!/usr/bin/env bash
# Stage-3 training speed on one GPU, both configurations side by side in one run, on a
# random-init Vicuna-7B (or -13B) of the published shape and the bundled ToolMMBench rows at
# their real lengths (ImageBind features cached before the timed loop):
#   (a) bench/speed_published.yaml: fp16, ZeRO-2, CPU-offloaded Adam, micro-batch 4 × accumulation 4
#   (b) bench/speed_fast.yaml: bf16, Adam on the GPU, random rows packed, flex attention, micro-batch 64
# Run from the repo root on the GPU machine with .whl/ carried (bench/README.md):
#   STEPS=40 PRESET=vicuna-7b bash bench/speed.sh
# Writes $OUT/<setting>/{metrics.jsonl,summary.json} and prints one table.
# Two GPUs: NPROC=2 bash bench/speed.sh (DeepSpeed data parallel; compare with NPROC=1).
# SETTINGS picks the runs (default "published fast"); VARIANTS adds fast-path runs with their own
# overrides, ';'-separated NAME=OVERRIDES, e.g.
#   SETTINGS=fast VARIANTS="padded128=train.packing=false train.micro_batch_size=128" bash bench/speed.sh
# An upper-case KEY=value word among a variant's overrides is an environment variable of that run
# alone (torch's TORCHINDUCTOR_* settings), e.g. VARIANTS="cdt=train.fp8=true TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1".
set -euo pipefail
OUT=${OUT:-/tmp/speed_out}; mkdir -p "$OUT"
STEPS=${STEPS:-40}
PRESET=${PRESET:-vicuna-7b}
LLM=/tmp/$PRESET
PARAMS=$([ "$PRESET" = vicuna-13b ] && echo 13.0e9 || echo 6.74e9)
export NPROC=${NPROC:-1}
exec > >(tee "$OUT/speed.log") 2>&1
source bench/device_env.sh
python3 -m toollmm.tiny
# TOKENIZER=trained: a 32000-token sentencepiece trained on the bundled text (Vicuna's vocabulary
# size; rows tokenize to about the lengths Vicuna's tokenizer gives); default: the tiny tokenizer.
if [ "${TOKENIZER:-tiny}" = trained ]; then
  LLM=/tmp/${PRESET}_vocab
  [ -f "$LLM/config.json" ] || python3 bench/make_random_llm.py --preset "$PRESET" --out "$LLM" --train-tokenizer data
else
  [ -f "$LLM/config.json" ] || python3 bench/make_random_llm.py --preset "$PRESET" --out "$LLM" --tokenizer pretrained_checkpoint/LLM_ckpt/tiny_llama
fi
layers=(--config tiny --config bench/gpu_smoke.yaml)
python3 code/extract_features.py --split train "${layers[@]}" >/dev/null  # cache first: not timed
run_setting() {  # name, config layer, overrides... (NAME=value words: environment variables of that run alone)
  local name=$1 layer=$2; shift 2
  local environment=() overrides=() word
  for word in "$@"; do
    if [[ $word =~ ^[A-Z][A-Z0-9_]*= ]]; then environment+=("$word"); else overrides+=("$word"); fi
  done
  rm -rf "/tmp/speed_$name"
  env "${environment[@]}" PYTHON=python3 bash scripts/train.sh --stage 3 "${layers[@]}" --config "$layer" model.llm_path="$LLM" \
    train.output_dir="/tmp/speed_$name" train.max_steps="$STEPS" train.max_time_s=420 train.epochs=5 "${overrides[@]}" \
    || { echo "=== $name failed (out of memory?): left out of the table"; rm -rf "/tmp/speed_$name"; return 0; }
  mkdir -p "$OUT/$name"; cp "/tmp/speed_$name/metrics.jsonl" "/tmp/speed_$name/config.yaml" "$OUT/$name/"
  [ ${#environment[@]} -eq 0 ] || printf '%s\n' "${environment[@]}" > "$OUT/$name/environment.txt"
  cp "/tmp/speed_$name"/profile* "$OUT/$name/" 2>/dev/null || true  # train.profile_steps
  python3 bench/summarize_metrics.py "/tmp/speed_$name/metrics.jsonl" --warmup 3 --params "$PARAMS" --json "$OUT/$name/summary.json"
  # Resume states and periodic checkpoints add up over 7B runs; final/ stays (bench/eval_speed.sh reads it).
  rm -rf "/tmp/speed_$name"/resume "/tmp/speed_$name"/checkpoint-*
  names+=("$name")
}
names=()
for setting in ${SETTINGS:-published fast}; do run_setting "$setting" "bench/speed_$setting.yaml" "$@"; done
IFS=';' read -ra variants <<< "${VARIANTS:-}"
for variant in "${variants[@]}"; do
  [ -n "$variant" ] || continue
  read -ra overrides <<< "${variant#*=}"
  run_setting "${variant%%=*}" bench/speed_fast.yaml "$@" "${overrides[@]}"
done
python3 - "$OUT" "${names[@]}" <<'PY'
import json, sys
rows = {s: json.load(open(f"{sys.argv[1]}/{s}/summary.json")) for s in sys.argv[2:]}
keys = ["samples_per_s_over_span", "real_tokens_per_s", "mfu_4n", "mfu_4n_vs_790", "peak_memory_gib", "loss_mean_first5", "loss_mean_last5"]
print(f"{'':26}" + "".join(f"{s:>14}" for s in rows))  # names up to 13 characters
for k in keys:
    print(f"{k:26}" + "".join(f"{rows[s].get(k, '-')!s:>14}" for s in rows))
PY
# The headline records are one-GPU 7B runs of these settings (bench/headline.py prints them beside).
if [ "$PRESET" = vicuna-7b ] && [ "$NPROC" = 1 ]; then
  for name in "${names[@]}"; do
    case $name in
      published) python3 bench/headline.py stage3_7b_published_samples_per_s --summary "$OUT/$name/summary.json" ;;
      fast|fp8) python3 bench/headline.py stage3_7b_fast_samples_per_s --summary "$OUT/$name/summary.json" ;;
    esac
  done
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
