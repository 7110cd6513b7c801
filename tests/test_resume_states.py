"""Resume states: a planted pickle never runs, a corrupt file falls back to the previous state.

A real DeepSpeed engine (ZeRO-2, Adam, as the stage configs) on a small module, in this
process: the resume files are the ones a training run writes, at a fraction of its set-up time."""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from toollmm.config import ConfigError
from toollmm.engine import init_distributed
from toollmm.run_state import TrainState, mark_complete, resume, resume_tags

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4,
    "zero_optimization": {"stage": 2}, "bf16": {"enabled": False},
    "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
}


class Planted:
    """Writes a marker file when unpickled (what an attacker's file would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def make_engine():
    import deepspeed

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=DS_CONFIG)
    return engine


def train_steps(engine, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps * 2):
        x = torch.randn(2, 4, generator=generator)
        engine.backward(engine(x).pow(2).mean())
        engine.step()


@pytest.fixture(scope="module")
def saved_states(tmp_path_factory):
    """A run folder with two complete resume states, step_2 and step_4."""
    from toollmm.run_state import RESUME_DIR, save_rng

    out = tmp_path_factory.mktemp("states")
    engine = make_engine()
    for step in (2, 4):
        train_steps(engine, 2)
        engine.save_checkpoint(str(out / RESUME_DIR), tag=f"step_{step}", client_state={"progress": {"step": step, "epoch": 0}},
                               save_latest=False)
        save_rng(out / RESUME_DIR / f"step_{step}", 0)
        mark_complete(out, f"step_{step}")
    return out, engine


RESUME_FILES = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt"]


@pytest.mark.parametrize("name", RESUME_FILES)
@pytest.mark.parametrize("protocol", ["torch.save", "pickle"])
def test_planted_pickle_in_a_resume_state_never_runs(saved_states, tmp_path, name, protocol):
    source, engine = saved_states
    run = tmp_path / "run"
    shutil.copytree(source, run)
    marker = tmp_path / "marker"
    target = run / "resume" / "step_4" / name
    assert target.is_file() and resume_tags(run) == ["step_4", "step_2"]
    payload = {"progress": Planted(marker), "module": {}}
    if protocol == "torch.save":
        torch.save(payload, target)
    else:
        target.write_bytes(pickle.dumps(payload))
    with pytest.raises(ConfigError) as refused:
        resume(engine, run, 0)
    assert not marker.exists()
    message = str(refused.value)
    assert message.startswith(f"{target} holds objects other than tensors and plain data (")
    assert "refused unread and nothing in it ran" in message and f"delete {target.parent}" in message


def test_states_a_run_writes_load_with_the_allowlist(saved_states):
    """Every file of a real ZeRO-2 resume state passes the weights-only loader (its optimizer
    states name DeepSpeed's ZeroStageEnum, fragment_address and LossScaler)."""
    source, engine = saved_states
    assert resume(engine, source, 0) == TrainState(step=4, epoch=0)


@pytest.mark.parametrize("name", RESUME_FILES)
def test_a_truncated_resume_file_falls_back_to_the_previous_state(saved_states, tmp_path, name, caplog):
    source, engine = saved_states
    run = tmp_path / "run"
    shutil.copytree(source, run)
    target = run / "resume" / "step_4" / name
    target.write_bytes(target.read_bytes()[: os.path.getsize(target) // 2])
    assert resume(engine, run, 0) == TrainState(step=2, epoch=0)
    assert f"resume state {target.parent} is unreadable" in caplog.text


@pytest.mark.slow
def test_resume_from_the_command_line_stops_on_a_planted_pickle(tiny_default, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, TINY_CONFIG, run_entry

    run, marker = tmp_path / "run", tmp_path / "marker"
    args = ["--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={run}", "model.tuning=lora",
            "train.micro_batch_size=4", "train.gradient_accumulation_steps=1", "train.max_steps=2", "train.save_every_steps=1"]
    run_entry("train.py", *args)
    target = run / "resume" / "step_2" / "mp_rank_00_model_states.pt"
    torch.save({"module": Planted(marker)}, target)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "train.sh"), *args, "train.max_steps=3", "--resume"], cwd="/",
                            capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable, "NPROC": "1"})
    assert result.returncode != 0 and not marker.exists()
    assert f"train: {target} holds objects other than tensors and plain data (" in result.stderr
    assert not (run / "checkpoint-3").exists()
