"""Build a random-init LLaMA of a published shape, in bf16, directly on the GPU, and save it.

    python bench/make_random_llm.py --preset vicuna-7b --out /tmp/v7b \
        --tokenizer pretrained_checkpoint/LLM_ckpt/tiny_llama

For throughput / memory smoke tests only: the weights are random (never carry them; build
them where they are used). The tokenizer copied in is the tiny one (3000 ids, all below the
model's 32000-row vocabulary), so the training path runs unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Vicuna v1.5 config.json values (lmsys/vicuna-7b-v1.5, lmsys/vicuna-13b-v1.5).
COMMON = dict(
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)
PRESETS = {
    "vicuna-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, **COMMON),
    "vicuna-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, **COMMON),
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_random_llm(config: LlamaConfig, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> LlamaForCausalLM:
    """A random-init LLaMA built in ``dtype`` straight on ``device`` (on a GPU: no 13 GB of CPU
    tensors first, and no fp32 copy), in eval mode."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--out", type=Path, required=True)
    tokenizer = p.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", type=Path, help="folder whose tokenizer files are copied in")
    tokenizer.add_argument("--train-tokenizer", type=Path, metavar="DATA_DIR",
                           help="train a tokenizer of the preset's full vocabulary on this bundled data (needed when "
                                "tokens are added after the base vocabulary: signal tokens, stages 1-2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-layers", type=int, default=None, help="override the layer count (local checks only)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    values = dict(PRESETS[args.preset])
    if args.num_layers:
        values["num_hidden_layers"] = args.num_layers
    config = LlamaConfig(**values)
    config.dtype = torch.bfloat16  # recorded in config.json; the weights are saved in bf16

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = build_random_llm(config, torch.device(args.device))
    n = sum(t.numel() for t in model.parameters())
    dtypes = sorted({str(t.dtype) for t in model.parameters()})
    built = time.perf_counter()
    print(f"built {args.preset}: {n / 1e9:.3f} B parameters, {dtypes}, on {args.device} in {built - start:.1f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    if args.train_tokenizer:
        from toollmm.tiny import VOCAB_SIZE, corpus, train_tokenizer

        # The tiny corpus supports about 3000 learned pieces; never-matching filler pieces
        # make up the rest, so ids span the real vocabulary and signal tokens start at 32000.
        tok = train_tokenizer(corpus(args.train_tokenizer, []), args.out, vocab_size=config.vocab_size,
                              unused_pieces=config.vocab_size - VOCAB_SIZE)
        tok.save_pretrained(args.out)
        copied = [f"trained, {len(tok)} tokens"]
    else:
        copied = [name for name in TOKENIZER_FILES if (args.tokenizer / name).is_file()]
        for name in copied:
            shutil.copy2(args.tokenizer / name, args.out / name)
        if "tokenizer.model" not in copied and "tokenizer.json" not in copied:
            raise SystemExit(f"{args.tokenizer} holds no tokenizer.model or tokenizer.json")
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"saved to {args.out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - built:.1f} s; tokenizer files: {copied}", flush=True)
    print(json.dumps({k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "intermediate_size", "vocab_size", "max_position_embeddings",
                                                       "rms_norm_eps")}))


if __name__ == "__main__":
    main()
