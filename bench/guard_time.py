"""Host time of torch.compile's guard check per compiled decoder-layer call, with float constants
symbolic (torch's default under ``dynamic=True``) or specialized (what training sets).

A tiny LLaMA with LoRA on q/k/v/o, each layer compiled with ``dynamic=True`` as
``train.compile`` does, trained forward and backward on four lengths, then profiled over ten
more; prints the mean host time of "TorchDynamo Cache Lookup" per layer call. CPU is enough:
the guards run on the host.

    python bench/guard_time.py            # both settings, one process each
"""

from __future__ import annotations

import subprocess
import sys

import torch


def measure(specialize_float: bool) -> float:
    from peft import LoraConfig, get_peft_model
    from torch.profiler import profile
    from transformers import LlamaConfig, LlamaForCausalLM

    torch._dynamo.config.specialize_float = specialize_float
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=100)
    lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(LlamaForCausalLM(config), lora)
    for layer in model.base_model.model.model.layers:
        layer.compile(dynamic=True)
    for length in (37, 45, 51, 60):  # compile, then one dynamic-shape graph for every length
        ids = torch.randint(0, 100, (2, length))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    ids = torch.randint(0, 100, (2, 50))
    with profile() as prof:
        for _ in range(10):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    lookups = [e for e in prof.key_averages() if "Cache Lookup" in e.key]
    return sum(e.cpu_time_total for e in lookups) / sum(e.count for e in lookups)


def main() -> None:
    if len(sys.argv) == 2:  # one setting in this process: dynamo's caches would mix the two
        print(f"{measure(sys.argv[1] == 'specialized'):.1f}")
        return
    for setting in ("symbolic", "specialized"):
        out = subprocess.run([sys.executable, __file__, setting], capture_output=True, text=True, check=True)
        print(f"float constants {setting:>11}: {out.stdout.strip().splitlines()[-1]} us of guard time a layer call")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
