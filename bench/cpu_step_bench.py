"""One training step of the tiny LLM alone on the CPU: forward, backward (loss on the last
answer-sized slice, as ``train.answer_logits_only``) and AdamW, in fp32 and under bf16 autocast.
The floor under the tiny main job's training loop, which adds data, projector and DeepSpeed.

    python bench/cpu_step_bench.py [--batch 16] [--tokens 80] [--steps 20]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from toollmm.config import resolve_path


def time_steps(model, optimizer, ids: torch.Tensor, answer: int, steps: int, bf16: bool) -> float:
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            hidden = model.model(input_ids=ids).last_hidden_state[:, -answer:]
            logits = model.lm_head(hidden).float()
        F.cross_entropy(logits.flatten(0, 1), ids[:, -answer:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):  # warm-up: allocator and oneDNN kernel selection
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default="pretrained_checkpoint/LLM_ckpt/tiny_llama")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=80, help="padded length of a row")
    parser.add_argument("--answer", type=int, default=12, help="answer tokens a row (the loss's positions)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_path(args.llm), dtype=torch.float32, attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, batch {args.batch} x {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads, {args.steps} steps after 3")
    for bf16 in (False, True):
        seconds = time_steps(model, optimizer, ids, args.answer, args.steps, bf16)
        print(f"{'bf16 autocast' if bf16 else 'fp32':14} {seconds:.3f} s a step")


if __name__ == "__main__":
    main()
