"""A learned query ↔ tool-entry retriever for open-set tool selection.

A tool the LLM never trained on gets no probability worth ranking from it (docs/open_set.md), and
its catalogue entry may hold nothing but its name. The retriever maps both sides into one space:
a request through its words, word pairs and the character 4-grams of its words, a catalogue
entry through the words and character 4-grams of its name (plus task, description and tags when
the entry has them). Trained contrastively on the seen tools (InfoNCE over every trained tool),
it scores a new entry from its text alone, so adding a tool needs no retraining. Character
4-grams carry what names share across tools (``wav2vec2``, ``whisper``, ``-ks``, ``sentiment``)
and what requests share across word forms (``transcribe``, ``transcription``): that is what lets
a request reach a name the training rows never showed. A few independently initialised members
are trained side by side and their similarities averaged (docs/open_set.md measures what the
4-grams and the members each add).

Training takes about a minute on a 2-core CPU (``python code/train_retriever.py --ckpt DIR``); inference uses
it through ``inference.open_set_slots`` (``Assistant``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from toollmm.catalogue import ToolEntry
from toollmm.open_set import words

log = logging.getLogger(__name__)

WEIGHTS, META = "tool_retriever.safetensors", "tool_retriever.json"
FORMAT = 2  # 2: members and request 4-grams; a format-1 file is refused with how to retrain


def char_grams(word: str, n: int = 4) -> list[str]:
    """The character n-grams of ``<word>`` (``<ks>``, shorter than n, is one)."""
    marked = f"<{word}>"
    return [marked[i:i + n] for i in range(max(1, len(marked) - n + 1))]


def query_features(text: str) -> list[str]:
    """A request's features: its words, adjacent word pairs and the character 4-grams of its words."""
    tokens = words(text)
    return ([f"w:{w}" for w in tokens] + [f"p:{a}_{b}" for a, b in zip(tokens, tokens[1:])]
            + [f"q:{g}" for w in tokens for g in char_grams(w)])


def entry_features(entry: ToolEntry) -> list[str]:
    """A catalogue entry's features: the words of its name, task, description and tags, and the
    character 4-grams of each name word (``<wav2vec2>`` gives ``<wav``, ``wav2``, ...). Example
    requests are left out: a new tool has none, and a retriever that leaned on them would rank
    new tools below trained ones for a reason unrelated to the request."""
    name_words = words(entry.name)
    grams = [f"c:{g}" for w in name_words for g in char_grams(w)]
    text = " ".join([entry.task, entry.description, *entry.tags])
    return [f"n:{w}" for w in name_words] + grams + [f"t:{w}" for w in words(text)]


@dataclass
class RetrieverSettings:
    dim: int = 64
    epochs: int = 15
    """Tiny default's split at 20% held out: 15 epochs reached unseen tools best of 15-120 (docs/open_set.md)."""
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.01
    temperature: float = 0.05
    min_count: int = 2
    """Request features seen in fewer training requests are dropped: too rare to learn. Every
    feature of a trained tool's entry is kept (a name is one entry: most of its features are its own)."""
    members: int = 5
    """Independently initialised retrievers trained side by side; a score is their mean cosine
    similarity. On tool-level validation folds of the training rows, 5 members raised mean
    recall@3 over held-out tools by 0.4-0.6 points over one; each member adds to the training
    time (about a minute for 5 on a 2-core CPU; docs/open_set.md)."""
    seed: int = 0


class ToolRetriever(nn.Module):
    """Two bags of learned feature vectors (one per side), pooled with 1/sqrt(n) weights; each of
    ``members`` slices of ``dim`` is L2-normalised on its own, and the score of a (request, entry)
    pair is the mean of the members' cosine similarities. Members share a bag (one lookup for all)
    but no parameter: each slice gets only its own loss's gradient."""

    def __init__(self, query_vocab: Sequence[str], entry_vocab: Sequence[str], dim: int, temperature: float,
                 trained_tools: Sequence[str], members: int = 1):
        super().__init__()
        self.query_vocab = {f: i for i, f in enumerate(query_vocab)}
        self.entry_vocab = {f: i for i, f in enumerate(entry_vocab)}
        self.temperature = temperature
        self.trained_tools = frozenset(trained_tools)
        """The tools of the training rows: the LLM's closed set, which open-set slots leave out."""
        self.dim, self.members = dim, members
        self.query_bag = nn.EmbeddingBag(len(query_vocab), dim * members, mode="sum")
        self.entry_bag = nn.EmbeddingBag(len(entry_vocab), dim * members, mode="sum")

    @staticmethod
    def _ids(vocab: dict[str, int], features: Sequence[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Known features as a padded (n, longest) id matrix and its pooling weights: 1/sqrt(count)
        for a row's distinct features, 0 for padding (a request with no known feature pools to 0)."""
        rows = [sorted({vocab[f] for f in items if f in vocab}) for items in features]
        width = max((len(row) for row in rows), default=0) or 1
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        weights = torch.zeros(len(rows), width)
        for i, row in enumerate(rows):
            if row:
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                weights[i, : len(row)] = len(row) ** -0.5
        return ids, weights

    def _pool(self, bag: nn.EmbeddingBag, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(len(ids), members, dim), each member's vector normalised."""
        pooled = bag(ids, per_sample_weights=weights)
        return F.normalize(pooled.view(len(ids), self.members, self.dim), dim=-1)

    @torch.no_grad()
    def encode_queries(self, texts: Sequence[str]) -> torch.Tensor:
        return self._pool(self.query_bag, *self._ids(self.query_vocab, [query_features(t) for t in texts]))

    @torch.no_grad()
    def encode_entries(self, entries: Sequence[ToolEntry]) -> torch.Tensor:
        return self._pool(self.entry_bag, *self._ids(self.entry_vocab, [entry_features(e) for e in entries]))

    @staticmethod
    def member_similarities(queries: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """(members, requests, entries) cosine similarities of encoded requests and entries."""
        return torch.einsum("qmd,emd->mqe", queries, entries)

    @torch.no_grad()
    def scores(self, texts: Sequence[str], entries: Sequence[ToolEntry]) -> torch.Tensor:
        """(requests × entries) similarities: the members' mean cosine."""
        return self.member_similarities(self.encode_queries(texts), self.encode_entries(entries)).mean(0)

    def rank_new_tools(self, texts: Sequence[str], entries: Sequence[ToolEntry], k: int) -> list[list[dict]]:
        """Per request, the ``k`` best catalogue tools outside ``trained_tools`` as ``{"tool", "score"}``."""
        new = [e for e in entries if e.name not in self.trained_tools]
        if not new or k < 1:
            return [[] for _ in texts]
        scores = self.scores(texts, new)
        top = scores.topk(min(k, len(new)), dim=1)
        return [[{"tool": new[j].name, "score": float(s)} for s, j in zip(row_s.tolist(), row_j.tolist())]
                for row_s, row_j in zip(top.values, top.indices)]

    def save(self, folder: Path) -> Path:
        """``tool_retriever.safetensors`` and ``tool_retriever.json`` (vocabularies, settings) in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS)
        meta = {"format": FORMAT, "dim": self.dim, "members": self.members, "temperature": self.temperature,
                "query_vocab": list(self.query_vocab), "entry_vocab": list(self.entry_vocab),
                "trained_tools": sorted(self.trained_tools)}
        (folder / META).write_text(json.dumps(meta) + "\n")
        return folder

    @classmethod
    def load(cls, folder: Path) -> ToolRetriever:
        folder = Path(folder)
        missing = [name for name in (WEIGHTS, META) if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} holds no tool retriever (missing {', '.join(missing)}); "
                                    f"train one with: python code/train_retriever.py --ckpt CKPT")
        retrain = "retrain it with: python code/train_retriever.py --ckpt CKPT"
        try:
            meta = json.loads((folder / META).read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, this code reads {FORMAT}")
            retriever = cls(meta["query_vocab"], meta["entry_vocab"], meta["dim"], meta["temperature"], meta["trained_tools"],
                            meta["members"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{folder / META} is not a readable tool retriever ({type(err).__name__}: {err}); {retrain}") from None
        try:
            retriever.load_state_dict(load_file(folder / WEIGHTS))
        except Exception as err:  # safetensors reports a cut file as a header or buffer error
            raise ValueError(f"{folder / WEIGHTS} is truncated, corrupt or of another retriever "
                             f"({type(err).__name__}: {err}); {retrain}") from None
        return retriever.eval()


def _vocabulary(feature_lists: Sequence[list[str]], min_count: int) -> list[str]:
    counts: dict[str, int] = defaultdict(int)
    for items in feature_lists:
        for f in set(items):
            counts[f] += 1
    return sorted(f for f, c in counts.items() if c >= min_count)


def train_retriever(records: Sequence, entries: Sequence[ToolEntry], settings: RetrieverSettings | None = None
                    ) -> ToolRetriever:
    """Fit on training records (``query``, ``tools``, ``request_key``): each (request, tool) pair is a
    positive; every other trained tool is a negative, except the request's other acceptable tools
    (ToolMMBench requests often accept several). ``entries``: the catalogue entries of the trained
    tools (others are ignored)."""
    settings = settings or RetrieverSettings()
    by_name = {e.name: e for e in entries}
    trained = sorted({t.strip() for r in records for t in r.tools})
    missing = [t for t in trained if t not in by_name]
    if missing:
        raise ValueError(f"{len(missing)} trained tools have no catalogue entry (e.g. {missing[0]!r})")
    accepted: dict[tuple, set[int]] = defaultdict(set)
    index = {t: i for i, t in enumerate(trained)}
    pairs = []
    for r in records:
        for t in r.tools:
            accepted[r.request_key].add(index[t.strip()])
            pairs.append((r.query, index[t.strip()], r.request_key))
    tool_entries = [by_name[t] for t in trained]
    query_feats = [query_features(q) for q, _, _ in pairs]
    entry_feats = [entry_features(e) for e in tool_entries]
    query_vocab = _vocabulary(query_feats, settings.min_count)
    entry_vocab = _vocabulary(entry_feats, 1)
    generator = torch.Generator().manual_seed(settings.seed)  # the run's own: the global RNG stays untouched
    model = ToolRetriever(query_vocab, entry_vocab, settings.dim, settings.temperature, trained, settings.members)
    # Small initial vectors (a linear layer's default scale over the vocabulary): rare features
    # then add little noise to a vector until training moves them.
    for bag in (model.query_bag, model.entry_bag):
        bound = bag.num_embeddings ** -0.5
        nn.init.uniform_(bag.weight, -bound, bound, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    targets = torch.tensor([t for _, t, _ in pairs])
    others = torch.zeros(len(pairs), len(trained), dtype=torch.bool)
    for row, (_, t, key) in enumerate(pairs):
        others[row, list(accepted[key] - {t})] = True
    query_ids, query_weights = model._ids(model.query_vocab, query_feats)
    entry_ids = model._ids(model.entry_vocab, entry_feats)
    members = settings.members
    for epoch in range(settings.epochs):
        total = 0.0
        # Each member its own shuffle: members that saw the same batches would err alike.
        orders = torch.stack([torch.randperm(len(pairs), generator=generator) for _ in range(members)])
        for batch in orders.split(settings.batch_size, dim=1):  # (members, batch) pair indices
            # Every member's batch goes through the shared bag; member m keeps its slice of its own batch.
            pooled = model._pool(model.query_bag, query_ids[batch.flatten()], query_weights[batch.flatten()])
            queries = pooled.view(members, batch.shape[1], members, -1).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            tools = model._pool(model.entry_bag, *entry_ids)
            logits = torch.einsum("mbd,tmd->mbt", queries, tools) / settings.temperature
            logits = logits.masked_fill(others[batch], float("-inf"))
            # Summed over members: each member's slice gets exactly its own InfoNCE gradient.
            loss = F.cross_entropy(logits.flatten(0, 1), targets[batch].flatten(), reduction="sum") / batch.shape[1]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * batch.shape[1]
        if epoch == 0 or (epoch + 1) % 10 == 0:
            log.info("retriever epoch %d: loss %.3f (mean over members)", epoch + 1, total / len(pairs) / members)
    return model.eval()
