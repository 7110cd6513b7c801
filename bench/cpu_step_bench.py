"""One training step of the tiny LLM alone on the CPU: forward, backward (loss on the last
answer-sized slice, as ``train.answer_logits_only``) and AdamW, in fp32 and under bf16 autocast.
The floor under the tiny main job's training loop, which adds data, projector and DeepSpeed.

It also counts the step's FLOPs (``torch.utils.flop_counter``), times a large matmul for this
machine's peak, and prints how long the main job's training would take at that peak: with
``--metrics`` (a run's ``metrics.jsonl``), over the tokens that run saw.

    python bench/cpu_step_bench.py [--batch 16] [--tokens 80] [--steps 20] [--metrics ckpt/tiny/metrics.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from toollmm.config import resolve_path


def train_step(model, optimizer, ids: torch.Tensor, answer: int, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        hidden = model.model(input_ids=ids).last_hidden_state[:, -answer:]
        logits = model.lm_head(hidden).float()
    F.cross_entropy(logits.flatten(0, 1), ids[:, -answer:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad()


def time_steps(model, optimizer, ids: torch.Tensor, answer: int, steps: int, bf16: bool) -> float:
    for _ in range(3):  # warm-up: allocator and oneDNN kernel selection
        train_step(model, optimizer, ids, answer, bf16)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, ids, answer, bf16)
    return (time.perf_counter() - start) / steps


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n×n matmul: what this machine's math library reaches at best."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default="pretrained_checkpoint/LLM_ckpt/tiny_llama")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=80, help="padded length of a row")
    parser.add_argument("--answer", type=int, default=12, help="answer tokens a row (the loss's positions)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--metrics", type=Path, help="a training run's metrics.jsonl: the floor over its tokens_seen")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_path(args.llm), dtype=torch.float32, attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, batch {args.batch} x {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads, {args.steps} steps after 3")
    seconds = {}
    for bf16 in (False, True):
        seconds[bf16] = time_steps(model, optimizer, ids, args.answer, args.steps, bf16)
        print(f"{'bf16 autocast' if bf16 else 'fp32':14} {seconds[bf16]:.3f} s a step")
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, optimizer, ids, args.answer, bf16=False)
    per_token = counter.get_total_flops() / ids.numel()
    print(f"{per_token / 1e6:.2f} MFLOP a token (forward and backward, counted); "
          f"fp32 step at {per_token * ids.numel() / seconds[False] / 1e9:.1f} GFLOP/s")
    peaks = {dtype: matmul_peak(dtype) for dtype in (torch.float32, torch.bfloat16)}
    print("2048x2048 matmul: " + ", ".join(f"{str(d).removeprefix('torch.')} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()))
    if args.metrics:
        rows = [json.loads(line) for line in args.metrics.read_text().splitlines() if line.strip()]
        tokens, elapsed = rows[-1]["tokens_seen"], rows[-1]["elapsed_s"]
        flops = per_token * tokens
        print(f"{args.metrics}: {len(rows)} steps, {tokens} tokens, {flops / 1e12:.1f} TFLOP, trained in {elapsed:.0f} s "
              f"({flops / elapsed / 1e9:.1f} GFLOP/s); at the matmul peak: fp32 {flops / peaks[torch.float32]:.0f} s, "
              f"bf16 {flops / peaks[torch.bfloat16]:.0f} s")


if __name__ == "__main__":
    main()
