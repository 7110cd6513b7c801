"""Validate and convert data: the ToolMMBench split of a training config, or any raw format.

Config mode — the split a config trains and evaluates on::

    python code/preprocess_dataset.py --config tiny --output-dir data/splits/tiny

writes ``train.json`` (one row per (request, tool), the published training layout),
``test.json`` (one row per request with the list of acceptable tools, the evaluation
layout), ``catalogue.json`` (every tool name) and ``report.json`` (rows read, used,
skipped by reason, with examples).

Convert mode — raw published formats into the unified format of ``toollmm.data.converters``::

    python code/preprocess_dataset.py convert --format caption-pairs \
        --input data/t2x_pairs/webvid/webvid.json \
        --media-root data/t2x_pairs/webvid/videos --output-dir data/unified/webvid

writes unified ``train.json`` / ``test.json`` (split by request) and ``report.json`` (counts
of malformed rows, empty fields, over-length rows, unknown tools, missing media and
duplicates, with examples naming file and row). Formats: toolmmbench, llava, alpaca,
videochat, caption-pairs. Either mode gives byte-identical files when run twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from toollmm.config import ConfigError, load_config
from toollmm.data import load_splits
from toollmm.data.converters import FORMATS, Input, convert, load_catalogue, split_examples, write_examples
from toollmm.data.split import Query, group_queries, training_pairs
from toollmm.data.toolmmbench import UNREADABLE_FILE, Record
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


def convert_main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(
        prog="preprocess_dataset.py convert", description="Convert raw published data into the unified format.")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="the raw format of every --input")
    parser.add_argument("--input", type=Path, action="append", required=True,
                        help="a raw file (JSON list, or .jsonl); repeat for several files of the same format")
    parser.add_argument("--media-root", type=Path, action="append", default=[],
                        help="folder the input's media paths are relative to: once for all inputs, or once per "
                             "--input in the same order (default: the input's folder)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of requests in test.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request → side assignment")
    parser.add_argument("--max-chars", type=int, default=0,
                        help="drop rows whose turn texts together exceed this many characters (0: no limit)")
    parser.add_argument("--catalogue", type=Path, default=None,
                        help="tool names (JSON list or one a line): tool rows naming another tool are dropped")
    parser.add_argument("--missing-media", choices=("skip", "keep", "error"), default="skip",
                        help="rows whose media file is missing: drop them, keep them, or stop (always counted)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    roots = args.media_root or [None]
    if len(roots) not in (1, len(args.input)):
        parser.error(f"give --media-root once, or once per --input ({len(args.input)}); got {len(roots)}")
    roots = roots * len(args.input) if len(roots) == 1 else roots
    inputs = [Input(path, root if root is not None else path.parent) for path, root in zip(args.input, roots)]
    if not 0 <= args.test_fraction <= 1:
        parser.error(f"--test-fraction must be in [0, 1], got {args.test_fraction}")
    catalogue = load_catalogue(args.catalogue) if args.catalogue else None
    examples, report = convert(args.format, inputs, catalogue=catalogue, max_chars=args.max_chars,
                               missing_media=args.missing_media)
    train, test = split_examples(examples, args.test_fraction, args.seed)
    report.settings.update(test_fraction=args.test_fraction, seed=args.seed)
    report.split = {"train": len(train), "test": len(test),
                    "train_requests": len({e.request_key for e in train}),
                    "test_requests": len({e.request_key for e in test})}
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    write_examples(out / "train.json", train)
    write_examples(out / "test.json", test)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(train)} train / {len(test)} test examples → {out}\n{report.summary()}")
    return out


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        return convert_main(argv[1:])
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
    pairs = training_pairs(splits.train, config.data.duplicate_rows == "keep")
    train = [to_row(record, i + 1, tool) for i, (record, tool) in enumerate(pairs)]
    if not train:
        unreadable = splits.report.examples.get(UNREADABLE_FILE, [])
        raise SystemExit("preprocess_dataset: no usable training row in data.train_files"
                         + (f": {unreadable[0]}" if unreadable else f" ({splits.report.summary().strip()})"))
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
