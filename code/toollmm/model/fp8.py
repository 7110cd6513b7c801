"""FP8 matmuls for the frozen base weights of the LLM's decoder layers (``train.fp8``).

Under LoRA the base weights never train, so their matmuls (the forward, and the gradient that
flows back through them to the input) are most of a step's work at 7B: 71% of the GPU time is
dense matmuls in a profiled step of the fast path. Each frozen ``nn.Linear`` becomes a
:class:`FrozenFloat8Linear`, which multiplies e4m3 inputs by an e4m3 copy of its weight with
``torch._scaled_mm``, and the e5m2 incoming gradient by the same copy transposed.

The scaling is torchao's float8 training recipe (one dynamic scale per tensor: max(|x|) mapped
to the format's largest value; saturating casts; fast accumulation in the forward only), so the
numbers are those of torchao's ``Float8Linear`` (tests/test_fp8.py compares them bit for bit).
What differs is the weight: torchao casts it to FP8 in every forward and again in every backward
(at 7B, two passes over 13 GB of bf16 weights a step), which a weight that never changes does not
need. Here it is cast once, when the layer is swapped, and kept in both layouts ``_scaled_mm``
takes (2 bytes a parameter: the size of the bf16 weight, which stays for checkpoints, the base
fingerprint and merging LoRA). The weight gradient is never computed.

The LoRA adapters, the input projector, the LM head and the loss stay in the model's dtype.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_CUDA_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9: L4, L40S, RTX 4090) and Hopper (9.0: H100, H200) onwards."""
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
"""e4m3 for inputs and weights (precision), e5m2 for gradients (range), as torchao."""
MIN_AMAX = 1e-12
"""torchao's floor under max(|x|): an all-zero tensor gets a finite scale."""


def fp8_targets(layers: nn.Module) -> list[str]:
    """Names (under ``layers``) of the linear layers FP8 applies to: frozen, not a LoRA adapter,
    and with both dimensions multiples of 16 (``torch._scaled_mm`` needs that)."""
    return [name for name, module in layers.named_modules() if _is_target(module, name)]


def _is_target(module: nn.Module, name: str) -> bool:
    if type(module) is not nn.Linear or "lora_" in name or module.weight.requires_grad:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # max(|x|) per row first, then over the rows: the same number (a max is exact), but faster
    # compiled with a dynamic row count (one H200, SwiGLU output of 4700 x 11008 cast to e4m3:
    # 262 against 353 us a call, bench/fp8_amax.py). The amax passes were 22% of the FP8 step's GPU time.
    # The scale in float64, as torchao: 1/amax rounds alike eager and compiled.
    amax = x.abs().amax(dim=-1).max().to(torch.float64)
    return (torch.finfo(dtype).max / amax.clamp(min=MIN_AMAX)).to(torch.float32)


def _cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Saturating: eager casts in torch 2.11 turn a finite overflow into NaN instead of the largest value.
    limit = torch.finfo(dtype).max
    return (x.to(torch.float32) * scale).clamp(-limit, limit).to(dtype)


@torch._dynamo.allow_in_graph  # as torchao's: AOTAutograd traces forward and backward; dynamo tracing it fails
class _FrozenWeightFloat8Matmul(torch.autograd.Function):
    """``x @ weight.T`` in FP8 with the weight's FP8 copies given; the gradient reaches ``x`` only."""

    @staticmethod
    def forward(ctx, x, weight_e4m3, weight_e4m3_t, weight_scale):
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # _scaled_mm takes its first operand row-major
        x_scale = _scale(rows, E4M3)
        out = torch._scaled_mm(_cast(rows, x_scale, E4M3), weight_e4m3.t(), scale_a=x_scale.reciprocal(),
                               scale_b=weight_scale.reciprocal(), out_dtype=x.dtype, use_fast_accum=True)
        ctx.save_for_backward(weight_e4m3_t, weight_scale)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight_e4m3_t, weight_scale = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_scale = _scale(rows, E5M2)
        grad_x = torch._scaled_mm(_cast(rows, grad_scale, E5M2), weight_e4m3_t.t(), scale_a=grad_scale.reciprocal(),
                                  scale_b=weight_scale.reciprocal(), out_dtype=grad.dtype, use_fast_accum=False)
        return grad_x.reshape(*grad.shape[:-1], grad_x.shape[-1]), None, None, None


class FrozenFloat8Linear(nn.Linear):
    """A frozen ``nn.Linear`` that multiplies in FP8 from copies of its weight cast once.

    Keeps ``weight`` (and ``bias``) as they were, so state dicts and the base fingerprint see an
    ordinary linear layer. The copies are non-persistent buffers held as integer views: a module
    ``.to(dtype)`` or ``.bfloat16()`` converts floating-point buffers, and would turn the FP8 bytes
    and the fp32 scale into bf16.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device) -> FrozenFloat8Linear:
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=False)
        layer.weight, layer.bias = linear.weight, linear.bias
        weight = linear.weight.detach().to(device)
        scale = _scale(weight, E4M3)
        weight_e4m3 = _cast(weight, scale, E4M3)
        layer.register_buffer("weight_e4m3", weight_e4m3.view(torch.uint8), persistent=False)
        layer.register_buffer("weight_e4m3_t", weight_e4m3.t().contiguous().view(torch.uint8), persistent=False)
        layer.register_buffer("weight_scale", scale.reshape(1).view(torch.int32), persistent=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _FrozenWeightFloat8Matmul.apply(x, self.weight_e4m3.view(E4M3), self.weight_e4m3_t.view(E4M3),
                                              self.weight_scale.view(torch.float32).reshape(()))
        return out if self.bias is None else out + self.bias.to(out.dtype)


def use_fp8_for_frozen_linears(layers: nn.Module, device: torch.device) -> list[str]:
    """Swap the frozen linear layers under ``layers`` (the decoder layers) for
    :class:`FrozenFloat8Linear`, casting their weights on ``device``; returns the swapped names.
    Call it before ``torch.compile``: compiled, the input and gradient casts fuse into the
    surrounding kernels."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CUDA_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"train.fp8 needs FP8 tensor cores (compute capability 8.9 or more: L4, L40S, H100, H200); "
                         f"{name} has {'.'.join(map(str, torch.cuda.get_device_capability(device)))}. Set train.fp8=false")
    targets = fp8_targets(layers)
    if not targets:
        raise ValueError("train.fp8 found no frozen linear layer in the decoder layers to run in FP8: it speeds up "
                         "the frozen base under model.tuning=lora")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = layers.get_submodule(parent_name) if parent_name else layers
        setattr(parent, child, FrozenFloat8Linear.from_linear(getattr(parent, child), device))
    if device.type == "cpu":
        log.warning("train.fp8 on the CPU: the FP8 matmuls run, but slower than bf16 (no FP8 units)")
    return targets
