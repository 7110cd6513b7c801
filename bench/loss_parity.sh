#!/usr/bin/env bash
# Do the two stage-3 configurations of bench/speed.sh train the same model to the same loss?
# Same model, same rows, same global batch of 64 (the published 4-GPU recipe's 4 × 4 × 4): the
# published settings as 4 × accumulation 16, the fast path as 64 × 1, each with SEEDS (the seed
# sets the row order and dropout: the spread between seeds is the noise). Compared by the final
# model's loss on the test split's tool rows (`train.held_out_tools`: the mean over answer tokens,
# whatever the batching) and by each epoch's mean training loss (every row once an epoch; but a
# mean of batch means, which length-grouped batches weigh differently from random ones).
#   bash bench/loss_parity.sh                       # CPU, the tiny default (about 28 minutes on 2 cores)
#   SETTINGS=fast TAG=random bash bench/loss_parity.sh train.group_by_length=false   # a variant, same table
# On CPU, DeepSpeed has no fp16 ("Type fp16 is not supported on your device"), so the published
# run takes bf16 there (CPU_OVERRIDES); on a GPU set CPU_OVERRIDES and LAYERS to the 7B set-up
# of bench/speed.sh, after it has built /tmp/vicuna-7b_vocab (bench/results/loss_parity.md):
#   LAYERS="tiny bench/gpu_smoke.yaml" CPU_OVERRIDES="train.max_time_s=0 train.offload_optimizer=false" \
#     EPOCHS=1 SEEDS=0 SETTINGS=published bash bench/loss_parity.sh model.llm_path=/tmp/vicuna-7b_vocab
# (Adam on the GPU: the same update, and a 7B published epoch then fits a 10-minute call: 464-511 s.)
# RESUME=1 keeps the finished runs in $OUT and resumes the cut-off ones (a 7B published epoch takes
# most of a 10-minute device call): train.save_every_steps=N gives them states to resume from.
# Writes $OUT/<setting>[-TAG]_seed<N>/{metrics.jsonl,held_out.json}; the table and $OUT/parity.json
# cover every run in $OUT, each setting against the published one.
set -euo pipefail
OUT=${OUT:-/tmp/loss_parity}; mkdir -p "$OUT"
EPOCHS=${EPOCHS:-2}
SEEDS=${SEEDS-0 1}  # SEEDS="" runs nothing: the table of what $OUT holds
PYTHON=${PYTHON:-python}
read -ra layers <<< "${LAYERS:-tiny}"
config_args=(); for layer in "${layers[@]}"; do config_args+=(--config "$layer"); done
# The tiny default trains the whole tiny LLM (tiny says why); compile is off on
# CPU (inductor's C++ build would dominate a CPU run; compiled and eager losses agree on an H100),
# and packed rows take SDPA's masked kernel (FlexAttention has no CPU backward; same maths).
read -ra cpu_overrides <<< "${CPU_OVERRIDES-model.dtype=bf16 train.compile=false model.attn_implementation=sdpa}"
for seed in $SEEDS; do
  for setting in ${SETTINGS:-published fast}; do
    accumulation=$([ "$setting" = published ] && echo 16 || echo 1)
    name=$setting${TAG:+-$TAG}_seed$seed
    # RESUME=1: a run cut off (a device call's time limit) continues from its last resume state;
    # one cut after its last step only measures the held-out loss. A finished run is kept as it is.
    resume=()
    if [ -n "${RESUME:-}" ] && [ -f "$OUT/$name/held_out.json" ] && grep -q '"after"' "$OUT/$name/held_out.json"; then
      echo "$name: finished earlier, kept"; continue
    elif [ -n "${RESUME:-}" ] && [ -n "$(ls -A "$OUT/$name/resume" 2>/dev/null)" ]; then
      resume=(--resume); echo "$name: resuming"
    else
      rm -rf "${OUT:?}/$name"; : > "$OUT/$name.log"
    fi
    PYTHON=$PYTHON bash scripts/train.sh --stage 3 "${resume[@]}" "${config_args[@]}" --config "bench/speed_$setting.yaml" \
      train.output_dir="$OUT/$name" train.epochs="$EPOCHS" train.max_steps=0 train.seed="$seed" \
      train.gradient_accumulation_steps="$accumulation" train.held_out_tools=true "${cpu_overrides[@]}" "$@" >> "$OUT/$name.log" 2>&1 \
      || { echo "$name failed: $OUT/$name.log"; exit 1; }
    rm -rf "$OUT/$name/final" "$OUT/$name/resume" "$OUT/$name"/checkpoint-*  # only the metrics matter here
  done
done
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from collections import defaultdict
from pathlib import Path
out = Path(sys.argv[1])
table = {}
for run in sorted(p.parent.name for p in out.glob("*_seed*/held_out.json") if "after" in json.loads(p.read_text())):  # finished runs
    losses = defaultdict(list)
    for line in open(out / run / "metrics.jsonl"):
        row = json.loads(line)
        losses[row["epoch"]].append(row["loss"])
    held_out = json.loads((out / run / "held_out.json").read_text())
    table[run] = {"steps": sum(map(len, losses.values())), "held_out_examples": held_out["examples"],
                  "held_out_lm_loss": [held_out.get("before", {}).get("lm_loss", float("nan")), held_out["after"]["lm_loss"]],
                  "held_out_token_accuracy_after": held_out["after"]["token_accuracy"],
                  "epoch_mean_loss": [round(sum(v) / len(v), 4) for _, v in sorted(losses.items())]}
epochs = min(len(row["epoch_mean_loss"]) for row in table.values())
print(f"{'run':<24}{'steps':>7}{'held-out before':>17}{'after':>9}{'accuracy':>10}" + "".join(f"{'epoch ' + str(e):>10}" for e in range(epochs)))
for run, row in table.items():
    print(f"{run:<24}{row['steps']:>7}{row['held_out_lm_loss'][0]:>17.4f}{row['held_out_lm_loss'][1]:>9.4f}"
          f"{row['held_out_token_accuracy_after']:>10.4f}" + "".join(f"{x:>10.4f}" for x in row["epoch_mean_loss"][:epochs]))
groups = defaultdict(list)
for run in table:
    groups[run.rsplit("_seed", 1)[0]].append(run)
def compare(setting, name, value):  # a setting's mean against the published one's, and each one's spread between seeds
    ours, base = [value(table[r]) for r in groups[setting]], [value(table[r]) for r in groups["published"]]
    row = {"setting": setting, "what": name, "mean": round(sum(ours) / len(ours), 4), "published_mean": round(sum(base) / len(base), 4),
           "seed_spread": round(max(ours) - min(ours), 4), "published_seed_spread": round(max(base) - min(base), 4)}
    row["minus_published"] = round(row["mean"] - row["published_mean"], 4)
    print(f"{setting}, {name}: {row['minus_published']:+.4f} against published; between seeds: "
          f"{row['seed_spread']:.4f} ({len(ours)} runs), published {row['published_seed_spread']:.4f} ({len(base)} runs)")
    return row
rows = []
for setting in (s for s in groups if s != "published" and "published" in groups):
    rows.append(compare(setting, "held-out lm_loss after training", lambda r: r["held_out_lm_loss"][1]))
    rows.append(compare(setting, "held-out token accuracy after training", lambda r: r["held_out_token_accuracy_after"]))
    rows += [compare(setting, f"epoch {e} mean training loss", lambda r, e=e: r["epoch_mean_loss"][e]) for e in range(epochs)]
(out / "parity.json").write_text(json.dumps({"runs": table, "comparisons": rows}, indent=1) + "\n")
PY
