"""bench/trace_gaps.py on a synthetic profiler trace: the phase split and the GPU-busy arithmetic."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def event(name, cat, ts, dur):
    return {"name": name, "cat": cat, "ts": ts, "dur": dur, "ph": "X"}


def test_trace_gaps_splits_each_step(tmp_path):
    events = []
    for step, start in enumerate((0.0, 10_000.0, 20_000.0)):  # microseconds; the third only closes step 2
        events.append(event("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", "user_annotation", start, 100))
        if step == 2:
            break
        events.append(event("triton_forward", "kernel", start + 1_000, 3_000))  # forward: 3 of 4 ms busy
        events.append(event("autograd::engine::evaluate_function: MmBackward0", "cpu_op", start + 4_000, 4_000))
        events.append(event("mm_backward", "kernel", start + 4_000, 2_000))  # backward: 2 of 4 ms busy
        for i in range(3):  # after the backward: 2 ms of host ops, the GPU idle
            events.append(event("aten::isfinite", "cpu_op", start + 8_000 + 500 * i, 400))
            events.append(event("aten::abs", "cpu_op", start + 8_000 + 500 * i + 50, 100))  # nested: not top level
    path = tmp_path / "profile_trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": events}, handle)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "trace_gaps.py"), str(path)], capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows == [{"step_ms": 10.0, "gpu_busy_ms": 5.0, "forward_ms": 4.0, "forward_gpu_ms": 3.0, "backward_ms": 4.0,
                     "backward_gpu_ms": 2.0, "after_backward_ms": 2.0, "after_backward_gpu_ms": 0.0}] * 2
    assert "1.20 ms      3 calls  aten::isfinite" in out and "aten::abs" not in out
