"""What each training stage learns from: files named by the config → ``Item`` objects (one
prompt/answer pair each, before tokenization).

- Stage 1 (encoder alignment): each caption pair's medium → its caption, with the published
  prompt ``data.caption_prompt`` ("generate a caption").
- Stage 2 (decoder alignment): each caption → the signal-token run of its modality; the run's
  projected states are pulled towards the caption's embedding by the decoder's text encoder.
- Stage 3 (instruction tuning): ToolMMBench tool selection (``data.train_files``) plus, from
  ``data.instruction_files``, X → text questions (comprehension files) and text → X requests
  whose answers carry a signal-token run (generation files).

Stages 1 and 2 hold out ``data.split.test_fraction`` of the captions (by caption text, seeded)
to measure the alignment on captions the run never saw.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from toollmm.config import ConfigError, RunConfig, resolve_path
from toollmm.data.captions import MEDIA_TAGS, CaptionRecord, read_caption_file
from toollmm.data.split import in_test_split
from toollmm.data.toolmmbench import DataFileError, DataReport, MediaRef, skip_file
from toollmm.prompts import STOP_STRING
from toollmm.signal_tokens import run_text

log = logging.getLogger(__name__)


@dataclass
class CaptionTarget:
    """A caption embedding, read when the example is batched (CC3M's would not fit in memory)."""

    modality: str
    store: object
    """The embeddings folder (``CaptionEmbeddingStore``)."""
    name: str


@dataclass
class Item:
    id: str
    query: str
    answer: str
    """The target text, ending with the stop string."""
    media: list[MediaRef] = field(default_factory=list)
    target: CaptionTarget | None = None
    source: str = ""
    """The data file it came from (``data.sampling: published`` draws each micro-batch from one file)."""


@dataclass
class StageData:
    train: list[Item]
    test: list[Item]
    report: DataReport


def open_embeddings(folder: Path, config: RunConfig, modality: str):
    from toollmm.caption_embeddings import CaptionEmbeddingStore

    return CaptionEmbeddingStore.for_reading(folder, shape=config.model.outputs.target_shape(modality),
                                             expected_by=f"model.outputs.{modality}")


def _read(config: RunConfig, entries, need_media: bool, report: DataReport) -> list[tuple[CaptionRecord, object, str]]:
    """Records of every caption file with its embeddings folder (opened when named) and the file's path."""
    out = []
    for entry in entries:
        path = resolve_path(entry.path)
        if not path.is_file():
            raise ConfigError(f"caption file {path} does not exist (data.caption_files / data.instruction_files path)")
        try:
            records, file_report = read_caption_file(path, resolve_path(entry.media_root), entry.modality, need_media)
        except DataFileError as err:
            skip_file(report, err)
            continue
        log.info("%s:\n%s", path, file_report.summary())
        report.merge(file_report)
        store = open_embeddings(resolve_path(entry.embeddings_dir), config, entry.modality) if entry.embeddings_dir else None
        out += [(record, store, str(path)) for record in records]
    return out


def _target(record: CaptionRecord, store, report: DataReport) -> CaptionTarget | None:
    if store is None:
        raise ConfigError(f"{record.id}: a {record.modality} caption needs its embeddings: set embeddings_dir for its file "
                          "and run process_embeddings.py")
    if record.embedding_name not in store:
        report.skipped["caption embedding missing"] += 1
        report.used -= 1
        report.note("caption embedding missing", f"{record.id}: {record.embedding_name} not in {store.root}")
        return None
    return CaptionTarget(record.modality, store, record.embedding_name)


def caption_items(config: RunConfig, stage: int, report: DataReport) -> tuple[list[Item], list[Item]]:
    """Stage 1 or 2 items from ``data.caption_files``, split into train and held-out."""
    if not config.data.caption_files:
        raise ConfigError(f"stage {stage} trains on caption pairs: list them in data.caption_files")
    train, test = [], []
    for record, store, source in _read(config, config.data.caption_files, need_media=stage == 1, report=report):
        if stage == 1:
            item = Item(record.id, config.data.caption_prompt, record.caption + STOP_STRING, record.media, source=source)
        else:
            target = _target(record, store, report)
            if target is None:
                continue
            length = config.model.outputs.modality(record.modality).signal_tokens
            item = Item(record.id, record.caption, run_text(record.modality, length) + STOP_STRING, target=target,
                        source=source)
        held_out = in_test_split((record.modality, record.caption), config.data.split.seed, config.data.split.test_fraction)
        (test if held_out else train).append(item)
    return train, test


def instruction_items(config: RunConfig, report: DataReport) -> list[Item]:
    """Stage 3 items from ``data.instruction_files`` (comprehension and generation rows)."""
    items = []
    for record, store, source in _read(config, config.data.instruction_files, need_media=True, report=report):
        if record.kind == "comprehension":
            items.append(Item(record.id, record.prompt, record.caption + STOP_STRING, record.media, source=source))
        elif record.kind == "generation":
            if not config.model.outputs.enabled:
                raise ConfigError(f"{record.id}: generation rows need signal tokens: set model.outputs.enabled=true "
                                  "or drop the *_generation.json files from data.instruction_files")
            target = _target(record, store, report)
            if target is None:
                continue
            run = run_text(record.modality, config.model.outputs.modality(record.modality).signal_tokens)
            answer = re.sub(rf"\s*{re.escape(MEDIA_TAGS[record.modality])}\s*", f" {run} ", record.response, count=1).strip()
            items.append(Item(record.id, record.prompt, answer + STOP_STRING, target=target, source=source))
        else:
            raise ConfigError(f"{record.id}: {record.kind} rows belong in data.caption_files (stages 1-2), "
                              "not data.instruction_files")
    return items
