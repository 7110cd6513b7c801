"""Which batches of an epoch make torch.compile recompile, found on the CPU in minutes.

Replays a stage-3 run's micro-batches (by default the fast path's: bench/speed_fast.yaml over
gpu_smoke.yaml, packed rows under flex attention, compiled decoder layers) through the model,
forward only, with the tiny LLaMA in place of the 7B. Dynamo's guards depend on the shapes and
the code path, not the model's size or the device, so the batches that recompile here are the
ones that recompile on the GPU. The layers compile with the ``aot_eager`` backend: inductor's
C++ flex attention template does not build with dynamic shapes on the CPU (torch 2.11), and
FlexAttention has no CPU backward. Prints each batch's shape and seconds; run it with
``TORCH_LOGS=recompiles`` to see each recompile's failed guard.

    TORCH_LOGS=recompiles python bench/recompile_probe.py --batches 40 [key=value ...]
"""

from __future__ import annotations

import argparse
import time

import torch

import toollmm.recipe as recipe
from toollmm.config import load_config
from toollmm.recipe import TrainingRecipe

LAYERS = ["tiny", "bench/gpu_smoke.yaml", "bench/speed_fast.yaml"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend of the decoder layers")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    overrides = ["model.llm_path=pretrained_checkpoint/LLM_ckpt/tiny_llama", "model.dtype=fp32",
                 "train.output_dir=/tmp/recompile_probe", "data.feature_cache_dir=/tmp/toollmm_features", *args.overrides]
    config = load_config(3, LAYERS, overrides)
    recipe.check_training_device = lambda *_: None  # flex attention runs forward-only here
    compile_layer = torch.nn.Module.compile
    torch.nn.Module.compile = lambda self, **kw: compile_layer(self, **{"backend": args.backend, **kw})
    run = TrainingRecipe(config)
    run.setup()
    run.load_data()
    run.zero3 = False
    model = run._build_model().train()
    run.sampler.set_epoch(0)
    for index, batch in enumerate(run.loader):
        if index == args.batches:
            break
        start = time.perf_counter()
        with torch.no_grad():
            model(**batch.inputs)
        print(f"batch {index}: input_ids {tuple(batch.inputs['input_ids'].shape)}, {time.perf_counter() - start:.2f} s",
              flush=True)


if __name__ == "__main__":
    main()
