"""The dynamic FP8 scale of an activation, compiled with a dynamic row count: max(|x|) over the
whole tensor against max(|x|) per row then over the rows (what ``toollmm.model.fp8`` computes).

Each function is the down projection's input cast as the compiled 7B layer does it: SwiGLU's
``silu(gate) * up``, its scale, and the saturating e4m3 cast. Prints microseconds per call (CUDA
events, median of --repeats) and, for each, whether its scale equals eager's and the share of
output bytes that differ from eager's (the compiled SwiGLU may skip eager's bf16 rounding).
Run on a GPU: python bench/fp8_amax.py [--rows 4700 5100] [--features 11008 4096]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from timing import time_fn

E4M3 = torch.float8_e4m3fn


def cast_with(amax_fn):
    def swiglu_to_e4m3(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.silu(gate) * up
        amax = amax_fn(x.abs()).to(torch.float64)
        scale = (torch.finfo(E4M3).max / amax.clamp(min=1e-12)).to(torch.float32)
        limit = torch.finfo(E4M3).max
        return (x.to(torch.float32) * scale).clamp(-limit, limit).to(E4M3), scale
    return swiglu_to_e4m3


VARIANTS = {
    "whole tensor": lambda a: a.max(),
    "rows, then over rows": lambda a: a.amax(dim=-1).max(),
}


def _agreement(out, reference) -> str:
    (x, scale), (x_ref, scale_ref) = out, reference
    differing = (x.view(torch.uint8) != x_ref.view(torch.uint8)).float().mean().item()
    return f"{'same' if torch.equal(scale, scale_ref) else 'other'} scale, {differing:.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4700, 5100], help="tokens in a packed batch")
    parser.add_argument("--features", type=int, nargs="+", default=[11008, 4096])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    compiled = {name: torch.compile(cast_with(fn), dynamic=True) for name, fn in VARIANTS.items()}
    print(f"{'rows x features':>18}" + "".join(f"{name:>24}" for name in compiled) + "   against eager: scale, bytes differing")
    for features in args.features:
        for rows in args.rows:
            gate, up = (torch.randn(rows, features, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            outs = {name: fn(gate, up) for name, fn in compiled.items()}  # compile (and warm up)
            us = {name: 1e6 * statistics.median(time_fn(lambda: fn(gate, up), 5, args.repeats, gate.device))
                  for name, fn in compiled.items()}
            eager = cast_with(VARIANTS["whole tensor"])(gate, up)
            agree = [_agreement(out, eager) for out in outs.values()]
            print(f"{f'{rows} x {features}':>18}" + "".join(f"{us[n]:>21.1f} us" for n in compiled) + "   " + " | ".join(agree))
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
