"""Open-set tool selection: recall@k of ranked tools for seen and unseen tools, and the
text-similarity baseline (TF-IDF between a request and each catalogue entry's text).

Any ranking (the baseline's, or a model's top-k answers) is scored the same way: a query is
a hit at k when one of its acceptable tools is among the first k ranked tools.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

from toollmm.catalogue import ToolEntry
from toollmm.evaluate import first_acceptable_rank

RECALL_AT = (1, 5)


def words(text: str) -> list[str]:
    """Lower-case runs of letters and digits: ``MIT/ast-finetuned-speech-commands-v2`` gives
    ``mit ast finetuned speech commands v2``."""
    return re.findall(r"[a-z0-9]+", text.lower())


def entry_text(entry: ToolEntry) -> str:
    """What text matching knows of a tool: its name (split into words by ``words``), task,
    description, tags, modalities and example requests."""
    return " ".join([entry.name, entry.task, entry.description, *entry.tags, *entry.input_modalities, *entry.examples])


class TfidfIndex:
    """TF-IDF vectors of documents, L2-normalised, and cosine ranking of a query against them.

    Term weight ``tf × idf`` with ``idf = ln((1 + n) / (1 + df)) + 1`` (smoothed: a term in every
    document still counts a little). Query terms absent from every document are ignored.
    """

    def __init__(self, documents: Sequence[str]):
        tokenized = [Counter(words(document)) for document in documents]
        self.vocabulary = {term: i for i, term in enumerate(sorted({t for counts in tokenized for t in counts}))}
        frequency = np.zeros(len(self.vocabulary))
        for counts in tokenized:
            frequency[[self.vocabulary[t] for t in counts]] += 1
        self.idf = np.log((1 + len(documents)) / (1 + frequency)) + 1
        self.matrix = np.stack([self._vector(counts) for counts in tokenized]) if documents else np.zeros((0, len(self.idf)))

    def _vector(self, counts: Counter) -> np.ndarray:
        vector = np.zeros(len(self.vocabulary))
        for term, count in counts.items():
            if term in self.vocabulary:
                vector[self.vocabulary[term]] = count * self.idf[self.vocabulary[term]]
        norm = np.linalg.norm(vector)
        return vector / norm if norm else vector

    def similarities(self, query: str) -> np.ndarray:
        """Cosine similarity of ``query`` to every document."""
        return self.matrix @ self._vector(Counter(words(query)))

    def ranked(self, query: str, k: int) -> list[tuple[int, float]]:
        """(index, similarity) of the ``k`` documents most similar to ``query``; equal scores keep document order."""
        scores = self.similarities(query)
        return [(int(i), float(scores[i])) for i in np.argsort(-scores, kind="stable")[:k]]

    def rank(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` documents most similar to ``query`` (see ``ranked``)."""
        return [i for i, _ in self.ranked(query, k)]


def top_k_by_text(entries: Sequence[ToolEntry], queries: Iterable[str], k: int = max(RECALL_AT)) -> list[list[dict]]:
    """The baseline: the ``k`` catalogue tools whose entry text is most similar to each query,
    as ``{"tool", "score"}`` (cosine similarity) best first, the shape of inference's ``top_k``."""
    index = TfidfIndex([entry_text(entry) for entry in entries])
    return [[{"tool": entries[i].name, "score": score} for i, score in index.ranked(query, k)] for query in queries]


def rank_by_text(entries: Sequence[ToolEntry], queries: Iterable[str], k: int = max(RECALL_AT)) -> list[list[str]]:
    """The baseline's tool names only (see ``top_k_by_text``)."""
    return [[entry["tool"] for entry in ranked] for ranked in top_k_by_text(entries, queries, k)]


def recall_by_group(rankings: Sequence[Sequence[str]], acceptable: Sequence[Iterable[str]],
                    groups: Sequence[Iterable[str]], ks: Sequence[int] = RECALL_AT) -> dict[str, dict]:
    """Recall@k of each group of queries: ``{group: {"queries": n, "recall@1": r, ...}}``.

    ``rankings[i]``: query i's tools, best first; ``acceptable[i]``: the tools that answer it
    (whitespace-stripped on both sides, a tool's identity); ``groups[i]``: the labels query i
    counts under (e.g. ``all``, ``unseen``, ``unseen/image``).
    """
    hits: dict[str, Counter] = defaultdict(Counter)
    for ranking, tools, labels in zip(rankings, acceptable, groups, strict=True):
        first = first_acceptable_rank(ranking, tools)
        for label in labels:
            hits[label]["queries"] += 1
            for k in ks:
                hits[label][f"recall@{k}"] += first <= k
    return {label: {"queries": c["queries"], **{f"recall@{k}": c[f"recall@{k}"] / c["queries"] for k in ks}}
            for label, c in sorted(hits.items())}


def query_groups(tool_split: str, input_modality: str) -> tuple[str, ...]:
    """The labels a query counts under: all, its tool split, its modality, and both."""
    return ("all", tool_split, input_modality, f"{tool_split}/{input_modality}")
