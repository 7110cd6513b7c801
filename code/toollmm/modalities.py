"""The modality registry: one entry per input modality, one code path for all of them.

Each entry says which ToolMMBench row key names the file, which ImageBind branch encodes
it, and how the file becomes the encoder's input tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from toollmm import media


@dataclass(frozen=True)
class Modality:
    name: str
    row_key: str
    """Key of the file path in a ToolMMBench row."""
    encoder_branch: str
    """ImageBind branch: images and videos both go through the vision trunk."""
    load: Callable[[Path], torch.Tensor]
    published_folder: str
    """Subfolder of the published ``mm_dataset/`` holding this modality's files (the row's path
    is joined under it); empty where the rows' paths already start with one (``video/...``)."""


MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality("image", "image_path", "vision", media.load_image, "image"),
        Modality("audio", "audio_path", "audio", media.load_audio, "audio"),
        Modality("video", "video_path", "vision", media.load_video, ""),
    )
}
