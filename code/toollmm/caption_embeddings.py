"""Caption embeddings: the targets NExT-GPT's stage 2 aligns the signal tokens to.

A decoder is conditioned on its own text encoder's output for a caption, so the targets
are that output, computed once per caption by ``process_embeddings.py``. Each output
modality's registry entry (``toollmm.output_modalities``) names its text encoder and how it
encodes:

- Stable Diffusion 1.5 and Zeroscope (``CLIPTextModel``): the last hidden state of the
  caption padded to the tokenizer's 77 tokens → (77, 768) and (77, 1024);
- AudioLDM (``ClapTextModelWithProjection``): ``text_embeds``, L2-normalized → (512,).

``CaptionEncoder`` reproduces what diffusers' pipelines do for the positive prompt
(``StableDiffusionPipeline.encode_prompt``, ``TextToVideoSDPipeline.encode_prompt``,
``AudioLDMPipeline._encode_prompt``), reading only ``text_encoder/`` and ``tokenizer/`` of
the decoder's folder. ``CaptionEmbeddingStore`` is a folder of ``<media name>.npy`` files
(the published naming) plus a ``manifest.json`` naming the encoder that made them, so a
folder made for one decoder is refused by another instead of crashing training on a
77×768 vs 77×1024 shape error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

from toollmm.output_modalities import OUTPUT_MODALITIES

# Bump when the tokenization or the forward below changes: stores made by older code are then refused.
PREPROCESSING_VERSION = 1


class DecoderFolderError(ValueError):
    """The decoder folder lacks a usable text encoder or tokenizer."""


class CaptionEmbeddingMismatch(ValueError):
    """Stored caption embeddings were made by another encoder or have another shape."""


class CaptionEmbeddingMissing(KeyError):
    """A caption embedding (or the whole store) is not on disk."""

    def __str__(self) -> str:  # KeyError would print the message quoted, as a repr
        return str(self.args[0])


def shape_text(shape) -> str:
    return "×".join(str(n) for n in shape)


def _weight_files(encoder_dir: Path) -> tuple[list[Path], bool, str | None]:
    """The weight files transformers will load (files, is safetensors, variant); safetensors first."""
    for variant in (None, "fp16"):
        for safetensors, stem in ((True, "model.safetensors"), (False, "pytorch_model.bin")):
            name = stem if variant is None else stem.replace(".", f".{variant}.", 1)
            index = encoder_dir / f"{name}.index.json"
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                return [index, *(encoder_dir / s for s in shards)], safetensors, variant
            if (encoder_dir / name).is_file():
                return [encoder_dir / name], safetensors, variant
    raise DecoderFolderError(f"{encoder_dir} holds no model.safetensors or pytorch_model.bin (nor sharded or fp16 ones)")


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256(f"p{PREPROCESSING_VERSION}".encode())
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


class CaptionEncoder:
    """A decoder's frozen text encoder and tokenizer: captions → the decoder's conditioning.

    ``identity`` hashes the text encoder's config and weights, the tokenizer files and
    ``PREPROCESSING_VERSION`` (not the dtype: bf16 and fp32 runs may fill one store).
    Hashing a 1.4 GB encoder costs a few seconds per run; a cheaper key could miss a
    changed checkpoint.
    """

    def __init__(self, folder: Path, modality: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if modality not in OUTPUT_MODALITIES:
            raise ValueError(f"modality {modality!r} is not one of the output modalities {list(OUTPUT_MODALITIES)}")
        self.folder, self.modality = Path(folder), modality
        self.encoding = OUTPUT_MODALITIES[modality].text_encoding
        encoder_dir, tokenizer_dir = self.folder / "text_encoder", self.folder / "tokenizer"
        self._check_folder(encoder_dir, tokenizer_dir)
        weights, safetensors, variant = _weight_files(encoder_dir)
        self.tokenizer = getattr(transformers, self.encoding.tokenizer).from_pretrained(tokenizer_dir)
        # from_pretrained reads .bin files with torch.load(weights_only=True): no arbitrary unpickling.
        self.model = getattr(transformers, self.encoding.architecture).from_pretrained(
            encoder_dir, dtype=dtype, use_safetensors=safetensors, variant=variant)
        self.model.to(device).eval().requires_grad_(False)
        self.max_length = self.tokenizer.model_max_length
        if not 0 < self.max_length <= self.model.config.max_position_embeddings:
            raise DecoderFolderError(
                f"{tokenizer_dir}: model_max_length {self.max_length} does not fit the text encoder's "
                f"{self.model.config.max_position_embeddings} positions; set it in tokenizer_config.json"
            )
        self.out_shape = self.encoding.encoder_shape(self.model.config, self.max_length)
        tokenizer_files = sorted(p for p in tokenizer_dir.rglob("*") if p.is_file())
        digest = _digest([encoder_dir / "config.json", *weights, *tokenizer_files])
        shape = shape_text(self.out_shape).replace("×", "x")
        self.identity = f"{self.encoding.short_name}-{shape}-{digest[:16]}-p{PREPROCESSING_VERSION}"

    def _check_folder(self, encoder_dir: Path, tokenizer_dir: Path) -> None:
        if not (encoder_dir / "config.json").is_file() or not tokenizer_dir.is_dir():
            raise DecoderFolderError(
                f"{self.folder} is not a diffusers decoder folder: it needs text_encoder/config.json (+ weights) "
                f"and tokenizer/ (see pretrained_checkpoint/README.md; python -m toollmm.tiny_decoders builds tiny ones)"
            )
        architectures = json.loads((encoder_dir / "config.json").read_text()).get("architectures") or ["(none)"]
        if architectures[0] != self.encoding.architecture:
            entry = OUTPUT_MODALITIES[self.modality]
            raise DecoderFolderError(
                f"{encoder_dir}/config.json names the architecture {architectures[0]}; the {self.modality} decoder "
                f"({entry.pipeline}) encodes captions with a {self.encoding.architecture}: pass its folder"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def count_truncated(self, captions: list[str]) -> int:
        """Captions longer than the tokenizer's max length (the pipelines cut them too, with a warning)."""
        return sum(len(ids) > self.max_length for ids in self.tokenizer(captions, verbose=False).input_ids)

    def _forward(self, captions: list[str]) -> torch.Tensor:
        inputs = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        return self.encoding.encode(self.model, inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device))

    def encode(self, captions: list[str], batch_size: int = 64) -> torch.Tensor:
        """``captions`` → float32 ``(N, *out_shape)`` on the CPU, ``batch_size`` captions per forward."""
        out = torch.empty((len(captions), *self.out_shape), dtype=torch.float32)
        with torch.inference_mode():
            for start in range(0, len(captions), batch_size):
                batch = captions[start:start + batch_size]
                out[start:start + len(batch)] = self._forward(batch).float().cpu()
        return out


class CaptionEmbeddingStore:
    """A folder of ``<name>.npy`` float32 arrays of one shape, and the manifest that says whose.

    Open it with ``for_writing`` (process_embeddings.py) or ``for_reading`` (training);
    both refuse a folder whose manifest disagrees. Each array is written to a temporary
    file and renamed into place, so an interrupted run leaves no partial file and a
    rerun can skip every name present.
    """

    MANIFEST = "manifest.json"

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = Path(root), manifest
        self.shape = tuple(manifest["shape"])
        self.identity = manifest["identity"]

    @classmethod
    def for_writing(cls, root: Path, *, identity: str, shape: tuple[int, ...], modality: str, decoder: str) -> "CaptionEmbeddingStore":
        root = Path(root)
        manifest = {"identity": identity, "shape": list(shape), "modality": modality, "decoder": str(decoder),
                    "dtype": "float32", "preprocessing_version": PREPROCESSING_VERSION}
        recorded = cls._read_manifest(root)
        if recorded is None:
            if root.is_dir() and any(root.rglob("*.npy")):
                raise CaptionEmbeddingMismatch(
                    f"{root} holds .npy files but no {cls.MANIFEST}, so nothing says which encoder made them "
                    f"(another tool?): write into another embeddings_dir, or delete them to rebuild here."
                )
            root.mkdir(parents=True, exist_ok=True)
            _atomic_write(root / cls.MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
            return cls(root, manifest)
        if tuple(recorded["shape"]) != tuple(shape) or recorded["identity"] != identity:
            raise CaptionEmbeddingMismatch(
                f"{root} holds {recorded.get('modality', '?')} caption embeddings of shape "
                f"{shape_text(recorded['shape'])} from encoder {recorded['identity']} (decoder {recorded.get('decoder', '?')}), "
                f"but this run's {modality} encoder is {identity} with shape {shape_text(shape)} (decoder {decoder}). "
                f"Write into another embeddings_dir, or delete {root} to rebuild it with this decoder."
            )
        return cls(root, recorded)

    @classmethod
    def for_reading(cls, root: Path, *, shape: tuple[int, ...], identity: str | None = None,
                    expected_by: str = "this run") -> "CaptionEmbeddingStore":
        """``expected_by`` names who expects ``shape`` in the messages, e.g. ``model.outputs.video``."""
        root = Path(root)
        recorded = cls._read_manifest(root)
        if recorded is None:
            raise CaptionEmbeddingMissing(
                f"{root} has no {cls.MANIFEST}: its caption embeddings were never made (or by another tool). "
                f"Run process_embeddings.py (e.g. python code/process_embeddings.py --stage 2) to write them."
            )
        modality = recorded.get("modality", "?")
        if tuple(recorded["shape"]) != tuple(shape):
            raise CaptionEmbeddingMismatch(
                f"{root} was made for a decoder with {shape_text(recorded['shape'])} conditioning "
                f"({recorded.get('decoder', '?')}) but {expected_by} expects {shape_text(shape)}: run "
                f"process_embeddings.py with the {modality} decoder into another embeddings_dir, or point "
                f"{expected_by} at the decoder these embeddings were made with."
            )
        if identity is not None and recorded["identity"] != identity:
            raise CaptionEmbeddingMismatch(
                f"{root} was made by encoder {recorded['identity']} ({recorded.get('decoder', '?')}) but {expected_by} "
                f"uses {identity}: rerun process_embeddings.py with that decoder into another embeddings_dir."
            )
        return cls(root, recorded)

    @classmethod
    def _read_manifest(cls, root: Path) -> dict | None:
        path = root / cls.MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            manifest = str(err)
        if not (isinstance(manifest, dict) and {"shape", "identity"} <= manifest.keys()):
            raise CaptionEmbeddingMismatch(
                f"{path} is not a caption-embedding manifest (no shape and identity); delete {root} and rerun process_embeddings.py"
            )
        return manifest

    def path(self, name: str) -> Path:
        if Path(name).is_absolute() or ".." in Path(name).parts or not name.endswith(".npy"):
            raise ValueError(f"caption embedding name {name!r} must be a relative '<media name>.npy'")
        return self.root / name

    def __contains__(self, name: str) -> bool:
        return self.path(name).is_file()

    def names(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*.npy"))

    def save(self, name: str, embedding: np.ndarray | torch.Tensor) -> Path:
        array = np.asarray(embedding.cpu() if isinstance(embedding, torch.Tensor) else embedding, dtype=np.float32)
        if array.shape != self.shape:
            raise CaptionEmbeddingMismatch(f"embedding {name} has shape {shape_text(array.shape)}; {self.root} stores {shape_text(self.shape)}")
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
        return path

    def load(self, name: str) -> np.ndarray:
        path = self.path(name)
        if not path.is_file():
            raise CaptionEmbeddingMissing(
                f"no caption embedding {name} in {self.root}: run process_embeddings.py over the caption file naming it"
            )
        array = np.load(path, allow_pickle=False)
        if array.shape != self.shape or array.dtype != np.float32:
            raise CaptionEmbeddingMismatch(
                f"{path} holds a {array.dtype} array of shape {shape_text(array.shape)}; this folder's manifest says "
                f"float32 {shape_text(self.shape)}: delete the file and rerun process_embeddings.py"
            )
        return array


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
