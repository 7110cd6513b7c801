"""Kills at every kind of save point resume to the uninterrupted run, bit for bit on CPU.

Ten rows, micro-batch 1, accumulation 4: an epoch is 10 micro-batches, 2 optimizer steps and a
tail of 2 micro-batches that DeepSpeed carries into the next epoch's first step. Saves come at
epoch ends (``save_every_steps: 0``): epoch 0 ends with a tail, so its save waits for step 3
(epoch 1, micro-batch 2); epoch 1 ends on a step boundary (step 5); step 6 is the last.
Mid-epoch periodic saves are covered by test_reliability.py's kill test."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, ROOT, TINY_CONFIG, run_entry
from test_reliability import descendants


def settings(tmp: Path) -> list[str]:
    rows = json.loads((DATA / "toolmmbench" / "audio_tx2t.json").read_text())[:10]
    for r in rows:  # text rows: no media to decode
        r.update(input_modality="text", audio_path="")
    data = tmp / "rows.json"
    data.write_text(json.dumps(rows))
    return ["--stage", "3", "--config", str(TINY_CONFIG), f"data.train_files=[{{path: {data}, media_root: {tmp}}}]",
            "data.eval_files=[]", "data.split.test_fraction=0.0", f"data.feature_cache_dir={tmp / 'cache'}",
            "train.micro_batch_size=1", "train.gradient_accumulation_steps=4", "train.epochs=3", "train.keep_last=3",
            "train.group_by_length=false"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def kill_when(args: list[str], ready, deadline_s: float = 900) -> None:
    """Start training and SIGKILL it, with anything it started, as soon as ``ready()`` holds."""
    env = {**os.environ, "PYTHON": sys.executable, "NPROC": "1"}
    process = subprocess.Popen(["bash", str(ROOT / "scripts" / "train.sh"), *args], cwd="/", env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + deadline_s
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the kill point"
        time.sleep(0.002)
    workers = descendants(process.pid)  # a launcher's workers sit in a session of their own
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    for pid in workers:  # gone (or a zombie) before the resumed run takes the folder
        while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower():
            time.sleep(0.01)


def complete(run: Path, step: int) -> bool:
    return (run / "resume" / f"step_{step}" / "complete").is_file()


def saving(run: Path, step: int) -> bool:
    """Inside the save of ``step``: its resume state begun, its completion marker not yet written."""
    return (run / "resume" / f"step_{step}").is_dir() and not complete(run, step)


def resumed_from(result) -> str:
    return result.stderr.split("resumed from ", 1)[1].split(" ")[0]


@pytest.mark.slow
def test_kills_at_epoch_end_saves_and_inside_a_save_resume_bit_exact(tiny_default, tmp_path):
    args = settings(tmp_path)
    reference = tmp_path / "uninterrupted"
    run_entry("train.py", *args, f"train.output_dir={reference}")
    steps = metrics(reference)
    assert [(r["step"], r["epoch"], r["samples_seen"]) for r in steps] == [
        (1, 0, 4), (2, 0, 8), (3, 1, 12), (4, 1, 16), (5, 1, 20), (6, 2, 24)]
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-5", "checkpoint-6"]
    progress = [json.loads((reference / f"checkpoint-{s}" / "checkpoint.json").read_text()) for s in (3, 5)]
    assert [(p["epoch"], p["batches_in_epoch"]) for p in progress] == [(1, 2), (2, 0)]  # the tail's save waited for step 3

    run = tmp_path / "killed"
    killed = [*args, f"train.output_dir={run}"]
    # 1. right after the save that ends epoch 0's accumulation tail
    kill_when(killed, lambda: complete(run, 3))
    # 2. resumed from it, killed inside the last save (step 6)
    kill_when([*killed, "--resume"], lambda: saving(run, 6))
    assert not complete(run, 6) and not (run / "final").exists()
    # 3. resumed from the epoch-1 save (step 5): runs to the end
    result = run_entry("train.py", *killed, "--resume")
    assert resumed_from(result) == "step_5"
    again = metrics(run)
    assert [r["step"] for r in again] == list(range(1, 7))
    for before, after in zip(steps, again):
        assert (after["loss"], after["lr"], after["samples_seen"]) == (before["loss"], before["lr"], before["samples_seen"])
    for name in ("checkpoint-3", "checkpoint-5", "final"):
        x, y = load_file(reference / name / "trainable.safetensors"), load_file(run / name / "trainable.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    print("killed after step_3 (epoch-0 tail), inside the step-6 save; resumed from step_3, then step_5: bit-exact")
