"""Where a training step leaves the GPU idle, from the Chrome trace that `train.profile_steps`
writes (`profile_trace.json`, gzipped or not):

    python bench/trace_gaps.py RUN/profile_trace.json.gz

Per profiled step (steps start at each DataLoader `__next__`): wall time and GPU-busy time of
the forward (up to the first autograd event), the backward (the autograd events' span on the
host) and what follows it (DeepSpeed's step, metrics); then the host operators of the
after-backward phase with the most time, the phase where the GPU waited on the host.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if "dur" in e]


def busy_ms(gpu: list[dict], start: float, end: float) -> float:
    return sum(max(0.0, min(e["ts"] + e["dur"], end) - max(e["ts"], start)) for e in gpu) / 1e3


def top_level(events: list[dict]) -> list[dict]:
    """Events not nested in an earlier one (host ops sorted by start)."""
    kept, end = [], -1.0
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= end:
            kept.append(e)
            end = e["ts"] + e["dur"]
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    events = load_events(args.trace)
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]
    starts = sorted(e["ts"] for e in host if e["name"].startswith("enumerate(DataLoader)"))
    autograd = [e for e in host if e["name"].startswith("autograd::engine")]
    after_backward: Counter = Counter()
    calls: Counter = Counter()
    rows = []
    for start, end in zip(starts, starts[1:]):
        inside = [e for e in autograd if start < e["ts"] < end]
        backward_start = min(e["ts"] for e in inside)
        backward_end = max(e["ts"] + e["dur"] for e in inside)
        rows.append({
            "step_ms": round((end - start) / 1e3, 1),
            "gpu_busy_ms": round(busy_ms(gpu, start, end), 1),
            "forward_ms": round((backward_start - start) / 1e3, 1),
            "forward_gpu_ms": round(busy_ms(gpu, start, backward_start), 1),
            "backward_ms": round((backward_end - backward_start) / 1e3, 1),
            "backward_gpu_ms": round(busy_ms(gpu, backward_start, backward_end), 1),
            "after_backward_ms": round((end - backward_end) / 1e3, 1),
            "after_backward_gpu_ms": round(busy_ms(gpu, backward_end, end), 1),
        })
        for e in top_level([e for e in host if backward_end <= e["ts"] < end]):
            after_backward[e["name"]] += e["dur"]
            calls[e["name"]] += 1
    steps = len(rows)
    for row in rows:
        print(json.dumps(row))
    print(f"after the backward, host time per step by operator ({steps} steps):")
    for name, total in after_backward.most_common(args.top):
        print(f"  {total / steps / 1e3:7.2f} ms  {calls[name] // steps:5d} calls  {name[:70]}")


if __name__ == "__main__":
    main()
