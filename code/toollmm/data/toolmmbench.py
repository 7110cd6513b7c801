"""ToolMMBench rows (the published schema) → validated ``Record`` objects.

Training files name one tool per row (a query with several acceptable tools appears once
per tool); evaluation files name a list of acceptable tools. Both read into ``Record``
with a ``tools`` list. Rows that cannot be used are counted by reason in a
``DataReport`` — never dropped silently, never a crash.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from toollmm.evaluate import normalize_ambiguity, normalize_flag
from toollmm.modalities import MODALITIES

log = logging.getLogger(__name__)

INPUT_MODALITIES = ("text", *MODALITIES)


@dataclass(frozen=True)
class MediaRef:
    modality: str
    path: Path


@dataclass
class Record:
    id: str
    """``<file stem>:<input modality>/<row id>``: published ids repeat across modalities."""
    query: str
    tools: list[str]
    """Acceptable tools as the row writes them (28 evaluation rows have a leading space): one
    for training rows, one or more for evaluation rows. ``data.tool_names: stripped`` strips them."""
    input_modality: str
    media: list[MediaRef] = field(default_factory=list)
    """Media that exist on disk. Empty for text rows and for missing media used text-only."""
    media_keys: tuple[str, ...] = ()
    """The row's media paths as written: with the query, they identify the request."""
    ambiguity: object = -1
    ifambiguity: bool | None = None
    onetomulti: bool | None = None
    source: str = ""
    """The data file the row came from (``data.sampling: published`` draws each micro-batch from one file)."""

    @property
    def request_key(self) -> tuple[str, tuple[str, ...]]:
        return (self.query, self.media_keys)


@dataclass
class DataReport:
    """Rows read, used and skipped, with reasons and a few examples of each."""

    rows: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    text_only: int = 0
    """Rows whose media is missing, used without it (data.missing_media=text_only)."""
    by_modality: Counter = field(default_factory=Counter)
    """Rows used, by input modality (text, image, audio, video)."""
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def note(self, reason: str, example: str) -> None:
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(example)

    def merge(self, other: "DataReport") -> None:
        self.rows += other.rows
        self.used += other.used
        self.skipped.update(other.skipped)
        self.text_only += other.text_only
        self.by_modality.update(other.by_modality)
        for reason, items in other.examples.items():
            for item in items:
                self.note(reason, item)

    def summary(self) -> str:
        lines = [f"{self.rows} rows read, {self.used} used"]
        if self.by_modality:
            lines[0] += " (" + ", ".join(f"{m} {n}" for m, n in sorted(self.by_modality.items())) + ")"
        if self.text_only:
            lines.append(f"  {self.text_only} used text-only because their media file is missing")
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  {count} skipped: {reason}")
        for reason, items in sorted(self.examples.items()):
            for item in items:
                lines.append(f"    e.g. [{reason}] {item}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "used": self.used,
            "text_only": self.text_only,
            "by_modality": dict(self.by_modality),
            "skipped": dict(self.skipped),
            "examples": dict(self.examples),
        }


def read_json_rows(path: Path, what: str) -> tuple[list, bool]:
    """A data file's JSON list, and whether its bytes were not valid UTF-8.

    Undecodable bytes become U+FFFD so the rest of the file stays readable; the readers then
    skip (and count) the rows that hold one. A file that is not a JSON list at all raises a
    ``DataFileError`` naming it (the caller counts and skips the file).
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise DataFileError(f"{path}: cannot be read ({err.strerror}); expected a JSON list of {what}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataFileError(f"{path}: UTF-16 text; save it as UTF-8 (a JSON list of {what})")
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
    try:
        text, lossy = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, lossy = raw.decode("utf-8", errors="replace"), True
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (one JSON value a line? that is JSON Lines: wrap the rows in one list)" if err.msg == "Extra data" else ""
        raise DataFileError(f"{path}: not valid JSON ({err}){hint}; expected a list of {what}") from None
    except RecursionError:
        raise DataFileError(f"{path}: JSON nested too deeply to read; expected a flat list of {what}") from None
    if not isinstance(rows, list):
        raise DataFileError(f"{path}: expected a JSON list of {what}, got {'null' if rows is None else type(rows).__name__}")
    return rows, lossy


NOT_UTF8 = "text is not valid UTF-8"


def has_replacement(row) -> bool:
    """Whether a row read from a non-UTF-8 file holds one of the replaced bytes."""
    return "\ufffd" in json.dumps(row, ensure_ascii=False)


def media_path(media_root: Path, value: str, folder: str = "") -> Path | None:
    """``media_root / folder / value`` when it stays inside ``media_root`` (links resolved), else
    None: a data file may not point at ``../../etc/passwd``, an absolute path or a link out."""
    root = Path(media_root).resolve()
    path = (root / folder / value).resolve()
    return path if path.is_relative_to(root) else None


OUTSIDE_ROOT = "media path outside media_root"


class DataFileError(ValueError):
    """A whole data file is unreadable (not JSON, not a list)."""


UNREADABLE_FILE = "unreadable data file (whole file)"


def skip_file(report: "DataReport", err: DataFileError) -> None:
    """Count a data file that cannot be read at all; training goes on with the other files."""
    log.error("skipped a whole data file: %s", err)
    report.skipped[UNREADABLE_FILE] += 1
    report.note(UNREADABLE_FILE, str(err))


class MissingMediaError(FileNotFoundError):
    pass


def _problem(row) -> str | None:
    """Why a row cannot be read, or None."""
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, not an object"
    turns = row.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return "'conversations' missing or shorter than 2 turns"
    if not all(isinstance(t, dict) and "value" in t for t in turns[:2]):
        return "a turn lacks 'value'"
    query = turns[0]["value"]
    if not isinstance(query, str) or not query.strip():
        return "empty or non-string query (conversations[0].value)"
    answer = turns[1]["value"]
    if isinstance(answer, str):
        answer = [answer]
    if not isinstance(answer, list) or not answer or not all(isinstance(t, str) and t.strip() for t in answer):
        return "tool (conversations[1].value) must be a non-empty string or list of strings"
    roles = [t.get("from") for t in turns[:2]]
    if roles[0] not in (None, "human") or roles[1] not in (None, "gpt"):
        return f"conversation roles are {roles}: the query comes 'from' 'human', the tool 'from' 'gpt'"
    if any("###" in t for t in answer):
        return "tool name holds '###', the prompt's turn marker (answers stop there)"
    try:
        normalize_ambiguity(row.get("ambiguity", turns[1].get("ambiguity", -1)))
        for flag in ("ifambiguity", "onetomulti"):
            normalize_flag(row.get(flag), flag)
    except ValueError as err:
        return str(err)
    modality = row.get("input_modality", turns[0].get("input_modality", "text"))
    if modality not in INPUT_MODALITIES:
        return f"input_modality {modality!r} is not one of {list(INPUT_MODALITIES)}"
    if modality != "text":
        path = row.get(MODALITIES[modality].row_key)
        if not isinstance(path, str) or not path:
            return f"input_modality is {modality} but '{MODALITIES[modality].row_key}' is empty"
    return None


def read_toolmmbench(
    path: Path, media_root: Path, missing_media: str = "skip", media_layout: str = "flat"
) -> tuple[list[Record], DataReport]:
    """Read one ToolMMBench JSON file. ``missing_media``: skip | text_only | error.
    ``media_layout``: flat (``media_root/<path>``) or published (per-modality subfolders, see
    ``DataFile.media_layout``)."""
    rows, lossy = read_json_rows(path, "ToolMMBench rows")
    report = DataReport(rows=len(rows))
    records = []
    # Rows name the same files again and again: resolve each (a walk of lstat calls) once per read.
    resolved: dict[str, Path | None] = {}
    for index, row in enumerate(rows):
        where = f"{path.name} row {index}" + (f" (id {row.get('id')})" if isinstance(row, dict) else "")
        if lossy and has_replacement(row):
            report.skipped[NOT_UTF8] += 1
            report.note(NOT_UTF8, where)
            continue
        problem = _problem(row)
        if problem:
            report.skipped["malformed row"] += 1
            report.note("malformed row", f"{where}: {problem}")
            continue
        turns = row["conversations"]
        tools = turns[1]["value"]
        tools = [tools] if isinstance(tools, str) else tools
        modality = row.get("input_modality", turns[0].get("input_modality", "text"))
        media_refs, media_keys, outside = [], [], None
        # Several media in one row are allowed (their features are summed, as the original did).
        for name, spec in MODALITIES.items():
            value = row.get(spec.row_key)
            if isinstance(value, str) and value:
                media_keys.append(f"{name}:{value}")
                folder = spec.published_folder if media_layout == "published" else ""
                if (folder, value) not in resolved:
                    resolved[folder, value] = media_path(media_root, value, folder)
                media_file = resolved[folder, value]
                if media_file is None:
                    outside = value
                media_refs.append(MediaRef(name, media_file))
        if outside is not None:
            report.skipped[OUTSIDE_ROOT] += 1
            report.note(OUTSIDE_ROOT, f"{where}: {outside!r} resolves outside {media_root}: refused")
            continue
        missing = [m for m in media_refs if not m.path.is_file()]
        if missing:
            if missing_media == "error":
                raise MissingMediaError(
                    f"{where}: media file {missing[0].path} is missing. Fix data.*_files media_root (and "
                    "media_layout: published for the authors' mm_dataset/ folder), or set "
                    "data.missing_media=skip or text_only."
                )
            report.note("missing media", f"{where}: {missing[0].path}")
            if missing_media == "skip":
                report.skipped["missing media"] += 1
                continue
            report.text_only += 1
            media_refs = [m for m in media_refs if m.path.is_file()]
        records.append(
            Record(
                id=f"{path.stem}:{modality}/{row.get('id', index)}",
                query=turns[0]["value"],
                tools=list(tools),
                input_modality=modality,
                media=media_refs,
                media_keys=tuple(media_keys),
                ambiguity=row.get("ambiguity", turns[1].get("ambiguity", -1)),
                ifambiguity=row.get("ifambiguity"),
                onetomulti=row.get("onetomulti"),
                source=str(path),
            )
        )
        report.used += 1
        report.by_modality[modality] += 1
    return records, report


def tool_catalogue(records: list[Record]) -> list[str]:
    """The union of tool names, whitespace-stripped (a tool's identity), sorted (``unknown``
    included when present)."""
    return sorted({tool.strip() for record in records for tool in record.tools})
