"""The tool catalogue: its file of tool entries (a name and what is known about the tool), a
prefix trie over the tokenized answers, and the logits processor that keeps generation inside it.

Every catalogue tool ``t`` has one answer, ``tokenizer.encode(format_answer(t))`` — the
exact token ids the model was trained on (the answer segment is encoded on its own, see
``toollmm.prompts``). Generation restricted to paths of this trie can only produce
``{'api_name': <catalogue member>}\\n###``: well-formed, and never a hallucinated name.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
from transformers import LogitsProcessor

from toollmm.modalities import MODALITIES
from toollmm.prompts import format_answer, parse_answer
from toollmm.tokenization import PromptTokenizer


class AnswerTrie:
    """Prefix trie over the token ids of every catalogue answer.

    Nodes are integers (0 is the root); ``children[node]`` maps a token id to the next node
    and a leaf (a node without children) ends exactly one answer, ``tool_at[node]``.
    """

    def __init__(self, tokenizer: PromptTokenizer, tools: Sequence[str]):
        if not tools:
            raise ValueError("The tool catalogue is empty: constrained decoding needs at least one tool name.")
        self.tools = list(tools)
        unparsable = [tool for tool in self.tools if parse_answer(format_answer(tool)) != tool]
        if unparsable:
            raise ValueError(f"Tool names {unparsable[:5]} would not read back from their answer (parse_answer strips "
                             "surrounding spaces and quotes, and a name may not contain braces or newlines): fix the catalogue.")
        self.sequences = [tokenizer.encode(format_answer(tool)) for tool in self.tools]
        self.children: list[dict[int, int]] = [{}]
        self.tool_at: dict[int, int] = {}
        for index, ids in enumerate(self.sequences):
            node = 0
            for token in ids:
                if node in self.tool_at:
                    raise ValueError(self._prefix_error(self.tool_at[node], index))
                child = self.children[node].get(token)
                if child is None:
                    child = len(self.children)
                    self.children.append({})
                    self.children[node][token] = child
                node = child
            if node in self.tool_at:
                other = self.tools[self.tool_at[node]]
                raise ValueError(f"Tools {other!r} and {self.tools[index]!r} tokenize to the same answer; remove one from the catalogue.")
            if self.children[node]:
                raise ValueError(self._prefix_error(index, self._any_tool_below(node)))
            self.tool_at[node] = index
        # only_answer[node]: the one answer below a node whose subtree holds a single answer, else
        # -1. Past such a node every token is forced, so greedy or sampled decoding can stop there.
        self.only_answer = [-1] * len(self.children)
        below = [0] * len(self.children)
        for node in reversed(range(len(self.children))):  # children are numbered after their parent
            below[node] = (node in self.tool_at) + sum(below[child] for child in self.children[node].values())
            if below[node] == 1:
                self.only_answer[node] = self.tool_at.get(node, -1)
                if node not in self.tool_at:
                    (child,) = self.children[node].values()
                    self.only_answer[node] = self.only_answer[child]

    def _prefix_error(self, short: int, long: int) -> str:
        return (f"The answer of tool {self.tools[short]!r} is a token prefix of the answer of {self.tools[long]!r}: "
                "decoding could not tell where one stops. Tool names must not contain '}' or newlines.")

    def _any_tool_below(self, node: int) -> int:
        while node not in self.tool_at:
            node = next(iter(self.children[node].values()))
        return self.tool_at[node]

    def __len__(self) -> int:
        return len(self.tools)

    @property
    def max_length(self) -> int:
        """Tokens in the longest answer."""
        return max(len(ids) for ids in self.sequences)

    @property
    def common_prefix(self) -> list[int]:
        """Token ids every answer starts with (``{'api_name':`` and whatever the tokenizer merges),
        never a whole answer."""
        prefix, node = [], 0
        while len(self.children[node]) == 1 and node not in self.tool_at:
            (token, child), = self.children[node].items()
            if child in self.tool_at:
                break
            prefix.append(token)
            node = child
        return prefix

    def decision_length(self, start_tokens: Sequence[int] = ()) -> int:
        """Tokens after ``start_tokens`` until the longest answer is decided (its node holds one
        answer): the most decoding steps that ``TrieLogitsProcessor(stop_when_decided=True)`` takes
        before its EOS."""
        start = self.walk(start_tokens)
        longest, frontier = 0, [(start, 0)]
        while frontier:
            node, depth = frontier.pop()
            if self.only_answer[node] >= 0:
                longest = max(longest, depth)
            else:
                frontier.extend((child, depth + 1) for child in self.children[node].values())
        return longest

    def walk(self, tokens: Sequence[int], stop_when_decided: bool = False) -> int:
        """The node reached by ``tokens`` from the root; tokens after a leaf (EOS, padding) are ignored,
        and with ``stop_when_decided``, tokens after a node that holds a single answer.

        Raises ``KeyError`` for a path that leaves the trie.
        """
        node = 0
        for token in tokens:
            if node in self.tool_at or (stop_when_decided and self.only_answer[node] >= 0):
                break
            node = self.children[node][token]
        return node

    def tool_for(self, tokens: Sequence[int]) -> str:
        """The tool whose answer ``tokens`` spell (followed by anything); ``ValueError`` if none."""
        try:
            node = self.walk(tokens)
        except KeyError:
            node = -1
        if node not in self.tool_at:
            raise ValueError(f"token ids {list(tokens)} do not spell a whole catalogue answer")
        return self.tools[self.tool_at[node]]

    def tool_decided_by(self, tokens: Sequence[int]) -> str:
        """The one tool whose answer starts with ``tokens`` up to a node that holds a single answer
        (what ``stop_when_decided`` decoding leaves); ``ValueError`` if the tokens decide none."""
        try:
            node = self.walk(tokens, stop_when_decided=True)
        except KeyError:
            node = -1
        if node < 0 or self.only_answer[node] < 0:
            raise ValueError(f"token ids {list(tokens)} do not decide a catalogue answer")
        return self.tools[self.only_answer[node]]


class TrieTensors:
    """The trie's edges as tensors on one device, so a batch walks it without Python per row.

    Edges are sorted by ``(node, token)``, so a node's outgoing edges are one contiguous run
    ``[first[node], first[node + 1])`` and an edge is found by binary search on
    ``node * STRIDE + token``.
    """

    STRIDE = 1 << 32  # above any token id: keys of different nodes never collide

    def __init__(self, trie: AnswerTrie, device: torch.device, stop_when_decided: bool = False):
        edges = sorted((node, token, child) for node, children in enumerate(trie.children) for token, child in children.items())
        nodes, tokens, childs = (torch.tensor(column, dtype=torch.long) for column in zip(*edges))
        self.keys = (nodes * self.STRIDE + tokens).to(device)
        self.tokens, self.child = tokens.to(device), childs.to(device)
        counts = torch.bincount(nodes, minlength=len(trie.children))
        self.first = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device)
        # Where a row's answer ends: its leaf, or with stop_when_decided the first node below
        # which only one answer remains.
        if stop_when_decided:
            self.stop = torch.tensor(trie.only_answer) >= 0
        else:
            self.stop = torch.zeros(len(trie.children), dtype=torch.bool)
            self.stop[list(trie.tool_at)] = True
        self.stop = self.stop.to(device)

    def walk(self, tokens: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Node reached by each row of ``tokens`` (rows, steps) from node ``start`` and whether the
        row stayed in the trie; tokens after a stop node (EOS, padding) are ignored, as in ``AnswerTrie.walk``."""
        node = torch.full((tokens.shape[0],), start, dtype=torch.long, device=tokens.device)
        valid = torch.ones_like(node, dtype=torch.bool)
        for step in range(tokens.shape[1]):
            key = node * self.STRIDE + tokens[:, step]
            edge = torch.searchsorted(self.keys, key).clamp_(max=len(self.keys) - 1)
            found = self.keys[edge] == key
            moving = ~self.stop[node]
            valid &= found | ~moving
            node = torch.where(moving & found, self.child[edge], node)
        return node, valid

    def allowed(self, node: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, token) index pairs of every edge out of each row's node."""
        start, counts = self.first[node], self.first[node + 1] - self.first[node]
        rows = torch.repeat_interleave(torch.arange(len(node), device=node.device), counts)
        offsets = torch.arange(len(rows), device=node.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        return rows, self.tokens[start[rows] + offsets]


class TrieLogitsProcessor(LogitsProcessor):
    """Allows only tokens that continue a catalogue answer; after the answer's last token, only EOS.

    ``input_ids`` as ``generate`` passes them: with ``inputs_embeds`` and no ``input_ids``, only
    the generated tokens (shape ``(rows, 0)`` at the first step, left padding or not), which is
    ``prompt_length=0``; pass the prompt length when generating from ``input_ids``. The walk
    starts from the root for every row at every step, so beam search may reorder rows freely.
    It runs on the scores' device: a Python walk per row cost as much as the 7B model's
    decoding step at batch 256 (over a 900-way branch, 230k allowed pairs per step).

    Finished rows get EOS at score 0 (probability 1): with beam search the trailing EOS then
    adds nothing, and a beam's score is exactly log p(answer | prompt).

    ``answer_prefix``: answer tokens already fed with the prompt (``generate_responses`` feeds
    ``trie.common_prefix``); the walk over the generated tokens starts where they lead.

    ``stop_when_decided``: EOS as soon as one answer remains below a row's node, instead of
    decoding its forced tokens (``trie.tool_decided_by`` reads the answer). Greedy and sampled
    answers are unchanged (a forced token has probability 1), and a batch decodes until its
    rows are decided, not until their longest answer is spelt: on the bundled 926-tool
    catalogue, at most 24 steps instead of 38. Not for beam search, whose scores must count
    every answer token.
    """

    def __init__(self, trie: AnswerTrie, eos_token_id: int, prompt_length: int = 0, answer_prefix: Sequence[int] = (),
                 stop_when_decided: bool = False):
        self.trie = trie
        self.eos_token_id = eos_token_id
        self.prompt_length = prompt_length
        self.answer_prefix = list(answer_prefix)
        self.stop_when_decided = stop_when_decided
        self._start = trie.walk(self.answer_prefix)
        if self._start in trie.tool_at:
            raise ValueError(f"answer_prefix {self.answer_prefix} is a whole answer: nothing is left to generate")
        self._tensors: TrieTensors | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._tensors is None or self._tensors.keys.device != scores.device:
            self._tensors = TrieTensors(self.trie, scores.device, self.stop_when_decided)
        generated = input_ids[:, self.prompt_length :]
        node, valid = self._tensors.walk(generated, self._start)
        if not bool(valid.all()):
            tokens = self.answer_prefix + generated[int((~valid).nonzero()[0, 0])].tolist()
            raise ValueError(
                f"generated tokens {tokens} left the answer trie: generate passed the prompt too? "
                "Set TrieLogitsProcessor(prompt_length=...) to the prompt's token count."
            )
        rows, tokens = self._tensors.allowed(node)
        mask = torch.full_like(scores, float("-inf"))
        mask[rows, tokens] = 0.0
        done = self._tensors.stop[node]
        only_eos = torch.full_like(mask[:1], float("-inf"))
        only_eos[0, self.eos_token_id] = 0.0
        return torch.where(done[:, None], only_eos, scores + mask)


class CatalogueError(ValueError):
    """A catalogue file that cannot be read: the message names the file, the entry and the problem."""


@dataclass(frozen=True)
class ToolEntry:
    """One tool of a catalogue file. Only ``name`` is required; the rest is what is known about
    the tool, used by text matching (``toollmm.open_set``)."""

    name: str
    task: str = ""
    input_modalities: tuple[str, ...] = ()
    """Input modalities the tool serves: text, image, audio, video."""
    output_modality: str = ""
    description: str = ""
    tags: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    """Requests the tool serves (the bundled catalogue's: training queries only)."""

    def to_dict(self) -> dict:
        """The entry as a file writes it: the name and the fields that are set."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items() if value}


ENTRY_FIELDS = tuple(f.name for f in fields(ToolEntry))
LIST_FIELDS = ("input_modalities", "tags", "examples")
INPUT_MODALITIES = ("text", *MODALITIES)


def _entry(item: object, where: str) -> ToolEntry:
    """A file entry (an object, or a bare name string) as a ``ToolEntry``; ``CatalogueError`` names the problem."""
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise CatalogueError(f"{where}: is a {type(item).__name__}; expected an object with a 'name' (or a name string)")
    unknown = sorted(set(item) - set(ENTRY_FIELDS))
    if unknown:
        raise CatalogueError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(ENTRY_FIELDS)}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CatalogueError(f"{where}: 'name' is missing or empty; every entry names its tool")
    values = {}
    for key, value in item.items():
        if key in LIST_FIELDS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise CatalogueError(f"{where} ({name!r}): {key!r} must be a list of strings")
            value = tuple(value)
        elif not isinstance(value, str):
            raise CatalogueError(f"{where} ({name!r}): {key!r} is a {type(value).__name__}; expected a string")
        values[key] = value
    bad = [m for m in values.get("input_modalities", ()) if m not in INPUT_MODALITIES]
    if bad:
        raise CatalogueError(f"{where} ({name!r}): input modality {bad[0]!r} is not one of {list(INPUT_MODALITIES)}")
    return ToolEntry(**{**values, "name": name.strip()})


def _json(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CatalogueError(f"{where}: not valid JSON ({err}); expected a JSON list of entries, or .jsonl with one a line") from None


def _file_items(path: Path) -> list[tuple[str, object]]:
    """(where, item) for each entry of a JSON list file or a JSON Lines file (``.jsonl``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CatalogueError(f"{path}: cannot be read ({err}); expected a catalogue file (JSON list or JSON Lines)") from None
    if Path(path).suffix == ".jsonl":
        return [(f"{path} line {n}", _json(line, f"{path} line {n}")) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    items = _json(text, str(path))
    if not isinstance(items, list):
        raise CatalogueError(f"{path}: a JSON {type(items).__name__}; expected a list of tool entries")
    return [(f"{path} entry {index}", item) for index, item in enumerate(items)]


def read_tool_entries(path: Path) -> list[ToolEntry]:
    """The entries of a catalogue file, in file order: a JSON list or JSON Lines (``.jsonl``) of
    objects with ``name`` and the optional ``ToolEntry`` fields, or of bare name strings (the
    ``catalogue.json`` that ``preprocess_dataset.py`` writes). Duplicate names are refused."""
    entries, first = [], {}
    for where, item in _file_items(path):
        entry = _entry(item, where)
        if entry.name in first:
            raise CatalogueError(f"{where}: duplicate name {entry.name!r} (first at {first[entry.name]})")
        first[entry.name] = where
        entries.append(entry)
    if not entries:
        raise CatalogueError(f"{path}: no tool entries; a catalogue names at least one tool")
    return entries


def load_catalogue(path: Path) -> list[str]:
    """The sorted tool names of a catalogue file (see ``read_tool_entries``)."""
    return sorted(entry.name for entry in read_tool_entries(path))


def describe_tools(names: Sequence[str], training: Sequence, examples: int = 3) -> list[ToolEntry]:
    """Entries from what the training rows tell, nothing more: each tool's name, the input
    modalities of the training rows that answer it, and its first ``examples`` distinct training
    queries. A tool with no training row (an unseen tool) gets its name alone."""
    modalities, queries = defaultdict(set), defaultdict(list)
    for record in training:
        for tool in (tool.strip() for tool in record.tools):
            modalities[tool].add(record.input_modality)
            if len(queries[tool]) < examples and record.query not in queries[tool]:
                queries[tool].append(record.query)
    return [ToolEntry(name=name, input_modalities=tuple(sorted(modalities[name])), examples=tuple(queries[name]))
            for name in sorted(names)]


def write_tool_entries(path: Path, entries: Sequence[ToolEntry]) -> None:
    """A JSON Lines catalogue file, one entry a line (``read_tool_entries`` reads it back)."""
    Path(path).write_text("".join(json.dumps(entry.to_dict(), ensure_ascii=False) + "\n" for entry in entries))
