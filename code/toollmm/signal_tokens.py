"""Signal tokens (NExT-GPT): the added vocabulary that lets the LLM ask for an image, a video or a sound.

``<Img>`` and ``</Img>`` (around a media slot) and one run per output modality:
``[IMG0]..[IMG3]``, ``[VID0]..[VID23]``, ``[AUD0]..[AUD7]`` (prefixes from
``toollmm.output_modalities``, lengths from ``model.outputs.<modality>.signal_tokens``). They are
appended to the tokenizer in this order, so their ids follow the base vocabulary and every
run's ids are consecutive.

A *run* is the full sequence ``[X0] .. [Xn-1]`` in an answer; the output projector reads the
LLM states at its positions. Runs cut short (by ``max_tgt_len`` truncation or in the data)
cannot feed the projector: ``check_runs`` finds them so the data layer can count and skip
them instead of failing later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toollmm.config import OutputsConfig
from toollmm.output_modalities import OUTPUT_MODALITIES

WRAPPERS = ("<Img>", "</Img>")


def run_names(modality: str, length: int) -> list[str]:
    """``[IMG0]`` .. ``[IMG<length-1>]`` for the image (the registry's prefix of each modality)."""
    prefix = OUTPUT_MODALITIES[modality].token_prefix
    return [f"[{prefix}{i}]" for i in range(length)]


def token_names(outputs: OutputsConfig) -> list[str]:
    names = list(WRAPPERS)
    for modality in OUTPUT_MODALITIES:
        names += run_names(modality, outputs.modality(modality).signal_tokens)
    return names


def run_text(modality: str, length: int) -> str:
    """The run as text, tokens separated by spaces as the published data writes them."""
    return " ".join(run_names(modality, length))


@dataclass
class SignalTokens:
    base_vocab_size: int
    """Rows of the LLM's embedding before the tokens were added: the rows that stay frozen."""
    ids: dict[str, list[int]]
    """Run ids per output modality, in order."""
    names: list[str]

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.names)

    def to_dict(self) -> dict:
        return {"base_vocab_size": self.base_vocab_size, "tokens": {n: self.base_vocab_size + i for i, n in enumerate(self.names)}}


def add_signal_tokens(tokenizer, outputs: OutputsConfig) -> SignalTokens:
    """Add the tokens to ``tokenizer`` (a ``PromptTokenizer``) unless it has them already
    (a checkpoint's tokenizer), and check they sit right after the base vocabulary."""
    names = token_names(outputs)
    vocab = tokenizer.hf.get_vocab()
    present = [n for n in names if n in vocab]
    if present and len(present) != len(names):
        raise ValueError(
            f"the tokenizer has {len(present)} of the {len(names)} signal tokens this config needs "
            f"(e.g. missing {[n for n in names if n not in vocab][:3]}): it was saved with other "
            "model.outputs.*.signal_tokens counts; use that config or the base tokenizer."
        )
    if not present:
        tokenizer.add_tokens(names)
        vocab = tokenizer.hf.get_vocab()
    base = vocab[names[0]]
    if len(tokenizer) - base != len(names):
        raise ValueError(
            f"the tokenizer holds {len(tokenizer) - base} added tokens but this config has {len(names)} signal tokens: "
            "it was saved with other model.outputs.*.signal_tokens counts; use that config or the base tokenizer."
        )
    if [vocab[n] for n in names] != list(range(base, base + len(names))):
        raise ValueError("the signal tokens are not the last, consecutive ids of the tokenizer; re-save it from the base tokenizer")
    ids = {m: [vocab[n] for n in run_names(m, outputs.modality(m).signal_tokens)] for m in OUTPUT_MODALITIES}
    return SignalTokens(base_vocab_size=base, ids=ids, names=names)


def find_runs(labels: torch.Tensor, run_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, start) of every complete run in ``labels`` (input-aligned), row-major order.

    Raises ``ValueError`` on an incomplete run: the data layer (``check_runs``) drops those
    before batching, so one here means the batch was built elsewhere.
    """
    rows, starts = (labels == run_ids[0]).nonzero(as_tuple=True)
    length = len(run_ids)
    if len(rows):
        offsets = torch.arange(length, device=labels.device)
        positions = (starts[:, None] + offsets).clamp(max=labels.shape[1] - 1)
        expected = torch.tensor(run_ids, device=labels.device)
        complete = (labels[rows[:, None], positions] == expected).all(1) & (starts + length <= labels.shape[1])
        if not complete.all():
            row = int(rows[~complete][0])
            raise ValueError(f"batch row {row}: a signal-token run starting with id {run_ids[0]} is incomplete")
    return rows, starts


def check_runs(labels: list[int], signal: SignalTokens) -> str | None:
    """Why an example's signal tokens cannot feed the projectors (a run cut short or out of order), or None."""
    for modality, run in signal.ids.items():
        if not run:
            continue
        members = set(run)
        i = 0
        while i < len(labels):
            if labels[i] in members:
                if labels[i : i + len(run)] != run:
                    return f"incomplete {modality} signal-token run"
                i += len(run)
            else:
                i += 1
    return None
