"""Summarize a training run's metrics.jsonl: step time, samples/s, real tokens/s, MFU, peak GPU memory, loss.

    python bench/summarize_metrics.py RUN/metrics.jsonl [--warmup 5] [--params 6.74e9] [--peak-tflops 989] [--json OUT.json]

Step time = differences of elapsed_s between consecutive logged optimizer steps, after the
first ``--warmup`` steps (step 1 holds the first-call overheads).

``epochs`` gives samples/s per epoch, each from the end of the previous epoch's last step (an
epoch-end checkpoint save counts in the next epoch) and epoch 0 from the end of the warmup:
a full epoch covers every row length once, long-row batches included, which a window of
steps need not.

MFU counts 4·N FLOPs per real (non-padding) token for a frozen base of N parameters with
LoRA: the forward pass (2N) plus the backward pass's input gradients (2N); the weight
gradients of the frozen base are never computed, LoRA's are negligible. MFU = tokens/s × 4N /
peak dense bf16 FLOP/s (989 TFLOP/s: H100 SXM datasheet).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summarize(path: Path, warmup: int, params: float | None = None, peak_tflops: float = 989.0) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) < warmup + 2:
        raise SystemExit(f"{path}: {len(rows)} steps logged, need more than warmup+1 = {warmup + 1}")
    steady = rows[warmup:]
    deltas = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steady, steady[1:])]
    span_s = steady[-1]["elapsed_s"] - steady[0]["elapsed_s"]
    span_samples = steady[-1]["samples_seen"] - steady[0]["samples_seen"]
    q = statistics.quantiles(deltas, n=10) if len(deltas) >= 2 else [deltas[0]] * 9
    median = statistics.median(deltas)
    samples_per_step = span_samples / len(deltas)
    return {
        "steps": rows[-1]["step"],
        "warmup_steps_excluded": warmup,
        "step_time_median_s": round(median, 4),
        "step_time_p10_s": round(q[0], 4),
        "step_time_p90_s": round(q[-1], 4),
        "step_time_mean_s": round(span_s / len(deltas), 4),
        "samples_per_step": samples_per_step,
        "samples_per_s_median_step": round(samples_per_step / median, 3),
        "samples_per_s_over_span": round(span_samples / span_s, 3),
        "first_step_s": rows[0]["elapsed_s"],
        "total_loop_s": rows[-1]["elapsed_s"],
        "peak_memory_gib": max((r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r), default=None),
        "loss_first": round(rows[0]["loss"], 4),
        "loss_last": round(rows[-1]["loss"], 4),
        "loss_mean_first5": round(statistics.mean(r["loss"] for r in rows[:5]), 4),
        "loss_mean_last5": round(statistics.mean(r["loss"] for r in rows[-5:]), 4),
        "token_accuracy_last": round(rows[-1].get("token_accuracy", float("nan")), 4),
        "lr_last": rows[-1]["lr"],
        **_tokens(steady, span_s, params, peak_tflops),
        "epochs": _per_epoch(rows, warmup, params),
    }


def _per_epoch(rows: list[dict], warmup: int, params: float | None) -> list[dict]:
    out = []
    for epoch in sorted({r.get("epoch", 0) for r in rows}):
        indices = [i for i, r in enumerate(rows) if r.get("epoch", 0) == epoch]
        start, end = max(indices[0] - 1, warmup), indices[-1]
        if end <= start:
            continue
        first, last = rows[start], rows[end]
        seconds = last["elapsed_s"] - first["elapsed_s"]
        entry = {"epoch": epoch, "steps": f"{first['step'] + 1}-{last['step']}", "seconds": round(seconds, 2),
                 "samples_per_s": round((last["samples_seen"] - first["samples_seen"]) / seconds, 1)}
        if "tokens_seen" in last:
            tokens_per_s = (last["tokens_seen"] - first["tokens_seen"]) / seconds
            entry["real_tokens_per_s"] = round(tokens_per_s)
            if params:
                entry["mfu_4n_vs_790"] = round(tokens_per_s * 4 * params / 790e12, 4)
        out.append(entry)
    return out


def _tokens(steady: list[dict], span_s: float, params: float | None, peak_tflops: float) -> dict:
    if "tokens_seen" not in steady[-1]:
        return {}
    tokens_per_s = (steady[-1]["tokens_seen"] - steady[0]["tokens_seen"]) / span_s
    out = {"real_tokens_per_s": round(tokens_per_s, 1)}
    if params:
        out["mfu_4n"] = round(tokens_per_s * 4 * params / (peak_tflops * 1e12), 4)
        out["mfu_formula"] = f"tokens/s × 4 × {params:.3g} / {peak_tflops} TFLOP/s"
        # The yardstick: the ~790 TFLOP/s a bf16 8192³ matmul reaches on an H100.
        out["mfu_4n_vs_790"] = round(tokens_per_s * 4 * params / 790e12, 4)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--params", type=float, default=None, help="frozen base parameter count, for MFU (7B: 6.74e9)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100 SXM: 989)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    summary = summarize(args.metrics, args.warmup, args.params, args.peak_tflops)
    width = max(map(len, summary))
    for key, value in summary.items():
        if key == "epochs":
            for entry in value:
                print(f"{'epoch ' + str(entry['epoch']):<{width}}  " + ", ".join(f"{k} {v}" for k, v in entry.items() if k != "epoch"))
            continue
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
