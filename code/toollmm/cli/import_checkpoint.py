"""Convert the original MLLM-Tool's delta checkpoint, or a NExT-GPT checkpoint, into a Tool_LMM checkpoint.

    python code/import_checkpoint.py --delta pytorch_model_5.pt \\
        --llm-path pretrained_checkpoint/LLM_ckpt/vicuna_7b \\
        --imagebind-path pretrained_checkpoint/imagebind_ckpt/huge/imagebind_huge.pth \\
        --output ckpt/imported_vicuna_7b [key=value ...]

The config is base.yaml + stage_3.yaml (+ --config files) with model.tuning=lora, then the
overrides (e.g. model.lora.r=16 for a delta trained with another rank). The ImageBind path
only goes into the checkpoint's config, for inference. The result loads like any trained
checkpoint: ``python code/inference.py --ckpt ckpt/imported_vicuna_7b ...``.

A NExT-GPT ``pytorch_model.pt`` (recognised by its ``gen_text_hidden_fcs*`` keys) is imported
the same way with model.outputs.enabled=true: its input and output projectors, the signal-token
rows (the whole embedding and LM head when their base rows were trained) and its LoRA weights
when present (a stage-3 checkpoint; without them, a stage-2 one).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from toollmm.config import ConfigError, load_config, resolve_path
from toollmm.convert import import_delta, import_nextgpt, is_nextgpt, read_delta


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delta", type=Path, required=True, help="the original's pytorch_model_<step>.pt, or NExT-GPT's pytorch_model.pt")
    parser.add_argument("--llm-path", required=True, help="base LLM folder the delta was trained on (Hugging Face format)")
    parser.add_argument("--imagebind-path", default=None, help="ImageBind weights for later inference (default: the config's)")
    parser.add_argument("--output", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--config", action="append", default=[], help="extra YAML layered over base + stage_3")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it already exists")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.lora.r=16")
    return parser.parse_args(argv)


def config_path(given: str) -> str:
    """As given when it names something under the project root (the checkpoint stays portable), else absolute."""
    return given if resolve_path(given).exists() else str(Path(given).resolve())


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = [f"model.llm_path={config_path(args.llm_path)}"]
    if args.imagebind_path is not None:
        paths.append(f"model.imagebind_path={config_path(args.imagebind_path)}")
    nextgpt = is_nextgpt(read_delta(args.delta))
    outputs = ["model.outputs.enabled=true"] if nextgpt else []
    config = load_config(3, args.config, ["model.tuning=lora", *outputs, *paths, *args.overrides])
    out_dir = args.output.resolve()
    if out_dir.exists() and not args.overwrite:
        raise ConfigError(f"--output {out_dir} already exists; pass --overwrite to replace it, or choose another folder")
    return (import_nextgpt if nextgpt else import_delta)(args.delta, config, out_dir)


if __name__ == "__main__":
    main()
