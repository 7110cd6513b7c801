"""Validate a training config's ToolMMBench data and write the split it trains and evaluates on::

    python code/preprocess_dataset.py --config tiny --output-dir data/splits/tiny

writes ``train.json`` (one row per (request, tool), the published training layout),
``test.json`` (one row per request with the list of acceptable tools, the evaluation
layout), ``catalogue.json`` (every tool name), ``tools.jsonl`` (one catalogue entry a tool: its
name, the input modalities and a few queries of its training rows) and ``report.json`` (rows read, used,
skipped by reason, with examples naming file and row). Running it twice gives identical files.
Both JSON files are ToolMMBench rows: a ``data.train_files`` or ``data.eval_files`` entry may name them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from toollmm.catalogue import describe_tools, write_tool_entries
from toollmm.config import ConfigError, load_config
from toollmm.data import load_splits
from toollmm.data.records import UNREADABLE_FILE, Record
from toollmm.data.split import group_queries, training_records
from toollmm.modalities import MODALITIES


def to_row(record: Record, index: int, tools: str | list[str]) -> dict:
    """A ToolMMBench row: one tool (training layout) or the list of acceptable tools (evaluation)."""
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
    try:
        config = load_config(args.stage, args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"preprocess_dataset: {err}") from None
    splits = load_splits(config.data)
    records = training_records(splits.train, config.data.duplicate_rows == "keep")
    train = [to_row(record, i + 1, record.tools[0]) for i, record in enumerate(records)]
    if not train:
        unreadable = splits.report.examples.get(UNREADABLE_FILE, [])
        raise SystemExit("preprocess_dataset: no usable training row in data.train_files"
                         + (f": {unreadable[0]}" if unreadable else f" ({splits.report.summary().strip()})"))
    test = [to_row(query, i + 1, query.tools) for i, query in enumerate(group_queries(splits.test))]
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    for name, payload in (("train.json", train), ("test.json", test), ("catalogue.json", splits.catalogue),
                          ("report.json", splits.report.to_dict())):
        (out / name).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    write_tool_entries(out / "tools.jsonl", describe_tools(splits.catalogue, splits.train))
    print(f"{len(train)} training rows, {len(test)} test queries, {len(splits.catalogue)} tools → {out}\n"
          f"{splits.report.summary()}")
    return out


if __name__ == "__main__":
    main()
