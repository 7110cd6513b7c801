"""Score tool-selection answers: accuracy, hallucination rate, format accuracy (overall, per input
modality, per ambiguity flag and type, one-to-one vs one-to-multi) and top-k recall, for one
prediction file or several side by side.

    python code/evaluate.py --predictions ckpt/tiny/predictions_test.json --ckpt ckpt/tiny/final \\
        --output-dir ckpt/tiny/eval_test
    python code/evaluate.py --ckpt ckpt/tiny/final --output-dir ckpt/tiny/eval_free_vs_constrained \\
        --predictions free.json constrained.json --labels free constrained

Writes ``metrics.json``, ``report.md`` and ``chart.png`` into ``--output-dir``.
The tool catalogue (union of every tool named by the configured data files) and the
most-frequent-tool baseline (most frequent training target) come from the checkpoint's
config. References (acceptable tools, ``input_modality``, ``ambiguity``, ``ifambiguity``,
``onetomulti``) come from the predictions' own fields, or from a ToolMMBench file given with
``--references`` (``question_id`` as inference.py writes it: ``<file stem>:<modality>/<id>``).
Several files are scored against the same references: the union of their rows, which must
agree where they overlap. Definitions: ``toollmm.evaluate.DEFINITIONS`` (also in the report).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from toollmm.checkpoint import read_checkpoint_config
from toollmm.data import load_splits
from toollmm.data.split import training_records
from toollmm.evaluate import (
    Reference,
    evaluate_predictions,
    format_recall_table,
    format_table,
    load_references,
    most_frequent_tool_baseline,
    write_reports,
)

log = logging.getLogger("toollmm.evaluate")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=Path, nargs="+", required=True, metavar="FILE",
                        help="JSON lists written by inference.py; several are reported side by side")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="one column-group name per --predictions file (default: the file names without .json)")
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint whose config names the data (catalogue, baseline)")
    parser.add_argument("--references", type=Path, default=None, help="ToolMMBench file with the acceptable tools")
    parser.add_argument("--allow-missing", action="store_true",
                        help="count references without a prediction as wrong instead of stopping")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if args.labels is None:
        args.labels = [path.stem for path in args.predictions]
        if len(set(args.labels)) < len(args.labels):
            parser.error(f"prediction files share a name {args.labels}: name their columns with --labels")
    elif len(args.labels) != len(args.predictions):
        parser.error(f"--labels gives {len(args.labels)} names for {len(args.predictions)} --predictions files")
    elif len(set(args.labels)) < len(args.labels):
        parser.error(f"--labels must be distinct, got {args.labels}")
    return args


def references_from_predictions(files: dict[Path, list[dict]]) -> dict[str, Reference]:
    """The union of the files' rows as references; a question must read the same in every file."""
    references: dict[str, Reference] = {}
    for path, predictions in files.items():
        missing = [p.get("question_id") for p in predictions if "acceptable" not in p]
        if missing:
            raise ValueError(f"{path}: rows {missing[:3]} have no 'acceptable' field; pass --references")
        for p in predictions:
            acceptable = [p["acceptable"]] if isinstance(p["acceptable"], str) else p["acceptable"]
            reference = Reference(p["question_id"], [name.strip() for name in acceptable],
                                  p.get("input_modality", "text"), p.get("ambiguity"),
                                  p.get("ifambiguity"), p.get("onetomulti"), p.get("tool_split"))
            known = references.setdefault(reference.question_id, reference)
            if known != reference:
                raise ValueError(f"{path}: question {reference.question_id!r} reads {reference} here but {known} in an "
                                 "earlier file; compare predictions of the same questions, or pass --references")
    return references


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files = {path: json.loads(path.read_text()) for path in args.predictions}
    if args.references is not None:
        # inference.py names a question "<file stem>:<modality>/<id>" (ids repeat across files and modalities).
        references = {f"{args.references.stem}:{key}": ref
                      for key, ref in load_references(json.loads(args.references.read_text())).items()}
    else:
        references = references_from_predictions(files)
    config, _ = read_checkpoint_config(args.ckpt)
    splits = load_splits(config.data)
    catalogue = set(splits.catalogue) | {t for ref in references.values() for t in ref.acceptable}
    runs = {}
    for label, (path, predictions) in zip(args.labels, files.items()):
        try:
            runs[label] = evaluate_predictions(predictions, references, catalogue, allow_missing=args.allow_missing)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    targets = [record.tools[0] for record in training_records(splits.train, config.data.duplicate_rows == "keep")]
    tool, baseline = most_frequent_tool_baseline(targets, references)
    names = ", ".join(path.name for path in args.predictions)
    title = args.title or f"Tool selection: {names}"
    info = {"catalogue_size": len(catalogue), "baseline_tool": tool,
            "predictions": {label: str(path) for label, path in zip(args.labels, args.predictions)},
            "references": str(args.references) if args.references else "the predictions' own fields"}
    single = runs if len(runs) > 1 else runs[args.labels[0]]
    paths = write_reports(single, args.output_dir, title, baseline, info)
    recall = format_recall_table(single)
    print(f"\n{title} (baseline: always '{tool}')\n{format_table(single, baseline)}" + (f"\n{recall}" if recall else ""))
    for label, metrics in runs.items():
        print(f"{label}: accuracy " + "; ".join(f"{rule['accuracy']:.3f} reading the {rule['label']}"
                                                for rule in metrics["answer_rules"].values()))
    log.info("reports: %s", ", ".join(str(p) for p in paths))
    first = runs[args.labels[0]]
    return {"metrics": first, "runs": runs, "baseline": baseline, "baseline_tool": tool}


if __name__ == "__main__":
    main()
