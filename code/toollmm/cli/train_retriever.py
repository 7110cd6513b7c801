"""Train the open-set tool retriever (``toollmm.tool_retriever``) for a checkpoint, on the same
training rows as its LLM (the checkpoint config's data files and split, held-out tools left out),
and report its recall on the test split::

    python code/train_retriever.py --ckpt ckpt/tiny_unseen/final
    python code/inference.py --ckpt ckpt/tiny_unseen/final --split test --output preds.json \
        inference.constrained=true inference.top_k=5 inference.open_set_slots=3

The retriever is written to ``<ckpt>/tool_retriever`` (``--output`` to choose), where inference
looks for it. ``--catalogue FILE``: entries with task, description or tags for the trained tools
(default: their names alone, which is all the bundled data gives). Seconds to a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import fields
from pathlib import Path

from toollmm.catalogue import CatalogueError, ToolEntry, read_tool_entries
from toollmm.checkpoint import read_checkpoint_config
from toollmm.cli.text_baseline import format_table
from toollmm.data import load_splits
from toollmm.open_set import query_groups, recall_by_group
from toollmm.tool_retriever import RetrieverSettings, train_retriever

log = logging.getLogger("train_retriever")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder whose training rows to learn from")
    parser.add_argument("--output", type=Path, default=None, help="folder to write (default: <ckpt>/tool_retriever)")
    parser.add_argument("--catalogue", type=Path, default=None, help="catalogue file of tool entries (default: names)")
    for f in fields(RetrieverSettings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, _ = read_checkpoint_config(args.ckpt)
    except FileNotFoundError as err:
        raise SystemExit(f"train_retriever: {err}") from None
    splits = load_splits(config.data)
    try:
        entries = read_tool_entries(args.catalogue) if args.catalogue else [ToolEntry(name=n) for n in splits.catalogue]
        start = time.perf_counter()
        retriever = train_retriever(splits.train, entries, RetrieverSettings(**{f.name: getattr(args, f.name)
                                                                               for f in fields(RetrieverSettings)}))
    except (CatalogueError, ValueError) as err:
        raise SystemExit(f"train_retriever: {err}") from None
    log.info("trained on %d rows of %d tools in %.1f s", len(splits.train), len(retriever.trained_tools),
             time.perf_counter() - start)
    output = retriever.save(args.output or args.ckpt / "tool_retriever")
    queries = splits.test_queries()
    if queries:
        # The retriever alone, over the tools it did not train on (what open-set slots draw from).
        ranked = retriever.rank_new_tools([q.query for q in queries], entries, 5)
        recall = recall_by_group([[t["tool"] for t in top] for top in ranked], [q.tools for q in queries],
                                 [query_groups(splits.tool_split(q), q.input_modality) for q in queries])
        print(f"test split, the retriever over the {len(entries) - len(retriever.trained_tools)} tools without a "
              f"training row:\n{format_table(recall)}")
        (output / "test_recall.json").write_text(json.dumps(recall, indent=1) + "\n")
    print(f"tool retriever written to {output}")
    return output


if __name__ == "__main__":
    main()
