"""Build the embedded tiny default: tokenizer, random-init LLaMA and ImageBind, in the real formats.

    toollmm-build-tiny            # or: python -m toollmm.tiny

No network, deterministic (same files byte for byte on every run of the same library
versions). The outputs sit where real checkpoints go, so every code path is the real one:

    pretrained_checkpoint/LLM_ckpt/tiny_llama/        config.json, model.safetensors, tokenizer.*
    pretrained_checkpoint/imagebind_ckpt/tiny/imagebind_tiny.pth   (imagebind_huge.pth's key layout)
    pretrained_checkpoint/diffusion_ckpt/tiny_{sd,zeroscope,audioldm}/  tiny random diffusers pipelines
        (SD-1.5, Zeroscope and AudioLDM shapes scaled down; text encoders of the real output widths)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from toollmm import prompts
from toollmm.config import project_root
from toollmm.extras import install_hint, is_installed
from toollmm.model.imagebind import ImageBindConfig, ImageBindEncoder, save_imagebind
from toollmm.tiny_decoders import build_tiny_decoders
from toollmm.tokenization import PromptTokenizer

log = logging.getLogger(__name__)

DATA_DIR = Path("data")  # the bundled sample data, relative to the project root
LLM_DIR = Path("pretrained_checkpoint/LLM_ckpt/tiny_llama")
IMAGEBIND_FILE = Path("pretrained_checkpoint/imagebind_ckpt/tiny/imagebind_tiny.pth")
VOCAB_SIZE = 3000
SEED = 0

TINY_LLAMA = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

# What a real LLaMA tokenizer's tokenizer_config.json says; without it transformers adds
# no BOS and decodes "\n" as a space.
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "model_max_length": 1024,
    "legacy": True,
    "clean_up_tokenization_spaces": False,
    "padding_side": "right",
}


class MissingDataError(RuntimeError):
    """The sample data the tokenizer is trained on is not where the builder looks."""


def check_data_dir(data_dir: Path) -> None:
    """The tokenizer needs the ToolMMBench rows; say where they were looked for and how to get them."""
    # Both sets feed the tokenizer's training text: with either missing it would come out different.
    wanted = {"toolmmbench": "*.json", "t2x_pairs": "*/*.json"}
    if not data_dir.is_dir():
        problem = f"the sample data folder {data_dir} does not exist"
    else:
        empty = [data_dir / name for name, pattern in wanted.items() if not any((data_dir / name).glob(pattern))]
        if not empty:
            return
        problem = " and ".join(str(p) for p in empty) + " hold no .json files"
    raise MissingDataError(
        f"{problem}. The tiny default's tokenizer is trained on the bundled sample data: run from a full clone "
        "of the project (its data/ folder holds toolmmbench/ and t2x_pairs/), restore it with `git checkout -- data`, "
        "or pass --data-dir to a folder with that layout."
    )


def corpus(data_dir: Path, extra_files: list[Path]) -> list[str]:
    """Every query, tool name and caption in the bundled data, plus the prompt strings."""
    texts: list[str] = []
    files = sorted((data_dir / "toolmmbench").glob("*.json")) + extra_files
    for path in files:
        for row in json.loads(path.read_text()):
            turns = row.get("conversations", [])
            if len(turns) >= 2:
                texts.append(turns[0]["value"])
                value = turns[1]["value"]
                texts += value if isinstance(value, list) else [value]
    for path in sorted((data_dir / "t2x_pairs").glob("*/*.json")):
        for row in json.loads(path.read_text()):
            if isinstance(row, dict) and "caption" in row:
                texts.append(row["caption"])
    # The template strings appear in every example: let BPE learn them as few pieces.
    template = prompts.HUMAN_WITH_MEDIA + prompts.AFTER_MEDIA + prompts.ASSISTANT + prompts.format_answer("x")
    texts += [template, prompts.HUMAN_TEXT_ONLY + prompts.ASSISTANT] * 200
    return texts


def _as_ordinary_pieces(proto: bytes) -> bytes:
    """The model with its user-defined filler pieces made ordinary vocabulary entries (same ids).

    A user-defined piece becomes an added token of the Hugging Face tokenizer: with ~29000 of
    them, loading the tokenizer took 5-7 s (2-core CPU and an H200), where Vicuna's, with 3
    added tokens, loads in a fraction of a second. No merge forms an ordinary ``<unused_i>``
    piece, so encoding is unchanged.
    """
    try:  # sentencepiece's model schema needs protobuf; only benchmark tokenizers are padded
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:
        raise ImportError("padding a tokenizer with unused pieces edits its sentencepiece model, which needs "
                          "protobuf: pip install protobuf") from err

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    lowest = min(piece.score for piece in model.pieces)
    for piece in model.pieces:
        if piece.type == piece.USER_DEFINED:
            piece.type, piece.score = piece.NORMAL, lowest - 1.0
    return model.SerializeToString()


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE, unused_pieces: int = 0) -> PromptTokenizer:
    """``unused_pieces``: that many never-matching ``<unused_i>`` pieces, so a benchmark
    tokenizer can span a real model's vocabulary (32000 rows for Vicuna) and, like it, have
    only its 3 special tokens as added tokens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # LLaMA's sentencepiece settings: BPE, byte fallback, digits split, dummy prefix,
    # no whitespace normalization; ids 0/1/2 = <unk>/<s>/</s>, no pad.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        # Written to memory: a model_prefix path would be recorded in the file and make
        # builds in different folders differ.
        model_writer=model,
        vocab_size=vocab_size,
        user_defined_symbols=[f"<unused_{i}>" for i in range(unused_pieces)],
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    proto = model.getvalue()
    if unused_pieces:
        proto = _as_ordinary_pieces(proto)
    (out_dir / "tokenizer.model").write_bytes(proto)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2)
    )
    hf = AutoTokenizer.from_pretrained(out_dir)
    tokenizer = PromptTokenizer(hf, out_dir / "tokenizer.model")
    return tokenizer


def build(root: Path, data_dir: Path, force: bool = False) -> tuple[Path, Path]:
    llm_dir, imagebind_file = root / LLM_DIR, root / IMAGEBIND_FILE
    built = not force and (llm_dir / "config.json").is_file() and imagebind_file.is_file()
    if not built:
        check_data_dir(data_dir)  # before any other work: a missing folder is the likely first error
    # The decoders' tiny text encoders (caption embeddings for stage 2): cheap, own skip logic.
    if is_installed("diffusers"):
        build_tiny_decoders(root, force=force)
    else:
        log.warning("tiny decoders not built (stage 2 and generated media need them): %s", install_hint("diffusers"))
    if built:
        log.info("tiny default already at %s and %s", llm_dir, imagebind_file)
        return llm_dir, imagebind_file
    sample_rows = data_dir / "toolmmbench_sample" / "media_requests.json"
    texts = corpus(data_dir, [sample_rows] if sample_rows.is_file() else [])

    # Build in a temporary folder and move into place: an interrupted build leaves nothing half-written.
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp = Path(tmp)
        tokenizer = train_tokenizer(texts, tmp / "tokenizer_src")
        torch.manual_seed(SEED)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=None,
            **TINY_LLAMA,
        )
        llm = LlamaForCausalLM(config)
        llm.save_pretrained(tmp / "llm")
        tokenizer.save_pretrained(tmp / "llm")

        torch.manual_seed(SEED)
        save_imagebind(ImageBindEncoder(ImageBindConfig.tiny()), tmp / "imagebind.pth")

        if llm_dir.exists():
            shutil.rmtree(llm_dir)
        llm_dir.parent.mkdir(parents=True, exist_ok=True)
        imagebind_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / "llm"), llm_dir)
        shutil.move(str(tmp / "imagebind.pth"), imagebind_file)
    log.info("built tiny LLaMA (%d-token vocabulary) at %s and tiny ImageBind at %s", len(tokenizer), llm_dir, imagebind_file)
    return llm_dir, imagebind_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="project root (default: this checkout)")
    parser.add_argument("--data-dir", type=Path, default=None, help="bundled sample data (default: ROOT/data)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    root = (args.root or project_root()).resolve()
    data_dir = args.data_dir or (root / DATA_DIR)
    try:
        build(root, data_dir.resolve(), force=args.force)
    except MissingDataError as err:
        raise SystemExit(f"toollmm-build-tiny: {err}") from None


if __name__ == "__main__":
    main()
