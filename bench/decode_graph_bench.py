"""Batched decoding steps of a random-init LLaMA over a static KV cache, eager against a CUDA graph
of the step (``torch.cuda.graph``, no compiler): milliseconds a step, and whether both give the
same logits.

The eager step is what ``generate`` runs when answering: about 1500 kernel launches a 7B forward,
each with its Python and dispatcher work on the host. A graph replays all of a step's kernels with
one launch, so the two figures tell the host's share of a step from the GPU's (on one H100: 44 ms
eager against 40 ms as a graph at 768 rows, 46 against 23 ms at 384; bench/results/eval_speed.md). It is
captured per batch shape in about one forward's time, where ``inference.compile`` pays inductor's
compile. The rows are left padded as in ``generate_responses`` and attend through a boolean
(rows, 1, 1, cache) mask that the steps update in place. Each step ends with a host read of the
next tokens, as ``generate``'s stop check does. On a CPU only the eager steps run (a dry run).

    python bench/decode_graph_bench.py --preset vicuna-7b --rows 768 384 --prompt 80 --steps 24
"""

from __future__ import annotations

import argparse
import json
import inspect
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from make_random_llm import COMMON, PRESETS, build_random_llm
from timing import sync

PRESETS = {**PRESETS, "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, **COMMON)}


def build(preset: str, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(**PRESETS[preset])
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return build_random_llm(config, device, dtype).requires_grad_(False)


def cache_arguments(model) -> tuple[str, bool]:
    """The forward's name for the cache (``cache`` in recent transformers 5, ``past_key_values``
    before) and whether it still takes ``cache_position`` (later caches count their own length)."""
    parameters = inspect.signature(model.model.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "cache_position" in parameters


class Batch:
    """Left-padded prompts, their cache and the step inputs, all in fixed tensors (a graph reads
    its inputs from the addresses it was captured with)."""

    def __init__(self, model, rows: int, prompt: int, steps: int, max_pad: int, device, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.model, self.prompt, self.length = model, prompt, prompt + steps
        self.prompt_ids = torch.randint(3, model.config.vocab_size, (rows, prompt), generator=generator).to(device)
        pad = torch.randint(0, max_pad + 1, (rows,), generator=generator).to(device)
        self.valid = torch.zeros(rows, self.length, dtype=torch.bool, device=device)
        self.valid[:, :prompt] = torch.arange(prompt, device=device)[None] >= pad[:, None]
        self.next_position = self.valid.sum(-1, keepdim=True)  # positions as generate computes them
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.cache = None
        self.cache_name, self.takes_cache_position = cache_arguments(model)

    def _cache_kwargs(self, positions: torch.Tensor) -> dict:
        kwargs = {self.cache_name: self.cache}
        if self.takes_cache_position:
            kwargs["cache_position"] = positions
        return kwargs

    def cache_counters(self) -> list[torch.Tensor]:
        """The cache's small tensors (lengths written so far): a step run outside the timed loop
        advances them, and they are put back in place (the graph holds their addresses)."""
        return [t for layer in self.cache.layers for t in vars(layer).values()
                if isinstance(t, torch.Tensor) and t.numel() < 1024]

    @torch.no_grad()
    def prefill(self) -> None:
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.length)
        key, query = torch.arange(self.length, device=self.valid.device), torch.arange(self.prompt, device=self.valid.device)
        mask = (key[None, None, :] <= query[None, :, None]) & self.valid[:, None, :]
        positions = (self.valid[:, : self.prompt].cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=self.prompt_ids, attention_mask=mask[:, None], position_ids=positions, logits_to_keep=1,
                            **self._cache_kwargs(torch.arange(self.prompt, device=key.device))).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.copy_(self.next_position)
        self.cache_position.fill_(self.prompt)
        self.valid[:, self.prompt :] = False

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        # The slot of this step's token turns valid; the mask is a view of the fixed `valid`.
        self.valid.scatter_(1, self.cache_position.expand(self.valid.shape[0], 1), True)
        return self.model(input_ids=self.token, attention_mask=self.valid[:, None, None, :], position_ids=self.position,
                          **self._cache_kwargs(self.cache_position)).logits[:, -1]

    def advance(self, logits: torch.Tensor) -> None:
        self.token.copy_(logits.argmax(-1, keepdim=True))
        self.position += 1
        self.cache_position += 1


def decode(batch: Batch, steps: int, step_fn, device) -> tuple[list[float], list[torch.Tensor]]:
    """Per-step seconds (host clock around a step and its host read) and each step's logits."""
    seconds, logits = [], []
    for _ in range(steps):
        start = time.perf_counter()
        out = step_fn()
        batch.advance(out)
        batch.token.max().item()  # generate's stop check reads the tokens on the host every step
        seconds.append(time.perf_counter() - start)
        logits.append(out.float().cpu())
    return seconds, logits


def run(model, rows: int, prompt: int, steps: int, max_pad: int, device) -> dict:
    record = {"rows": rows, "prompt": prompt, "steps": steps}
    batch = Batch(model, rows, prompt, steps, max_pad, device)
    batch.prefill()
    sync(device)
    eager_seconds, eager_logits = decode(batch, steps - 1, batch.step, device)
    record["eager_ms_per_step"] = round(1e3 * statistics.median(eager_seconds[1:]), 2)
    if device.type != "cuda":
        return record
    batch = Batch(model, rows, prompt, steps, max_pad, device)
    batch.prefill()
    start = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    # The capture runs the step once without executing it; a warm-up on a side stream first
    # (cuBLAS handles and workspaces are created outside the capture). It writes this step's
    # slot of the cache, which the first replay writes again.
    counters = [t.clone() for t in batch.cache_counters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        batch.step()
        batch.valid[:, prompt:] = False
        for tensor, saved in zip(batch.cache_counters(), counters):
            tensor.copy_(saved)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        graph_out = batch.step()
    batch.valid[:, prompt:] = False  # the capture recorded the mask update without running it
    sync(device)
    record["capture_s"] = round(time.perf_counter() - start, 3)

    def replay() -> torch.Tensor:
        graph.replay()
        return graph_out

    graph_seconds, graph_logits = decode(batch, steps - 1, replay, device)
    record["graph_ms_per_step"] = round(1e3 * statistics.median(graph_seconds[1:]), 2)
    record["speedup"] = round(record["eager_ms_per_step"] / record["graph_ms_per_step"], 2)
    record["max_abs_logit_difference"] = max((a - b).abs().max().item() for a, b in zip(eager_logits, graph_logits))
    record["same_tokens"] = all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(eager_logits, graph_logits))
    record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vicuna-7b")
    parser.add_argument("--rows", type=int, nargs="+", default=[768, 384])
    parser.add_argument("--prompt", type=int, default=80, help="prompt length, padding included")
    parser.add_argument("--steps", type=int, default=24, help="new tokens (the first comes from the prefill)")
    parser.add_argument("--max-pad", type=int, default=16, help="left padding, at most, per row")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model = build(args.preset, device)
    sync(device)
    print(json.dumps({"preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "build_s": round(time.perf_counter() - start, 1), "torch": torch.__version__}), flush=True)
    for rows in args.rows:
        print(json.dumps(run(model, rows, args.prompt, args.steps, args.max_pad, device)), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
