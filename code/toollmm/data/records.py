"""The one record type every data file reads into, the report of rows used and skipped, and
the row helpers the readers share.

A ``Record`` is what one row of a data file says, with its media resolved to files under the
file's media root. The readers (``toolmmbench.py``, ``captions.py``) fill the fields their
format has; the stage functions (``split.training_records``, ``stages.py``) then set what the
model learns from the record (``query``, ``answer``, ``target``), and ``dataset.py`` tokenizes
it into an ``Example``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Kind = Literal["tool_selection", "pairs", "comprehension", "generation"]


@dataclass(frozen=True)
class MediaRef:
    modality: str
    path: Path


@dataclass
class CaptionTarget:
    """A caption embedding, read when the example is batched (CC3M's would not fit in memory)."""

    modality: str
    store: object
    """The embeddings folder (``CaptionEmbeddingStore``)."""
    name: str


@dataclass
class Record:
    """One row of a data file, media resolved; a reader fills the fields its format has."""

    id: str
    """ToolMMBench: ``<file stem>:<input modality>/<row id>`` (published ids repeat across
    modalities); caption files: ``<file stem>/<row index>``."""
    query: str
    """The request: a ToolMMBench query, a caption file's human turn (media tag removed); empty
    for a caption pair. Stages 1-2 set it to what the model is asked."""
    answer: str = ""
    """What the model learns to answer, ending with the stop string; empty for a record that is
    only asked (evaluation). Set by ``split.training_records`` and ``stages.py``."""
    media: list[MediaRef] = field(default_factory=list)
    """Media that exist on disk. Empty for text rows and for missing media used text-only."""
    target: CaptionTarget | None = None
    """The caption embedding the answer's signal-token run is aligned to (stage 2, generation rows)."""
    source: str = ""
    """The data file the row came from (``data.sampling: published`` draws each micro-batch from one file)."""
    kind: Kind = "tool_selection"
    input_modality: str = "text"
    output_modality: str = "text"
    # ToolMMBench rows
    tools: list[str] = field(default_factory=list)
    """Acceptable tools as the row writes them (28 evaluation rows have a leading space): one
    for training rows, one or more for evaluation rows. ``data.tool_names: stripped`` strips them."""
    media_keys: tuple[str, ...] = ()
    """The row's media paths as written: with the query, they identify the request."""
    ambiguity: object = -1
    ifambiguity: bool | None = None
    onetomulti: bool | None = None
    # caption files (NExT-GPT layout)
    caption: str = ""
    """The caption of the row's medium (what its caption embedding encodes)."""
    response: str = ""
    """Generation rows: the assistant turn; the media tag marks the signal-token run."""
    embedding_name: str = ""
    """File name of the caption's embedding in the file's embeddings folder."""

    @property
    def request_key(self) -> tuple[str, tuple[str, ...]]:
        return (self.query, self.media_keys)

    @property
    def caption_modality(self) -> str:
        """Caption files: the modality of the medium the caption describes."""
        return self.output_modality if self.kind == "generation" else self.input_modality


@dataclass
class DataReport:
    """Rows read, used and skipped, with reasons and a few examples (file and row) of each."""

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

    def skip(self, reason: str, example: str) -> None:
        """Count a row skipped for ``reason``; ``example`` names the file and row."""
        self.skipped[reason] += 1
        self.note(reason, example)

    def drop(self, reason: str, example: str) -> None:
        """Count a row counted as used that a later step (decoding, tokenizing) could not use."""
        self.skip(reason, example)
        self.used -= 1

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


class DataFileError(ValueError):
    """A whole data file is unreadable (not JSON, not a list)."""


class MissingMediaError(FileNotFoundError):
    """A row names a media file that is not there, and the config says to stop (``missing_media: error``)."""


NOT_UTF8 = "text is not valid UTF-8"
OUTSIDE_ROOT = "media path outside media_root"
UNREADABLE_FILE = "unreadable data file (whole file)"


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


def has_replacement(row) -> bool:
    """Whether a row read from a non-UTF-8 file holds one of the replaced bytes."""
    return "\ufffd" in json.dumps(row, ensure_ascii=False)


def media_path(media_root: Path, value: str, folder: str = "") -> Path | None:
    """``media_root / folder / value`` when it stays inside ``media_root`` (links resolved), else
    None: a data file may not point at ``../../etc/passwd``, an absolute path or a link out."""
    root = Path(media_root).resolve()
    path = (root / folder / value).resolve()
    return path if path.is_relative_to(root) else None


def skip_file(report: DataReport, err: DataFileError) -> None:
    """Count a data file that cannot be read at all; training goes on with the other files."""
    log.error("skipped a whole data file: %s", err)
    report.skip(UNREADABLE_FILE, str(err))
