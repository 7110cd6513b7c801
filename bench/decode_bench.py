"""Decoding speed of `generate_responses` on a checkpoint, several settings in one process (the
model loads once), on the evaluation workload of bench/eval_speed.sh.

    python3 bench/decode_bench.py --ckpt /tmp/speed_fast/final --data /tmp/eval_2397.json \\
        --variant free:256:dynamic --variant free:1024:static --variant constrained:1024:dynamic --profile

A variant is MODE:BATCH:CACHE[:compile], MODE free or constrained. Prints one JSON line per
variant (seconds, queries/s, LLM forward calls: prefills, decoding steps and rows × steps)
and, with --profile, torch.profiler tables of the first variant's
first batch (GPU time and host time per op) to --out/decode_profile.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from toollmm.catalogue import AnswerTrie
from toollmm.checkpoint import load_for_inference
from toollmm.cli.inference import select_queries
from toollmm.data import load_splits
from toollmm.generate import generate_responses
from toollmm.prompts import build_example


def parse_variant(text: str) -> dict:
    mode, batch, cache, *flags = text.split(":")
    if mode not in ("free", "constrained") or cache not in ("dynamic", "static") or set(flags) - {"compile"}:
        raise SystemExit(f"--variant {text!r}: expected MODE:BATCH:CACHE[:compile], MODE free|constrained, CACHE dynamic|static")
    return {"name": text, "constrained": mode == "constrained", "batch_size": int(batch), "cache": cache,
            "compile": "compile" in flags}


CUDA = torch.cuda.is_available()  # a CPU run only checks the script (tiny checkpoint)


def synchronized_seconds(function) -> tuple[object, float]:
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if CUDA:
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="a ToolMMBench JSON file (its missing media: text-only)")
    parser.add_argument("--variant", action="append", type=parse_variant, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=65536, help="KV-cache cap per batch (inference.max_batch_tokens)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("/tmp/decode_bench"))
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as code/inference.py
    args.out.mkdir(parents=True, exist_ok=True)

    (model, tokenizer, config, _), load_s = synchronized_seconds(lambda: load_for_inference(args.ckpt, "cuda" if CUDA else "cpu"))
    queries = select_queries(SimpleNamespace(data=args.data, media_root=None, split=None), config)
    with_media = [q for q in queries if q.media]
    queries = [q for q in queries if not q.media]  # the bench carries no media: features would need ImageBind
    prompts = [torch.tensor(build_example(tokenizer, q.query, False, None, config.data.max_tgt_len).input_ids)
               for q in queries]
    trie = AnswerTrie(tokenizer, load_splits(config.data).catalogue)
    print(json.dumps({"load_s": round(load_s, 2), "queries": len(prompts), "left_out_with_media": len(with_media),
                      "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
                      "answer_tokens_max": trie.max_length}), flush=True)

    # Forward calls of the LLM, split into prefills and one-token decoding steps: rows × steps is
    # the decoding work whatever the device, so settings compare on a CPU too.
    calls = {"prefill": 0, "decode_steps": 0, "decode_row_steps": 0}

    def count_forward(module, args_, kwargs):
        inputs = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
        if inputs is None or inputs.shape[1] > 1:
            calls["prefill"] += 1
        else:
            calls["decode_steps"] += 1
            calls["decode_row_steps"] += inputs.shape[0]

    model.llm.register_forward_pre_hook(count_forward, with_kwargs=True)

    for index, variant in enumerate(args.variant):
        calls.update(dict.fromkeys(calls, 0))
        def run(prompts=prompts):
            return generate_responses(model, tokenizer, prompts, [None] * len(prompts), variant["batch_size"],
                                      args.max_new_tokens, show_progress=False, cache=variant["cache"],
                                      compile=variant["compile"], max_batch_tokens=args.max_batch_tokens, constraint=trie if variant["constrained"] else None)
        if variant["compile"]:  # compile on one batch first, reported apart
            _, compile_s = synchronized_seconds(lambda: run(prompts[: variant["batch_size"]]))
            variant["first_batch_with_compile_s"] = round(compile_s, 2)
        responses, seconds = synchronized_seconds(run)
        tokens = sum(len(tokenizer.encode(r)) for r in responses)
        print(json.dumps({**variant, "max_batch_tokens": args.max_batch_tokens, "seconds": round(seconds, 2), "queries_per_s": round(len(prompts) / seconds, 1),
                          "generated_tokens_mean": round(tokens / len(responses), 1), **calls,
                          "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if CUDA else None}),
              flush=True)
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        if args.profile and index == 0:
            batch = prompts[: variant["batch_size"]]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as profiler:
                synchronized_seconds(lambda: run(batch))
            events = profiler.key_averages()
            tables = [f"# {variant['name']}, one batch of {len(batch)}\n",
                      events.table(sort_by="cuda_time_total", row_limit=30),
                      events.table(sort_by="self_cpu_time_total", row_limit=30)]
            (args.out / "decode_profile.txt").write_text("\n".join(tables))


if __name__ == "__main__":
    main()
