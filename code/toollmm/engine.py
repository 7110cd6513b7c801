"""DeepSpeed set-up (the process group, the DeepSpeed config, planned steps) and per-step metrics."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from toollmm.config import ConfigError, RunConfig, read_deepspeed_file
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


DEEPSPEED_DEFAULTS = {
    "steps_per_print": 1000000,  # DeepSpeed's own step log off: metrics.jsonl and tqdm report every step
    "wall_clock_breakdown": False,
    "zero_optimization": {"contiguous_gradients": True, "allgather_bucket_size": 500000000, "allgather_partitions": True},
    "fp16": {"min_loss_scale": 1},
    # DeepSpeed's Adam in adam_w_mode is AdamW; torch_adam steps it with torch's implementation
    # (no extension to compile).
    "optimizer": {"type": "Adam", "params": {"torch_adam": True, "adam_w_mode": True}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0}},
}
"""DeepSpeed settings the run config leaves alone; a ``train.deepspeed_config`` file may change them."""


def deepspeed_config(config: RunConfig, world_size: int, total_steps: int) -> dict:
    """The run's DeepSpeed config: ``DEEPSPEED_DEFAULTS``, then the ``train.deepspeed_config``
    file's settings, then what the run config sets (``config.DEEPSPEED_KEYS``)."""
    ds = _merged(_merged(DEEPSPEED_DEFAULTS, read_deepspeed_file(config)), run_settings(config, world_size, total_steps))
    if config.train.offload_optimizer:
        ds["optimizer"]["params"].pop("torch_adam", None)  # DeepSpeedCPUAdam steps the offloaded states
    return ds


def run_settings(config: RunConfig, world_size: int, total_steps: int) -> dict:
    """The DeepSpeed keys the run config sets, one per entry of ``config.DEEPSPEED_KEYS``."""
    t, dtype = config.train, config.model.dtype
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        # Adam states and step on the CPU (DeepSpeedCPUAdam, compiled on first use), for cards too
        # small for them; it costs a host round trip every step.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.gradient_clipping,
        "bf16": {"enabled": dtype == "bf16", "check_grad_overflow": t.grad_overflow_check},
        "fp16": {"enabled": dtype == "fp16"},
        "zero_optimization": zero,
        "optimizer": {"params": {"lr": t.learning_rate, "betas": list(t.betas), "eps": t.adam_eps,
                                 "weight_decay": t.weight_decay}},
        "scheduler": {"params": {"warmup_max_lr": t.learning_rate, "total_num_steps": max(1, total_steps),
                                 "warmup_num_steps": warmup_steps(t.warmup_rate, total_steps, t.warmup_rule)}},
    }


def _merged(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else copy.deepcopy(value)
    return out


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


class StepMetrics:
    """Named sums over one optimizer step's micro-batches (loss, token accuracy, each output
    modality's MSE and the micro-batches that had it), reduced over the ranks at the step's end."""

    def __init__(self, modalities, device: torch.device):
        self.modalities, self.device = tuple(modalities), device
        self.names = ["loss", "token_accuracy", "micro_batches"]
        for modality in self.modalities:
            self.names += [f"mse_{modality}", f"mse_{modality}_batches"]
        self.sums = torch.zeros(len(self.names), device=device)  # one tensor: one all-reduce a step

    def add(self, out: dict) -> None:
        """Add one micro-batch's model outputs."""
        # Made on the device (a fill, not a copy from host memory, which would wait for the GPU).
        zero, one = torch.zeros((), device=self.device), torch.ones((), device=self.device)
        values = {"loss": out["loss"].detach().float(), "token_accuracy": out["token_accuracy"].float(), "micro_batches": one}
        for modality in self.modalities:
            present = f"mse_{modality}" in out
            values[f"mse_{modality}"] = out[f"mse_{modality}"].float() if present else zero
            values[f"mse_{modality}_batches"] = one if present else zero
        self.sums += torch.stack([values[name] for name in self.names])

    def reduce(self) -> dict:
        """Means over the step's micro-batches on every rank (an MSE over those that had it), then reset."""
        dist.all_reduce(self.sums)
        # One read from the GPU a step: each .item() or comparison would wait for the GPU on its own.
        sums = dict(zip(self.names, self.sums.tolist()))
        means = {"loss": sums["loss"] / sums["micro_batches"], "token_accuracy": sums["token_accuracy"] / sums["micro_batches"]}
        for modality in self.modalities:
            if sums[f"mse_{modality}_batches"] > 0:
                means[f"mse_{modality}"] = sums[f"mse_{modality}"] / sums[f"mse_{modality}_batches"]
        self.sums.zero_()
        return means


def loss_scale_events(engine, config: RunConfig) -> dict:
    """fp16 only: the dynamic loss scale and the optimizer steps skipped on overflow so far."""
    if config.model.dtype != "fp16":
        return {}
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    events = {"overflow_skipped_steps": int(getattr(engine, "skipped_steps", 0))}
    if isinstance(scale, (int, float)):
        events["loss_scale"] = float(scale)
    return events


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
