"""The frozen encoder and its feature cache.

Encoder features are computed once per media file, before training, and cached on disk
keyed by the file's content and the encoder's identity; the training loop only looks
them up. (The originals ran ImageBind preprocessing inside the training step, leaving
the GPU idle while the CPU decoded media.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from toollmm.data.toolmmbench import DataReport, MediaRef, Record
from toollmm.media import MediaError
from toollmm.modalities import MODALITIES
from toollmm.model.imagebind import ImageBindConfig, load_imagebind

log = logging.getLogger(__name__)


def _file_digest(path: Path, chunk: int = 1 << 20, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        read = 0
        while block := f.read(chunk):
            h.update(block)
            read += len(block)
            if limit is not None and read >= limit:
                break
    return h.hexdigest()


class FrozenEncoder:
    """ImageBind in eval mode without gradients; device and dtype are read from its weights."""

    def __init__(self, path: Path, size: str, device: torch.device | str = "cpu"):
        config = ImageBindConfig.huge() if size == "huge" else ImageBindConfig.tiny()
        self.model = load_imagebind(path, config).to(device).eval().requires_grad_(False)
        self.out_dim = config.out_embed_dim
        # Hashing all 4.5 GB of imagebind_huge.pth costs seconds per run; the first 64 MiB
        # plus the size and architecture identify a checkpoint well enough for a cache key.
        stat = Path(path).stat()
        self.identity = f"imagebind-{size}-{stat.st_size}-{_file_digest(Path(path), limit=64 << 20)[:16]}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, ref: MediaRef) -> torch.Tensor:
        modality = MODALITIES[ref.modality]
        inputs = modality.load(ref.path).unsqueeze(0).to(self.device)
        return self.model(modality.encoder_branch, inputs)[0].float().cpu()


class FeatureCache:
    """One safetensors file per (encoder, media content)."""

    def __init__(self, root: Path, identity: str):
        self.root = Path(root) / identity

    def _path(self, ref: MediaRef) -> Path:
        digest = _file_digest(ref.path)
        return self.root / ref.modality / f"{digest}.safetensors"

    def get_or_compute(self, ref: MediaRef, encoder: FrozenEncoder) -> torch.Tensor:
        path = self._path(ref)
        if path.is_file():
            return load_file(path)["feature"]
        feature = encoder.encode(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({"feature": feature.contiguous()}, tmp, metadata={"source": str(ref.path)})
        os.replace(tmp, path)
        return feature


def featurize(
    records: list[Record], encoder: FrozenEncoder, cache: FeatureCache, report: DataReport
) -> tuple[list[Record], dict[MediaRef, torch.Tensor]]:
    """Features for every media file the records use; records whose media fails to decode
    are dropped and counted in ``report``."""
    refs = sorted({ref for record in records for ref in record.media}, key=lambda r: str(r.path))
    features, failed = {}, {}
    for ref in tqdm(refs, desc="encoding media", disable=not refs, leave=False):
        try:
            features[ref] = cache.get_or_compute(ref, encoder)
        except MediaError as err:
            failed[ref] = str(err)
    kept = []
    for record in records:
        bad = [ref for ref in record.media if ref in failed]
        if bad:
            report.skipped["undecodable media"] += 1
            report.used -= 1
            report.note("undecodable media", f"{record.id}: {failed[bad[0]]}")
        else:
            kept.append(record)
    return kept, features
