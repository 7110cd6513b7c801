"""What each training stage learns from: files named by the config → ``Record`` objects whose
``query`` and ``answer`` are the stage's prompt and target (before tokenization).

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
from dataclasses import replace
from pathlib import Path

from toollmm.config import ConfigError, RunConfig, resolve_path
from toollmm.data.captions import MEDIA_TAGS, read_caption_file
from toollmm.data.records import CaptionTarget, DataFileError, DataReport, Record, skip_file
from toollmm.data.split import in_test_split
from toollmm.prompts import STOP_STRING
from toollmm.signal_tokens import run_text

log = logging.getLogger(__name__)


def open_embeddings(folder: Path, config: RunConfig, modality: str):
    from toollmm.caption_embeddings import CaptionEmbeddingStore

    return CaptionEmbeddingStore.for_reading(folder, shape=config.model.outputs.target_shape(modality),
                                             expected_by=f"model.outputs.{modality}")


def _read(config: RunConfig, entries, need_media: bool, report: DataReport) -> list[tuple[Record, object]]:
    """Records of every caption file with its embeddings folder (opened when named)."""
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
        out += [(record, store) for record in records]
    return out


def _target(record: Record, store, report: DataReport) -> CaptionTarget | None:
    modality = record.caption_modality
    if store is None:
        raise ConfigError(f"{record.id}: a {modality} caption needs its embeddings: set embeddings_dir for its file "
                          "and run process_embeddings.py")
    if record.embedding_name not in store:
        report.drop("caption embedding missing", f"{record.id}: {record.embedding_name} not in {store.root}")
        return None
    return CaptionTarget(modality, store, record.embedding_name)


def _signal_run(config: RunConfig, modality: str) -> str:
    return run_text(modality, config.model.outputs.modality(modality).signal_tokens)


def caption_items(config: RunConfig, stage: int, report: DataReport) -> tuple[list[Record], list[Record]]:
    """Stage 1 or 2 records from ``data.caption_files``, split into train and held-out.
    Stage 1 asks ``data.caption_prompt`` about the medium; stage 2 asks the caption (no medium)."""
    if not config.data.caption_files:
        raise ConfigError(f"stage {stage} trains on caption pairs: list them in data.caption_files")
    train, test = [], []
    for record, store in _read(config, config.data.caption_files, need_media=stage == 1, report=report):
        modality = record.caption_modality
        if stage == 1:
            item = replace(record, query=config.data.caption_prompt, answer=record.caption + STOP_STRING)
        else:
            target = _target(record, store, report)
            if target is None:
                continue
            item = replace(record, query=record.caption, answer=_signal_run(config, modality) + STOP_STRING,
                           media=[], target=target)
        held_out = in_test_split((modality, record.caption), config.data.split.seed, config.data.split.test_fraction)
        (test if held_out else train).append(item)
    return train, test


def instruction_items(config: RunConfig, report: DataReport) -> list[Record]:
    """Stage 3 records from ``data.instruction_files``: comprehension rows answer with the caption,
    generation rows with their response, its media tag replaced by the signal-token run."""
    items = []
    for record, store in _read(config, config.data.instruction_files, need_media=True, report=report):
        if record.kind == "comprehension":
            items.append(replace(record, answer=record.caption + STOP_STRING))
        elif record.kind == "generation":
            if not config.model.outputs.enabled:
                raise ConfigError(f"{record.id}: generation rows need signal tokens: set model.outputs.enabled=true "
                                  "or drop the *_generation.json files from data.instruction_files")
            target = _target(record, store, report)
            if target is None:
                continue
            modality = record.output_modality
            answer = re.sub(rf"\s*{re.escape(MEDIA_TAGS[modality])}\s*", f" {_signal_run(config, modality)} ",
                            record.response, count=1).strip()
            items.append(replace(record, answer=answer + STOP_STRING, target=target))
        else:
            raise ConfigError(f"{record.id}: {record.kind} rows belong in data.caption_files (stages 1-2), "
                              "not data.instruction_files")
    return items
