"""Records → examples (token ids with a media slot, labels, the slot's feature) → batches.

The flow of one training example: a data file's row is read into a ``Record`` (``records.py``),
the stage sets its query and answer (``split.training_records``, ``stages.py``),
``InstructionDataset`` tokenizes it into an ``Example`` (``prompts.build_example``) with its
media feature, and a collator pads or packs examples into a ``Batch``: the tensors the model
takes (``Batch.inputs``) and, beside them, the bookkeeping it does not (record ids, token counts).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch.nn.utils.rnn import pad_sequence

from toollmm.data.records import DataReport, MediaRef, Record
from toollmm.output_modalities import OUTPUT_MODALITIES
from toollmm.prompts import IGNORE_INDEX, Example, build_example
from toollmm.signal_tokens import SignalTokens, check_runs
from toollmm.tokenization import PromptTokenizer

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """What a collator returns: the model's keyword arguments and, apart, what is not a model input."""

    inputs: dict[str, torch.Tensor | dict[str, torch.Tensor]]
    """``input_ids``, ``labels``, ``slot_features`` (packed: ``position_ids``), and ``targets``:
    output modality → caption embeddings."""
    record_ids: list[str]
    """The records of the batch's examples, in row-major order (for samples and messages)."""
    real_tokens: int
    """Tokens that are not padding (for throughput)."""

    def to(self, device) -> Batch:
        moved = {k: {m: t.to(device) for m, t in v.items()} if isinstance(v, dict) else v.to(device)
                 for k, v in self.inputs.items()}
        return replace(self, inputs=moved)


def record_feature(record: Record, features: dict[MediaRef, torch.Tensor]) -> torch.Tensor | None:
    if not record.media:
        return None
    return torch.stack([features[ref] for ref in record.media]).sum(0)


def run_problem(labels: list[int], record: Record, signal: SignalTokens) -> str | None:
    """Why an example's signal tokens cannot feed the output projectors, or None: each run
    complete, and exactly one run, of the target's modality, when the record has a caption embedding."""
    problem = check_runs(labels, signal)
    if problem:
        return f"{problem} in the data"
    runs = {m: labels.count(ids[0]) for m, ids in signal.ids.items() if ids}
    wanted = {m: int(record.target is not None and record.target.modality == m) for m in runs}
    if runs != wanted:
        return "signal-token runs do not match the caption embeddings (one run per generation answer)"
    return None


class InstructionDataset(torch.utils.data.Dataset):
    """Records tokenized once up front (a few thousand rows take about a second).

    With signal tokens, an example whose run cannot feed its output projector — cut by
    ``max_tgt_len``, incomplete in the data, or without a caption embedding — is skipped and
    counted by reason (``skipped`` and the data report), never an error mid-training.
    """

    def __init__(
        self,
        records: list[Record],
        tokenizer: PromptTokenizer,
        features: dict[MediaRef, torch.Tensor],
        max_tgt_len: int,
        signal: SignalTokens | None = None,
        report: DataReport | None = None,
    ):
        self.examples: list[Example] = []
        self.truncated = 0
        self.skipped: Counter = Counter()
        for record in records:
            tokens = build_example(tokenizer, record.query, bool(record.media), record.answer, max_tgt_len)
            problem = self._problem(tokens, record, tokenizer, signal)
            if problem:
                self.skipped[problem] += 1
                if report is not None:
                    report.drop(problem, record.id)
                continue
            self.truncated += tokens.truncated
            self.examples.append(replace(
                tokens, input_ids=torch.tensor(tokens.input_ids), labels=torch.tensor(tokens.labels),
                feature=record_feature(record, features), target=record.target, record_id=record.id,
                source=record.source,
            ))
        if self.skipped:
            log.warning("skipped %d examples: %s", sum(self.skipped.values()), dict(self.skipped))

    @staticmethod
    def _problem(tokens: Example, record: Record, tokenizer: PromptTokenizer, signal: SignalTokens | None) -> str | None:
        """Why the example cannot train, or None."""
        if all(label == IGNORE_INDEX for label in tokens.labels):
            return "answer cut entirely by max_tgt_len (over-long query)"
        if signal is None:
            return None
        problem = run_problem(tokens.labels, record, signal)
        if problem and tokens.truncated:
            whole = build_example(tokenizer, record.query, bool(record.media), record.answer, max_tgt_len=1 << 30)
            if run_problem(whole.labels, record, signal) is None:
                return "signal-token run cut by max_tgt_len"
        return problem

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        example = self.examples[index]
        if example.target is None:
            return example
        return replace(example, target_value=torch.from_numpy(example.target.store.load(example.target.name)))


def stack_targets(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Output modality → its examples' caption embeddings stacked in row order: the model's
    ``targets`` (a modality without a run in the batch is absent)."""
    by_modality: dict[str, list[torch.Tensor]] = {}
    for e in examples:
        if e.target is not None:
            by_modality.setdefault(e.target.modality, []).append(e.target_value)
    return {m: torch.stack(by_modality[m]) for m in OUTPUT_MODALITIES if m in by_modality}


class Collator:
    """Right padding (pad = EOS, as the original) and the caption embeddings of each output
    modality in row order (``targets``, see ``stack_targets``).

    No attention mask: under causal attention a real token never sees the padding to its right,
    so the mask changes nothing that the loss reads (the padding's own outputs carry no label).
    Without it SDPA runs its causal flash kernel; with it, transformers builds a 4-D mask and
    SDPA falls back to a slower masked kernel (tests/test_packing.py checks the losses match).
    """

    def __init__(self, pad_token_id: int, feature_dim: int):
        self.pad_token_id = pad_token_id
        self.feature_dim = feature_dim

    def __call__(self, examples: list[Example]) -> Batch:
        input_ids = pad_sequence([e.input_ids for e in examples], batch_first=True, padding_value=self.pad_token_id)
        labels = pad_sequence([e.labels for e in examples], batch_first=True, padding_value=IGNORE_INDEX)
        inputs = {"input_ids": input_ids, "labels": labels, "slot_features": self.slot_features(examples)}
        inputs["targets"] = stack_targets(examples)
        return Batch(inputs, [e.record_id for e in examples], sum(len(e.input_ids) for e in examples))

    def slot_features(self, examples: list[Example]) -> torch.Tensor:
        """The media features in example order, one per example that has a slot."""
        features = [e.feature for e in examples if e.feature is not None]
        return torch.stack(features) if features else torch.zeros(0, self.feature_dim)


class PackingCollator(Collator):
    """Padding-free batches: the micro-batch's examples packed into as few rows of at most
    ``row_length`` tokens as fit, balanced (longest first, each into the shortest row) so the
    rows end at nearly the same length; each example's position ids restart at 0.

    No attention mask is passed: transformers sees the restarts in ``position_ids`` and builds a
    block-diagonal causal mask, so no token attends across examples (with flash attention, the
    variable-length kernel). Each example starts with BOS, whose label is ignored, so the
    shifted loss never predicts across a boundary. Slots and caption targets keep the packed
    (row-major) order. A bounded row keeps SDPA's masked attention, which does not skip the
    masked blocks, from growing quadratically with the micro-batch. ``width_multiple`` rounds the
    rows' width up (at most ``row_length``) so that batches take few shapes.
    """

    def __init__(self, pad_token_id: int, feature_dim: int, row_length: int, width_multiple: int = 0):
        super().__init__(pad_token_id, feature_dim)
        self.row_length, self.width_multiple = row_length, width_multiple

    def _balanced_rows(self, examples: list[Example]) -> tuple[list[list[Example]], list[int]]:
        sizes = [len(e.input_ids) for e in examples]
        if max(sizes) > self.row_length:
            raise ValueError(f"an example of {max(sizes)} tokens does not fit train.pack_length={self.row_length}; "
                             "raise it to at least data.max_tgt_len plus the prompt prefix")
        order = sorted(range(len(examples)), key=lambda i: -sizes[i])
        count = -(-sum(sizes) // self.row_length)
        while True:
            rows: list[list[Example]] = [[] for _ in range(count)]
            used = [0] * count
            for i in order:
                shortest = min(range(count), key=used.__getitem__)
                rows[shortest].append(examples[i])
                used[shortest] += sizes[i]
            if max(used) <= self.row_length:
                return rows, used
            count += 1

    def __call__(self, examples: list[Example]) -> Batch:
        rows, used = self._balanced_rows(examples)
        width = max(used)
        if self.width_multiple:
            # Padding buys a small set of shapes (what a static-shape compile or CUDA graphs would need).
            width = min(-(-width // self.width_multiple) * self.width_multiple, self.row_length)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        ordered: list[Example] = []
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                end = start + len(example.input_ids)
                input_ids[r, start:end] = example.input_ids
                labels[r, start:end] = example.labels
                position_ids[r, start:end] = torch.arange(end - start)
                start = end
                ordered.append(example)
            position_ids[r, start:] = torch.arange(width - start)  # the padding is a block of its own
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
                  "slot_features": self.slot_features(ordered)}
        inputs["targets"] = stack_targets(ordered)
        return Batch(inputs, [e.record_id for e in ordered], sum(used))


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Random batches of similar length, for one rank of ``world_size``.

    Each epoch shuffles all examples (seeded by ``seed`` and the epoch), cuts the order into
    groups of ``group_batches`` global batches, sorts each group by length and deals its
    batches to the ranks; the order of global batches is shuffled again. Batches stay random
    in content while little compute goes to padding (tiny config, batches of 16: padded
    tokens per real token 2.06 with random batches, 1.05 grouped). Every example appears
    once per epoch; the last global
    batch wraps around to the start so every rank gets the same number of batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, group_batches: int = 32):
        self.lengths = torch.tensor(lengths)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.group_batches, self.epoch = seed, group_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // (self.batch_size * self.world_size))

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        global_batch = self.batch_size * self.world_size
        order = torch.randperm(len(self.lengths), generator=generator)
        order = torch.cat([order, order[: len(self) * global_batch - len(order)]])
        group = global_batch * self.group_batches
        batches = []
        for start in range(0, len(order), group):
            chunk = order[start : start + group]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
        for index in torch.randperm(len(batches), generator=generator).tolist():
            # Deal the sorted global batch round-robin so every rank gets similar lengths.
            yield batches[index][self.rank :: self.world_size].tolist()


class PublishedBatchSampler(torch.utils.data.Sampler):
    """The original's multi-dataset batch sampler, for one rank of ``world_size``.

    Each data file is a dataset. An epoch runs ceil(largest / global batch) rounds; a round
    takes one global batch (``batch_size × world_size`` examples) from each file in turn, so
    an epoch holds about largest file × number of files examples, every micro-batch from one
    file, and the smaller files are seen several times. A file is drawn as successive random
    permutations cut into whole global batches (the remainder of each permutation is dropped,
    as the original's ``drop_last``). Seeded by ``seed`` and the epoch, where the original drew
    from the process's RNG. Each rank takes its contiguous share of the global batch.
    """

    def __init__(self, sources: list[str], batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        groups: dict[str, list[int]] = {}
        for index, source in enumerate(sources):
            groups.setdefault(source, []).append(index)
        self.groups = [torch.tensor(g) for g in groups.values()]
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.epoch = seed, 0
        global_batch = batch_size * world_size
        small = {name: len(g) for name, g in groups.items() if len(g) < global_batch}
        if small:
            name, size = next(iter(small.items()))
            raise ValueError(f"data.sampling=published draws whole global batches of {global_batch} examples from each "
                             f"file, but {name} has {size}: lower train.micro_batch_size, merge the file with another, "
                             "or set data.sampling=shuffled_union")
        self.rounds = -(-max(len(g) for g in self.groups) // global_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rounds * len(self.groups)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        global_batch = self.batch_size * self.world_size
        pending: list[list[torch.Tensor]] = [[] for _ in self.groups]
        for _ in range(self.rounds):
            for g, group in enumerate(self.groups):
                if not pending[g]:
                    order = group[torch.randperm(len(group), generator=generator)]
                    whole = len(order) // global_batch * global_batch
                    pending[g] = list(order[:whole].split(global_batch))
                batch = pending[g].pop(0)
                yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
