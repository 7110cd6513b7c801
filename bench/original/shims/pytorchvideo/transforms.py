"""ShortSideScale and UniformTemporalSubsample on (C, T, H, W) float video tensors."""

import math

import torch
from torch import nn


class ShortSideScale(nn.Module):
    """Scale so the shorter spatial side is ``size``, keeping the aspect ratio (floor of the longer)."""

    def __init__(self, size: int, interpolation: str = "bilinear"):
        super().__init__()
        self.size, self.interpolation = size, interpolation

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        _, _, h, w = video.shape
        if w < h:
            shape = (int(math.floor(h / w * self.size)), self.size)
        else:
            shape = (self.size, int(math.floor(w / h * self.size)))
        return nn.functional.interpolate(video, size=shape, mode=self.interpolation, align_corners=False)


class UniformTemporalSubsample(nn.Module):
    """``num_samples`` evenly spaced frames (nearest frames repeat when the clip is shorter)."""

    def __init__(self, num_samples: int, temporal_dim: int = -3):
        super().__init__()
        self.num_samples, self.temporal_dim = num_samples, temporal_dim

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        frames = video.shape[self.temporal_dim]
        index = torch.linspace(0, frames - 1, self.num_samples).clamp(0, frames - 1).long()
        return video.index_select(self.temporal_dim, index)
