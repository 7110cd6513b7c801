"""Self-describing checkpoints: trainable weights (safetensors), resolved config, tokenizer, base identity.

A checkpoint folder::

    trainable.safetensors   every trainable parameter, by its name in ToolLMM
    adapter/                the LoRA weights in PEFT's format (readable by other tools)
    config.yaml             the resolved run config
    tokenizer/              the tokenizer the model was trained with
    checkpoint.json         base model identity, stage, step, samples seen, encoder identity

Folders are written under a temporary name and renamed when complete, so a crash never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from toollmm.config import RunConfig, config_from_dict, resolve_path
from toollmm.model.toollmm import ToolLMM, build_model, load_trainable_state, trainable_state_dict
from toollmm.tokenization import PromptTokenizer, load_tokenizer

WEIGHTS = "trainable.safetensors"
META = "checkpoint.json"


def base_identity(model: ToolLMM, config: RunConfig) -> dict:
    llm_config = model.llm.config
    return {
        "llm_path": config.model.llm_path,
        "model_type": llm_config.model_type,
        "vocab_size": llm_config.vocab_size,
        "hidden_size": llm_config.hidden_size,
        "num_hidden_layers": llm_config.num_hidden_layers,
    }


def save_checkpoint(
    out_dir: Path, model: ToolLMM, config: RunConfig, tokenizer: PromptTokenizer, progress: dict, encoder_identity: str
) -> Path:
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state_dict(model), tmp / WEIGHTS, metadata={"format": "toollmm"})
    if config.model.tuning == "lora":
        model.llm.save_pretrained(tmp / "adapter")
    (tmp / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tokenizer.save_pretrained(tmp / "tokenizer")
    meta = {
        "base_model": base_identity(model, config),
        "encoder": encoder_identity,
        "stage": config.train.stage,
        **progress,
    }
    (tmp / META).write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def read_checkpoint_config(ckpt_dir: Path) -> tuple[RunConfig, dict]:
    ckpt_dir = Path(ckpt_dir)
    missing = [name for name in (WEIGHTS, META, "config.yaml") if not (ckpt_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{ckpt_dir} is not a Tool_LMM checkpoint: missing {', '.join(missing)}. "
            "Pass a folder written by training (ckpt/<run>/checkpoint-<step> or ckpt/<run>/final)."
        )
    config = config_from_dict(RunConfig, yaml.safe_load((ckpt_dir / "config.yaml").read_text()))
    meta = json.loads((ckpt_dir / META).read_text())
    return config, meta


def load_checkpoint(
    ckpt_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, llm_path: str | None = None
) -> tuple[ToolLMM, PromptTokenizer, RunConfig, dict]:
    """Base LLM + the checkpoint's trainable weights, checked against the base it is put on."""
    ckpt_dir = Path(ckpt_dir)
    config, meta = read_checkpoint_config(ckpt_dir)
    if llm_path is not None:
        config.model.llm_path = llm_path
    tokenizer = load_tokenizer(ckpt_dir / "tokenizer")
    state = load_file(ckpt_dir / WEIGHTS)
    encoder_dim = state["input_projector.weight"].shape[1]
    model = build_model(config.model, encoder_dim, dtype=dtype)
    expected, actual = meta["base_model"], base_identity(model, config)
    differences = [f"{k}: checkpoint {expected[k]} vs base {actual[k]}" for k in expected if k != "llm_path" and expected[k] != actual[k]]
    if differences:
        raise ValueError(
            f"{ckpt_dir} was trained on {expected['llm_path']}, which differs from the base at "
            f"{resolve_path(config.model.llm_path)}: " + "; ".join(differences) + ". Pass the base it was trained on."
        )
    load_trainable_state(model, state, config.model.tuning, ckpt_dir / WEIGHTS)
    return model.to(device).eval(), tokenizer, config, meta
