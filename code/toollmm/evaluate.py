"""Tool-selection metrics, a most-frequent-tool baseline, and report files.

Question ids. ToolMMBench ``id`` values repeat across input modalities (text row 1,
image row 1, ... are different queries; they are unique only within one modality), so a
reference is keyed by ``question_key(row)`` = ``"{input_modality}/{id}"``. Predictions
must carry that key as ``question_id``.

The metric definitions are in ``DEFINITIONS`` below; every report includes them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from toollmm.prompts import format_answer, parse_answer

DEFINITIONS = """\
- A response is *well-formed* when `prompts.parse_answer` returns a name: it is
  `{'api_name': NAME}` after cutting at the first `\\n###` and stripping whitespace
  (quotes around NAME are dropped).
- Names are compared as exact, case-sensitive strings after stripping surrounding
  whitespace (Hugging Face resolves ids case-insensitively, but we do not guess).
- *accuracy*: the predicted name is one of the question's acceptable tools.
- *hallucination rate*: the response is well-formed but its name is not in the tool
  catalogue. Format errors are wrong and are not hallucinations.
- *format accuracy*: the response is well-formed.
- Every rate divides by *n*, the number of reference questions. With
  `allow_missing=True` a question without a prediction counts as wrong and not
  well-formed, and is counted as `missing_predictions` (not as a format error);
  otherwise a missing prediction is an error.
"""

# Report rows come in this order; any other modality follows, sorted by name.
MODALITY_ORDER = ("text", "image", "audio", "video")


@dataclass
class Reference:
    question_id: int | str
    acceptable: list[str]
    input_modality: str


def question_key(row: dict) -> str:
    """The question id of a ToolMMBench row (ids are unique only within a modality)."""
    return f"{row['input_modality']}/{row['id']}"


def load_references(rows: list[dict]) -> dict[str, Reference]:
    """References keyed by ``question_key`` from evaluation rows (value: list of
    acceptable tools) or training rows (value: one tool name)."""
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
        references[key] = Reference(key, acceptable, modality)
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


def evaluate_predictions(
    predictions: list[dict],
    references: dict,
    catalogue: set[str],
    allow_missing: bool = False,
) -> dict:
    """Metrics overall and per input modality (see the module docstring)."""
    if not references:
        raise ValueError("no references to evaluate against")
    catalogue = {name.strip() for name in catalogue}
    outside = sorted({t for ref in references.values() for t in ref.acceptable} - catalogue)
    if outside:
        # A correct answer would otherwise count as a hallucination.
        raise ValueError(f"{len(outside)} acceptable tools are not in the catalogue, e.g. {outside[:5]}")

    predicted_tool: dict = {}
    for prediction in predictions:
        question_id = prediction["question_id"]
        if question_id not in references:
            raise ValueError(f"prediction for unknown question_id {question_id!r}")
        if question_id in predicted_tool:
            raise ValueError(f"more than one prediction for question_id {question_id!r}")
        tool = prediction["tool"] if "tool" in prediction else parse_answer(prediction["response"])
        predicted_tool[question_id] = tool.strip() if tool else None

    missing = [qid for qid in references if qid not in predicted_tool]
    if missing and not allow_missing:
        raise ValueError(f"{len(missing)} references have no prediction, e.g. {missing[:5]}")

    overall: Counter = Counter()
    by_modality: dict[str, Counter] = {}
    for question_id, reference in references.items():
        outcome = Counter(n=1)
        if question_id not in predicted_tool:
            outcome["missing_predictions"] = 1
        elif (tool := predicted_tool[question_id]) is None:
            outcome["format_errors"] = 1
        else:
            outcome["correct"] = int(tool in reference.acceptable)
            outcome["hallucinated"] = int(tool not in catalogue)
        overall.update(outcome)
        by_modality.setdefault(reference.input_modality, Counter()).update(outcome)

    return {
        "overall": _rates(overall),
        "by_modality": {m: _rates(by_modality[m]) for m in sorted(by_modality, key=_modality_sort_key)},
        "missing_predictions": overall["missing_predictions"],
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


def format_table(metrics: dict, baseline: dict | None = None) -> str:
    """A Markdown table: overall, then one row per input modality."""
    header = ["split", "n", "accuracy", "hallucination rate", "format accuracy"]
    if baseline is not None:
        header.append("baseline accuracy")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [("overall", metrics["overall"])] + list(metrics["by_modality"].items())
    for name, stats in rows:
        cells = [name, str(stats["n"]), f"{stats['accuracy']:.3f}",
                 f"{stats['hallucination_rate']:.3f}", f"{stats['format_accuracy']:.3f}"]
        if baseline is not None:
            base = baseline["overall"] if name == "overall" else baseline["by_modality"].get(name)
            cells.append(f"{base['accuracy']:.3f}" if base else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    # A reader (or a crash mid-write) never sees a half-written report.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_reports(metrics: dict, out_dir: Path, title: str, baseline: dict | None = None) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``report.md`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, report_path = out_dir / "metrics.json", out_dir / "report.md"
    payload = {"title": title, "metrics": metrics, "baseline": baseline}
    _write_atomically(json_path, json.dumps(payload, indent=2) + "\n")
    report = [f"# {title}", "", format_table(metrics, baseline)]
    if metrics["missing_predictions"]:
        report.append(f"{metrics['missing_predictions']} questions had no prediction (counted as wrong).\n")
    if baseline is not None:
        report.append("Baseline: always answering the most frequent training tool.\n")
    report += ["## Definitions", "", DEFINITIONS]
    _write_atomically(report_path, "\n".join(report))
    return json_path, report_path
