"""Tool-selection metrics with breakdowns, top-k recall, a most-frequent-tool baseline, and
report files (JSON, Markdown, PNG chart) for one or several prediction files side by side.

Question ids. ToolMMBench ``id`` values repeat across input modalities (text row 1,
image row 1, ... are different queries; they are unique only within one modality), so a
reference is keyed by ``question_key(row)`` = ``"{input_modality}/{id}"``. Predictions
must carry that key as ``question_id``.

The metric definitions are in ``DEFINITIONS`` below; every report includes them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from toollmm.extras import install_hint, is_installed
from toollmm.prompts import ANSWER_RULES, format_answer, parse_answer

log = logging.getLogger(__name__)

DEFINITIONS = """\
- A response is *well-formed* when `prompts.parse_answer` returns a name: it is
  `{'api_name': NAME}` after cutting at the first `\\n###` and stripping whitespace
  (quotes around NAME are dropped).
- The original read the first line of a response instead (its inference.py); the metrics'
  `answer_rules` give the overall rates under both rules, each labelled (a prediction
  without a `response` counts its `tool` under both).
- Names are compared as exact, case-sensitive strings after stripping surrounding
  whitespace (Hugging Face resolves ids case-insensitively, but we do not guess).
- *accuracy*: the predicted name is one of the question's acceptable tools.
- *hallucination rate*: the response is well-formed but its name is not in the tool
  catalogue. Format errors are wrong and are not hallucinations.
- *format accuracy*: the response is well-formed.
- Every rate divides by *n*, the number of reference questions (of the row's group in a
  breakdown). With `allow_missing=True` a question without a prediction counts as wrong and
  not well-formed, and is counted as `missing_predictions` (not as a format error);
  otherwise a missing prediction is an error.
- *Breakdowns* split the questions into groups; each question is in exactly one group of
  each breakdown.
  - *input modality*: the row's `input_modality`.
  - *ambiguity type*: the row's `ambiguity` (top level, else in the answer turn). Integers
    and integer strings are one key (`4` and `"4"` are `4`); `-1` is `none`; a question
    without the field is `unknown`.
  - *ambiguity flag* (`true` / `false`): the row's `ifambiguity`; without it, derived as
    `ambiguity != -1`; `unknown` when both are absent.
  - *one-to-one / one-to-multi*: the row's `onetomulti`; without it, one-to-multi when the
    question has more than one distinct acceptable tool.
  - *tool seen / unseen* (only when the rows carry `tool_split`, written by inference.py when
    `data.split.unseen_tools` > 0): `unseen` when every acceptable tool was held out of
    training, else `seen`. recall@k is also reported per split and per split and modality.
  - `breakdown_sources` counts how many questions took the field and how many the derived
    value.
- *recall@k* (when predictions carry `top_k`, a list of `{"tool", "score"}`): the fraction
  of the n questions with at least one acceptable tool among the first k distinct tools of
  `top_k`. Entries are ordered by `score`, highest first, with a stable sort (equal scores
  keep the order in the file), within each ranker: entries with `"ranked_by"` (open-set slots'
  `retriever`, whose score is a similarity, not a log-probability) follow the model's entries
  in the order the file lists the rankers; a tool listed twice (after stripping whitespace) keeps its
  first place and counts once. A question without `top_k` or without a prediction is not
  recalled (`with_top_k` counts those that have one). K is the most distinct tools any
  question lists; a shorter list is used whole. recall@1 scores the first `top_k` entry,
  which can differ from the generated `tool`.
- Several prediction files (e.g. free and constrained decoding) are scored against the
  same references and reported side by side, one column group per file.
"""

# Report rows come in this order; any other modality follows, sorted by name.
MODALITY_ORDER = ("text", "image", "audio", "video")

BREAKDOWNS = {
    "by_modality": "input modality",
    "by_ambiguity_flag": "ambiguity flag (ifambiguity)",
    "by_ambiguity_type": "ambiguity type",
    "by_onetomulti": "one-to-one vs one-to-multi",
    "by_tool_split": "tool seen or unseen in training",
}
UNKNOWN = "unknown"


def normalize_ambiguity(value) -> int | str | None:
    """-1 (none) or an ambiguity type id; ``"4"`` and ``4`` both give ``4``; ``None`` when absent."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            return text  # a named type: kept as written, its own group
    raise ValueError(f"ambiguity must be -1 or a type id, got {value!r}")


def normalize_flag(value, name: str) -> bool | None:
    """A boolean field that the data sometimes writes as 0/1 or "true"/"false"."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"{name} must be true or false, got {value!r}")


@dataclass
class Reference:
    question_id: int | str
    acceptable: list[str]
    input_modality: str
    ambiguity: int | str | None = None
    """-1 (none), a type id, or None when the data does not say (normalized on construction)."""
    ifambiguity: bool | None = None
    onetomulti: bool | None = None
    tool_split: str | None = None
    """``seen`` or ``unseen`` (every acceptable tool held out of training), None when the run held none out."""

    def __post_init__(self):
        try:
            self.ambiguity = normalize_ambiguity(self.ambiguity)
            self.ifambiguity = normalize_flag(self.ifambiguity, "ifambiguity")
            self.onetomulti = normalize_flag(self.onetomulti, "onetomulti")
        except ValueError as err:
            raise ValueError(f"question {self.question_id!r}: {err}") from None

    def groups(self) -> dict[str, tuple[str, str]]:
        """Breakdown → (group, where the group came from: "field" or "derived")."""
        if self.ambiguity is None:
            ambiguity_type = UNKNOWN
        else:
            ambiguity_type = "none" if self.ambiguity == -1 else str(self.ambiguity)
        if self.ifambiguity is not None:
            flag = (str(self.ifambiguity).lower(), "field")
        elif self.ambiguity is not None:
            flag = (str(self.ambiguity != -1).lower(), "derived")
        else:
            flag = (UNKNOWN, UNKNOWN)
        if self.onetomulti is not None:
            multi = self.onetomulti, "field"
        else:
            multi = len(set(self.acceptable)) > 1, "derived"
        return {
            "by_modality": (self.input_modality, "field"),
            "by_ambiguity_flag": flag,
            "by_ambiguity_type": (ambiguity_type, "field" if self.ambiguity is not None else UNKNOWN),
            "by_onetomulti": ("one-to-multi" if multi[0] else "one-to-one", multi[1]),
            **({"by_tool_split": (self.tool_split, "field")} if self.tool_split is not None else {}),
        }


def question_key(row: dict) -> str:
    """The question id of a ToolMMBench row (ids are unique only within a modality)."""
    return f"{row['input_modality']}/{row['id']}"


def load_references(rows: list[dict]) -> dict[str, Reference]:
    """References keyed by ``question_key`` from evaluation rows (value: list of
    acceptable tools) or training rows (value: one tool name), with the rows' ambiguity
    metadata (``ambiguity``, ``ifambiguity``, ``onetomulti``) where present."""
    references: dict[str, Reference] = {}
    for index, row in enumerate(rows):
        row_id = row.get("id", f"<row {index}>") if isinstance(row, dict) else f"<row {index}>"

        def malformed(problem: str) -> ValueError:
            return ValueError(f"reference row id={row_id}: {problem}")

        if not isinstance(row, dict):
            raise malformed(f"expected an object, got {type(row).__name__}")
        if "id" not in row:
            raise malformed("missing 'id'")
        conversations = row.get("conversations")
        if not isinstance(conversations, list) or len(conversations) < 2:
            raise malformed("'conversations' must be a list of a human and a gpt turn")
        if not isinstance(conversations[1], dict) or "value" not in conversations[1]:
            raise malformed("conversations[1] has no 'value'")
        value = conversations[1]["value"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise malformed(f"conversations[1].value must be a string or a list of strings, got {value!r}")
        # The data has names with stray spaces (' t5-base'); they name the same tool.
        acceptable = [name.strip() for name in value]
        if not acceptable or not all(acceptable):
            raise malformed("empty tool name or empty list of acceptable tools")
        modality = row.get("input_modality")
        if not isinstance(modality, str) or not modality:
            raise malformed("missing 'input_modality'")
        key = question_key(row)
        if key in references:
            raise malformed(f"duplicate question id {key!r}")
        try:
            references[key] = Reference(
                key, acceptable, modality,
                ambiguity=row.get("ambiguity", conversations[1].get("ambiguity")),
                ifambiguity=row.get("ifambiguity"),
                onetomulti=row.get("onetomulti"),
            )
        except ValueError as err:
            raise malformed(str(err)) from None
    return references


def _rates(counts: Counter) -> dict:
    n = counts["n"]
    return {
        "n": n,
        "correct": counts["correct"],
        "hallucinated": counts["hallucinated"],
        "format_errors": counts["format_errors"],
        "missing_predictions": counts["missing_predictions"],
        "accuracy": counts["correct"] / n,
        "hallucination_rate": counts["hallucinated"] / n,
        "format_accuracy": (n - counts["format_errors"] - counts["missing_predictions"]) / n,
    }


def _modality_sort_key(modality: str) -> tuple:
    if modality in MODALITY_ORDER:
        return (0, MODALITY_ORDER.index(modality), "")
    return (1, 0, modality)


def _group_sort_key(breakdown: str, group: str) -> tuple:
    if breakdown == "by_modality":
        return _modality_sort_key(group)
    if breakdown == "by_tool_split":
        return (0, ("seen", "unseen").index(group), "") if group in ("seen", "unseen") else (1, 0, group)
    if group == UNKNOWN:
        return (3, 0, "")
    if group in ("none", "false", "one-to-one"):
        return (0, 0, "")
    if group in ("true", "one-to-multi"):
        return (1, 0, "")
    try:
        return (1, int(group), "")  # ambiguity types by number
    except ValueError:
        return (2, 0, group)


def ranked_tools(top_k, question_id) -> list[str]:
    """Distinct tool names of a ``top_k`` list, best score first within each ranker (see ``DEFINITIONS``)."""
    if not isinstance(top_k, list):
        raise ValueError(f"question {question_id!r}: top_k must be a list, got {type(top_k).__name__}")
    entries, rankers = [], {"model": 0}
    for entry in top_k:
        if not (isinstance(entry, dict) and isinstance(entry.get("tool"), str)
                and isinstance(entry.get("score"), (int, float)) and not math.isnan(entry["score"])):
            raise ValueError(f"question {question_id!r}: top_k entries must be {{'tool': str, 'score': number}}, "
                             f"got {entry!r}")
        entries.append((rankers.setdefault(entry.get("ranked_by", "model"), len(rankers)), -entry["score"], entry["tool"].strip()))
    entries.sort(key=lambda e: e[:2])  # stable: ties keep the file's order
    return list(dict.fromkeys(tool for _, _, tool in entries))


def score(predicted: dict, question_id, reference, catalogue: set[str]) -> Counter:
    """One question's outcome (n, and correct / hallucinated / format_errors / missing_predictions)."""
    outcome = Counter(n=1)
    if question_id not in predicted:
        outcome["missing_predictions"] = 1
    elif (tool := predicted[question_id]) is None:
        outcome["format_errors"] = 1
    else:
        outcome["correct"] = int(tool in reference.acceptable)
        outcome["hallucinated"] = int(tool not in catalogue)
    return outcome


@dataclass
class Answers:
    """The prediction file read per question: the tool under each answer rule and the ranked tools."""

    tool: dict
    """question id → the tool (stripped) read up to the stop string, None when malformed."""
    first_line_tool: dict
    """question id → the tool read from the response's first line (the original's rule)."""
    ranked: dict
    """question id → distinct tools of its ``top_k``, best first (questions with one only)."""


def read_answers(predictions: list[dict], references: dict) -> Answers:
    """Each prediction's tools; an unknown or repeated ``question_id`` is an error."""
    answers = Answers({}, {}, {})
    for prediction in predictions:
        question_id = prediction["question_id"]
        if question_id not in references:
            raise ValueError(f"prediction for unknown question_id {question_id!r}")
        if question_id in answers.tool:
            raise ValueError(f"more than one prediction for question_id {question_id!r}")
        tool = prediction["tool"] if "tool" in prediction else parse_answer(prediction["response"])
        answers.tool[question_id] = tool.strip() if tool else None
        first_line = parse_answer(prediction["response"], "first_line") if "response" in prediction else tool
        answers.first_line_tool[question_id] = first_line.strip() if first_line else None
        if prediction.get("top_k") is not None:
            answers.ranked[question_id] = ranked_tools(prediction["top_k"], question_id)
    return answers


def first_acceptable_rank(ranking: list[str], acceptable) -> float:
    """The 1-based rank of the first acceptable tool in ``ranking`` (inf when none is): a question
    is recalled at k when this is ≤ k. Tools compare whitespace-stripped, a tool's identity."""
    accepted = {tool.strip() for tool in acceptable}
    return next((rank for rank, tool in enumerate(ranking, 1) if tool.strip() in accepted), math.inf)


def recall_hits(tools: list[str] | None, reference: Reference, max_k: int) -> Counter:
    """One question's recall@1..max_k (``tools``: its ranked tools, None without ``top_k``)."""
    hits = Counter(n=1, with_top_k=int(tools is not None))
    rank = first_acceptable_rank(tools or [], reference.acceptable)
    for k in range(1, max_k + 1):
        hits[f"recall@{k}"] = int(rank <= k)
    return hits


def recall_metrics(hits: dict[str, Counter], references: dict, max_k: int) -> dict:
    """recall@1..max_k overall, per input modality and, when the references carry a tool split,
    per split (``by_tool_split``) and per split and modality (``by_tool_split_modality``,
    groups named ``unseen/image``), from each question's ``recall_hits``."""
    overall: Counter = Counter()
    sections: dict[str, dict[str, Counter]] = {"by_modality": {}, "by_tool_split": {}, "by_tool_split_modality": {}}
    for question_id, reference in references.items():
        overall.update(hits[question_id])
        sections["by_modality"].setdefault(reference.input_modality, Counter()).update(hits[question_id])
        if reference.tool_split is not None:
            sections["by_tool_split"].setdefault(reference.tool_split, Counter()).update(hits[question_id])
            sections["by_tool_split_modality"].setdefault(f"{reference.tool_split}/{reference.input_modality}",
                                                          Counter()).update(hits[question_id])

    def rates(counts: Counter) -> dict:
        return {"n": counts["n"], "with_top_k": counts["with_top_k"],
                **{f"recall@{k}": counts[f"recall@{k}"] / counts["n"] for k in range(1, max_k + 1)}}

    def order(group: str) -> tuple:
        split, _, modality = group.rpartition("/")
        return (_group_sort_key("by_tool_split", split) if split else ()), _modality_sort_key(modality)

    return {"k": max_k, "overall": rates(overall),
            **{name: {g: rates(groups[g]) for g in sorted(groups, key=order)}
               for name, groups in sections.items() if groups or name == "by_modality"}}


def evaluate_predictions(
    predictions: list[dict],
    references: dict,
    catalogue: set[str],
    allow_missing: bool = False,
) -> dict:
    """Metrics overall and per breakdown group, and recall@k when predictions carry
    ``top_k`` (see ``DEFINITIONS``)."""
    if not references:
        raise ValueError("no references to evaluate against")
    catalogue = {name.strip() for name in catalogue}
    outside = sorted({t for ref in references.values() for t in ref.acceptable} - catalogue)
    if outside:
        # A correct answer would otherwise count as a hallucination.
        raise ValueError(f"{len(outside)} acceptable tools are not in the catalogue, e.g. {outside[:5]}")
    answers = read_answers(predictions, references)
    missing = [qid for qid in references if qid not in answers.tool]
    if missing and not allow_missing:
        raise ValueError(f"{len(missing)} references have no prediction, e.g. {missing[:5]}")

    overall: Counter = Counter()
    groups: dict[str, dict[str, Counter]] = {name: {} for name in BREAKDOWNS}
    sources: dict[str, Counter] = {"ifambiguity": Counter(), "onetomulti": Counter()}
    by_rule = {rule: Counter() for rule in ANSWER_RULES}
    for question_id, reference in references.items():
        outcome = score(answers.tool, question_id, reference, catalogue)
        by_rule["stop_string"].update(outcome)
        by_rule["first_line"].update(score(answers.first_line_tool, question_id, reference, catalogue))
        overall.update(outcome)
        question_groups = reference.groups()
        for breakdown, (group, _) in question_groups.items():
            groups[breakdown].setdefault(group, Counter()).update(outcome)
        sources["ifambiguity"][question_groups["by_ambiguity_flag"][1]] += 1
        sources["onetomulti"][question_groups["by_onetomulti"][1]] += 1

    max_k = max((len(tools) for tools in answers.ranked.values()), default=0)
    hits = {qid: recall_hits(answers.ranked.get(qid), ref, max_k) for qid, ref in references.items()}
    # by_tool_split stays empty unless the references carry a tool split: it is then left out.
    groups = {breakdown: by_group for breakdown, by_group in groups.items() if by_group}
    return {
        "overall": _rates(overall),
        **{breakdown: {g: _rates(by_group[g]) for g in sorted(by_group, key=lambda g: _group_sort_key(breakdown, g))}
           for breakdown, by_group in groups.items()},
        "breakdown_sources": {name: dict(sorted(counts.items())) for name, counts in sources.items()},
        "missing_predictions": overall["missing_predictions"],
        "answer_rules": {rule: {"label": ANSWER_RULES[rule], **_rates(counts)} for rule, counts in by_rule.items()},
        "top_k_recall": recall_metrics(hits, references, max_k) if max_k else None,
    }


def most_frequent_tool_baseline(train_tools: list[str], references: dict) -> tuple[str, dict]:
    """The most frequent training target (ties: first by name) and its metrics."""
    counts = Counter(tool.strip() for tool in train_tools)
    if not counts:
        raise ValueError("no training tools")
    tool = min(counts, key=lambda name: (-counts[name], name))
    catalogue = set(counts) | {t for ref in references.values() for t in ref.acceptable}
    predictions = [{"question_id": qid, "response": format_answer(tool)} for qid in references]
    return tool, evaluate_predictions(predictions, references, catalogue)


def _as_runs(metrics_or_runs: dict) -> dict[str, dict]:
    """``{label: metrics}``; a single metrics dict is one run without a label."""
    return {"": metrics_or_runs} if "overall" in metrics_or_runs else metrics_or_runs


def _suffix(label: str) -> str:
    return f" ({label})" if label else ""


def format_table(metrics: dict, baseline: dict | None = None, breakdown: str = "by_modality") -> str:
    """A Markdown table with one column group per run: ``metrics`` is one run's metrics or
    ``{label: metrics}``. ``by_modality`` starts with the overall row."""
    runs = _as_runs(metrics)
    first = next(iter(runs.values()))
    header = ["split", "n"]
    for label in runs:
        header += [f"{name}{_suffix(label)}" for name in ("accuracy", "hallucination rate", "format accuracy")]
    if baseline is not None:
        header.append("baseline accuracy")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    names = (["overall"] if breakdown == "by_modality" else []) + list(first[breakdown])
    for name in names:
        per_run = [run["overall"] if name == "overall" else run[breakdown].get(name) for run in runs.values()]
        if any(stats is not None and stats["n"] != per_run[0]["n"] for stats in per_run):
            raise ValueError(f"runs were scored against different references ({breakdown} {name!r})")
        cells = [name, str(per_run[0]["n"])]
        for stats in per_run:
            cells += ([f"{stats['accuracy']:.3f}", f"{stats['hallucination_rate']:.3f}", f"{stats['format_accuracy']:.3f}"]
                      if stats else ["-"] * 3)
        if baseline is not None:
            base = baseline["overall"] if name == "overall" else baseline[breakdown].get(name)
            cells.append(f"{base['accuracy']:.3f}" if base else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


RECALL_SECTIONS = ("by_modality", "by_tool_split", "by_tool_split_modality")


def format_recall_table(metrics: dict) -> str | None:
    """recall@1..K overall, per modality and per tool split (when known), one column group per
    run that has ``top_k``; None when no run has it."""
    runs = {label: m["top_k_recall"] for label, m in _as_runs(metrics).items() if m.get("top_k_recall")}
    if not runs:
        return None
    first = next(iter(runs.values()))
    header = ["split", "n"]
    for label, recall in runs.items():
        header += [f"recall@{k}{_suffix(label)}" for k in range(1, recall["k"] + 1)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for section, name in [("overall", "overall"), *((s, g) for s in RECALL_SECTIONS for g in first.get(s, {}))]:
        def stats_of(recall: dict) -> dict | None:
            return recall["overall"] if section == "overall" else recall.get(section, {}).get(name)
        cells = [name, str(stats_of(first)["n"])]
        for recall in runs.values():
            stats = stats_of(recall)
            cells += [f"{stats[f'recall@{k}']:.3f}" if stats else "-" for k in range(1, recall["k"] + 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, data: str | bytes) -> None:
    # A reader (or a crash mid-write) never sees a half-written report.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; reports are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _plot_split_recall(ax, split_runs: dict) -> None:
    """Bars of recall@1 and recall@K for seen and unseen tools, one bar per run."""
    groups = [(split, k) for split in ("seen", "unseen") for k in sorted({1, max(r["k"] for r in split_runs.values())})]
    width = 0.8 / len(split_runs)
    for i, ((label, colour), recall) in enumerate(split_runs.items()):
        values = [recall["by_tool_split"].get(split, {}).get(f"recall@{min(k, recall['k'])}", 0.0) for split, k in groups]
        ax.bar([x + (i - (len(split_runs) - 1) / 2) * width for x in range(len(groups))], values, width,
               label=label, color=colour)
    ax.set_xticks(range(len(groups)), [f"{split}\nrecall@{k}" for split, k in groups])
    ax.set_ylim(0, 1.05)
    ax.set_title("seen vs unseen tools")


def render_chart(metrics: dict, title: str) -> bytes:
    """PNG: grouped bars of accuracy / hallucination rate / format accuracy, overall and per
    modality, one bar per run; plus recall@k lines (overall) when any run has ``top_k``, and
    seen vs unseen recall bars when the questions carry a tool split."""
    # The Figure API renders with Agg without touching pyplot's global backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = _as_runs(metrics)
    labels = [label or "predictions" for label in runs]
    # One colour per run in every panel.
    recall_runs = {(label or "predictions", f"C{i}"): m["top_k_recall"]
                   for i, (label, m) in enumerate(runs.items()) if m.get("top_k_recall")}
    split_runs = {key: recall for key, recall in recall_runs.items() if recall.get("by_tool_split")}
    panels = [("accuracy", "accuracy"), ("hallucination_rate", "hallucination rate"), ("format_accuracy", "format accuracy")]
    extra = bool(recall_runs) + bool(split_runs)
    figure = Figure(figsize=(4.2 * (len(panels) + extra), 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels) + extra, squeeze=False)[0]
    splits = ["overall", *next(iter(runs.values()))["by_modality"]]
    width = 0.8 / len(runs)
    for ax, (key, name) in zip(axes, panels):
        for i, (label, run) in enumerate(zip(labels, runs.values())):
            values = [(run["overall"] if s == "overall" else run["by_modality"].get(s, {})).get(key, 0.0) for s in splits]
            ax.bar([x + (i - (len(runs) - 1) / 2) * width for x in range(len(splits))], values, width,
                   label=label, color=f"C{i}")
        ax.set_xticks(range(len(splits)), splits)
        ax.set_ylim(0, 1.05)
        ax.set_title(name)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=len(runs))
    if split_runs:
        _plot_split_recall(axes[-1], split_runs)
    if recall_runs:
        ax = axes[len(panels)]
        for (label, colour), recall in recall_runs.items():
            ks = list(range(1, recall["k"] + 1))
            ax.plot(ks, [recall["overall"][f"recall@{k}"] for k in ks], marker="o", label=label, color=colour)
        ax.set_xlabel("k")
        ax.set_xticks(range(1, max(r["k"] for r in recall_runs.values()) + 1))
        ax.set_ylim(0, 1.05)
        ax.set_title("recall@k (overall)")
        ax.legend(fontsize="small")
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_reports(
    metrics: dict, out_dir: Path, title: str, baseline: dict | None = None, info: dict | None = None
) -> tuple[Path, Path, Path]:
    """Write ``metrics.json``, ``report.md`` and ``chart.png`` into ``out_dir``; return their paths.

    ``metrics``: one run's metrics, or ``{label: metrics}`` for several prediction files side
    by side. In the JSON, ``runs`` holds every run and ``metrics`` the first (single-file
    readers need nothing else); ``info`` (catalogue size, baseline tool, files) is stored as is.
    """
    runs = _as_runs(metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, report_path, chart_path = out_dir / "metrics.json", out_dir / "report.md", out_dir / "chart.png"
    payload = {"title": title, "labels": list(runs), "metrics": next(iter(runs.values())), "runs": runs,
               "baseline": baseline, "info": info or {}, "definitions": DEFINITIONS}
    _write_atomically(json_path, json.dumps(payload, indent=2) + "\n")

    report = [f"# {title}", ""]
    if len(runs) > 1:
        report.append("Prediction files side by side: " + ", ".join(f"`{label}`" for label in runs) + ".\n")
    report.append(format_table(runs if len(runs) > 1 else metrics, baseline))
    for label, run in runs.items():
        if run["missing_predictions"]:
            report.append(f"{run['missing_predictions']} questions had no prediction{_suffix(label)} (counted as wrong).\n")
    if baseline is not None:
        report.append("Baseline: always answering the most frequent training tool.\n")
    for breakdown, name in list(BREAKDOWNS.items())[1:]:
        if breakdown not in next(iter(runs.values())):
            continue
        report += [f"## By {name}", "", format_table(runs if len(runs) > 1 else metrics, baseline, breakdown)]
    first = next(iter(runs.values()))
    sources = first["breakdown_sources"]
    report.append("Group sources (questions): " + "; ".join(
        f"{field}: " + ", ".join(f"{count} {src}" for src, count in counts.items()) for field, counts in sources.items()
    ) + ".\n")
    recall = format_recall_table(runs if len(runs) > 1 else metrics)
    report += ["## Top-k recall", ""]
    if recall is None:
        report.append("No prediction file carries `top_k` (inference.py `inference.top_k=K`).\n")
    else:
        report.append(recall)
        without = [label or "predictions" for label, run in runs.items() if not run.get("top_k_recall")]
        if without:
            report.append("No `top_k` in: " + ", ".join(f"`{label}`" for label in without) + ".\n")
    # The chart is the one part that needs matplotlib (the [plots] extra); the figures are all above.
    with_chart = is_installed("matplotlib")
    if with_chart:
        report.append(f"![chart]({chart_path.name})\n")
    else:
        log.warning("no chart.png: %s", install_hint("matplotlib"))
        report.append(f"No chart: matplotlib is not installed ({install_hint('matplotlib')}).\n")
    report += ["## Definitions", "", DEFINITIONS]
    _write_atomically(report_path, "\n".join(report))
    if with_chart:
        _write_atomically(chart_path, render_chart(metrics, title))
    return json_path, report_path, chart_path
