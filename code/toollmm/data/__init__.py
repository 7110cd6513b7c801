"""Data: file rows → records (one type for every format) → train/test splits → examples → batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from toollmm.config import DataConfig, resolve_path
from toollmm.data.records import DataFileError, DataReport, Record, skip_file
from toollmm.data.split import group_queries, hold_out_tools, pick_unseen_tools, split_by_query, tool_split
from toollmm.data.toolmmbench import read_toolmmbench, tool_catalogue

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: list[Record]
    test: list[Record]
    catalogue: list[str]
    report: DataReport = field(default_factory=DataReport)
    unseen_tools: frozenset[str] = frozenset()
    """Tools held out of training (``data.split.unseen_tools``); still in ``catalogue``."""

    def test_queries(self) -> list[Record]:
        """One record per test request, with every tool it accepts."""
        return group_queries(self.test)

    def train_queries(self, limit: int) -> list[Record]:
        """An evenly spaced, deterministic sample of training queries, scored like the test split."""
        queries = group_queries(self.train)
        step = max(1, len(queries) // limit) if limit else 1
        return queries[::step][:limit] if limit else []

    def catalogue_of(self, tools: str) -> list[str]:
        """``all``: the catalogue; ``trained``: its tools that answer a training row (without the
        held-out tools: the closed set a model trained on this split knows)."""
        if tools == "all":
            return self.catalogue
        if tools != "trained":
            raise ValueError(f"catalogue tools {tools!r} is not one of ['all', 'trained']")
        return sorted({tool.strip() for record in self.train for tool in record.tools})

    def tool_split(self, query: Record) -> str:
        """``seen`` or ``unseen``: whether the query's tools were held out of training."""
        return tool_split(query, self.unseen_tools)

    def tool_split_tag(self, query: Record) -> str | None:
        """The ``tool_split`` a prediction row carries: None when no tool is held out (the rows then
        have no such field and the evaluation no seen/unseen rows)."""
        return self.tool_split(query) if self.unseen_tools else None


def load_splits(config: DataConfig) -> Splits:
    report = DataReport()
    catalogue_records: list[Record] = []

    def read(entries) -> list[Record]:
        records = []
        for entry in entries:
            path, media_root = resolve_path(entry.path), resolve_path(entry.media_root)
            try:
                rows, file_report = read_toolmmbench(path, media_root, config.missing_media, entry.media_layout)
            except DataFileError as err:
                skip_file(report, err)
                continue
            if config.tool_names == "stripped":
                for record in rows:
                    record.tools = [tool.strip() for tool in record.tools]
            log.info("%s:\n%s", path, file_report.summary())
            report.merge(file_report)
            records += rows
            # The catalogue is every tool named by a well-formed row, media present or not (what
            # text_only keeps: then the rows just read are those rows).
            if config.missing_media == "text_only":
                catalogue_records.extend(rows)
            else:
                catalogue_records.extend(read_toolmmbench(path, media_root, "text_only", entry.media_layout)[0])
        return records

    train, test = read(config.train_files), read(config.eval_files)
    if config.split.test_fraction > 0:
        train, test = split_by_query(train + test, config.split.test_fraction, config.split.seed)
    unseen = frozenset()
    if config.split.unseen_tools > 0:
        unseen = pick_unseen_tools(train + test, config.split.unseen_tools, config.split.seed)
        train, test = hold_out_tools(train, test, unseen)
    return Splits(train=train, test=test, catalogue=tool_catalogue(catalogue_records), report=report, unseen_tools=unseen)
