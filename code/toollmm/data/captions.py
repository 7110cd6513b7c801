"""Caption files in the published NExT-GPT layout (``t2x_pairs``) → ``Record`` objects.

Three kinds of JSON list, told apart by their keys (X is image, video or audio):

- pair index (``cc3m.json``, ``webvid.json``, ``audiocap.json``): ``{"<X>_name": file, "caption": text}``;
- comprehension (``*_comprehension.json``): ``{"input_<X>": file, "conversations": [human
  "<X-tag>\\nquestion", gpt caption]}``: X → text;
- generation (``*_generation.json``): ``{"output_<X>": file, "<X>_captions": text,
  "<X>_caption_embeddings": "name.npy", "conversations": [human request, gpt "Sure thing! <X-tag>"]}``:
  text → X, the tag marking where the signal tokens go.

A caption embedding is named ``<media file name>.npy`` (the generation files name exactly
that), so one embeddings folder serves a pair index and its generation file.
Rows that cannot be used are counted by reason in a ``DataReport``, never a crash.
"""

from __future__ import annotations

from pathlib import Path

from toollmm.data.records import (
    NOT_UTF8,
    OUTSIDE_ROOT,
    DataReport,
    Kind,
    MediaRef,
    Record,
    has_replacement,
    media_path,
    read_json_rows,
)

MEDIA_TAGS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}


def file_kind(row: dict, modality: str) -> Kind:
    if f"output_{modality}" in row:
        return "generation"
    if f"input_{modality}" in row:
        return "comprehension"
    return "pairs"


def _parse(row, modality: str) -> tuple[Kind, str, str, str, str] | str:
    """(kind, media name, caption, prompt, response), or why the row cannot be used."""
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, not an object"
    kind = file_kind(row, modality)
    tag = MEDIA_TAGS[modality]
    if kind == "pairs":
        name, caption = row.get(f"{modality}_name"), row.get("caption")
        prompt = response = ""
    else:
        name = row.get(f"{'output' if kind == 'generation' else 'input'}_{modality}")
        turns = row.get("conversations")
        if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2])):
            return "'conversations' must hold a human and a gpt turn with string values"
        prompt, response = turns[0]["value"], turns[1]["value"]
        if kind == "comprehension":
            caption = response
            prompt = prompt.replace(tag, "").strip()
        else:
            caption = row.get(f"{modality}_captions")
            if tag not in response:
                return f"the gpt turn has no {tag} tag where the signal tokens go"
            name_npy = row.get(f"{modality}_caption_embeddings")
            if isinstance(name, str) and name_npy not in (None, f"{name}.npy"):
                return f"{modality}_caption_embeddings {name_npy!r} is not '{name}.npy'"
    if not isinstance(name, str) or not name:
        return f"no {modality} file name"
    if not isinstance(caption, str) or not caption.strip():
        return "empty caption"
    return kind, name, caption.strip(), prompt, response


def read_caption_file(path: Path, media_root: Path, modality: str, need_media: bool) -> tuple[list[Record], DataReport]:
    """Read one caption file. ``need_media``: rows whose medium is missing are skipped (counted)."""
    rows, lossy = read_json_rows(path, "caption rows")
    report = DataReport(rows=len(rows))
    records = []
    for index, row in enumerate(rows):
        where = f"{Path(path).name} row {index}"
        if lossy and has_replacement(row):
            report.skip(NOT_UTF8, where)
            continue
        parsed = _parse(row, modality)
        if isinstance(parsed, str):
            report.skip("malformed row", f"{where}: {parsed}")
            continue
        kind, name = parsed[:2]
        media = [] if kind == "generation" else _medium(media_root, name, modality, need_media, where, report)
        if media is None:
            continue
        records.append(_record(parsed, modality, media, f"{Path(path).stem}/{index}", str(path)))
        report.used += 1
    return records, report


def _medium(media_root: Path, name: str, modality: str, need_media: bool, where: str,
            report: DataReport) -> list[MediaRef] | None:
    """The row's input medium ([] when missing and not needed), or None when the row is skipped (counted)."""
    media_file = media_path(media_root, name)
    if media_file is None:
        report.skip(OUTSIDE_ROOT, f"{where}: {name!r} resolves outside {media_root}: refused")
        return None
    if media_file.is_file():
        return [MediaRef(modality, media_file)]
    if need_media:
        report.skip("missing media", f"{where}: {media_file}")
        return None
    return []


def _record(parsed: tuple[Kind, str, str, str, str], modality: str, media: list[MediaRef], record_id: str,
            source: str) -> Record:
    kind, name, caption, prompt, response = parsed
    generation = kind == "generation"
    return Record(id=record_id, query=prompt, media=media, source=source, kind=kind,
                  input_modality="text" if generation else modality, output_modality=modality if generation else "text",
                  caption=caption, response=response, embedding_name=f"{name}.npy")
