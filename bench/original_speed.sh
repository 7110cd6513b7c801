#!/usr/bin/env bash
# Stage-3 training speed of the ORIGINAL MLLM-Tool code (a checkout of 0114f7c, run in place and
# unedited, through bench/original/train.py) on one GPU, on the rows, model shape and tokenizer of
# our speed run, so that its samples/s sits beside bench/speed.sh's in the same call:
#   STEPS=40 TOKENIZER=trained SETTINGS=published bash bench/speed.sh       # ours (leaves /tmp/vicuna-7b_vocab)
#   ORIGINAL=.original/MLLM-Tool STEPS=40 bash bench/original_speed.sh      # the original, same OUT
# Prepare the checkout as bench/README.md says and carry it (`.original`). Writes
# $OUT/original/{metrics.jsonl,summary.json,rows.json,ds_config.json,original_speed.log} and
# prints one line (beside ours when $OUT/published/summary.json exists).
# CPU dry run (a functional check, never a timing; its ImageBind cache stays cold):
#   SKIP_WHEELS=1 DRY_RUN=1 PYTHON=.venv/bin/python LLM=pretrained_checkpoint/LLM_ckpt/tiny_llama \
#     ORIGINAL=/path/to/MLLM-Tool STEPS=6 WARMUP=2 OUT=/tmp/original_dry bash bench/original_speed.sh
#
# The original runs with its published settings: scripts/train.sh's arguments (openllama_peft,
# its stage-1 DeepSpeed config, max_tgt_len 512, 5 epochs) and config/*.yaml (LoRA r 32, alpha
# 32, dropout 0.1 on q/k/v/o), DeepSpeed's fp16 with dynamic loss scaling, ZeRO-2, Adam offloaded
# to the CPU (DeepSpeedCPUAdam), gradient clipping 1.0, micro-batch 4 × accumulation 4 per GPU.
# Its model: its own copy of the LLaMA code (eager attention: matmul, additive 4-D mask, fp32
# softmax; full-vocabulary logits and loss), ImageBind-huge inside the module (frozen, fp16 on
# the GPU), a linear projector; it tokenizes each micro-batch inside forward and reads each
# medium's embedding from its disk cache.
#
# What is the same in both runs: the rows (our speed run's 9553 training rows: the 85% split of
# the bundled ToolMMBench files and media requests, one row per (request, tool), repeats dropped,
# tool names stripped); the prompt template ("### Human: " + query, or "### Human: <Img>" +
# slot + "</Img> " + query for a medium, then "\n### Assistant: " and the answer
# "{'api_name': TOOL}\n###", loss on the answer only); the token ids and labels of every row
# (sentencepiece on each segment; checked on the CPU with the trained tokenizer: 0 of 9553 rows
# differ; 73.02 positions a row on average, BOS, prefix and slot included; longest 335, none cut
# at 512);
# media per row (none for the 9451 rows whose ToolMMBench media is absent, which both use
# text-only; one for the 102 rows over bundled media: 55 image, 24 audio, 23 video); the LLM
# (random-init Vicuna-7B shape, the same folder); trainable parameters (LoRA on q/k/v/o and the
# projector); 16 samples an optimizer step; the window (steps 5..STEPS, summarize_metrics.py
# --warmup 3).
#
# What differs, and how it bears on the comparison:
# - Which rows fall in the window: both draw random micro-batches, seeded differently, so the
#   576 samples of steps 5-40 are different draws of the same rows (their mean length varies by
#   a few percent between draws): the line printed at the end gives real tokens/s and tokens a
#   row for both.
# - Micro-batches: ours draws 4 random rows from all rows; the original's forward takes one
#   modality per micro-batch, so its micro-batches stay within one file (bench/original/train.py's
#   mixed sampler: every row once an epoch, the micro-batches of the four files shuffled
#   together). Its 24 media micro-batches an epoch hold 4 media rows each where ours spreads
#   the 102 media rows over text batches: the text micro-batches (99% of both) draw from the
#   same rows, so the padded width per micro-batch has the same distribution. SAMPLER=original
#   uses its own sampler instead: the four files in turn, 3 micro-batches in 4 from the few short
#   media rows, i.e. a different workload.
# - Media encoder: ours runs the tiny ImageBind of our `tiny` config before the timed loop and
#   keeps the features in memory; the original holds a random ImageBind-huge in its model (about
#   2.2 GiB of fp16 weights in its peak memory, never run in the loop) and torch.loads each
#   medium's 1024-d embedding from its cache, filled before the loop by its own code
#   (make_inputs.py; COLD=1 leaves it empty so the loop encodes each medium the first time).
# - Attention and loss: SDPA's causal kernel without a mask (ours) against its eager attention
#   with a mask built every forward; our loss against its full-vocabulary fp16 logits. These are
#   the implementations being compared, as are its per-micro-batch tokenization, loss.item(),
#   tqdm and DEBUG-level logging to a file, and DeepSpeed's per-step print (steps_per_print 1).
# - Learning rate: its warm-up is max(10, 0.1 × its total steps), with total steps from its own
#   epoch definition (largest file × 4 files × 5 epochs / 16 = 11813, so 1181 warm-up steps);
#   ours has 2985 steps, 299 warm-up. Both stay in warm-up for 40 steps; losses of two
#   random-init runs in warm-up compare nothing, speed is unaffected.
# - Its DeepSpeed config as published except: train_batch_size 16 (published 64 is 4 GPUs × 16;
#   DeepSpeed refuses a mismatch), and two keys DeepSpeed 0.19 refuses that older versions
#   ignored (fp16 "opt_level", bf16 "enable", a misspelling that never enabled bf16).
# - Checkpoint saves are skipped in the original (none would fall in 40 steps but its final one);
#   ours saves after the loop, outside the window.
# - Loading (outside the window): transformers 5 loads the LLM in bf16 where 4.28 loaded fp32;
#   DeepSpeed casts to fp16 either way. The original builds ImageBind-huge in fp32 on the CPU
#   every start (its code), about 10-20 s of set-up.
set -euo pipefail
repo=$(pwd)
ORIGINAL=$(cd "${ORIGINAL:?set ORIGINAL to a checkout of MLLM-Tool (bench/README.md)}" && pwd)
[ -f "$ORIGINAL/code/train_sft.py" ] || { echo "ORIGINAL=$ORIGINAL has no code/train_sft.py" >&2; exit 2; }
OUT=${OUT:-/tmp/speed_out}; mkdir -p "$OUT/original"; OUT=$(cd "$OUT" && pwd)
STEPS=${STEPS:-40}
RUN=${RUN:-/tmp/original_run}
LLM=${LLM:-/tmp/vicuna-7b_vocab}           # what speed.sh builds with TOKENIZER=trained
SAMPLER=${SAMPLER:-mixed}
WARMUP=${WARMUP:-3}                        # steps left out of the figures: steps 5..STEPS, as speed.sh
PYTHON=${PYTHON:-python3}
[[ $PYTHON != */* ]] || PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")  # the run cds away
exec > >(tee "$OUT/original/original_speed.log") 2>&1
source bench/device_env.sh
dry=(); [ -z "${DRY_RUN:-}" ] || { dry=(--cpu-dry-run); COLD=${COLD:-1}; }
cold=(); [ "${COLD:-0}" = 0 ] || cold=(--cold)
git -C "$ORIGINAL" log -1 --format='original checkout: %h %s' 2>/dev/null || echo "original checkout: $ORIGINAL (no git metadata)"
start=$(date +%s)
[ -f "$LLM/config.json" ] || "$PYTHON" bench/make_random_llm.py --preset vicuna-7b --out "$LLM" --train-tokenizer data
LLM=$(cd "$LLM" && pwd)
"$PYTHON" bench/original/make_inputs.py --original "$ORIGINAL" --run "$RUN" "${dry[@]}" "${cold[@]}"
cp "$RUN/rows.json" "$OUT/original/"; cp "$RUN/code/dsconfig/openllama_peft_stage_1.json" "$OUT/original/ds_config.json"
echo "inputs ready in $(( $(date +%s) - start )) s; LLM $LLM"
# One process, one GPU: the rendezvous the deepspeed launcher would have set. The guard stops a
# run that hangs; metrics written before it stay summarizable.
(cd "$RUN/code" && env MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29561}" RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 \
  timeout "${TIME_LIMIT_S:-480}" "$PYTHON" "$repo/bench/original/train.py" --original "$ORIGINAL" --steps "$STEPS" \
  --out "$OUT/original" --sampler "$SAMPLER" "${dry[@]}" -- \
  --model openllama_peft --stage 1 --imagebind_ckpt_path "$RUN/imagebind" --llm_ckpt_path "$LLM" \
  --max_tgt_len 512 --epochs 5 --save_path "$RUN/ckpt" --log_path "$RUN/ckpt/log" --version v1) \
  || echo "=== the original's run ended with status $? (summarizing the steps it logged)"
echo "original: set-up and run took $(( $(date +%s) - start )) s"
[ -s "$OUT/original/metrics.jsonl" ] || { echo "original: no step logged (see $OUT/original/original_speed.log)"; exit 1; }
"$PYTHON" bench/summarize_metrics.py "$OUT/original/metrics.jsonl" --warmup "$WARMUP" --params 6.74e9 --json "$OUT/original/summary.json"
"$PYTHON" - "$OUT" "$WARMUP" <<'PY'
import json, sys
from pathlib import Path
out, warmup = Path(sys.argv[1]), int(sys.argv[2])
s = json.loads((out / "original/summary.json").read_text())
rows = [json.loads(line) for line in (out / "original/metrics.jsonl").read_text().splitlines() if line.strip()]
first, last = rows[warmup], rows[-1]  # the span summarize_metrics.py measures
per_row = (last["tokens_seen"] - first["tokens_seen"]) / (last["samples_seen"] - first["samples_seen"])
padded = (last["padded_tokens_seen"] - first["padded_tokens_seen"]) / (last["tokens_seen"] - first["tokens_seen"])
line = (f"original: {s['samples_per_s_over_span']} samples/s over steps {s['warmup_steps_excluded'] + 2}-{s['steps']}, "
        f"median step {s['step_time_median_s']} s, {s.get('real_tokens_per_s', '-')} real tokens/s "
        f"({per_row:.1f} a row, {padded:.2f} padded per real), peak {s['peak_memory_gib']} GiB, "
        f"loss {s['loss_mean_first5']} -> {s['loss_mean_last5']}")
def skipped(path):  # optimizer steps skipped on fp16 overflow within the span (no update: cheaper)
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(steps) <= warmup or "overflow_skipped_steps" not in steps[-1]:
        return "-"
    return steps[-1]["overflow_skipped_steps"] - steps[warmup]["overflow_skipped_steps"]
line += f", {skipped(out / 'original/metrics.jsonl')} steps skipped on overflow"
ours = out / "published/summary.json"
if ours.exists():
    o = json.loads(ours.read_text())
    line += (f"; ours (published settings): {o['samples_per_s_over_span']} samples/s, "
             f"{o.get('real_tokens_per_s', '-')} real tokens/s"
             + (f" ({o['real_tokens_per_s'] / o['samples_per_s_over_span']:.1f} a row)" if 'real_tokens_per_s' in o else "")
             + (f", {skipped(out / 'published/metrics.jsonl')} skipped on overflow" if (out / 'published/metrics.jsonl').exists() else "")
             + f", {o['samples_per_s_over_span'] / s['samples_per_s_over_span']:.2f}x the original's samples/s")
print(line)
PY
