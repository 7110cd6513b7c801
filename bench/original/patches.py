"""In-process adaptations that let the original MLLM-Tool code (0114f7c, written for transformers
4.28 / torch 2.0) import and train on this stack (transformers 5, torch 2.11), without editing it.

``install()`` must run before the original's modules are imported:

- ``shims/`` goes first on ``sys.path``: ipdb, tensorboardX, timm, ftfy, iopath, einops,
  pytorchvideo and the top-level ``data`` module the original's header.py imports. First, not
  after site-packages: the same code runs wherever the real packages are or are not installed
  (pytorchvideo 0.1.5 itself no longer imports under torchvision 0.26), and a CPU check
  exercises what the GPU machine, which lacks most of them, runs. DeepSpeed's flops profiler
  imports einops too; it only touches ``einops.einsum`` when profiling, which this run does not.
- ``transformers.deepspeed`` (gone in transformers 5): the same ``HfDeepSpeedConfig`` from
  ``transformers.integrations.deepspeed``.
- ``torchvision.transforms._transforms_video.NormalizeVideo``, where torchvision no longer has it.
- ``torchaudio.load`` through soundfile where torchaudio would need torchcodec (torchaudio >= 2.9).
- DeepSpeed 0.19 broadcasts every parameter as a uint8 view at ``initialize``, which fails on
  the 0-dim parameters in ImageBind (``log_logit_scale``); they are broadcast as 1-element views.
- ``sentencepiece_segments(module)``, called by the wrapper once the original is imported: its
  ``LlamaTokenizer.from_pretrained(..., use_fast=False)`` meant sentencepiece itself in
  transformers 4.28; in transformers 5 it returns the ``tokenizers``-backed tokenizer, which
  encodes a segment that starts with a space one token shorter (1994 of the 9553 rows here).
  The loaded tokenizer then encodes its plain segments (``add_special_tokens=False``) with
  sentencepiece, as the slow tokenizer did; the rest stays transformers'.
- ``cpu_dry_run``: NCCL and ``storage.cuda`` (its embedding cache's map_location) mapped to the
  CPU, for a functional check on a machine without a GPU (the wrapper handles the rest). Never
  a timing.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

SHIMS = Path(__file__).resolve().parent / "shims"


def install(cpu_dry_run: bool = False) -> None:
    sys.path.insert(0, str(SHIMS))
    _transformers_deepspeed()
    _normalize_video()
    _torchaudio_load()
    _deepspeed_scalar_broadcast()
    if cpu_dry_run:
        _cuda_to_cpu()


def _transformers_deepspeed() -> None:
    try:
        import transformers.deepspeed  # noqa: F401  (transformers < 4.31 had it)
    except ImportError:
        from transformers.integrations import deepspeed as integration

        module = types.ModuleType("transformers.deepspeed")
        module.HfDeepSpeedConfig = integration.HfDeepSpeedConfig
        sys.modules["transformers.deepspeed"] = module


def _normalize_video() -> None:
    """NormalizeVideo: per-channel (x - mean) / std of a (C, T, H, W) clip."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated since torchvision 0.12, still there in 0.26
            from torchvision.transforms._transforms_video import NormalizeVideo  # noqa: F401
        return
    except ImportError:
        pass
    import torch

    class NormalizeVideo(torch.nn.Module):
        def __init__(self, mean, std, inplace=False):
            super().__init__()
            self.mean, self.std = mean, std

        def forward(self, clip):
            mean = torch.as_tensor(self.mean, dtype=clip.dtype, device=clip.device)[:, None, None, None]
            std = torch.as_tensor(self.std, dtype=clip.dtype, device=clip.device)[:, None, None, None]
            return (clip - mean) / std

    module = types.ModuleType("torchvision.transforms._transforms_video")
    module.NormalizeVideo = NormalizeVideo
    sys.modules[module.__name__] = module


def _torchaudio_load() -> None:
    """torchaudio >= 2.9 loads through torchcodec; without it, read with soundfile: float32
    (channels, frames) and the file's rate, what torchaudio.load returned."""
    import torchaudio

    if importlib.util.find_spec("torchcodec") is not None:
        return

    def load(path, *args, **kwargs):
        import soundfile
        import torch

        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        return torch.from_numpy(samples.T.copy()), rate

    torchaudio.load = load


def sentencepiece_segments(module) -> None:
    """Swap ``module.LlamaTokenizer`` for a loader whose tokenizers encode plain segments with
    sentencepiece (the folder's tokenizer.model)."""
    base = module.LlamaTokenizer

    class LlamaTokenizer:
        @staticmethod
        def from_pretrained(path, *args, **kwargs):
            tokenizer = base.from_pretrained(path, *args, **kwargs)
            model_file = Path(path) / "tokenizer.model"
            if not model_file.is_file():
                return tokenizer
            import sentencepiece
            from transformers import BatchEncoding

            pieces = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
            loaded = type(tokenizer)

            def __call__(self, text, add_special_tokens=True, return_tensors=None, **kwargs):
                if add_special_tokens or kwargs or not isinstance(text, str):
                    return loaded.__call__(self, text, add_special_tokens=add_special_tokens,
                                           return_tensors=return_tensors, **kwargs)
                ids = pieces.encode(text)
                data = {"input_ids": ids, "attention_mask": [1] * len(ids)}
                if return_tensors:
                    data = {key: [value] for key, value in data.items()}
                return BatchEncoding(data, tensor_type=return_tensors)

            tokenizer.__class__ = type(loaded.__name__, (loaded,), {"__call__": __call__})
            return tokenizer

    module.LlamaTokenizer = LlamaTokenizer


def _deepspeed_scalar_broadcast() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    broadcast = DeepSpeedEngine._broadcast_model

    def _broadcast_model(self):
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)  # a view: the broadcast writes into the parameter's storage
        try:
            broadcast(self)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    DeepSpeedEngine._broadcast_model = _broadcast_model


def _cuda_to_cpu() -> None:
    """NCCL and ``storage.cuda``; the wrapper swaps the original's ``initialize_distributed`` and
    ``torch.cuda.current_device`` (its model's device)."""
    import deepspeed
    import torch

    torch.UntypedStorage.cuda = lambda self, *args, **kwargs: self  # its cache's torch.load map_location
    init = deepspeed.init_distributed

    def init_distributed(dist_backend=None, **kwargs):
        return init(dist_backend="gloo", **kwargs)

    deepspeed.init_distributed = init_distributed
