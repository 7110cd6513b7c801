"""DeepSpeed set-up, per-step metrics, and the resumable training state."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from toollmm.config import ConfigError, RunConfig, load_deepspeed_config
from toollmm.extras import install_hint, is_installed

log = logging.getLogger(__name__)


def _free_port() -> int:
    # A port the kernel hands out as free; a fixed or pid-derived one can be taken (or in
    # TIME_WAIT) when several runs start on one machine.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """One process per device, launched by torchrun/deepspeed (or a single plain process)."""
    import deepspeed

    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:  # a plain single process: no launcher chose one
        os.environ["MASTER_PORT"] = str(_free_port())
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def deepspeed_config(config: RunConfig, world_size: int, total_steps: int) -> dict:
    """The stage's DeepSpeed JSON with the run's batch sizes, precision and schedule filled in."""
    ds = load_deepspeed_config(config)
    t = config.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    ds["train_batch_size"] = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    dtype = config.model.dtype
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == "bf16", "check_grad_overflow": t.grad_overflow_check}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": dtype == "fp16"}
    if t.learning_rate is not None:
        ds["optimizer"]["params"]["lr"] = t.learning_rate
    if t.zero_stage is not None:
        ds["zero_optimization"]["stage"] = t.zero_stage
    if t.offload_optimizer:
        # The original's setting: Adam states and step on the CPU (DeepSpeedCPUAdam, compiled
        # on first use), for cards too small for them; it costs a host round trip every step.
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        ds["optimizer"]["params"].pop("torch_adam", None)
    scheduler = ds.get("scheduler")
    if scheduler and scheduler["type"] == "WarmupDecayLR":
        params = scheduler["params"]
        params["total_num_steps"] = max(1, total_steps)
        params["warmup_num_steps"] = warmup_steps(config.train.warmup_rate, total_steps, config.train.warmup_rule)
        params["warmup_max_lr"] = ds["optimizer"]["params"]["lr"]
    return ds


def warmup_steps(rate: float, total_steps: int, rule: str) -> int:
    """``train.warmup_rule``: ceil → max(1, ceil(rate·T)); published → max(10, int(rate·T))."""
    if rule == "published":
        return max(10, int(rate * total_steps))
    return max(1, math.ceil(rate * total_steps))


def planned_steps(num_examples: int, config: RunConfig, world_size: int, micro_batches_per_rank: int | None = None) -> int:
    """Optimizer steps of the run. ``micro_batches_per_rank``: an epoch's micro-batches where the
    sampler decides them (published sampling); else every example once."""
    t = config.train
    if micro_batches_per_rank is None:
        micro_batches_per_rank = math.ceil(num_examples / world_size / t.micro_batch_size)
    steps = t.epochs * (micro_batches_per_rank // t.gradient_accumulation_steps)
    if steps == 0:
        raise ConfigError(
            f"{num_examples} training examples make no full optimizer step with micro_batch_size "
            f"{t.micro_batch_size} × gradient_accumulation_steps {t.gradient_accumulation_steps} × world size "
            f"{world_size}; lower train.gradient_accumulation_steps or train.micro_batch_size."
        )
    return min(steps, t.max_steps) if t.max_steps else steps


class MetricLogger:
    """One record per optimizer step, from rank 0: tqdm, TensorBoard and metrics.jsonl."""

    def __init__(self, out_dir: Path, enabled: bool, after_step: int = 0):
        """``after_step``: a resumed run's step; records past it (logged before a kill, then
        undone by resuming) are dropped so each step appears once."""
        self.enabled = enabled
        self.writer = None
        self.file = None
        if enabled:
            path = out_dir / "metrics.jsonl"
            if path.is_file():
                kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= after_step]
                path.write_text("".join(line + "\n" for line in kept))
            if is_installed("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=after_step + 1 if after_step else None)
            else:
                log.info("metrics.jsonl only, no TensorBoard logs: %s", install_hint("tensorboard"))
            self.file = open(path, "a")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            if self.writer is not None and isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"train/{key}", value, step)
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.enabled:
            if self.writer is not None:
                self.writer.close()
            self.file.close()


class UnsafeStateFile(RuntimeError):
    """A resume-state file that holds more than tensors and plain data (refused unread)."""


def state_globals() -> list:
    """The classes DeepSpeed's ZeRO optimizer states pickle besides tensors and plain data: the
    only ones a resume state may name (anything else, e.g. ``os.system``, is refused unrun)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def load_state_file(path: str | Path, map_location=None):
    """``torch.load`` with the weights-only unpickler and :func:`state_globals`: a planted pickle
    raises :class:`UnsafeStateFile` naming the file, and none of its code runs."""
    try:
        with torch.serialization.safe_globals(state_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
        raise UnsafeStateFile(f"{path} holds objects other than tensors and plain data ({reason}); it was refused "
                              "unread and nothing in it ran") from None


def load_resume_state(engine, folder: Path) -> dict | None:
    """``engine.load_checkpoint`` of one resume state, every file read by :func:`load_state_file`
    (DeepSpeed's own loader unpickles with ``weights_only=False``, which runs a planted pickle)."""
    engine.checkpoint_engine.load = load_state_file
    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
    return client_state


RESUME_DIR = "resume"
COMPLETE = "complete"
"""Marker written into a resume state once every rank has saved it."""


def mark_complete(out_dir: Path, tag: str) -> None:
    folder = out_dir / RESUME_DIR / tag
    tmp = folder / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"tag": tag, "files": sorted(p.name for p in folder.iterdir() if p.is_file())}))
    os.replace(tmp, folder / COMPLETE)


STATE_NAME = re.compile(r"step_(\d+)")
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
"""The only folder names training writes (and so prunes); ``checkpoint-best`` and the like are left alone."""


def numbered(folder: Path, pattern: re.Pattern, suffix: str = "") -> list[tuple[int, Path]]:
    """(step, path) of the sub-folders named exactly ``pattern`` + ``suffix``, by step."""
    found = []
    for path in folder.glob("*") if folder.is_dir() else []:
        match = pattern.fullmatch(path.name[: len(path.name) - len(suffix)]) if path.name.endswith(suffix) else None
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resume_tags(out_dir: Path) -> list[str]:
    """Complete resume states, newest first (a state cut short by a kill has no marker)."""
    return [p.name for _, p in reversed(numbered(out_dir / RESUME_DIR, STATE_NAME)) if (p / COMPLETE).is_file()]


def checkpoints(out_dir: Path) -> list[Path]:
    """The run's complete checkpoint folders, oldest first (a ``.partial`` one is cut short)."""
    return [p for _, p in numbered(out_dir, CHECKPOINT_NAME)]


def latest_resume_tag(out_dir: Path) -> str | None:
    tags = resume_tags(out_dir)
    return tags[0] if tags else None


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a line cut by the kill: dropped


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class StepProfiler:
    """torch.profiler over optimizer steps ``[3, 3 + steps)`` of rank 0: the first steps hold
    one-off costs (allocator growth, kernel selection) that would hide the steady state."""

    WARMUP_STEPS = 3

    def __init__(self, out_dir: Path, steps: int, enabled: bool):
        self.out_dir, self.steps = out_dir, steps
        self.profiler = None
        if enabled and steps > 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=False)

    def step_done(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based) has been taken."""
        if self.profiler is None:
            return
        if step == self.WARMUP_STEPS:
            self.profiler.start()
        elif step == self.WARMUP_STEPS + self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.stop()
            self._write()
            self.profiler = None

    def _write(self) -> None:
        averages = self.profiler.key_averages()
        sections = [f"{self.steps} optimizer steps after {self.WARMUP_STEPS}"]
        if torch.cuda.is_available():
            sections.append(averages.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
        # Host time: where the Python and launch overheads are (a GPU waiting on them is idle).
        sections.append(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
        (self.out_dir / "profile.txt").write_text("\n".join(sections) + "\n")
        self.profiler.export_chrome_trace(str(self.out_dir / "profile_trace.json"))
