"""Stand-in for einops.rearrange, for the one kind of pattern ImageBind uses ("b l d -> l b d"):
a permutation of single named axes (no grouping, no ellipsis)."""

import torch


def rearrange(tensor: torch.Tensor, pattern: str, **axes_lengths) -> torch.Tensor:
    left, right = (side.split() for side in pattern.split("->"))
    if sorted(left) != sorted(right) or any(not name.isidentifier() for name in left):
        raise NotImplementedError(f"einops stand-in: only axis permutations, got {pattern!r}")
    if len(left) != tensor.dim():
        raise ValueError(f"pattern {pattern!r} names {len(left)} axes, tensor has {tensor.dim()}")
    return tensor.permute(*(left.index(name) for name in right))
