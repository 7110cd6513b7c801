"""Tiny random-init text encoders of the three NExT-GPT decoders, in diffusers' folder layout.

    python -m toollmm.tiny_decoders [--root DIR] [--force]

Builds, offline and deterministically (fixed seed), under ``<root>/pretrained_checkpoint/diffusion_ckpt/``:

    tiny_sd/          CLIPTextModel, hidden 768   (Stable Diffusion 1.5's conditioning: 77 × 768)
    tiny_zeroscope/   CLIPTextModel, hidden 1024  (Zeroscope's: 77 × 1024)
    tiny_audioldm/    ClapTextModelWithProjection, projection 512 (AudioLDM's: 512)

Each holds ``model_index.json``, ``text_encoder/`` (config.json + model.safetensors) and
``tokenizer/`` (vocab.json + merges.txt, as the real checkpoints ship them) — the parts
``process_embeddings.py`` reads; there is no UNet or VAE. The output shapes are the real
ones, so the stage-2 code paths see what they see with the published decoders. The
tokenizers have a byte-level vocabulary and no merges: every character is one token.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import ClapTextConfig, ClapTextModelWithProjection, CLIPTextConfig, CLIPTextModel

from toollmm.config import project_root

log = logging.getLogger(__name__)

DIFFUSION_DIR = Path("pretrained_checkpoint/diffusion_ckpt")
SEED = 0
# Written as float16: the 768/1024-wide attention of even one layer is 2-4 M parameters,
# and half precision keeps each folder under 10 MB. Loaders choose their own dtype.
STORED_DTYPE = torch.float16
# The diffusers release whose folder layout model_index.json follows (fixed, so the build
# does not need diffusers installed and is the same file everywhere).
DIFFUSERS_LAYOUT_VERSION = "0.42.1"

CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def byte_characters() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes, in the real vocabularies' order.

    Printable Latin-1 bytes stand for themselves and come first (so "!" is id 0 in CLIP's
    vocabulary); the other bytes follow, mapped in order to code points from 256 on (the
    GPT-2 / CLIP / RoBERTa convention, which makes "Ġ" the space).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = 256 - len(printable)
    return [chr(byte) for byte in printable] + [chr(256 + n) for n in range(others)]


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def write_bpe_tokenizer(folder: Path, vocab: dict[str, int], config: dict) -> None:
    folder.mkdir(parents=True)
    write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n")
    write_json(folder / "tokenizer_config.json", config)


def clip_tokenizer(folder: Path, pad_token: str) -> int:
    """CLIP's layout: byte characters, then their end-of-word forms, then the two specials."""
    chars = byte_characters()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {CLIP_START: 512, CLIP_END: 513}
    write_bpe_tokenizer(folder, vocab, {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "bos_token": CLIP_START, "eos_token": CLIP_END, "unk_token": CLIP_END, "pad_token": pad_token,
    })
    return len(vocab)


def roberta_tokenizer(folder: Path) -> int:
    """RoBERTa's layout: <s> <pad> </s> <unk>, byte characters, <mask> last."""
    vocab = {token: i for i, token in enumerate(ROBERTA_SPECIALS)}
    vocab |= {c: len(ROBERTA_SPECIALS) + i for i, c in enumerate(byte_characters())}
    vocab["<mask>"] = len(vocab)
    # 512: what AudioLDM's tokenizer says; its pipeline pads every prompt to this length.
    write_bpe_tokenizer(folder, vocab, {
        "tokenizer_class": "RobertaTokenizer", "model_max_length": 512, "bos_token": "<s>", "eos_token": "</s>",
        "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
    })
    return len(vocab)


def clip_text_encoder(vocab_size: int, hidden: int, act: str) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, projection_dim=hidden,
        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
        bos_token_id=512, eos_token_id=513, pad_token_id=513,
    ))


def clap_text_encoder(vocab_size: int) -> ClapTextModelWithProjection:
    return ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=514, projection_dim=512,
    ))


def tiny_sd(tokenizer_dir: Path) -> CLIPTextModel:
    return clip_text_encoder(clip_tokenizer(tokenizer_dir, pad_token=CLIP_END), hidden=768, act="quick_gelu")


def tiny_zeroscope(tokenizer_dir: Path) -> CLIPTextModel:
    # Zeroscope's OpenCLIP-H tokenizer pads with "!" (id 0), not with the end token.
    return clip_text_encoder(clip_tokenizer(tokenizer_dir, pad_token="!"), hidden=1024, act="gelu")


def tiny_audioldm(tokenizer_dir: Path) -> ClapTextModelWithProjection:
    return clap_text_encoder(roberta_tokenizer(tokenizer_dir))


# folder name → (pipeline class model_index.json names, tokenizer class, builder writing the tokenizer, returning the encoder)
DECODERS = {
    "tiny_sd": ("StableDiffusionPipeline", "CLIPTokenizer", tiny_sd),
    "tiny_zeroscope": ("TextToVideoSDPipeline", "CLIPTokenizer", tiny_zeroscope),
    "tiny_audioldm": ("AudioLDMPipeline", "RobertaTokenizer", tiny_audioldm),
}


def build_decoder(folder: Path, pipeline_class: str, tokenizer_class: str, make_encoder) -> None:
    torch.manual_seed(SEED)
    encoder = make_encoder(folder / "tokenizer")
    encoder.to(STORED_DTYPE).save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_json(folder / "model_index.json", {
        "_class_name": pipeline_class,
        "_diffusers_version": DIFFUSERS_LAYOUT_VERSION,
        "_note": "toollmm tiny decoder: text encoder and tokenizer only, for caption embeddings",
        "text_encoder": ["transformers", type(encoder).__name__],
        "tokenizer": ["transformers", tokenizer_class],
    })


def build_tiny_decoders(root: Path, force: bool = False) -> dict[str, Path]:
    """Build (or find) the three tiny decoders under ``root``; returns name → folder."""
    base = Path(root) / DIFFUSION_DIR
    folders = {}
    for name, (pipeline_class, tokenizer_class, make_encoder) in DECODERS.items():
        folder = folders[name] = base / name
        if not force and (folder / "model_index.json").is_file():
            continue
        base.mkdir(parents=True, exist_ok=True)
        # Built aside and moved into place: an interrupted build leaves no half folder
        # (model_index.json, written last, is what marks a folder as built).
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            build_decoder(Path(tmp) / name, pipeline_class, tokenizer_class, make_encoder)
            if folder.exists():
                shutil.rmtree(folder)
            shutil.move(str(Path(tmp) / name), folder)
        log.info("built %s at %s", name, folder)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="project root (default: this checkout)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folders exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for name, folder in build_tiny_decoders((args.root or project_root()).resolve(), args.force).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
