"""Deterministic train/test split by request, an optional held-out set of tools (open-set
evaluation), and the records each side yields: one training record per (request, acceptable
tool), one evaluation record per request."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import replace

from toollmm.data.records import Record
from toollmm.prompts import format_answer


def _draw(key: object, seed: int) -> float:
    """A uniform number in [0, 1) fixed by ``key`` and ``seed`` alone."""
    digest = hashlib.sha256(f"{seed}\x00{key!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_test_split(key: tuple, seed: int, test_fraction: float) -> bool:
    return _draw(key, seed) < test_fraction


def tool_modalities(records: list[Record]) -> dict[str, str]:
    """Each tool's main input modality: the one most of its rows have (ties: the first by name).
    The rows give no task field, so modality is the only stratum the data supports."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        for tool in record.tools:
            counts[tool.strip()][record.input_modality] += 1
    return {tool: min(count, key=lambda m: (-count[m], m)) for tool, count in counts.items()}


def pick_unseen_tools(records: list[Record], fraction: float, seed: int) -> frozenset[str]:
    """``round(fraction × n)`` tools of each main input modality's ``n``, the ones with the lowest
    draws: which tools are picked depends only on the tool set, the modalities and the seed."""
    strata: dict[str, list[str]] = defaultdict(list)
    for tool, modality in tool_modalities(records).items():
        strata[modality].append(tool)
    unseen = set()
    for tools in strata.values():
        ranked = sorted(tools, key=lambda tool: (_draw(("unseen tool", tool), seed), tool))
        unseen.update(ranked[: round(fraction * len(ranked))])
    return frozenset(unseen)


def hold_out_tools(train: list[Record], test: list[Record], unseen: frozenset[str]) -> tuple[list[Record], list[Record]]:
    """Keep unseen tools out of training. A training request whose every acceptable tool (over
    all its rows) is unseen moves, all its rows, to the test side; a request that also accepts a
    seen tool stays, answering only its seen tools (moving it would take most audio requests out
    of training: they accept several tools)."""
    accepted: dict[tuple, set[str]] = defaultdict(set)
    for record in train:
        accepted[record.request_key].update(tool.strip() for tool in record.tools)
    moved = {key for key, tools in accepted.items() if tools <= unseen}
    kept = []
    for record in train:
        seen_tools = [tool for tool in record.tools if tool.strip() not in unseen]
        if record.request_key not in moved and seen_tools:
            kept.append(record if len(seen_tools) == len(record.tools) else replace(record, tools=seen_tools))
    return kept, test + [record for record in train if record.request_key in moved]


def tool_split(query: Record, unseen: frozenset[str]) -> str:
    """``unseen`` when every tool the query accepts is held out of training, else ``seen`` (a
    query that also accepts a trained tool can be answered without the open set)."""
    return "unseen" if unseen and all(tool.strip() in unseen for tool in query.tools) else "seen"


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
