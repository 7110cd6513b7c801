"""Precompute encoder features for every media file a config's data names, into the feature cache.

    python code/extract_features.py --config tiny
    python code/extract_features.py --config my.yaml --split train --batch-size 128 --num-workers 15 --dtype bf16
    python code/extract_features.py --config tiny --data rows.json --media-root media/

Config: ``config/base.yaml`` + ``config/stage_<N>.yaml`` + ``--config`` files + ``key=value``
overrides, as for training; ``model.imagebind_*`` names the encoder and
``data.feature_cache_dir`` the cache. Files already cached (same content, same encoder)
are skipped, so an interrupted run resumes where it stopped, and several runs may fill
one cache at once. Training and inference then load the features instead of decoding.

Prints a JSON report on stdout and writes it to ``--report`` (default
``<feature_cache_dir>/<encoder>/extract_report.json``): files named, found, cached before,
extracted now, missing and corrupt, with examples naming the file and the reason. Missing
and corrupt files do not fail the command (exit 0); a config error does (exit 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from toollmm.config import ConfigError, DataConfig, DataFile, load_config, resolve_path
from toollmm.data.split import split_by_query
from toollmm.data.records import DataFileError, Record, read_json_rows
from toollmm.data.toolmmbench import read_toolmmbench
from toollmm.features import DTYPES, FeatureCache, FrozenEncoder, default_num_workers, extract_features
from toollmm.media import set_limits as set_media_limits

log = logging.getLogger("toollmm.extract_features")

EXAMPLES = 20
"""Files listed per problem in the report (the counts are complete)."""


def split_records(data: DataConfig, split: str) -> list[Record]:
    """The records of ``split`` (train | test | all), split as ``toollmm.data.load_splits`` does, each
    with every media file its row names, on disk or not (the command reports the missing ones);
    rows that training skips as malformed are left out."""

    def read(entries: list[DataFile], key: str) -> list[Record]:
        records = []
        for i, entry in enumerate(entries):
            path = resolve_path(entry.path)
            if not path.is_file():
                raise ConfigError(f"data.{key}[{i}].path: {path} does not exist")
            try:
                records += read_toolmmbench(path, resolve_path(entry.media_root), "keep", entry.media_layout)[0]
            except ValueError as err:  # not JSON / not a list of rows
                raise ConfigError(f"data.{key}[{i}].path: {err}") from err
        return records

    train, test = read(data.train_files, "train_files"), read(data.eval_files, "eval_files")
    if data.split.test_fraction > 0:
        train, test = split_by_query(train + test, data.split.test_fraction, data.split.seed)
    return {"train": train, "test": test, "all": train + test}[split]


# --------------------------------------------------------------------------- command


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, default=3, choices=[3], help="stage whose config layer to read (default 3)")
    parser.add_argument("--config", action="append", default=[], help="extra YAML layered over base + stage")
    parser.add_argument("--split", choices=["train", "test", "all"], default=None,
                        help="which split's media (default all); the split follows data.split as in training")
    parser.add_argument("--data", type=Path, default=None, help="a ToolMMBench JSON file instead of the config's data")
    parser.add_argument("--media-root", type=Path, default=None, help="folder --data's media paths are relative to (default: its folder)")
    parser.add_argument("--batch-size", type=int, default=64, help="media files per encoder batch (default 64)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help=f"decoding processes (default: cores - 1, at most 16; here {default_num_workers()}); 0 decodes in this process")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="encoder precision (bf16/fp16 for GPU); features are stored as float32")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--report", type=Path, default=None, help="where to write the JSON report")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.feature_cache_dir=/scratch/features")
    args = parser.parse_args(argv)
    if args.data is not None and args.split is not None:
        parser.error("--split selects from the config's data; with --data every row of that file is used")
    if args.media_root is not None and args.data is None:
        parser.error("--media-root goes with --data")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.num_workers is not None and args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    args.split = args.split or "all"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, refs, device = setup(args)
    except ConfigError as err:
        raise SystemExit(f"extract_features: {err}") from err

    found = [r for r in refs if r.path.is_file()]
    missing = [r for r in refs if not r.path.is_file()]
    encoder = FrozenEncoder(resolve_path(config.model.imagebind_path), config.model.imagebind_size, device, DTYPES[args.dtype])
    cache = FeatureCache(resolve_path(config.data.feature_cache_dir), encoder.identity, encoder.out_dim)
    num_workers = default_num_workers() if args.num_workers is None else args.num_workers
    start = time.perf_counter()
    result = extract_features(found, encoder, cache, batch_size=args.batch_size, num_workers=num_workers,
                              keep_features=False, progress=not args.quiet)
    seconds = time.perf_counter() - start

    groups = {"files": refs, "found": found, "missing": missing, "cached_before": result.cached,
              "extracted": result.extracted, "corrupt": list(result.failed)}
    report = {
        **{name: len(items) for name, items in groups.items()},
        "by_modality": {
            modality: {name: Counter(r.modality for r in items)[modality] for name, items in groups.items()}
            for modality in sorted({r.modality for r in refs})
        },
        "examples": {
            "missing": [str(r.path) for r in missing[:EXAMPLES]],
            "corrupt": list(result.failed.values())[:EXAMPLES],
        },
        "seconds": round(seconds, 2),
        "extracted_per_s": round(len(result.extracted) / seconds, 2) if result.extracted else 0.0,
        "encoder": encoder.identity,
        "cache_dir": str(cache.root),
        "data": describe_data(config.data, args),
        "device": str(device),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "num_workers": num_workers,
    }
    report_path = args.report or cache.root / "extract_report.json"
    write_json(report_path, report)
    print(json.dumps(report, indent=2))
    log.info("%d files: %d cached before, %d extracted in %.1f s, %d missing, %d corrupt; report %s",
             len(refs), len(result.cached), len(result.extracted), seconds, len(missing), len(result.failed), report_path)
    return report


def setup(args) -> tuple:
    """Config, the media files it names and the device; every problem is a ConfigError, before any model is built."""
    config = load_config(args.stage, args.config, args.overrides)
    set_media_limits(config.data.media_limits)
    if args.data is not None:
        if not args.data.is_file():
            raise ConfigError(f"--data {args.data} does not exist")
        try:
            read_json_rows(args.data, "ToolMMBench rows")
        except DataFileError as err:
            raise ConfigError(f"--data {err}") from None
        media_root = args.media_root or args.data.parent
        config.data.train_files = [DataFile(str(args.data.resolve()), str(Path(media_root).resolve()))]
        config.data.eval_files = []
        config.data.split.test_fraction = 0.0
    imagebind = resolve_path(config.model.imagebind_path)
    if not imagebind.is_file():
        raise ConfigError(f"model.imagebind_path: {imagebind} does not exist (see pretrained_checkpoint/README.md)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible; pass --device cpu")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    records = split_records(config.data, args.split)
    refs = sorted({ref for record in records for ref in record.media}, key=lambda r: (r.modality, str(r.path)))
    return config, refs, device


def file_entry(entry: DataFile) -> dict:
    return {"path": str(resolve_path(entry.path)), "media_root": str(resolve_path(entry.media_root)),
            "media_layout": entry.media_layout}


def describe_data(data: DataConfig, args) -> dict:
    return {
        "split": "all" if args.data is not None else args.split,
        "train_files": [file_entry(f) for f in data.train_files],
        "eval_files": [file_entry(f) for f in data.eval_files],
        "test_fraction": data.split.test_fraction,
    }


def write_json(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    main()
