"""How many batch shapes an epoch of packed micro-batches takes, and what rounding the row width
costs in padding: what CUDA graphs would cost (one recorded per shape; training does not offer
them), counted without a model on the CPU.

Walks one epoch of a stage-3 config's micro-batches (by default the fast path's:
bench/speed_fast.yaml over gpu_smoke.yaml, random rows packed into rows of at most
``train.pack_length`` tokens) through ``PackingCollator`` once per ``--multiples`` value
(``train.pack_width_multiple``; 0 is the longest row) and prints, per value, the distinct
``input_ids`` shapes and the padded tokens per real token. Give ``model.llm_path`` a folder with
the benchmark tokenizer to count at Vicuna-like lengths (``make_random_llm.py --train-tokenizer``).

    python bench/pack_shapes.py --multiples 0,64,128,256 model.llm_path=/tmp/v7b_tok
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections import Counter


from toollmm.config import load_config
from toollmm.data.dataset import PackingCollator
from toollmm.recipe import TrainingRecipe

LAYERS = ["tiny", "bench/gpu_smoke.yaml", "bench/speed_fast.yaml"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--multiples", default="0,64,128,256", help="comma-separated train.pack_width_multiple values")
    parser.add_argument("--epoch", type=int, default=0, help="which epoch's shuffle")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    # No model is built: SDPA only passes the CPU training check (flex attention trains on CUDA),
    # and the shapes do not depend on the attention kernel.
    run_dir = tempfile.mkdtemp(prefix="pack_shapes_")  # the recipe writes its data report there
    overrides = ["model.llm_path=pretrained_checkpoint/LLM_ckpt/tiny_llama", f"train.output_dir={run_dir}",
                 "data.feature_cache_dir=/tmp/toollmm_features", "model.attn_implementation=sdpa", *args.overrides]
    config = load_config(3, LAYERS, overrides)
    t = config.train
    if not t.packing:
        raise SystemExit("the config does not pack rows (train.packing=false): nothing to count")
    run = TrainingRecipe(config)
    run.setup()
    run.load_data()
    shutil.rmtree(run_dir, ignore_errors=True)  # only the examples and the sampler are needed from here
    run.sampler.set_epoch(args.epoch)
    # The epoch's micro-batches as the loader draws them (every index once; the last batch may be short).
    order = list(iter(run.sampler))
    batches = [[run.dataset[i] for i in order[k:k + t.micro_batch_size]] for k in range(0, len(order), t.micro_batch_size)]
    results = {}
    for multiple in (int(value) for value in args.multiples.split(",")):
        collate = PackingCollator(run.tokenizer.pad_token_id, run.encoder_dim, t.pack_length, multiple)
        shapes, cells, real = Counter(), 0, 0
        for examples in batches:
            batch = collate(examples)
            shape = tuple(batch.inputs["input_ids"].shape)
            shapes[shape] += 1
            cells += batch.inputs["input_ids"].numel()
            real += batch.real_tokens
        results[multiple] = {"batches": len(batches), "distinct_shapes": len(shapes),
                             "padded_per_real_token": round(cells / real, 4),
                             "real_tokens_per_batch": round(real / len(batches), 1),
                             "most_common": [[list(s), n] for s, n in shapes.most_common(5)]}
        label = f"pack_width_multiple={multiple}" + (" (the longest row)" if multiple == 0 else "")
        print(f"{label:40} {len(shapes):4d} shapes over {len(batches)} batches, "
              f"{cells / real:.4f} padded tokens per real token; most common {shapes.most_common(3)}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": LAYERS, "overrides": overrides, "pack_length": t.pack_length,
                       "micro_batch_size": t.micro_batch_size, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
