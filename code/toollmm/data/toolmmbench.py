"""ToolMMBench rows (the published schema) → ``Record`` objects.

Training files name one tool per row (a query with several acceptable tools appears once
per tool); evaluation files name a list of acceptable tools. Both read into ``Record``
with a ``tools`` list. Rows that cannot be used are counted by reason in a
``DataReport`` — never dropped silently, never a crash.
"""

from __future__ import annotations

from pathlib import Path

from toollmm.data.records import (
    NOT_UTF8,
    OUTSIDE_ROOT,
    UNREADABLE_FILE,
    DataFileError,
    DataReport,
    MediaRef,
    MissingMediaError,
    Record,
    has_replacement,
    media_path,
    read_json_rows,
    skip_file,
)
from toollmm.evaluate import normalize_ambiguity, normalize_flag
from toollmm.modalities import MODALITIES

INPUT_MODALITIES = ("text", *MODALITIES)
# The record types and the report live in records.py; named here too, beside the reader that returns them.
__all__ = ["DataFileError", "DataReport", "MediaRef", "MissingMediaError", "Record", "NOT_UTF8", "OUTSIDE_ROOT",
           "UNREADABLE_FILE", "read_toolmmbench", "skip_file", "tool_catalogue"]


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
    """Read one ToolMMBench JSON file. ``missing_media``: skip | text_only | error, or keep (every
    media file the row names stays in ``media``, on disk or not: what ``extract_features`` reports).
    ``media_layout``: flat (``media_root/<path>``) or published (per-modality subfolders, see
    ``DataFile.media_layout``)."""
    rows, lossy = read_json_rows(path, "ToolMMBench rows")
    report = DataReport(rows=len(rows))
    records = []
    # Rows name the same files again and again: resolve each (a walk of lstat calls) once per read.
    resolved: dict[tuple[str, str], Path | None] = {}
    for index, row in enumerate(rows):
        where = f"{path.name} row {index}" + (f" (id {row.get('id')})" if isinstance(row, dict) else "")
        if lossy and has_replacement(row):
            report.skip(NOT_UTF8, where)
            continue
        problem = _problem(row)
        if problem:
            report.skip("malformed row", f"{where}: {problem}")
            continue
        media = _row_media(row, media_root, media_layout, resolved, where, report)
        if media is None:
            continue
        media = _present_media(media, missing_media, where, report)
        if media is None:
            continue
        record = _record(row, index, path, media)
        records.append(record)
        report.used += 1
        report.by_modality[record.input_modality] += 1
    return records, report


def _row_media(row: dict, media_root: Path, media_layout: str, resolved: dict, where: str,
               report: DataReport) -> tuple[list[MediaRef], tuple[str, ...]] | None:
    """The row's media files and keys (``<modality>:<path as written>``), or None (counted) when
    a path resolves outside ``media_root``. Several media in one row are allowed (their features
    are summed, as the original did)."""
    refs, keys, outside = [], [], []
    for name, spec in MODALITIES.items():
        value = row.get(spec.row_key)
        if isinstance(value, str) and value:
            keys.append(f"{name}:{value}")
            folder = spec.published_folder if media_layout == "published" else ""
            if (folder, value) not in resolved:
                resolved[folder, value] = media_path(media_root, value, folder)
            if resolved[folder, value] is None:
                outside.append(value)
            refs.append(MediaRef(name, resolved[folder, value]))
    if outside:
        report.skip(OUTSIDE_ROOT, f"{where}: {outside[-1]!r} resolves outside {media_root}: refused")
        return None
    return refs, tuple(keys)


def _present_media(media: tuple[list[MediaRef], tuple[str, ...]], missing_media: str, where: str,
                   report: DataReport) -> tuple[list[MediaRef], tuple[str, ...]] | None:
    """The media a record keeps under ``missing_media``, or None when the row is skipped (counted)."""
    refs, keys = media
    missing = [m for m in refs if not m.path.is_file()]
    if not missing or missing_media == "keep":
        return media
    if missing_media == "error":
        raise MissingMediaError(
            f"{where}: media file {missing[0].path} is missing. Fix data.*_files media_root (and "
            "media_layout: published for the authors' mm_dataset/ folder), or set "
            "data.missing_media=skip or text_only."
        )
    report.note("missing media", f"{where}: {missing[0].path}")
    if missing_media == "skip":
        report.skipped["missing media"] += 1
        return None
    report.text_only += 1
    return [m for m in refs if m not in missing], keys


def _record(row: dict, index: int, path: Path, media: tuple[list[MediaRef], tuple[str, ...]]) -> Record:
    turns = row["conversations"]
    tools = turns[1]["value"]
    modality = row.get("input_modality", turns[0].get("input_modality", "text"))
    return Record(
        id=f"{path.stem}:{modality}/{row.get('id', index)}",
        query=turns[0]["value"],
        media=media[0],
        source=str(path),
        input_modality=modality,
        tools=[tools] if isinstance(tools, str) else list(tools),
        media_keys=media[1],
        ambiguity=row.get("ambiguity", turns[1].get("ambiguity", -1)),
        ifambiguity=row.get("ifambiguity"),
        onetomulti=row.get("onetomulti"),
    )


def tool_catalogue(records: list[Record]) -> list[str]:
    """The union of tool names, whitespace-stripped (a tool's identity), sorted (``unknown``
    included when present)."""
    return sorted({tool.strip() for record in records for tool in record.tools})
