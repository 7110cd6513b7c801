"""The composed model: input projector + LLM (LoRA or fully tuned), and what trains.

The frozen encoder is not part of this module: its features are computed once and cached
(``toollmm.features``), so the training engine only ever sees the parts that can train.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from toollmm.config import ModelConfig, resolve_path
from toollmm.prompts import IGNORE_INDEX, MEDIA_SLOT_ID

log = logging.getLogger(__name__)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ToolLMM(nn.Module):
    def __init__(self, llm: nn.Module, input_projector: nn.Linear):
        super().__init__()
        self.llm = llm
        self.input_projector = input_projector

    def embed_inputs(self, input_ids: torch.Tensor, slot_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each media slot replaced by its projected feature.

        Slots are filled in row-major order: ``slot_features[i]`` goes to the i-th slot of
        the flattened batch.
        """
        slots = input_ids == MEDIA_SLOT_ID
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(slots, 0))
        n_slots = int(slots.sum())
        if n_slots:
            if slot_features is None or slot_features.shape[0] != n_slots:
                got = None if slot_features is None else slot_features.shape[0]
                raise ValueError(f"batch has {n_slots} media slots but {got} features")
            projected = self.input_projector(slot_features.to(self.input_projector.weight.dtype))
            embeds = embeds.clone()
            embeds[slots] = projected.to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        slot_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        embeds = self.embed_inputs(input_ids, slot_features)
        logits = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
        out = {"logits": logits}
        if labels is not None:
            out.update(causal_lm_loss(logits, labels))
        return out


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Next-token loss (mean over answer tokens) and token accuracy on the same positions."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        valid = shift_labels != IGNORE_INDEX
        correct = (shift_logits.argmax(-1) == shift_labels) & valid
        token_accuracy = correct.sum() / valid.sum().clamp(min=1)
    return {"loss": loss, "token_accuracy": token_accuracy}


def load_llm(config: ModelConfig, dtype: torch.dtype | None = None) -> nn.Module:
    path = resolve_path(config.llm_path)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or TORCH_DTYPES[config.dtype], attn_implementation=config.attn_implementation
    )


def build_model(config: ModelConfig, encoder_dim: int, dtype: torch.dtype | None = None) -> ToolLMM:
    """LLM from ``config.llm_path`` + LoRA (if ``tuning: lora``) + a fresh input projector."""
    llm = load_llm(config, dtype)
    if config.tuning == "lora":
        llm = get_peft_model(
            llm,
            PeftLoraConfig(
                task_type="CAUSAL_LM",
                r=config.lora.r,
                lora_alpha=config.lora.alpha,
                lora_dropout=config.lora.dropout,
                target_modules=list(config.lora.target_modules),
            ),
        )
    projector = nn.Linear(encoder_dim, llm.config.hidden_size).to(llm.dtype)
    model = ToolLMM(llm, projector)
    set_trainable(model, config.tuning)
    return model


def is_trainable(name: str, tuning: str) -> bool:
    """The one rule for what trains in stage 3: the input projector, plus LoRA weights
    (published recipe) or every LLM weight (tiny default)."""
    if name.startswith("input_projector."):
        return True
    if tuning == "lora":
        return ".lora_A." in name or ".lora_B." in name
    return name.startswith("llm.")


def set_trainable(model: ToolLMM, tuning: str) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, tuning))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)


def trainable_state_dict(model: ToolLMM) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: ToolLMM, state: dict[str, torch.Tensor], tuning: str, source: Path) -> None:
    """Load a checkpoint's trainable weights and check that exactly the frozen keys were missing."""
    expected = {name for name in model.state_dict() if is_trainable(name, tuning)}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: trainable weights do not match this model (tuning={tuning}). "
            f"Missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
            "Was the checkpoint trained with another model.tuning or LoRA target_modules?"
        )
    own = model.state_dict()
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}")
    model.load_state_dict(state, strict=False)
