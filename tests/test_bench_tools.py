"""bench/trace_gaps.py on a synthetic profiler trace: the phase split and the GPU-busy arithmetic;
bench/headline.py printing a new figure beside its headline record."""

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

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


def headline(*args):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "headline.py"), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_headline_prints_a_figure_beside_its_record(tmp_path):
    records = [{"name": "cpu_main_job_s", "value": 800, "unit": "s", "hardware": "a 2-core CPU", "commit": "abc1234",
                "date": "2026-12-01", "command": "bash scripts/run_tiny.sh", "compared_with": {"name": "before", "value": 900}},
               {"name": "stage3_7b_fast_samples_per_s", "value": 200.0, "unit": "samples/s", "hardware": "one H200",
                "commit": "def5678", "date": "2026-12-02", "command": "bash bench/speed.sh", "compared_with": None}]
    path = tmp_path / "headline.json"
    path.write_text(json.dumps(records))
    assert headline("cpu_main_job_s", "600", "--headline", str(path)) == (
        "cpu_main_job_s: 600 s now | headline 800 s (abc1234, a 2-core CPU, 2026-12-01) | now/headline 0.75"
        " | the headline compared with 900 s: before")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"samples_per_s_over_span": 250.0}))
    assert headline("stage3_7b_fast_samples_per_s", "--summary", str(summary), "--headline", str(path)) == (
        "stage3_7b_fast_samples_per_s: 250 samples/s now | headline 200 samples/s (def5678, one H200, 2026-12-02)"
        " | now/headline 1.25")
    log = tmp_path / "inference.log"
    log.write_text("INFO answered 393 queries in 4.3 s (91.7 queries/s, batch size 64, free)\n"
                   "INFO answered 200 queries in 2.4 s (84.4 queries/s, batch size 64, free)\n")
    assert headline("cpu_main_job_s", "--log", str(log), "--headline", str(path)).startswith("cpu_main_job_s: 84.4 s now")
    # Never fails a benchmark: a run that did not finish, or a name without a record, is one line.
    assert "did not finish" in headline("stage3_7b_fast_samples_per_s", "--summary", str(tmp_path / "none.json"))
    assert "did not finish" in headline("cpu_main_job_s", "--log", str(tmp_path / "none.log"))
    assert headline("unknown_figure", "3", "--headline", str(path)).endswith(f"no headline record of that name in {path}")


def test_every_bench_comparison_names_a_headline_record():
    """The names the bench scripts print beside their figures are records of headline.json."""
    names = {record["name"] for record in json.loads((ROOT / "bench" / "results" / "headline.json").read_text())}
    used = set()
    for script in ("bench/speed.sh", "bench/eval_speed.sh", "scripts/run_tiny.sh"):
        used |= set(re.findall(r"python3? bench/headline\.py \"?([a-z0-9_]+)", (ROOT / script).read_text()))
    assert len(used) == 6 and used <= names, sorted(used - names)


def test_hide_packages_runs_a_script_as_if_they_were_not_installed(tmp_path):
    (tmp_path / "beside.py").write_text("WHERE = 'beside the script'\n")
    (tmp_path / "script.py").write_text(
        "import importlib.util, json, sys\n"
        "import beside\n"
        "try:\n"
        "    import torchao\n"
        "    imported = True\n"
        "except ModuleNotFoundError:\n"
        "    imported = False\n"
        "print(json.dumps([__name__, sys.argv, beside.WHERE, importlib.util.find_spec('torchao') is None, imported,\n"
        "                  importlib.util.find_spec('yaml') is None]))\n")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "hide_packages.py"), "torchao,sklearn", str(tmp_path / "script.py"),
                             "--flag", "x"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Hidden: no spec and no import (torchao is installed by the test extra); others untouched.
    assert json.loads(result.stdout) == ["__main__", [str(tmp_path / "script.py"), "--flag", "x"], "beside the script", True, False, False]


def test_decode_graph_bench_steps_decode_as_generate():
    """bench/decode_graph_bench.py's hand-driven steps (left padding, a boolean mask updated in
    place, positions and a static cache) give generate's greedy tokens, so its eager and graph
    timings are of the decoding that answering runs."""
    sys.path.insert(0, str(ROOT / "bench"))
    import decode_graph_bench as bench

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = bench.build("tiny", cpu)
    model.generation_config.eos_token_id = None  # random weights: decode all the steps
    rows, prompt, steps = 5, 9, 6
    batch = bench.Batch(model, rows, prompt, steps, max_pad=4, device=cpu)
    assert batch.valid[:, :prompt].sum(-1).tolist() != [prompt] * rows  # some rows are padded
    batch.prefill()
    tokens, logits = [batch.token.clone()], []
    for _ in range(steps - 1):
        logits.append(batch.step())
        batch.advance(logits[-1])
        tokens.append(batch.token.clone())
    reference = model.generate(input_ids=batch.prompt_ids, attention_mask=batch.valid[:, :prompt].long(), max_new_tokens=steps,
                               do_sample=False, cache_implementation="static", pad_token_id=0, output_logits=True,
                               return_dict_in_generate=True)
    assert torch.equal(torch.cat(tokens, 1), reference.sequences[:, prompt:])
    torch.testing.assert_close(torch.stack(logits), torch.stack(reference.logits[1:]), rtol=0, atol=1e-5)
