"""DropPath (stochastic depth per sample) and trunc_normal_, the timm names ImageBind imports."""

import torch
from torch import nn
from torch.nn.init import trunc_normal_  # same signature as timm's: (tensor, mean, std, a, b)

__all__ = ["DropPath", "trunc_normal_"]


class DropPath(nn.Module):
    """Zero a sample's residual branch with probability ``drop_prob`` in training, scaling the
    kept ones by 1 / (1 - drop_prob); identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask
