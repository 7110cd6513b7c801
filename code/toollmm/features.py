"""The frozen encoder, its on-disk feature cache, and batched extraction into it.

Encoder features are computed once per media file, before training, and cached on disk
keyed by the file's content and the encoder's identity; the training loop only looks
them up. (The originals ran ImageBind preprocessing inside the training step, leaving
the GPU idle while the CPU decoded media.)

``extract_features`` is the one path that fills the cache: the files are hashed once
(threads), cache hits are skipped or loaded, and the misses are decoded by DataLoader
worker processes in batches of one modality each (so their tensors stack) while the
encoder runs on its device. A file that fails to decode becomes a per-file message, not
an exception. ``featurize`` (training, inference) and ``code/extract_features.py`` (the
precompute command) both go through it.

Cache layout: ``<feature_cache_dir>/<encoder identity>/<modality>/<sha256 of the file>.safetensors``,
one float32 ``feature`` tensor per file. Each file is written to a uniquely named
temporary file and renamed into place, so concurrent writers (several ranks, several
extraction commands) never leave a partial file, and an interrupted run loses at most
the batch in flight.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from toollmm.data.records import DataReport, MediaRef, Record
from toollmm.media import MediaError
from toollmm.modalities import MODALITIES
from toollmm.model.imagebind import ImageBindConfig, ImageBindEncoder, check_imagebind_file, load_imagebind

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers() -> int:
    """Decoding processes: one core stays with the main process (encoder, cache writes)."""
    return min(16, max(0, _cpu_count() - 1))


# Bump when media.py's preprocessing changes: features cached by older code are then not reused.
PREPROCESSING_VERSION = 1


def encoder_identity(path: Path, size: str) -> str:
    """The cache key of an encoder checkpoint (and of the preprocessing feeding it).

    Hashing all 4.5 GB of imagebind_huge.pth costs seconds per run; the first 64 MiB plus the
    size and architecture identify a checkpoint well enough for a cache key.
    """
    digest = _file_digest(path, limit=64 << 20)[:16]
    return f"imagebind-{size}-{path.stat().st_size}-{digest}-p{PREPROCESSING_VERSION}"


class FrozenEncoder:
    """ImageBind in eval mode without gradients, in ``dtype`` on ``device``, read from its
    checkpoint at the first encoding: a run whose media features are all cached, or that has no
    media, never loads it (imagebind_huge.pth is 4.5 GB of weights).

    ``identity`` names the weights (not the precision): features computed in bf16/fp16
    share the cache with fp32 ones, so a GPU precompute in bf16 serves an fp32 training
    run. Each cache file records the dtype that produced it in its metadata.
    """

    def __init__(self, path: Path, size: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        check_imagebind_file(self.path)  # a wrong path fails now, not at the first cache miss
        self.config = ImageBindConfig.huge() if size == "huge" else ImageBindConfig.tiny()
        self.device, self.dtype = torch.device(device), dtype
        self.out_dim = self.config.out_embed_dim
        self.identity = encoder_identity(self.path, size)

    @functools.cached_property
    def model(self) -> ImageBindEncoder:
        return load_imagebind(self.path, self.config).to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    @property
    def loaded(self) -> bool:
        return "model" in vars(self)

    @torch.no_grad()
    def encode_batch(self, branch: str, inputs: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` encoder inputs of one branch -> ``[B, out_dim]`` float32 on the CPU."""
        features, ready = self.encode_batch_async(branch, inputs)
        if ready is not None:
            ready.synchronize()
        return features

    @torch.no_grad()
    def encode_batch_async(self, branch: str, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Like ``encode_batch`` but returns at once on CUDA: the features land in pinned host
        memory when the returned event completes, so the caller can fetch the next batch
        while the GPU works (a blocking copy idled the GPU during every batch's hand-off)."""
        # no_grad, not inference_mode: these features later enter autograd graphs (the projector).
        features = self.model(branch, inputs.to(self.device, non_blocking=True)).float()
        if features.device.type != "cuda":
            return features, None
        host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        host.copy_(features, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def encode(self, ref: MediaRef) -> torch.Tensor:
        """One file, decoded here (the reference for the batched path)."""
        modality = MODALITIES[ref.modality]
        return self.encode_batch(modality.encoder_branch, modality.load(ref.path).unsqueeze(0))[0]


class FeatureCache:
    """One safetensors file per (encoder identity, media content).

    File digests are remembered for the life of the object (one run), so each file is
    read for hashing once however often it is looked up.
    """

    def __init__(self, root: Path, identity: str, dim: int | None = None):
        """``dim``: the encoder's output width; an entry of another shape is recomputed."""
        self.root = Path(root) / identity
        self.identity = identity
        self.dim = dim
        self._digests: dict[Path, str] = {}

    def digest(self, path: Path) -> str:
        path = Path(path)
        if path not in self._digests:
            self._digests[path] = _file_digest(path)
        return self._digests[path]

    def path(self, ref: MediaRef) -> Path:
        return self.root / ref.modality / f"{self.digest(ref.path)}.safetensors"

    def contains(self, ref: MediaRef) -> bool:
        return self.path(ref).is_file()

    def load(self, ref: MediaRef) -> torch.Tensor | None:
        """The cached feature, or None when absent or unreadable (then it is recomputed)."""
        path = self.path(ref)
        try:
            # One read of the whole (4 KB) file: load_file opens the path twice (header, then
            # mmap), and a writer replacing the file in between gave torn reads.
            feature = load_tensors(path.read_bytes())["feature"]
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, KeyError) as err:
            log.warning("cached feature %s for %s is unreadable (%s); recomputing it", path, ref.path, err)
            return None
        expected = f"[{self.dim}]" if self.dim else "one dimension"
        if feature.ndim != 1 or (self.dim and feature.shape[0] != self.dim) or not torch.isfinite(feature).all():
            log.warning("cached feature %s for %s has shape %s (expected %s)%s; recomputing it", path, ref.path,
                        list(feature.shape), expected, "" if torch.isfinite(feature).all() else " and non-finite values")
            return None
        return feature

    def store(self, ref: MediaRef, feature: torch.Tensor, dtype: str = "") -> Path:
        path = self.path(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name no other writer uses, in the target folder (os.replace must not cross file systems).
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(
                {"feature": feature.detach().float().contiguous()}, tmp,
                metadata={"source": str(ref.path), "modality": ref.modality, "encoder": self.identity, "dtype": dtype},
            )
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable by others
            os.replace(tmp, path)  # atomic: readers see the old state or the whole file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


# --------------------------------------------------------------------------- batched extraction


class _DecodeDataset(Dataset):
    """Item ``i`` = ``refs[i]`` decoded by the modality registry, or the reason it failed."""

    def __init__(self, refs: list[MediaRef]):
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        ref = self.refs[index]
        try:
            return index, MODALITIES[ref.modality].load(ref.path), None
        except MediaError as err:  # one bad file must not stop the batch (nor the workers)
            return index, None, str(err)


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict:
    decoded = [(i, x) for i, x, _ in items if x is not None]
    return {
        "indices": [i for i, _ in decoded],
        "inputs": torch.stack([x for _, x in decoded]) if decoded else None,
        "failures": [(i, err) for i, _, err in items if err is not None],
    }


def _batches_by_modality(refs: list[MediaRef], batch_size: int) -> list[list[int]]:
    """Index batches in which every item has one modality (hence one tensor shape)."""
    by_modality: dict[str, list[int]] = {}
    for index, ref in enumerate(refs):
        by_modality.setdefault(ref.modality, []).append(index)
    return [
        indices[start : start + batch_size]
        for _, indices in sorted(by_modality.items())
        for start in range(0, len(indices), batch_size)
    ]


@dataclass
class Extraction:
    """What ``extract_features`` did, per file."""

    cached: list[MediaRef] = field(default_factory=list)
    """Found in the cache (not decoded)."""
    extracted: list[MediaRef] = field(default_factory=list)
    """Decoded and encoded by this call, now in the cache."""
    failed: dict[MediaRef, str] = field(default_factory=dict)
    """Unreadable or undecodable files -> a message naming the file and the reason."""
    features: dict[MediaRef, torch.Tensor] = field(default_factory=dict)
    """Every cached and extracted feature (only with ``keep_features``)."""


def extract_features(
    refs: Iterable[MediaRef],
    encoder: FrozenEncoder,
    cache: FeatureCache,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    keep_features: bool = True,
    progress: bool = True,
) -> Extraction:
    """Bring every file of ``refs`` into ``cache``: hits are skipped (``keep_features``: loaded),
    misses decoded by ``num_workers`` DataLoader processes (None: ``default_num_workers()``;
    0: in this process) and encoded ``batch_size`` files at a time, one modality per batch.

    A video is 15 clips and an audio file 3 for the encoder, so their batches cost that many
    times an image batch in memory.
    """
    refs = sorted(set(refs), key=lambda r: (r.modality, str(r.path)))
    result = Extraction()
    misses = _look_up(refs, cache, keep_features, result)
    if misses:
        num_workers = default_num_workers() if num_workers is None else num_workers
        _encode_misses(misses, encoder, cache, result, batch_size, num_workers, keep_features, progress)
    _log_failures(result)
    return result


def _look_up(refs: list[MediaRef], cache: FeatureCache, keep_features: bool, result: Extraction) -> list[MediaRef]:
    """Hash every file once and look it up (threads: hashlib and file reads release the GIL);
    hits and unreadable files go into ``result``, the misses are returned."""

    def look_up(ref: MediaRef) -> tuple[MediaRef, str | None, bool, torch.Tensor | None]:
        try:
            cache.digest(ref.path)
        except OSError as err:
            return ref, str(MediaError(ref.path, f"cannot be read ({err.strerror or err})")), False, None
        if keep_features:
            feature = cache.load(ref)
            return ref, None, feature is not None, feature
        return ref, None, cache.contains(ref), None

    misses: list[MediaRef] = []
    with ThreadPoolExecutor(max_workers=min(16, _cpu_count())) as pool:
        for ref, error, hit, feature in pool.map(look_up, refs):
            if error is not None:
                result.failed[ref] = error
            elif hit:
                result.cached.append(ref)
                if feature is not None:
                    result.features[ref] = feature
            else:
                misses.append(ref)
    return misses


def _encode_misses(misses: list[MediaRef], encoder: FrozenEncoder, cache: FeatureCache, result: Extraction,
                   batch_size: int, num_workers: int, keep_features: bool, progress: bool) -> None:
    """Decode the misses in worker processes, encode them in batches, write them as they come."""
    dtype_name = {v: k for k, v in DTYPES.items()}.get(encoder.dtype, str(encoder.dtype))
    batches = _batches_by_modality(misses, batch_size)
    loader = DataLoader(
        _DecodeDataset(misses),
        batch_sampler=batches,
        collate_fn=_collate,
        num_workers=num_workers,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=2 if num_workers else None,
    )
    log.info("extracting %d files (%d cached) in %d batches with %d decoding workers on %s/%s",
             len(misses), len(result.cached), len(batches), num_workers, encoder.device, dtype_name)
    with ThreadPoolExecutor(max_workers=WRITER_THREADS) as writer:
        hand_off = _HandOff(cache, result, writer, dtype_name, keep_features)
        try:
            for batch in tqdm(loader, total=len(batches), desc="encoding media", unit="batch",
                              disable=not progress, leave=False):
                for index, error in batch["failures"]:
                    result.failed[misses[index]] = error
                if batch["inputs"] is not None:
                    batch_refs = [misses[i] for i in batch["indices"]]
                    branch = MODALITIES[batch_refs[0].modality].encoder_branch
                    hand_off.launched(batch_refs, *encoder.encode_batch_async(branch, batch["inputs"]))
        finally:
            # The batch already encoded reaches the cache even when a later one fails.
            hand_off.finish()


class _HandOff:
    """Writes each encoded batch to the cache from writer threads, at most one batch behind: the
    encoder's next forward overlaps the file writes (file I/O releases the GIL; one thread alone
    wrote slower than an H100 encodes), and an interrupted run still loses at most the batches in
    flight."""

    def __init__(self, cache: FeatureCache, result: Extraction, writer: ThreadPoolExecutor, dtype_name: str,
                 keep_features: bool):
        self.cache, self.result, self.writer = cache, result, writer
        self.dtype_name, self.keep_features = dtype_name, keep_features
        self.in_flight: tuple | None = None
        self.pending: list[Future] = []

    def launched(self, batch_refs: list[MediaRef], features: torch.Tensor, ready) -> None:
        """A batch was launched on the encoder: the previous one finishes while it runs."""
        if self.in_flight is not None:
            self._write(*self.in_flight)
        self.in_flight = (batch_refs, features, ready)

    def finish(self) -> None:
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            self._write(*in_flight)
        for future in self.pending:
            future.result()

    def _write(self, batch_refs: list[MediaRef], features: torch.Tensor, ready) -> None:
        """Wait for a batch's features, then queue their writes (after the previous batch's)."""
        if ready is not None:
            ready.synchronize()
        features = [f.clone() for f in features.unbind(0)]
        for future in self.pending:
            future.result()
        self.result.extracted.extend(batch_refs)
        if self.keep_features:
            self.result.features.update(zip(batch_refs, features))
        self.pending = [self.writer.submit(self._store, batch_refs[i::WRITER_THREADS], features[i::WRITER_THREADS])
                        for i in range(WRITER_THREADS)]

    def _store(self, batch_refs: list[MediaRef], features: list[torch.Tensor]) -> None:
        for ref, feature in zip(batch_refs, features):
            self.cache.store(ref, feature, dtype=self.dtype_name)


WRITER_THREADS = 4


def _log_failures(result: Extraction) -> None:
    for message in result.failed.values():
        log.warning("skipped: %s", message)


def featurize(
    records: list[Record],
    encoder: FrozenEncoder,
    cache: FeatureCache,
    report: DataReport,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
) -> tuple[list[Record], dict[MediaRef, torch.Tensor]]:
    """Features for every media file the records use (cache hits loaded, misses extracted in
    batches); records whose media fails to decode are dropped and counted in ``report``."""
    refs = {ref for record in records for ref in record.media}
    result = extract_features(refs, encoder, cache, batch_size=batch_size, num_workers=num_workers)
    kept = []
    for record in records:
        bad = [ref for ref in record.media if ref in result.failed]
        if bad:
            report.drop("undecodable media", f"{record.id}: {result.failed[bad[0]]}")
        else:
            kept.append(record)
    return kept, result.features
