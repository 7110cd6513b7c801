"""Non-finite losses and weights: skipped micro-batches, a run that diverged, and where to go back to."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from toollmm.checkpoint import non_finite

log = logging.getLogger("toollmm.train")


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row, or weights that are no longer finite."""


class DivergenceGuard:
    """Non-finite losses in a row, and the checkpoint to go back to when they are too many: the
    newest one whose weights then gave a finite loss (finite weights can still be too large,
    |w| ~ 1e9 after a huge step, to give one)."""

    def __init__(self, limit: int, untried: Path | None):
        self.limit, self.in_a_row = limit, 0
        self.trusted: Path | None = None
        self.untried = untried
        """The newest checkpoint whose weights have not yet given a loss."""

    def finite_loss(self) -> None:
        if self.untried is not None:
            self.trusted, self.untried = self.untried, None
        self.in_a_row = 0

    def nonfinite_loss(self, where: str, skipped: int) -> None:
        self.in_a_row += 1
        log.warning("non-finite loss on %s: skipped (%d so far, %d in a row)", where, skipped, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"{self.in_a_row} micro-batches in a row had a non-finite loss (train.max_nonfinite_in_a_row="
                f"{self.limit}): stopped. {self.advice()}; lower the learning rate (train.learning_rate) and check "
                "the data rows named above."
            )

    def saved(self, checkpoint: Path) -> None:
        self.untried = checkpoint

    def advice(self, latest_untried: bool = True) -> str:
        """Which checkpoint to go back to, in words."""
        untried = self.untried if latest_untried else None
        later = f" ({untried.name}, written since, gave no finite loss yet)" if untried is not None else ""
        if self.trusted is None:
            return f"No checkpoint of this run is known to give a finite loss{later}: start again"
        return f"The last checkpoint whose weights gave a finite loss is {self.trusted}{later}: start from it (train.init_from)"


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (all ranks must skip a step together)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def weights_finite(model) -> bool:
    """Whether every trainable weight is finite on every rank (each checks the shard it holds)."""
    held = [(n, getattr(p, "ds_tensor", p)) for n, p in model.named_parameters() if p.requires_grad]
    finite = torch.tensor([0.0 if non_finite(held) else 1.0], device=held[0][1].device if held else "cpu")
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())
