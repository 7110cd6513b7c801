"""The published MLLM-Tool prompt and answer format, and label masking.

One example is a list of *segments*. Each text segment is tokenized on its own, exactly
as the original did with the slow LLaMA tokenizer (one ``tokenizer(text,
add_special_tokens=False)`` call per segment, so every segment gets sentencepiece's
dummy-prefix space). A media segment is a single *slot* position whose embedding is the
projected encoder feature.

With media::

    <s> "### Human: <Img>" [slot] "</Img> {query}\\n### Assistant: " "{'api_name': {tool}}\\n###"

Text only::

    <s> "### Human: " "{query}\\n### Assistant: " "{'api_name': {tool}}\\n###"

The loss covers the answer segment only. The answer ends with ``\\n###``: the model learns
to open the next ``### Human:`` turn, and generation stops on that string (no EOS is
appended, as in the original).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from toollmm.data.records import CaptionTarget
    from toollmm.tokenization import PromptTokenizer

IGNORE_INDEX = -100
# Placeholder id for a media slot in ``input_ids`` (LLaVA's convention): never a real
# token, replaced by the projected feature before the LLM runs.
MEDIA_SLOT_ID = -200

HUMAN_WITH_MEDIA = "### Human: <Img>"
HUMAN_TEXT_ONLY = "### Human: "
AFTER_MEDIA = "</Img> "
ASSISTANT = "\n### Assistant: "
ANSWER_PREFIX = "{'api_name': "
ANSWER_SUFFIX = "}"
STOP_STRING = "\n###"
MODES = ("chat", "tool")
"""How a free prompt is answered (``toollmm.assistant``): chat generates freely, signal-token
runs becoming media; tool picks a catalogue tool."""


def format_answer(tool: str) -> str:
    """The training target for one tool, including the turn terminator."""
    return f"{ANSWER_PREFIX}{tool}{ANSWER_SUFFIX}{STOP_STRING}"


def prompt_segments(query: str, has_media: bool) -> list[str | None]:
    """Text segments of the human turn; ``None`` marks the media slot."""
    if has_media:
        return [HUMAN_WITH_MEDIA, None, f"{AFTER_MEDIA}{query}{ASSISTANT}"]
    return [HUMAN_TEXT_ONLY, f"{query}{ASSISTANT}"]


# An answer is well-formed when, after stripping surrounding whitespace and cutting at
# the first stop string, it is exactly ``{'api_name': NAME}`` with a non-empty NAME
# without braces or newlines. Quotes around NAME are tolerated and removed: some
# backbones quote it, and the name is the same tool either way.
_ANSWER_RE = re.compile(r"^\{\s*'api_name'\s*:\s*(?P<name>[^{}\n]+?)\s*\}$")


ANSWER_RULES = {"stop_string": "up to the first \\n### (ours)", "first_line": "first line (the original's inference.py)"}
"""How much of a response is read as the answer, with the label reports give each rule."""


def parse_answer(response: str, rule: str = "stop_string") -> str | None:
    """The tool name in a model response, or ``None`` when the format is invalid. ``rule``:
    stop_string reads up to the first ``\n###``; first_line reads the first line, as the
    original's inference.py kept it (a response that breaks the line before its stop string
    is then still read)."""
    if rule not in ANSWER_RULES:
        raise ValueError(f"answer rule {rule!r} is not one of {list(ANSWER_RULES)}")
    text = response.split(STOP_STRING if rule == "stop_string" else "\n", 1)[0].strip()
    match = _ANSWER_RE.match(text)
    if match is None:
        return None
    name = match.group("name").strip().strip("'\"").strip()
    return name or None


@dataclass
class Example:
    """One tokenized prompt: token ids with a media slot (``MEDIA_SLOT_ID``), labels
    (``IGNORE_INDEX`` outside the answer) and what the model reads besides the tokens.
    ``build_example`` fills the tokens; ``InstructionDataset`` the rest, from the record."""

    input_ids: "list[int] | torch.Tensor"
    """Lists from ``build_example``; tensors once in an ``InstructionDataset`` (collation pads them)."""
    labels: "list[int] | torch.Tensor"
    truncated: bool = False
    """The query and answer were cut at ``max_tgt_len``."""
    feature: "torch.Tensor | None" = None
    """The media feature for the slot (features of several media are summed, as the original did)."""
    target: "CaptionTarget | None" = None
    """The caption embedding its signal-token run is aligned to (stage 2, generation rows)."""
    target_value: "torch.Tensor | None" = None
    """``target`` read from its folder (filled when the example is fetched for a batch)."""
    record_id: str = ""
    """Bookkeeping, never a model input: the record it came from."""
    source: str = ""
    """Bookkeeping: the data file of its record (``PublishedBatchSampler`` groups by it)."""


def build_example(
    tokenizer: "PromptTokenizer",
    query: str,
    has_media: bool,
    answer: str | None,
    max_tgt_len: int,
) -> Example:
    """Token ids and labels for one example; ``answer=None`` builds a generation prompt.

    ``max_tgt_len`` caps the tokens after the media slot (query + answer), as the
    original's ``max_tgt_len`` did; the fixed prefix (BOS, ``### Human: <Img>``, slot)
    is not counted. Tokenizers without a BOS token (Qwen2) start with ``### Human:``.
    """
    segments = prompt_segments(query, has_media)
    prefix: list[int] = tokenizer.bos_ids()
    body: list[int] = []
    body_labels: list[int] = []
    for i, segment in enumerate(segments):
        if segment is None:
            prefix.append(MEDIA_SLOT_ID)
        elif i == 0:
            prefix += tokenizer.encode(segment)
        else:
            ids = tokenizer.encode(segment)
            body += ids
            body_labels += [IGNORE_INDEX] * len(ids)
    if answer is not None:
        ids = tokenizer.encode(answer)
        body += ids
        body_labels += ids
    truncated = len(body) > max_tgt_len
    body, body_labels = body[:max_tgt_len], body_labels[:max_tgt_len]
    return Example(
        input_ids=prefix + body,
        labels=[IGNORE_INDEX] * len(prefix) + body_labels,
        truncated=truncated,
    )
