"""Deterministic train/test split by request, and the records each side yields: one training
record per (request, acceptable tool), one evaluation record per request."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from toollmm.data.records import Record
from toollmm.prompts import format_answer


def in_test_split(key: tuple, seed: int, test_fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}\x00{key!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def group_queries(records: list[Record]) -> list[Record]:
    """One record per request (query text + media), the unit of evaluation: the first row of the
    request with every tool its rows accept, whitespace-stripped (a tool's identity in evaluation)."""
    groups: dict[tuple, Record] = {}
    for record in records:
        query = groups.setdefault(record.request_key, replace(record, tools=[]))
        for tool in record.tools:
            if tool.strip() not in query.tools:
                query.tools.append(tool.strip())
    return list(groups.values())


def split_by_query(records: list[Record], test_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Rows of one request always land on the same side; the assignment depends only on the
    request and the seed, so adding files never moves existing requests."""
    train, test = [], []
    for record in records:
        (test if in_test_split(record.request_key, seed, test_fraction) else train).append(record)
    return train, test


def training_records(records: list[Record], keep_duplicates: bool = False) -> list[Record]:
    """One record per acceptable tool, answering it (as the published training files do).
    A request that appears in several rows with the same tool yields it once, unless
    ``keep_duplicates`` (the original trains on every row: 545 of the 2944 audio rows and 8 of
    the 224 video rows repeat one)."""
    seen, out = set(), []
    for record in records:
        for tool in record.tools:
            key = (record.request_key, tool)
            if keep_duplicates or key not in seen:
                seen.add(key)
                out.append(replace(record, tools=[tool], answer=format_answer(tool)))
    return out
