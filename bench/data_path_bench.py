"""How fast the training data path delivers batches, without a model: is it ever the bottleneck?

Two paths, on the CPU of the machine it runs on:

1. cached features (how training runs): the stage-3 examples of a config (tokenized once up
   front, features loaded from the cache) → DataLoader → padded or packed micro-batches;
   samples/s and real tokens/s per collator and micro-batch size;
2. on-the-fly decoding (what the cache avoids): the ImageBind preprocessing of the bundled
   media files, per file type, in one process (files/s).

    PYTHONPATH=code .venv/bin/python bench/data_path_bench.py --config tiny --json /tmp/data_path.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from toollmm import media
from toollmm.config import load_config, resolve_path
from toollmm.data import load_splits
from toollmm.data.dataset import Collator, InstructionDataset, LengthGroupedBatchSampler, PackingCollator
from toollmm.data.split import training_records
from toollmm.tokenization import load_tokenizer

FEATURE_DIM = 1024


def batches_per_second(dataset, collate, batch_size: int, seconds: float) -> dict:
    sampler = LengthGroupedBatchSampler([len(e.input_ids) for e in dataset.examples], batch_size, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    samples = tokens = cells = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in loader:
            samples += len(batch.record_ids)
            tokens += batch.real_tokens
            cells += batch.inputs["input_ids"].numel()
            if time.perf_counter() - start >= seconds:
                break
    elapsed = time.perf_counter() - start
    return {"samples_per_s": round(samples / elapsed, 1), "real_tokens_per_s": round(tokens / elapsed, 1),
            "padding_fraction": round(1 - tokens / cells, 4)}


def decode_rate(paths: list[Path], load, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for path in paths:
            load(path)
            done += 1
    return round(done / (time.perf_counter() - start), 2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--media-dir", type=Path, default=Path("data"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    config = load_config(3, args.config)
    tokenizer = load_tokenizer(resolve_path(config.model.llm_path))
    splits = load_splits(config.data)
    # Cached-feature stand-ins: one fixed vector per medium (the values do not change the cost).
    features = {ref: torch.zeros(FEATURE_DIM) for record in splits.train for ref in record.media}
    dataset = InstructionDataset(training_records(splits.train), tokenizer, features, config.data.max_tgt_len)
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
               "command": "bench/data_path_bench.py " + " ".join(f"--config {c}" for c in args.config),
               "examples": len(dataset), "cached": {}}
    for batch_size in (16, 64):
        for name, collate in (("padded", Collator(tokenizer.pad_token_id, FEATURE_DIM)),
                              ("packed", PackingCollator(tokenizer.pad_token_id, FEATURE_DIM, 1024))):
            results["cached"][f"{name}_micro{batch_size}"] = batches_per_second(dataset, collate, batch_size, args.seconds)
    t2x = args.media_dir / "t2x_pairs"
    kinds = {"image (JPEG)": (sorted((t2x / "cc3m" / "images").glob("*.jpg")), media.load_image),
             "audio (WAV, 10 s)": (sorted((t2x / "audiocap" / "audios").glob("*.wav")), media.load_audio),
             "video (MP4)": (sorted((t2x / "webvid" / "videos").glob("*.mp4")), media.load_video)}
    results["on_the_fly_files_per_s_one_process"] = {k: decode_rate(paths, load, args.seconds) for k, (paths, load) in kinds.items()}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
