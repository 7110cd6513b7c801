"""The text-similarity baseline of open-set tool selection: rank every catalogue tool for each
test query by TF-IDF similarity between the query text and the tool's entry, and report
recall@1/5 for seen and unseen tools, per input modality::

    python code/text_baseline.py --config tiny data.split.unseen_tools=0.2 --output text_baseline.json \
        --predictions text_baseline_predictions.json

``--predictions`` writes the ranking as an inference.py prediction file (the first tool as the
answer, the first five as ``top_k`` with their similarity as score, ``tool_split`` per query), so
that ``evaluate.py`` reports the baseline beside a model's files.

The entries are written from the training rows (as ``preprocess_dataset.py``'s ``tools.jsonl``),
or read from ``--catalogue FILE``. Only the query text is matched: media are not read.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from toollmm.catalogue import CatalogueError, describe_tools, read_tool_entries
from toollmm.config import ConfigError, load_config
from toollmm.data import load_splits
from toollmm.open_set import query_groups, recall_by_group, top_k_by_text
from toollmm.prompts import format_answer


def format_table(recall: dict[str, dict]) -> str:
    keys = [key for key in next(iter(recall.values())) if key != "queries"]
    lines = [f"{'queries':<18}{'n':>6}" + "".join(f"{key:>11}" for key in keys)]
    lines += [f"{label:<18}{row['queries']:>6}" + "".join(f"{row[key]:>11.3f}" for key in keys) for label, row in recall.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML layered over base + stage 3 (as in training)")
    parser.add_argument("--catalogue", type=Path, default=None, help="catalogue file of tool entries (default: from the training rows)")
    parser.add_argument("--output", type=Path, default=None, help="write the recall table and the split's sizes as JSON")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="write the ranking as an inference.py prediction file, for evaluate.py")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. data.split.unseen_tools=0.2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        config = load_config(3, args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"text_baseline: {err}") from None
    splits = load_splits(config.data)
    try:
        entries = read_tool_entries(args.catalogue) if args.catalogue else describe_tools(splits.catalogue, splits.train)
    except CatalogueError as err:
        raise SystemExit(f"text_baseline: {err}") from None
    queries = splits.test_queries()
    ranked = top_k_by_text(entries, [query.query for query in queries])
    rankings = [[entry["tool"] for entry in top] for top in ranked]
    recall = recall_by_group(rankings, [query.tools for query in queries],
                             [query_groups(splits.tool_split(query), query.input_modality) for query in queries])
    print(f"{len(entries)} catalogue tools, {len(splits.unseen_tools)} unseen in training\n{format_table(recall)}")
    if args.output:
        report = {"catalogue_size": len(entries), "unseen_tools": sorted(splits.unseen_tools), "recall": recall}
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    if args.predictions:
        from toollmm.cli.inference import query_row, write_rows  # torch is imported only for this file

        write_rows([query_row(query, format_answer(top[0]["tool"]), top, splits.tool_split_tag(query))
                    for query, top in zip(queries, ranked)], args.predictions)
    return recall


if __name__ == "__main__":
    main()
