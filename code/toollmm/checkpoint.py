"""Self-describing checkpoints: trainable weights (safetensors), resolved config, tokenizer, base identity.

A checkpoint folder::

    trainable.safetensors   every trainable parameter, by its name in ToolLMM
    adapter/                the LoRA weights in PEFT's format (readable by other tools)
    config.yaml             the resolved run config
    tokenizer/              the tokenizer the model was trained with
    checkpoint.json         base model identity, stage, step, samples seen, encoder identity,
                            signal tokens and output-projector shape (what the next stage checks)

Folders are written under a temporary name and renamed when complete, so a crash never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import yaml
from safetensors.torch import load_file, save_file

from toollmm.config import RunConfig, apply_inference_overrides, config_from_dict, resolve_path
from toollmm.output_modalities import OUTPUT_MODALITIES

if TYPE_CHECKING:
    from toollmm.model.toollmm import ToolLMM
    from toollmm.tokenization import PromptTokenizer

# The model and tokenizer modules are imported where a model is built or saved: they bring in
# peft and transformers (3-4 s on a 2-core CPU), which reading a checkpoint's config (evaluate.py)
# does not need.

log = logging.getLogger(__name__)

WEIGHTS = "trainable.safetensors"
META = "checkpoint.json"


def base_identity(model: ToolLMM, config: RunConfig) -> dict:
    llm_config = model.llm.config
    return {
        "llm_path": config.model.llm_path,
        "model_type": llm_config.model_type,
        # The base vocabulary: the signal tokens are recorded on their own.
        "vocab_size": model.signal.base_vocab_size if model.signal is not None else llm_config.vocab_size,
        "hidden_size": llm_config.hidden_size,
        "num_hidden_layers": llm_config.num_hidden_layers,
        "fingerprint": getattr(model, "base_fingerprint", None),
    }


def outputs_identity(model: ToolLMM, config: RunConfig) -> dict | None:
    """Signal tokens and output-projector shape: what a later stage must share."""
    if model.signal is None:
        return None
    outputs = dataclasses.asdict(config.model.outputs)
    return {
        "signal_tokens": model.signal.to_dict(),
        "projector": outputs["projector"],
        "targets": {m: [outputs[m]["target_tokens"], outputs[m]["target_dim"]] for m in OUTPUT_MODALITIES},
    }


def save_checkpoint(
    out_dir: Path, model: ToolLMM, config: RunConfig, tokenizer: PromptTokenizer, progress: dict, encoder_identity: str
) -> Path:
    from toollmm.model.toollmm import checkpoint_state

    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(checkpoint_state(model), tmp / WEIGHTS, metadata={"format": "toollmm"})
    if "lora" in model.parts:  # stages 1-2 have no adapter: save_pretrained would write the whole base
        model.llm.save_pretrained(tmp / "adapter")
    (tmp / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tokenizer.save_pretrained(tmp / "tokenizer")
    meta = {
        "base_model": base_identity(model, config),
        "encoder": encoder_identity,
        "outputs": outputs_identity(model, config),
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


def non_finite(tensors) -> list[str]:
    """Names of the (name, tensor) pairs holding a NaN or an infinity."""
    return [name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]


def read_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights, or a clear error when the file is truncated, corrupt or not finite."""
    path = Path(ckpt_dir) / WEIGHTS
    earlier = sorted(p.name for p in Path(ckpt_dir).parent.glob("checkpoint-*") if p != Path(ckpt_dir))
    others = f" (this run also has {', '.join(earlier)})" if earlier else ""
    try:
        state = load_file(path)
    except Exception as err:  # safetensors reports a cut file as a header or buffer error
        raise ValueError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); use another checkpoint{others}.") from err
    bad = non_finite(state.items())
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]}): the weights of a "
                         f"diverged run; use another checkpoint{others}.")
    return state


def load_checkpoint(
    ckpt_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, llm_path: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[ToolLMM, PromptTokenizer, RunConfig, dict]:
    """Base LLM + the checkpoint's weights, checked against the base it is put on.
    ``attn_implementation``: the attention backend to answer with (default: the config's)."""
    from toollmm.model.toollmm import build_model, load_trainable_state
    from toollmm.signal_tokens import add_signal_tokens
    from toollmm.tokenization import load_tokenizer

    ckpt_dir = Path(ckpt_dir)
    config, meta = read_checkpoint_config(ckpt_dir)
    if llm_path is not None:
        config.model.llm_path = llm_path
    if config.model.attn_implementation == "flex_attention":
        # Flex attention pays for packed training rows (its block mask skips other examples'
        # tokens); answering runs padded prompts and a KV cache, where SDPA's kernels serve, and
        # FlexAttention has no CPU backward. Same weights, same maths (tests/test_packing.py).
        config.model.attn_implementation = "sdpa"
    if attn_implementation is not None:
        config.model.attn_implementation = attn_implementation
    state = read_weights(ckpt_dir)  # first: a cut or non-finite file stops before anything is built
    tokenizer = load_tokenizer(ckpt_dir / "tokenizer")
    signal = add_signal_tokens(tokenizer, config.model.outputs) if config.model.outputs.enabled else None
    encoder_dim = state["input_projector.weight"].shape[1]
    model = build_model(config.model, encoder_dim, dtype=dtype, stage=config.train.stage, signal=signal, device=device)
    check_compatible(meta, model, config, ckpt_dir)
    load_trainable_state(model, state, ckpt_dir / WEIGHTS)
    return model.to(device).eval(), tokenizer, config, meta


def load_for_inference(
    ckpt_dir: Path, device: torch.device | str, dtype: torch.dtype | str | None = None, overrides: Sequence[str] = ()
) -> tuple[ToolLMM, PromptTokenizer, RunConfig, dict]:
    """``load_checkpoint``, made ready to answer: the config's dtype on CUDA (fp32 on a CPU,
    unless ``dtype`` says otherwise), frozen, and LoRA folded into the base when the config's
    ``inference.merge_lora`` is on. ``overrides``: ``key=value`` settings over the checkpoint
    config's (``config.apply_inference_overrides``), checked before any model is built."""
    from toollmm.model.toollmm import TORCH_DTYPES, avoid_cudnn_attention

    device = torch.device(device)
    settings = apply_inference_overrides(read_checkpoint_config(ckpt_dir)[0], overrides)
    avoid_cudnn_attention(device)
    model, tokenizer, config, meta = load_checkpoint(ckpt_dir, device, llm_path=settings.model.llm_path,
                                                     attn_implementation=settings.inference.attn_implementation)
    config.inference = settings.inference
    if dtype is None:
        dtype = config.model.dtype if device.type == "cuda" else torch.float32
    model.to(TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype).requires_grad_(False)
    if config.inference.merge_lora:
        model.merge_lora()
    return model, tokenizer, config, meta


def check_compatible(meta: dict, model: ToolLMM, config: RunConfig, ckpt_dir: Path) -> None:
    """The checkpoint was trained on this base, with these signal tokens and output projectors."""
    expected, actual = meta["base_model"], base_identity(model, config)
    shape = [k for k in expected if k not in ("llm_path", "fingerprint")]
    differences = [f"{k}: checkpoint {expected[k]} vs base {actual.get(k)}" for k in shape if expected[k] != actual.get(k)]
    if not differences and None not in (expected.get("fingerprint"), actual["fingerprint"]) \
            and expected["fingerprint"] != actual["fingerprint"]:
        # Same shape, other weights: a LoRA delta on another fine-tune of the base answers, wrongly.
        message = (f"{ckpt_dir} was trained on {expected['llm_path']}, whose weights differ from the base at "
                   f"{resolve_path(config.model.llm_path)} (fingerprint {expected['fingerprint']} vs "
                   f"{actual['fingerprint']}), though their shapes agree")
        if config.model.base_check == "refuse":
            raise ValueError(message + ". Pass the base it was trained on, or set model.base_check=warn to load it anyway.")
        log.warning("%s; loading it anyway (model.base_check=warn)", message)
    if differences:
        raise ValueError(
            f"{ckpt_dir} was trained on {expected['llm_path']}, which differs from the base at "
            f"{resolve_path(config.model.llm_path)}: " + "; ".join(differences) + ". Pass the base it was trained on."
        )
    recorded, current = meta.get("outputs"), outputs_identity(model, config)
    if recorded != current:
        if recorded is None or current is None:
            what = "has no signal tokens" if recorded is None else "has signal tokens and output projectors"
            fix = "model.outputs.enabled=" + ("false" if recorded is None else "true")
            raise ValueError(f"{ckpt_dir} {what}, this config does not agree: set {fix} (or pass another checkpoint)")
        differences = [f"{k}: checkpoint {recorded[k]} vs config {current[k]}" for k in recorded if recorded[k] != current.get(k)]
        raise ValueError(
            f"{ckpt_dir} was trained with other signal tokens or output projectors: " + "; ".join(differences)
            + ". Use the model.outputs settings it was trained with."
        )


def load_initial_weights(model: ToolLMM, config: RunConfig, init_dir: Path) -> None:
    """Start a stage from the previous stage's checkpoint (``train.init_from``), after checking
    it matches: same base model, same signal tokens, same output projectors."""
    from toollmm.model.toollmm import load_trainable_state

    init_dir = Path(init_dir)
    _, meta = read_checkpoint_config(init_dir)
    check_compatible(meta, model, config, init_dir)
    if meta.get("stage") != config.train.stage - 1:
        log.warning("%s is a stage-%s checkpoint; stage %d usually starts from stage %d", init_dir, meta.get("stage"),
                    config.train.stage, config.train.stage - 1)
    fresh = load_trainable_state(model, read_weights(init_dir), init_dir / WEIGHTS, partial=True)
    log.info("initialised from %s (stage %s, step %s); %d tensors start fresh%s", init_dir, meta.get("stage"),
             meta.get("step"), len(fresh), f" (e.g. {fresh[0]})" if fresh else "")
