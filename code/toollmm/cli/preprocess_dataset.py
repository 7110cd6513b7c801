"""Validate ToolMMBench data and write the split a config trains and evaluates on.

    python code/preprocess_dataset.py --config code/config/tiny.yaml --output-dir data/splits/tiny

Writes ``train.json`` (one row per (request, tool), the published training layout),
``test.json`` (one row per request with the list of acceptable tools, the evaluation
layout), ``catalogue.json`` (every tool name) and ``report.json`` (rows read, used,
skipped by reason, with examples). Running it twice gives the same files. Converters from
other published formats (LLaVA, Alpaca, VideoChat, caption pairs) come with a later issue.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from toollmm.config import load_config
from toollmm.data import load_splits
from toollmm.data.split import Query, group_queries, training_pairs
from toollmm.data.toolmmbench import Record
from toollmm.modalities import MODALITIES


def to_row(record: Record, index: int, tools) -> dict:
    paths = dict(key.split(":", 1) for key in record.media_keys)
    row = {"id": index, "source_id": record.id}
    row.update({spec.row_key: paths.get(name, "") for name, spec in MODALITIES.items()})
    row.update({
        "input_modality": record.input_modality,
        "output_modality": "text",
        "conversations": [
            {"from": "human", "value": record.query, "input_modality": record.input_modality},
            {"from": "gpt", "value": tools, "ambiguity": record.ambiguity, "output_modality": "text"},
        ],
    })
    return row


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--config", action="append", default=[], help="YAML layered over base + stage (as in training)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.stage, args.config, args.overrides)
    splits = load_splits(config.data)
    train = [to_row(record, i + 1, tool) for i, (record, tool) in enumerate(training_pairs(splits.train))]
    test_queries: list[Query] = group_queries(splits.test)
    test = [to_row(q.record, i + 1, q.tools) for i, q in enumerate(test_queries)]
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    for name, payload in (("train.json", train), ("test.json", test), ("catalogue.json", splits.catalogue),
                          ("report.json", splits.report.to_dict())):
        (out / name).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(train)} training rows, {len(test)} test queries, {len(splits.catalogue)} tools → {out}\n"
          f"{splits.report.summary()}")
    return out


if __name__ == "__main__":
    main()
