"""Batched tool-selection inference throughput at 7B shape (goal: the whole benchmark in seconds).

A random-init LLaMA of a published shape (bench/make_random_llm.py) + LoRA + projector in bf16,
the real prompts of the bundled ToolMMBench evaluation file (1917 queries; a random feature
for each media slot, since the media is absent), `generate_responses` at several batch sizes:
free generation (greedy, stop on "\\n###") and constrained decoding over the catalogue trie.
A random model never writes the stop string, so free generation runs to --max-new-tokens: the
worst case. Constrained answers end at the trie's leaf (7-42 tokens).

Device:  PYTHONPATH=$PWD/code:/tmp/site python3 bench/inference_bench.py --llm-path /tmp/v7b
CPU dry: PYTHONPATH=code .venv/bin/python bench/inference_bench.py --llm-path pretrained_checkpoint/LLM_ckpt/tiny_llama --queries 16 --batch-sizes 8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from toollmm.catalogue import AnswerTrie
from toollmm.config import load_config, resolve_path
from toollmm.data import load_splits
from toollmm.data.split import group_queries
from toollmm.generate import generate_responses
from toollmm.model.toollmm import build_model
from toollmm.prompts import build_example
from toollmm.tokenization import load_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"  # the bundled sample data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llm-path", required=True)
    parser.add_argument("--queries", type=int, default=0, help="0: all")
    parser.add_argument("--batch-sizes", default="64,128")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bench = resolve_path(DATA) / "toolmmbench"
    config = load_config(3, overrides=[
        f"model.llm_path={args.llm_path}", "model.tuning=lora",
        f"data.train_files=[{{path: {bench}/audio_tx2t.json, media_root: {bench}}}, {{path: {bench}/video_tx2t.json, media_root: {bench}}}]",
        f"data.eval_files=[{{path: {bench}/combined_data.json, media_root: {bench}}}]", "data.missing_media=text_only"])
    splits = load_splits(config.data)
    queries = group_queries(splits.test)[: args.queries or None]
    tokenizer = load_tokenizer(args.llm_path)
    torch.manual_seed(0)
    model = build_model(config.model, 1024, dtype=dtype).to(device).eval()
    # The tool-selection prompts keep their media slot (the row names a file); its feature is random.
    prompts = [torch.tensor(build_example(tokenizer, q.query, bool(q.media_keys), None, 512).input_ids)
               for q in queries]
    features = [torch.randn(1024) if q.media_keys else None for q in queries]
    trie = AnswerTrie(tokenizer, splits.catalogue)
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        for mode in ("free", "constrained"):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            responses = generate_responses(model, tokenizer, prompts, features, batch_size, args.max_new_tokens,
                                           constraint=trie if mode == "constrained" else None, show_progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            row = {"mode": mode, "batch_size": batch_size, "queries": len(prompts), "seconds": round(seconds, 2),
                   "queries_per_s": round(len(prompts) / seconds, 1),
                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
                   "mean_response_chars": round(sum(map(len, responses)) / len(responses), 1)}
            results.append(row)
            print(row, flush=True)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "llm": args.llm_path,
              "dtype": str(dtype), "max_new_tokens": args.max_new_tokens, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": results}
    Path(args.out, "inference_bench.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
