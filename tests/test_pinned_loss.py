"""Pinned losses: the training entry point on the tiny default (CPU, fp32, seed 0) gives these
exact per-step losses, straight through and stopped after step 3 then resumed.

The values were measured once and written here; a change to the data path, the model, the
optimizer set-up or the loop that moves any of them fails this test. Six optimizer steps of
two micro-batches of four, LoRA with dropout (so the resumed run must restore the RNG too)."""

import json
import shutil

import pytest

from conftest import TINY_CONFIG, run_entry

pytestmark = pytest.mark.slow

SETTINGS = ["--stage", "3", "--config", str(TINY_CONFIG), "model.tuning=lora", "train.learning_rate=0.001",
            "train.seed=0", "train.micro_batch_size=4", "train.gradient_accumulation_steps=2", "train.max_steps=6",
            "train.save_every_steps=3", "train.keep_last=2"]

# Measured once on the tiny default (tests/conftest.py's tiny_default), CPU, fp32. The log warm-up
# gives steps 1 and 2 a rate of 0: steps 1-3 see the initial weights, on different batches.
PINNED_LOSSES = [8.051809310913086, 8.057868957519531, 7.982378959655762, 7.8605265617370605, 7.6461052894592285,
                 7.559745788574219]
PINNED_TOKENS_SEEN = [513, 953, 1628, 2302, 2822, 3407]


def assert_pinned(run) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens_seen"] for r in records] == PINNED_TOKENS_SEEN  # the same examples, in the same order
    assert [r["loss"] for r in records] == pytest.approx(PINNED_LOSSES, rel=1e-5)


@pytest.fixture(scope="module")
def straight_run(tiny_default, tmp_path_factory):
    run = tmp_path_factory.mktemp("pinned") / "straight"
    run_entry("train.py", *SETTINGS, f"train.output_dir={run}")
    return run


def test_losses_are_the_pinned_ones(straight_run):
    assert_pinned(straight_run)


def test_a_run_stopped_after_step_3_resumes_to_the_pinned_losses(straight_run, tmp_path):
    # The run as a stop right after step 3's save leaves it: that state newest, nothing after it.
    run = tmp_path / "stopped"
    shutil.copytree(straight_run, run)
    for later in (run / "resume" / "step_6", run / "checkpoint-6", run / "final"):
        shutil.rmtree(later)
    lines = (run / "metrics.jsonl").read_text().splitlines()[:3]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    result = run_entry("train.py", *SETTINGS, f"train.output_dir={run}", "--resume")
    assert "resumed from step_3 at step 3" in result.stderr
    assert_pinned(run)
