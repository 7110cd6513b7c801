"""Score tool-selection answers: accuracy, hallucination rate, format accuracy; overall and per modality.

    python code/evaluate.py --predictions ckpt/tiny/predictions_test.json --ckpt ckpt/tiny/final \\
        --output-dir ckpt/tiny/eval_test

The tool catalogue (union of every tool named by the configured data files) and the
most-frequent-tool baseline (most frequent training target) come from the checkpoint's
config. References come from the predictions' ``acceptable`` field, or from a ToolMMBench
file given with ``--references`` (``question_id`` as inference.py writes it:
``<file stem>:<modality>/<id>``).
Definitions: ``toollmm.evaluate``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from toollmm.checkpoint import read_checkpoint_config
from toollmm.data import load_splits
from toollmm.data.split import training_pairs
from toollmm.evaluate import (
    Reference,
    evaluate_predictions,
    format_table,
    load_references,
    most_frequent_tool_baseline,
    write_reports,
)

log = logging.getLogger("toollmm.evaluate")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=Path, required=True, help="JSON list written by inference.py")
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint whose config names the data (catalogue, baseline)")
    parser.add_argument("--references", type=Path, default=None, help="ToolMMBench file with the acceptable tools")
    parser.add_argument("--allow-missing", action="store_true",
                        help="count references without a prediction as wrong instead of stopping")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--title", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    predictions = json.loads(args.predictions.read_text())
    if args.references is not None:
        # inference.py names a question "<file stem>:<modality>/<id>" (ids repeat across files and modalities).
        references = {f"{args.references.stem}:{key}": ref
                      for key, ref in load_references(json.loads(args.references.read_text())).items()}
    else:
        missing = [p.get("question_id") for p in predictions if "acceptable" not in p]
        if missing:
            raise ValueError(f"{args.predictions}: rows {missing[:3]} have no 'acceptable' field; pass --references")
        references = {
            p["question_id"]: Reference(p["question_id"], p["acceptable"], p.get("input_modality", "text"))
            for p in predictions
        }
    config, _ = read_checkpoint_config(args.ckpt)
    splits = load_splits(config.data)
    catalogue = set(splits.catalogue) | {t for ref in references.values() for t in ref.acceptable}
    metrics = evaluate_predictions(predictions, references, catalogue, allow_missing=args.allow_missing)
    tool, baseline = most_frequent_tool_baseline([tool for _, tool in training_pairs(splits.train)], references)
    title = args.title or f"Tool selection: {args.predictions.name}"
    write_reports({**metrics, "catalogue_size": len(catalogue), "baseline_tool": tool}, args.output_dir, title, baseline)
    print(f"\n{title} (baseline: always '{tool}')\n{format_table(metrics, baseline)}")
    return {"metrics": metrics, "baseline": baseline, "baseline_tool": tool}


if __name__ == "__main__":
    main()
