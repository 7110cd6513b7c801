"""Raw published formats → one unified example format, with a validation report.

The unified format (``Example``; one JSON object per example, files are JSON lists)::

    {"id": "llava_rows/0",                    # <input file stem>/<row index in that file>
     "source": "llava:llava_rows",            # <format>:<input file stem>
     "task": "instruction",                   # tool_selection | instruction | caption
     "media": [{"modality": "image", "path": "coco/000001.jpg"}],   # relative to the input's media root
     "turns": [{"role": "user", "text": "What is in the picture?"},  # system | user | assistant
               {"role": "assistant", "text": "A cat."}],
     "tools": [],                             # tool_selection: every acceptable tool, else []
     "meta": {}}                              # format-specific extras kept verbatim (sorted keys)

- ``tool_selection`` rows have one user turn (the request); the answer is any of ``tools``.
  Published ToolMMBench training files repeat a request once per acceptable tool: those rows
  merge into one example whose ``tools`` is the union (counted as ``merged_rows``).
- ``caption`` rows have one assistant turn (the caption); the prompt is chosen at training.
- Media placeholders (``<image>`` in LLaVA) are removed from the text: ``media`` says what
  the example carries, and the prompt builder decides where it goes.

A **request** is what the model is asked: the user/system turns and the media (for tool rows
the same key as ``toollmm.data.toolmmbench.Record.request_key``, so a request lands on the same
side as in the ``--config`` split with the same seed). Splits are by request, and every row of
one request is on one side.

Each raw row ends in exactly one of: a new example, merged into an earlier tool example, or
dropped for the first problem found, checked in this order:

==================  ===========================================================================
``malformed``       not an object, a required key missing, a wrong type, turns out of order
``empty_field``     a required text (query, answer, caption, tool name, media path) is blank
``over_length``     the turns' texts together exceed ``max_chars`` characters (characters, not
                    tokens: the tokenizer is a training choice; ``data.max_tgt_len`` caps tokens)
``unknown_tool``    a tool row names a tool that is not in the given catalogue
``missing_media``   a media file is not under the media root (dropped unless ``missing_media=keep``,
                    counted either way; a path resolving outside the root is always dropped)
``duplicate``       the same example again (tool rows: the same request adding no new tool)
==================  ===========================================================================

A new format is one row reader registered in ``FORMATS``: it turns one raw row into an
``Example`` (with relative media paths) or raises ``RowProblem``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toollmm.data.split import in_test_split
from toollmm.data.toolmmbench import has_replacement, media_path, read_json_rows
from toollmm.modalities import MODALITIES

TASKS = ("tool_selection", "instruction", "caption")
ROLES = ("system", "user", "assistant")
PROBLEMS = ("malformed", "empty_field", "over_length", "unknown_tool", "missing_media", "duplicate")
EXAMPLES_PER_PROBLEM = 5


@dataclass(frozen=True)
class Example:
    """One unified example; ``to_json``/``from_json`` are its file form (see the module doc)."""

    id: str
    source: str
    task: str
    media: tuple[tuple[str, str], ...]
    """(modality, path relative to the input's media root), in ``MODALITIES`` order."""
    turns: tuple[tuple[str, str], ...]
    """(role, text), role one of ``ROLES``."""
    tools: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def request_key(self) -> tuple:
        asked = tuple(t for t in self.turns if t[0] != "assistant")
        if self.task == "tool_selection":
            return (asked[0][1], tuple(f"{m}:{p}" for m, p in self.media))
        return (self.task, asked, self.media)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "source": self.source,
            "task": self.task,
            "media": [{"modality": m, "path": p} for m, p in self.media],
            "turns": [{"role": r, "text": t} for r, t in self.turns],
            "tools": list(self.tools),
            "meta": dict(sorted(self.meta.items())),
        }

    @classmethod
    def from_json(cls, row: dict) -> "Example":
        return cls(
            id=row["id"], source=row["source"], task=row["task"],
            media=tuple((m["modality"], m["path"]) for m in row["media"]),
            turns=tuple((t["role"], t["text"]) for t in row["turns"]),
            tools=tuple(row["tools"]), meta=row.get("meta", {}),
        )


class RowProblem(ValueError):
    """A raw row that cannot become an example; ``kind`` is one of ``PROBLEMS``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class RowContext:
    """What a reader needs besides the row: the ``id`` and ``source`` it must give the example."""

    id: str
    source: str


# --------------------------------------------------------------------------- field helpers


def _require(row: Any, *keys: str) -> dict:
    if not isinstance(row, dict):
        raise RowProblem("malformed", f"row is a {type(row).__name__}, not an object")
    missing = [k for k in keys if k not in row]
    if missing:
        raise RowProblem("malformed", f"missing key(s) {missing}")
    return row


def _text(value: Any, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowProblem("malformed", f"{name} is a {type(value).__name__}, not a string")
    if not allow_empty and not value.strip():
        raise RowProblem("empty_field", f"{name} is empty")
    return value.strip()


# --------------------------------------------------------------------------- readers

Reader = Callable[[Any, RowContext], Example]
FORMATS: dict[str, Reader] = {}


def register(name: str) -> Callable[[Reader], Reader]:
    def add(reader: Reader) -> Reader:
        FORMATS[name] = reader
        return reader
    return add


@register("toolmmbench")
def read_toolmmbench_row(row: Any, ctx: RowContext) -> Example:
    """ToolMMBench as published: ``<modality>_path`` keys, ``conversations[0]`` the request,
    ``conversations[1].value`` one tool (training files) or a list of tools (evaluation)."""
    row = _require(row, "conversations")
    turns = row["conversations"]
    if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) and "value" in t for t in turns[:2]):
        raise RowProblem("malformed", "'conversations' must hold 2 turns with a 'value'")
    roles = [t.get("from") for t in turns[:2]]
    if roles[0] not in (None, "human") or roles[1] not in (None, "gpt"):
        raise RowProblem("malformed", f"conversation roles are {roles}: the query comes 'from' 'human', the tool 'from' 'gpt'")
    _text(turns[0]["value"], "conversations[0].value")
    query = turns[0]["value"]  # as written: the request key must equal Record.request_key
    tools = turns[1]["value"]
    tools = [tools] if isinstance(tools, str) else tools
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise RowProblem("malformed", "conversations[1].value must be a tool name or a list of them")
    if not tools or not all(t.strip() for t in tools):
        raise RowProblem("empty_field", "conversations[1].value has an empty tool name")
    modality = row.get("input_modality", turns[0].get("input_modality", "text"))
    media = []
    for name, spec in MODALITIES.items():
        path = row.get(spec.row_key, "")
        if not isinstance(path, str):
            raise RowProblem("malformed", f"{spec.row_key} is a {type(path).__name__}, not a string")
        if path:
            media.append((name, path))
    if modality != "text" and modality not in dict(media):
        if modality not in MODALITIES:
            raise RowProblem("malformed", f"input_modality {modality!r} is not text or one of {list(MODALITIES)}")
        raise RowProblem("empty_field", f"input_modality is {modality} but {MODALITIES[modality].row_key} is empty")
    meta = {"input_modality": modality, "ambiguity": row.get("ambiguity", turns[1].get("ambiguity", -1))}
    meta.update({k: row[k] for k in ("ifambiguity", "onetomulti") if k in row})
    return Example(ctx.id, ctx.source, "tool_selection", tuple(media), (("user", query),),
                   tuple(dict.fromkeys(t.strip() for t in tools)), meta)


_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@register("llava")
def read_llava_row(row: Any, ctx: RowContext) -> Example:
    """LLaVA instruction data: ``{"id", "image"?, "conversations": [{"from": "human"|"gpt",
    "value"}...]}`` with ``<image>`` in the first human turn. ``video``/``audio`` keys with
    ``<video>``/``<audio>`` are read the same way."""
    row = _require(row, "conversations")
    media = []
    for name in MODALITIES:
        if name in row:
            media.append((name, _text(row[name], f"'{name}'")))
    raw = row["conversations"]
    if not isinstance(raw, list) or len(raw) < 2:
        raise RowProblem("malformed", "'conversations' must be a list of at least 2 turns")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict) or turn.get("from") not in _LLAVA_ROLES or "value" not in turn:
            raise RowProblem("malformed", f"conversations[{i}] needs 'from' (human|gpt) and 'value'")
        text = _text(turn["value"], f"conversations[{i}].value", allow_empty=True)
        for name in MODALITIES:
            token = f"<{name}>"
            if token in text and name not in row:
                raise RowProblem("malformed", f"conversations[{i}] has {token} but the row has no '{name}' key")
            text = text.replace(token, "").strip()
        if not text:
            raise RowProblem("empty_field", f"conversations[{i}].value is empty")
        turns.append((_LLAVA_ROLES[turn["from"]], text))
    spoken = [r for r, _ in turns if r != "system"]
    if spoken[::2] != ["user"] * len(spoken[::2]) or spoken[1::2] != ["assistant"] * len(spoken[1::2]) \
            or spoken[-1] != "assistant":
        raise RowProblem("malformed", "turns must alternate human/gpt, starting with human and ending with gpt")
    meta = {"raw_id": row["id"]} if "id" in row else {}
    return Example(ctx.id, ctx.source, "instruction", tuple(media), tuple(turns), (), meta)


@register("alpaca")
def read_alpaca_row(row: Any, ctx: RowContext) -> Example:
    """Alpaca: ``{"instruction", "input", "output"}``; a non-empty input follows the instruction
    after a blank line (one user turn)."""
    row = _require(row, "instruction", "output")
    instruction = _text(row["instruction"], "instruction")
    extra = _text(row.get("input", ""), "input", allow_empty=True)
    output = _text(row["output"], "output")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return Example(ctx.id, ctx.source, "instruction", (), (("user", user), ("assistant", output)))


@register("videochat")
def read_videochat_row(row: Any, ctx: RowContext) -> Example:
    """VideoChat instruction data (OpenGVLab Ask-Anything): ``{"video"|"image": path,
    "QA": [{"i"?: instruction, "q": question, "a": answer}...], "start"?, "end"?}``. The first
    QA's non-empty ``i`` becomes a system turn; an empty ``q`` (caption data) adds no user turn.
    ``start``/``end`` (a clip of the video, seconds) are kept in ``meta``."""
    row = _require(row, "QA")
    keys = [k for k in ("video", "image") if k in row]
    if len(keys) != 1:
        raise RowProblem("malformed", "needs exactly one of 'video' or 'image'")
    media = ((keys[0], _text(row[keys[0]], f"'{keys[0]}'")),)
    qa = row["QA"]
    if not isinstance(qa, list):
        raise RowProblem("malformed", "'QA' is not a list")
    if not qa:
        raise RowProblem("empty_field", "'QA' is empty")
    turns = []
    for i, item in enumerate(qa):
        if not isinstance(item, dict) or "a" not in item:
            raise RowProblem("malformed", f"QA[{i}] needs 'a'")
        if i == 0 and _text(item.get("i", ""), "QA[0].i", allow_empty=True):
            turns.append(("system", item["i"].strip()))
        question = _text(item.get("q", ""), f"QA[{i}].q", allow_empty=True)
        if question:
            turns.append(("user", question))
        turns.append(("assistant", _text(item["a"], f"QA[{i}].a")))
    meta = {k: row[k] for k in ("start", "end") if k in row}
    return Example(ctx.id, ctx.source, "instruction", media, tuple(turns), (), meta)


_CAPTION_KEYS = {"image_name": "image", "video_name": "video", "audio_name": "audio"}


@register("caption-pairs")
def read_caption_pair_row(row: Any, ctx: RowContext) -> Example:
    """CC3M / WebVid / AudioCaps pair lists as NExT-GPT prepares them: ``{"caption",
    "image_name"|"video_name"|"audio_name", "id"|"audio_id"}``."""
    row = _require(row, "caption")
    keys = [k for k in _CAPTION_KEYS if k in row]
    if len(keys) != 1:
        raise RowProblem("malformed", f"needs exactly one of {list(_CAPTION_KEYS)}")
    path = _text(row[keys[0]], keys[0])
    caption = _text(row["caption"], "caption")
    raw_id = row.get("id", row.get("audio_id"))
    meta = {"raw_id": raw_id} if raw_id is not None else {}
    return Example(ctx.id, ctx.source, "caption", ((_CAPTION_KEYS[keys[0]], path),), (("assistant", caption),), (), meta)


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class Input:
    path: Path
    media_root: Path


@dataclass
class ConversionReport:
    """Counts by problem with a few examples each; every raw row is accounted for:
    ``rows == converted + merged_rows + sum(dropped)``."""

    format: str
    inputs: list[dict] = field(default_factory=list)
    rows: int = 0
    converted: int = 0
    merged_rows: int = 0
    problems: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBLEMS, 0))
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBLEMS, 0))
    problem_examples: dict[str, list[str]] = field(default_factory=lambda: {p: [] for p in PROBLEMS})
    settings: dict = field(default_factory=dict)
    split: dict = field(default_factory=dict)

    def note(self, kind: str, where: str, message: str, dropped: bool = True) -> None:
        self.problems[kind] += 1
        self.dropped[kind] += dropped
        if len(self.problem_examples[kind]) < EXAMPLES_PER_PROBLEM:
            self.problem_examples[kind].append(f"{where}: {message}")

    def to_dict(self) -> dict:
        return {
            "format": self.format, "inputs": self.inputs, "rows": self.rows, "converted": self.converted,
            "merged_rows": self.merged_rows, "problems": self.problems, "dropped": self.dropped,
            "problem_examples": self.problem_examples, "settings": self.settings, "split": self.split,
        }

    def summary(self) -> str:
        lines = [f"{self.rows} rows read → {self.converted} examples ({self.merged_rows} rows merged into them)"]
        for kind in PROBLEMS:
            if self.problems[kind]:
                lines.append(f"  {self.problems[kind]} {kind} ({self.dropped[kind]} dropped)")
                lines += [f"    e.g. {item}" for item in self.problem_examples[kind]]
        return "\n".join(lines)


class MissingMediaError(FileNotFoundError):
    pass


def load_rows(path: Path) -> list:
    """A JSON list, or JSON Lines (``.jsonl``). An unparseable line, or a row holding bytes that
    are not UTF-8, becomes a ``None`` row, reported as malformed."""
    if path.suffix != ".jsonl":
        rows, lossy = read_json_rows(path, "rows (or a .jsonl file)")
        return [None if lossy and has_replacement(row) else row for row in rows]
    raw = path.read_bytes()
    try:
        text, lossy = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, lossy = raw.decode("utf-8", errors="replace"), True
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(None if lossy and "\ufffd" in line else json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)
    return rows


def load_catalogue(path: Path) -> list[str]:
    """A JSON list of tool names (``catalogue.json`` of the ``--config`` mode) or one name a line."""
    text = path.read_text(encoding="utf-8")
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = text.splitlines()
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: a catalogue is a JSON list of tool names or one name per line")
    return [n.strip() for n in names if n.strip()]


def convert(
    format: str,
    inputs: list[Input],
    *,
    catalogue: list[str] | None = None,
    max_chars: int = 0,
    missing_media: str = "skip",
) -> tuple[list[Example], ConversionReport]:
    """Read every input with the format's reader; return the examples in input order.
    ``missing_media``: skip | keep | error. ``max_chars`` 0: no length limit."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known: {sorted(FORMATS)}")
    if missing_media not in ("skip", "keep", "error"):
        raise ValueError(f"missing_media must be skip, keep or error, not {missing_media!r}")
    stems = [i.path.stem for i in inputs]
    if len(set(stems)) != len(stems):
        raise ValueError(f"inputs share a file name ({stems}): example ids are <file stem>/<row>; rename one")
    reader, known = FORMATS[format], set(catalogue) if catalogue is not None else None
    report = ConversionReport(format)
    report.settings = {"max_chars": max_chars or None, "length_unit": "characters of all turn texts",
                       "missing_media": missing_media, "catalogue_size": None if catalogue is None else len(known)}
    examples: list[Example] = []
    by_request: dict[tuple, int] = {}  # tool rows: request → index in examples
    seen: set[tuple] = set()
    for source in inputs:
        rows = load_rows(source.path)
        report.inputs.append({"path": str(source.path), "media_root": str(source.media_root), "rows": len(rows)})
        report.rows += len(rows)
        for index, row in enumerate(rows):
            where = f"{source.path.name} row {index}"
            ctx = RowContext(id=f"{source.path.stem}/{index}", source=f"{format}:{source.path.stem}")
            try:
                example = reader(row, ctx)
            except RowProblem as problem:
                report.note(problem.kind, where, str(problem))
                continue
            length = sum(len(text) for _, text in example.turns)
            if max_chars and length > max_chars:
                report.note("over_length", where, f"{length} characters > max_chars {max_chars}")
                continue
            unknown = [t for t in example.tools if known is not None and t not in known]
            if unknown:
                report.note("unknown_tool", where, f"{unknown} not in the catalogue")
                continue
            outside = [p for _, p in example.media if media_path(source.media_root, p) is None]
            if outside:  # never kept: a data file may not point at ../../etc/passwd or a link out
                report.note("missing_media", where, f"{outside[0]!r} resolves outside {source.media_root}: refused")
                continue
            missing = [p for _, p in example.media if not (source.media_root / p).is_file()]
            if missing:
                if missing_media == "error":
                    raise MissingMediaError(f"{where}: {source.media_root / missing[0]} is missing. Fix --media-root, "
                                            "or pass --missing-media skip|keep to count such rows instead.")
                report.note("missing_media", where, str(source.media_root / missing[0]), missing_media == "skip")
                if missing_media == "skip":
                    continue
            if example.task == "tool_selection":
                key = example.request_key
                if key in by_request:
                    first = examples[by_request[key]]
                    new = [t for t in example.tools if t not in first.tools]
                    if not new:
                        report.note("duplicate", where, f"same request and tools as {first.id}")
                        continue
                    examples[by_request[key]] = Example(first.id, first.source, first.task, first.media, first.turns,
                                                        first.tools + tuple(new), first.meta)
                    report.merged_rows += 1
                    continue
                by_request[key] = len(examples)
            else:
                key = (example.task, example.media, example.turns)
                if key in seen:
                    report.note("duplicate", where, "same media and turns as an earlier row")
                    continue
                seen.add(key)
            examples.append(example)
    report.converted = len(examples)
    return examples, report


def split_examples(examples: list[Example], test_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """By request, with ``toollmm.data.split``'s assignment: it depends only on the request and
    the seed, so every example of one request is on one side and adding inputs moves nothing."""
    train, test = [], []
    for example in examples:
        (test if in_test_split(example.request_key, seed, test_fraction) else train).append(example)
    return train, test


def write_examples(path: Path, examples: list[Example]) -> None:
    path.write_text(json.dumps([e.to_json() for e in examples], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def load_examples(path: Path) -> list[Example]:
    return [Example.from_json(row) for row in json.loads(path.read_text(encoding="utf-8"))]
