"""Host operators per training micro-batch, counted on the CPU: what an eager step launches.

One forward and backward of the tiny LLaMA under LoRA (q/k/v/o) at the given depths, counted
with torch.profiler as top-level operators (those not inside another; each backward node is
one). The count grows by a fixed number per decoder layer and does not depend on the model's
width or device, so it scales to 7B; on a GPU each operator costs host time whether or not its
kernel is small (bench/results/speed_7b_stage3.md).

    python bench/op_count.py [--layers 4 8] [--batch 4] [--tokens 70]
"""

from __future__ import annotations

import argparse
import copy
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from toollmm.config import load_config
from toollmm.model.toollmm import build_model


def top_level_operators(step) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    by_thread = defaultdict(list)
    for event in prof.events():
        by_thread[event.thread].append(event)
    count = 0
    for events in by_thread.values():
        end = -1
        for event in sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end)):
            if event.time_range.start >= end:
                count, end = count + 1, event.time_range.end
    return count


def count_for_depth(layers: int, batch: int, tokens: int) -> int:
    torch.manual_seed(0)
    model = build_model(load_config(3, ["tiny"], ["model.tuning=lora"]).model, 1024).train()
    decoder = model.decoder_layers()
    depth = len(decoder)
    while len(decoder) < layers:  # deeper than the tiny model: copies of its layers
        decoder.append(copy.deepcopy(decoder[len(decoder) % depth]))
    del decoder[layers:]
    model.causal_lm().config.num_hidden_layers = layers
    ids = torch.randint(3, 2000, (batch, tokens))
    labels = ids.clone()
    labels[:, : tokens * 3 // 4] = -100  # the prompt; the loss on the answer

    def step():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)["loss"].backward()

    step()  # warm-up: lazy initialisation is not part of a step
    return top_level_operators(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=70)
    args = parser.parse_args()
    counts = {layers: count_for_depth(layers, args.batch, args.tokens) for layers in args.layers}
    for layers, count in counts.items():
        print(f"{layers} layers: {count} top-level operators, one forward and backward of {args.batch} x {args.tokens} tokens")
    if len(counts) > 1:
        (low, a), (high, b) = min(counts.items()), max(counts.items())
        per_layer = (b - a) / (high - low)
        outside = a - per_layer * low
        print(f"{per_layer:.0f} a layer, {outside:.0f} outside the layers; at 32 layers {32 * per_layer + outside:.0f}")


if __name__ == "__main__":
    main()
