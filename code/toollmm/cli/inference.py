"""Answer tool-selection queries with a trained checkpoint.

    python code/inference.py --ckpt ckpt/tiny/final --split test --output ckpt/tiny/predictions_test.json
    python code/inference.py --ckpt CKPT --data combined_data.json --media-root mm_dataset --output preds.json

Writes a JSON list with the original's fields (``question_id``, ``questions``,
``response``) plus ``tool`` (the parsed name, null when the answer is malformed),
``input_modality`` and ``acceptable`` (the reference tools, when known).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from toollmm.checkpoint import load_checkpoint
from toollmm.config import DataFile, resolve_path
from toollmm.data import load_splits
from toollmm.data.dataset import record_feature
from toollmm.data.split import Query, group_queries
from toollmm.data.toolmmbench import DataReport
from toollmm.features import FeatureCache, FrozenEncoder, featurize
from toollmm.generate import generate_responses
from toollmm.model.toollmm import TORCH_DTYPES
from toollmm.prompts import build_example, parse_answer

log = logging.getLogger("toollmm.inference")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder written by training")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", choices=["test", "train"], help="the checkpoint config's test split, or a sample of its training queries")
    source.add_argument("--data", type=Path, help="a ToolMMBench JSON file")
    parser.add_argument("--media-root", type=Path, default=None, help="folder --data's media paths are relative to")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--llm-path", default=None, help="base LLM folder, if it moved since training")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N queries")
    return parser.parse_args(argv)


def select_queries(args, config) -> list[Query]:
    data = config.data
    if args.data is not None:
        media_root = args.media_root or args.data.parent
        data.train_files, data.eval_files = [DataFile(str(args.data.resolve()), str(Path(media_root).resolve()))], []
        data.split.test_fraction = 0.0
        return group_queries(load_splits(data).train)
    splits = load_splits(data)
    return splits.test_queries() if args.split == "test" else splits.train_queries(data.train_eval_queries)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, config, meta = load_checkpoint(args.ckpt, device, llm_path=args.llm_path)
    dtype = TORCH_DTYPES[config.model.dtype] if device.type == "cuda" else torch.float32
    model.to(dtype)
    settings = config.inference
    for name in ("batch_size", "max_new_tokens", "temperature", "top_p"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))

    queries = select_queries(args, config)
    if args.limit:
        queries = queries[: args.limit]
    encoder = FrozenEncoder(resolve_path(config.model.imagebind_path), config.model.imagebind_size, device)
    cache = FeatureCache(resolve_path(config.data.feature_cache_dir), encoder.identity)
    report = DataReport(rows=len(queries), used=len(queries))
    kept, features = featurize([q.record for q in queries], encoder, cache, report)
    kept_ids = {r.id for r in kept}
    queries = [q for q in queries if q.record.id in kept_ids]
    del encoder
    if report.skipped:
        log.warning("%s", report.summary())

    prompts = [
        torch.tensor(build_example(tokenizer, q.record.query, bool(q.record.media), None, config.data.max_tgt_len).input_ids)
        for q in queries
    ]
    responses = generate_responses(
        model, tokenizer, prompts, [record_feature(q.record, features) for q in queries],
        settings.batch_size, settings.max_new_tokens, settings.temperature, settings.top_p,
    )
    rows = [
        {
            "question_id": q.record.id,
            "questions": q.record.query,
            "response": response,
            "tool": parse_answer(response),
            "input_modality": q.record.input_modality,
            "acceptable": q.tools,
        }
        for q, response in zip(queries, responses)
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.output.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=1, ensure_ascii=False)
    os.replace(tmp, args.output)
    log.info("%d answers written to %s", len(rows), args.output)
    return args.output


if __name__ == "__main__":
    main()
