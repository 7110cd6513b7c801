"""Deterministic train/test split by request, and the examples each side yields."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from toollmm.data.toolmmbench import Record


@dataclass
class Query:
    """One request with every acceptable tool (the unit of evaluation)."""

    record: Record
    tools: list[str]


def in_test_split(key: tuple, seed: int, test_fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}\x00{key!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def group_queries(records: list[Record]) -> list[Query]:
    """Merge rows of the same request (query text + media) into one query with all its tools,
    whitespace-stripped (a tool's identity in evaluation)."""
    groups: dict[tuple, Query] = {}
    for record in records:
        query = groups.setdefault(record.request_key, Query(record, []))
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


def training_pairs(records: list[Record], keep_duplicates: bool = False) -> list[tuple[Record, str]]:
    """One (record, tool) example per acceptable tool, as the published training files do.
    A request that appears in several rows with the same tool yields it once, unless
    ``keep_duplicates`` (the original trains on every row: 545 of the 2944 audio rows and 8 of
    the 224 video rows repeat one)."""
    seen, pairs = set(), []
    for record in records:
        for tool in record.tools:
            key = (record.request_key, tool)
            if keep_duplicates or key not in seen:
                seen.add(key)
                pairs.append((record, tool))
    return pairs
