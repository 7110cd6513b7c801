"""A training run's state on disk: the run folder, its lock, resume states, RNG and held-out figures.

::

    <train.output_dir>/
      .lock                  held by the training process while it runs (its pid inside)
      config.yaml            the resolved config
      metrics.jsonl          one record per optimizer step (toollmm.engine.MetricLogger)
      data_report.json       rows read, used and skipped, by reason
      held_out.json          held-out figures before and after training
      checkpoint-<step>/     self-describing checkpoints (toollmm.checkpoint)
      final/                 a copy of the last checkpoint
      resume/step_<step>/    DeepSpeed's optimizer and scheduler state with the TrainState, each
                             rank's RNG (rng_rank<r>.pt), and ``complete`` once every rank saved

Resume files are read with the weights-only unpickler and an allowlist of DeepSpeed's classes:
a planted pickle is refused unread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from toollmm.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

RESUME_DIR = "resume"
COMPLETE = "complete"
"""Marker written into a resume state once every rank has saved it."""
HELD_OUT_FILE = "held_out.json"
STATE_NAME = re.compile(r"step_(\d+)")
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
"""The only folder names training writes (and so prunes); ``checkpoint-best`` and the like are left alone."""
RUN_FILES = ("config.yaml", "metrics.jsonl", "data_report.json", HELD_OUT_FILE, "final", RESUME_DIR, "tensorboard",
             "profile.txt", "profile_trace.json")
"""What a run writes into its output_dir besides its numbered checkpoints."""


@dataclass
class TrainState:
    """Where a run stands: what a resumed run continues from. Saved in every resume state (as
    DeepSpeed's client state) and in every checkpoint's checkpoint.json."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches of ``epoch`` already trained on (or skipped for a non-finite loss)."""
    samples_seen: int = 0
    tokens_seen: int = 0
    """Real (unpadded) tokens: rank 0's count × ranks."""
    nonfinite_skipped: int = 0
    """Micro-batches skipped for a non-finite loss."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        return cls(**{f.name: int(data[f.name]) for f in dataclasses.fields(cls) if f.name in data})


# --------------------------------------------------------------------------- the run folder


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


def latest_resume_tag(out_dir: Path) -> str | None:
    tags = resume_tags(out_dir)
    return tags[0] if tags else None


def checkpoints(out_dir: Path) -> list[Path]:
    """The run's complete checkpoint folders, oldest first (a ``.partial`` one is cut short)."""
    return [p for _, p in numbered(out_dir, CHECKPOINT_NAME)]


def last_checkpoint(out_dir: Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def run_files(out_dir: Path) -> list[Path]:
    """The files and folders a training run wrote into ``out_dir`` (exact names; others are the user's)."""
    found = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    return found + [p for _, p in numbered(out_dir, CHECKPOINT_NAME) + numbered(out_dir, CHECKPOINT_NAME, ".partial")]


def check_output_dir(out_dir: Path, config: RunConfig) -> list[Path]:
    """Refuse an output_dir that cannot hold this run, before any model loads; returns the earlier
    run's files that ``train.overwrite`` deletes (a resumed run keeps them)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.output_dir: {out_dir} is a file, not a folder; set train.output_dir to a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"train.output_dir: cannot create {out_dir} ({err.strerror}); set train.output_dir to a "
                          "writable folder") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir: {out_dir} is not writable; set train.output_dir to a writable folder")
    earlier = run_files(out_dir)
    state = latest_resume_tag(out_dir)
    if config.train.resume:
        if state is None:
            raise ConfigError(f"--resume given but {out_dir / RESUME_DIR} holds no complete training state; "
                              + ("start over with train.overwrite=true or " if earlier else "drop --resume to start fresh, or ")
                              + "set train.output_dir to a new folder")
        return []
    if earlier and not config.train.overwrite:
        held = f"state {state}" if state else ", ".join(sorted(p.name for p in earlier)[:5])
        raise ConfigError(
            f"{out_dir} already holds a run ({held}). Pass --resume to continue it, set train.output_dir to a "
            "new folder, or train.overwrite=true to delete that run's files and start over."
        )
    return earlier


def hold_run_lock(out_dir: Path):
    """An exclusive lock on the run folder for this process's life. The kernel drops it when the
    process dies, even by SIGKILL; a second trainer on the same folder (a resume started while
    an orphaned worker still runs) stops instead of interleaving its writes."""
    import fcntl

    handle = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise ConfigError(f"another training process (pid {handle.read().strip() or '?'}) is writing to {out_dir}; "
                          "stop it (or wait for it) before starting or resuming this run") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def open_run_folder(out_dir: Path, config: RunConfig, earlier_run: list[Path]):
    """Rank 0 only: delete what ``check_output_dir`` returned (``train.overwrite``), lock the
    folder and write the resolved config. Returns the lock; keep it for the run's life."""
    for path in earlier_run:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_run_lock(out_dir)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return lock


def prune(out_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints and resume states; only folders named as
    training names them (``checkpoint-<step>``, ``resume/step_<step>``) are touched."""
    if keep_last < 1:
        return
    found = checkpoints(out_dir)
    keep = set(found[-keep_last:])
    keep |= {out_dir / RESUME_DIR / tag for tag in resume_tags(out_dir)[:keep_last]}
    # Everything else goes, including what a killed run left half-written: resume states without
    # their marker and ".partial" checkpoint folders.
    stale = [p for _, p in numbered(out_dir / RESUME_DIR, STATE_NAME) + numbered(out_dir, CHECKPOINT_NAME, ".partial")]
    for old in found + stale:
        if old not in keep:
            shutil.rmtree(old)


def drop_after(out_dir: Path, step: int) -> None:
    """Checkpoints and resume states past the state a run resumes from (written before a kill,
    or past an unreadable state): the resumed run writes them again, and left in place they
    would be pruned as newest, or copied to final/ by a run that stops before reaching them."""
    for later, path in numbered(out_dir, CHECKPOINT_NAME) + numbered(out_dir / RESUME_DIR, STATE_NAME):
        if later > step:
            log.warning("removing %s, past the resumed step %d", path, step)
            shutil.rmtree(path)


def publish_final(out_dir: Path) -> Path:
    """Copy the newest checkpoint to ``final/`` (a ".partial" folder left by a kill is not one)."""
    final = out_dir / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(last_checkpoint(out_dir), final)
    return final


# --------------------------------------------------------------------------- held-out figures


def write_held_out(out_dir: Path, examples: int, figures: dict) -> None:
    # Written through a temporary file: a resumed run reads the before-training figures back, and
    # a kill mid-write must not leave it half a JSON.
    tmp = out_dir / (HELD_OUT_FILE + ".partial")
    tmp.write_text(json.dumps({"examples": examples, **figures}, indent=2))
    os.replace(tmp, out_dir / HELD_OUT_FILE)


def with_earlier_held_out(out_dir: Path, figures: dict) -> dict:
    """``figures`` with the before-training ones a resumed run's first start measured."""
    earlier = out_dir / HELD_OUT_FILE
    if "before" in figures or not earlier.is_file():
        return figures
    return {**json.loads(earlier.read_text()), **figures}


# --------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_rng(folder: Path, rank: int) -> None:
    """Each rank's torch RNG (LoRA dropout draws from it), so a resumed run continues the same stream."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, folder / f"rng_rank{rank}.pt")


def read_rng(folder: Path, rank: int) -> dict | None:
    path = folder / f"rng_rank{rank}.pt"
    if not path.is_file():
        log.warning("%s missing: dropout masks after resuming will differ from an uninterrupted run", path)
        return None
    state = load_state_file(path)
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor):
        raise ValueError(f"{path} holds no CPU RNG state")
    return state


def restore_rng(state: dict | None) -> None:
    if state is None:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- resume states


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


def state_saved(out_dir: Path, step: int) -> bool:
    return (out_dir / RESUME_DIR / f"step_{step}" / COMPLETE).is_file()


def save_resume_state(engine, out_dir: Path, state: TrainState) -> None:
    """Every rank: DeepSpeed's state of the trainable weights with ``state``, and this rank's RNG.
    Not yet complete: :func:`mark_complete` follows once the step's checkpoint is written."""
    tag = f"step_{state.step}"
    # The frozen base stays out of the resume state: for a 7B model it would add 13+ GB per save.
    engine.save_checkpoint(str(out_dir / RESUME_DIR), tag=tag, client_state={"progress": state.to_dict()},
                           exclude_frozen_parameters=True, save_latest=False)
    save_rng(out_dir / RESUME_DIR / tag, dist.get_rank())


def mark_complete(out_dir: Path, tag: str) -> None:
    folder = out_dir / RESUME_DIR / tag
    tmp = folder / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"tag": tag, "files": sorted(p.name for p in folder.iterdir() if p.is_file())}))
    os.replace(tmp, folder / COMPLETE)


def load_resume_state(engine, folder: Path) -> dict | None:
    """``engine.load_checkpoint`` of one resume state, every file read by :func:`load_state_file`
    (DeepSpeed's own loader unpickles with ``weights_only=False``, which runs a planted pickle)."""
    engine.checkpoint_engine.load = load_state_file
    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
    return client_state


def resume(engine, out_dir: Path, rank: int) -> TrainState:
    """Load the newest complete resume state into ``engine`` and restore this rank's RNG; a
    truncated or corrupt state is reported and the previous one used. A file holding anything
    but tensors and plain data stops the run unread."""
    for tag in resume_tags(out_dir):
        folder = out_dir / RESUME_DIR / tag
        try:
            rng = read_rng(folder, rank)  # before the engine's state: a bad RNG file falls back like any other
            client_state = load_resume_state(engine, folder)
            if client_state is None:
                raise RuntimeError("DeepSpeed found no state under this tag")
        except UnsafeStateFile as err:
            raise ConfigError(f"{err}. If you did not put it there, the run folder was tampered with: delete {folder} "
                              "to resume from the previous state, or start a new run") from None
        except Exception as err:  # a truncated or corrupt file surfaces as any of pickle/zip/runtime errors
            log.error("resume state %s is unreadable (%s: %s); trying the previous one", folder, type(err).__name__,
                      str(err)[:200])
            continue
        restore_rng(rng)
        state = TrainState.from_dict(client_state["progress"])
        log.info("resumed from %s at step %d (epoch %d)", tag, state.step, state.epoch)
        return state
    raise ConfigError(f"no readable resume state under {out_dir / RESUME_DIR}: start a new run (drop --resume)")
