"""Examples (token ids with media slots + labels) and their collation into padded batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from toollmm.data.toolmmbench import MediaRef, Record
from toollmm.prompts import IGNORE_INDEX, build_example, format_answer
from toollmm.tokenization import PromptTokenizer


@dataclass
class Example:
    input_ids: torch.Tensor
    labels: torch.Tensor
    feature: torch.Tensor | None
    """The example's media feature (features of several media are summed, as the original did)."""
    record_id: str


def record_feature(record: Record, features: dict[MediaRef, torch.Tensor]) -> torch.Tensor | None:
    if not record.media:
        return None
    return torch.stack([features[ref] for ref in record.media]).sum(0)


class ToolDataset(torch.utils.data.Dataset):
    """(record, tool) pairs tokenized once up front; a few thousand rows take about a second."""

    def __init__(
        self,
        pairs: list[tuple[Record, str]],
        tokenizer: PromptTokenizer,
        features: dict[MediaRef, torch.Tensor],
        max_tgt_len: int,
    ):
        self.examples: list[Example] = []
        self.truncated = 0
        for record, tool in pairs:
            tokens = build_example(tokenizer, record.query, bool(record.media), format_answer(tool), max_tgt_len)
            self.truncated += tokens.truncated
            self.examples.append(
                Example(
                    input_ids=torch.tensor(tokens.input_ids),
                    labels=torch.tensor(tokens.labels),
                    feature=record_feature(record, features),
                    record_id=record.id,
                )
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


class Collator:
    """Right padding (pad = EOS, as the original), attention mask from the true lengths."""

    def __init__(self, pad_token_id: int, feature_dim: int):
        self.pad_token_id = pad_token_id
        self.feature_dim = feature_dim

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        input_ids = pad_sequence([e.input_ids for e in examples], batch_first=True, padding_value=self.pad_token_id)
        labels = pad_sequence([e.labels for e in examples], batch_first=True, padding_value=IGNORE_INDEX)
        lengths = torch.tensor([len(e.input_ids) for e in examples])
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        features = [e.feature for e in examples if e.feature is not None]
        slot_features = torch.stack(features) if features else torch.zeros(0, self.feature_dim)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "slot_features": slot_features,
        }
