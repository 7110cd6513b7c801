"""Tiny random-init versions of the three NExT-GPT decoders, as complete diffusers pipelines.

    python -m toollmm.tiny_decoders [--root DIR] [--force]

Builds, offline and deterministically (fixed seeds), under ``<root>/pretrained_checkpoint/diffusion_ckpt/``:

    tiny_sd/          StableDiffusionPipeline: CLIPTextModel hidden 768 (SD 1.5's conditioning 77 × 768),
                      UNet2DConditionModel (cross-attention 768), AutoencoderKL, PNDM; no safety checker;
                      32 × 32 images
    tiny_zeroscope/   TextToVideoSDPipeline: CLIPTextModel hidden 1024 (Zeroscope's 77 × 1024),
                      UNet3DConditionModel (cross-attention 1024), AutoencoderKL, DDIM; 16 × 16 frames
    tiny_audioldm/    AudioLDMPipeline: ClapTextModelWithProjection projection 512 (AudioLDM's 512),
                      UNet2DConditionModel conditioned through its class embedding (512, concatenated,
                      as AudioLDM's), AutoencoderKL on 16-bin mel spectrograms, DDIM, SpeechT5HifiGan
                      vocoder at 16 kHz with AudioLDM's 160× upsampling (100 mel frames a second)

Each loads with ``DiffusionPipeline.from_pretrained``. The conditioning shapes are the real
ones, so the stage-2 targets and the decoding path see what they see with the published
decoders; the images, videos and sounds are noise. The tokenizers have a byte-level
vocabulary and no merges: every character is one token.

``text_encoder/`` and ``tokenizer/`` are built first from their own seed and never change
(their bytes key the cached caption embeddings); a folder from an older build holding only
those two is completed with the other parts, not rebuilt.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ClapTextConfig, ClapTextModelWithProjection, CLIPTextConfig, CLIPTextModel

from toollmm.config import project_root
from toollmm.extras import require
from toollmm.output_modalities import OUTPUT_MODALITIES

log = logging.getLogger(__name__)

DIFFUSION_DIR = Path("pretrained_checkpoint/diffusion_ckpt")
SEED = 0
# Written as float16: the 768/1024-wide attention of even one layer is 2-4 M parameters,
# and half precision keeps each folder under 10 MB. Loaders choose their own dtype.
STORED_DTYPE = torch.float16
# The diffusers release whose folder layout model_index.json follows (fixed, so the file is the
# same whichever release builds it).
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


# Each builder returns the pipeline's other parts: name → the object to save (diffusers models,
# schedulers and transformers models all have save_pretrained). Sizes: the smallest that run
# every block type the real decoders have; the cross-attention widths are the real ones.


def _vae(in_channels: int = 3, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    # Two levels: latents are half the output's side, as the real VAEs' are an eighth.
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
                         block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, sample_size=32)


def _unet_blocks(dims: str) -> dict:
    return dict(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
                down_block_types=(f"CrossAttnDownBlock{dims}", f"DownBlock{dims}"),
                up_block_types=(f"UpBlock{dims}", f"CrossAttnUpBlock{dims}"))


def _sd_betas() -> dict:
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def sd_parts() -> dict:
    from diffusers import PNDMScheduler, UNet2DConditionModel

    return {
        "unet": UNet2DConditionModel(sample_size=16, cross_attention_dim=768, **_unet_blocks("2D")),
        "vae": _vae(),
        "scheduler": PNDMScheduler(**_sd_betas(), skip_prk_steps=True, set_alpha_to_one=False),
    }


def zeroscope_parts() -> dict:
    from diffusers import DDIMScheduler, UNet3DConditionModel

    return {
        "unet": UNet3DConditionModel(sample_size=8, cross_attention_dim=1024, **_unet_blocks("3D")),
        "vae": _vae(),
        "scheduler": DDIMScheduler(**_sd_betas(), clip_sample=False, set_alpha_to_one=False),
    }


def audioldm_parts() -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    # AudioLDM conditions the UNet on the 512-d text vector through the class embedding
    # (projected, concatenated to the time embedding); its cross-attention attends to itself,
    # so its width is the blocks' (8).
    unet = UNet2DConditionModel(sample_size=16, in_channels=8, out_channels=8, cross_attention_dim=8,
                                class_embed_type="simple_projection", projection_class_embeddings_input_dim=512,
                                class_embeddings_concat=True, **_unet_blocks("2D"))
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=16, sampling_rate=16000, upsample_initial_channel=32, upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1]],
        # 0.2, not the default 0.01: five upsampling layers at 0.01 give a silent (1e-10) waveform.
        normalize_before=False, initializer_range=0.2))
    scheduler = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False)
    return {"unet": unet, "vae": _vae(in_channels=1, latent_channels=8), "scheduler": scheduler, "vocoder": vocoder}


@dataclass(frozen=True)
class TinyDecoder:
    """A tiny stand-in of one output modality's decoder (pipeline and tokenizer classes from its registry entry)."""

    modality: str
    make_text_encoder: Callable[[Path], torch.nn.Module]
    """Writes the tokenizer into the folder it is given and returns the text encoder."""
    make_parts: Callable[[], dict]
    parts: tuple[str, ...]
    """What ``make_parts`` returns: a folder holding these (and the text encoder and tokenizer) is complete."""


DECODERS = {
    "tiny_sd": TinyDecoder("image", tiny_sd, sd_parts, ("unet", "vae", "scheduler")),
    "tiny_zeroscope": TinyDecoder("video", tiny_zeroscope, zeroscope_parts, ("unet", "vae", "scheduler")),
    "tiny_audioldm": TinyDecoder("audio", tiny_audioldm, audioldm_parts, ("unet", "vae", "scheduler", "vocoder")),
}
# StableDiffusionPipeline's optional components, recorded as absent (diffusers' own way).
ABSENT = {"StableDiffusionPipeline": {"safety_checker": [None, None], "feature_extractor": [None, None],
                                      "image_encoder": [None, None], "requires_safety_checker": False}}


def build_text_encoder(folder: Path, make_encoder) -> str:
    """text_encoder/ and tokenizer/ (seed ``SEED``, as every earlier build); returns the encoder's class name."""
    torch.manual_seed(SEED)
    encoder = make_encoder(folder / "tokenizer")
    encoder.to(STORED_DTYPE).save_pretrained(folder / "text_encoder", safe_serialization=True)
    return type(encoder).__name__


def build_parts(folder: Path, make_parts) -> dict[str, list[str]]:
    """The UNet, VAE, scheduler (and vocoder) under ``folder``; returns model_index.json's entries for them."""
    from diffusers.utils import logging as diffusers_logging

    torch.manual_seed(SEED + 1)  # their own seed: the text encoder's draws stay as they were
    entries = {}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(float16) warns about fp32 modules these models lack
    try:
        parts = {part: obj.to(STORED_DTYPE) if isinstance(obj, torch.nn.Module) else obj for part, obj in make_parts().items()}
    finally:
        diffusers_logging.set_verbosity(verbosity)
    for part, obj in parts.items():
        obj.save_pretrained(folder / part)
        library = "transformers" if type(obj).__module__.startswith("transformers") else "diffusers"
        entries[part] = [library, type(obj).__name__]
    return entries


def is_complete(folder: Path, decoder: TinyDecoder) -> bool:
    index = folder / "model_index.json"
    if not index.is_file():
        return False
    listed = json.loads(index.read_text())
    return all(part in listed and (folder / part).is_dir() for part in (*decoder.parts, "text_encoder", "tokenizer"))


def write_model_index(folder: Path, pipeline_class: str, encoder_class: str, tokenizer_class: str, parts: dict) -> None:
    write_json(folder / "model_index.json", {
        "_class_name": pipeline_class,
        "_diffusers_version": DIFFUSERS_LAYOUT_VERSION,
        "_note": "toollmm tiny decoder: random weights with the real conditioning shapes",
        "text_encoder": ["transformers", encoder_class],
        "tokenizer": ["transformers", tokenizer_class],
        **parts,
        **ABSENT.get(pipeline_class, {}),
    })


def build_tiny_decoders(root: Path, force: bool = False) -> dict[str, Path]:
    """Build (or find, or complete) the three tiny decoders under ``root``; returns name → folder."""
    require("diffusers", "building the tiny decoders")
    base = Path(root) / DIFFUSION_DIR
    folders = {}
    for name, decoder in DECODERS.items():
        entry = OUTPUT_MODALITIES[decoder.modality]
        folder = folders[name] = base / name
        if not force and is_complete(folder, decoder):
            continue
        base.mkdir(parents=True, exist_ok=True)
        keep_text = not force and (folder / "text_encoder" / "config.json").is_file() and (folder / "tokenizer").is_dir()
        # Built aside and moved into place: an interrupted build leaves no half folder
        # (model_index.json, written last, is what marks a folder as built).
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            staged = Path(tmp) / name
            staged.mkdir()
            if keep_text:
                encoder_class = json.loads((folder / "text_encoder" / "config.json").read_text())["architectures"][0]
            else:
                encoder_class = build_text_encoder(staged, decoder.make_text_encoder)
            parts = build_parts(staged, decoder.make_parts)
            write_model_index(staged, entry.pipeline, encoder_class, entry.text_encoding.tokenizer, parts)
            if keep_text:
                for part in (*parts, "model_index.json"):
                    if (folder / part).is_dir():
                        shutil.rmtree(folder / part)
                    shutil.move(str(staged / part), folder / part)
            else:
                if folder.exists():
                    shutil.rmtree(folder)
                shutil.move(str(staged), folder)
        log.info("%s %s at %s", "completed" if keep_text else "built", name, folder)
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
