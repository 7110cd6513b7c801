"""Batched answer generation: left padding, KV cache, greedy by default, per-sequence stop on ``\\n###``."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from toollmm.model.toollmm import ToolLMM
from toollmm.prompts import STOP_STRING
from toollmm.tokenization import PromptTokenizer


def left_pad(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    flipped = pad_sequence([s.flip(0) for s in sequences], batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(s) for s in sequences])
    mask = torch.arange(flipped.shape[1])[None, :] < lengths[:, None]
    return flipped.flip(1), mask.flip(1).long()


def cut_at_stop(text: str) -> str:
    """The response up to and including the first stop string (what the model answered)."""
    index = text.find(STOP_STRING)
    return text if index < 0 else text[: index + len(STOP_STRING)]


@torch.no_grad()
def generate_responses(
    model: ToolLMM,
    tokenizer: PromptTokenizer,
    prompts: list[torch.Tensor],
    features: list[torch.Tensor | None],
    batch_size: int = 16,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    show_progress: bool = True,
) -> list[str]:
    """One response per prompt (token ids with media slots), in input order.

    Prompts are batched by length so little compute goes to padding. Each sequence stops
    at its own ``\\n###``; sequences that finish early are padded while the rest go on.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[str] = [""] * len(prompts)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generate", disable=not show_progress, leave=False):
        input_ids, attention_mask = left_pad([prompts[i] for i in batch], tokenizer.pad_token_id)
        batch_features = [features[i] for i in batch if features[i] is not None]
        slot_features = torch.stack(batch_features).to(device) if batch_features else None
        embeds = model.embed_inputs(input_ids.to(device), slot_features)
        output = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            stop_strings=[STOP_STRING],
            tokenizer=tokenizer.hf,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            top_k=None,
            **sampling,
        )
        # With inputs_embeds and no input_ids, generate returns only the new tokens.
        for i, ids in zip(batch, output):
            responses[i] = cut_at_stop(tokenizer.decode(ids.tolist(), skip_special_tokens=True))
    return responses
