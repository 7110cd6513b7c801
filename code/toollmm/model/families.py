"""Which modules LoRA adapts in each LLM family (Hugging Face ``config.model_type``).

The published recipe puts LoRA on LLaMA's four attention projections; each row is the same
choice in that family's module names. ``model.lora.target_modules`` overrides the row (module
name suffixes, as PEFT matches them), and ``[all-linear]`` adapts every linear layer of the
decoder (PEFT's preset; the LM head stays frozen).
"""

from __future__ import annotations

from toollmm.config import LoraConfig

_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _QKVO,        # LLaMA 1/2, Vicuna (sentencepiece), Llama 3 (GQA, BPE), SmolLM2
    "mistral": _QKVO,
    "mixtral": _QKVO,
    "qwen2": _QKVO,        # q/k/v carry biases: LoRA adds beside them, the biases stay frozen
    "qwen3": _QKVO,
    "gemma": _QKVO,
    "gemma2": _QKVO,
    "phi3": ("qkv_proj", "o_proj"),        # q, k and v fused into one linear layer
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
}
ALL_LINEAR = "all-linear"


def lora_targets(config: LoraConfig, model_type: str) -> list[str] | str:
    """The ``target_modules`` PEFT gets: the config's override, else the family's row."""
    if config.target_modules is not None:
        if config.target_modules == [ALL_LINEAR]:
            return ALL_LINEAR  # PEFT expands the string only, not a list holding it
        return list(config.target_modules)
    if model_type not in LORA_TARGETS:
        raise ValueError(
            f"no LoRA target row for LLM family {model_type!r} (config.json model_type); known: {', '.join(sorted(LORA_TARGETS))}. "
            "Set model.lora.target_modules to its attention projections' names (e.g. [q_proj,k_proj,v_proj,o_proj]) "
            f"or to [{ALL_LINEAR}]"
        )
    return list(LORA_TARGETS[model_type])
