"""FP8 matmuls for the frozen base weights of the LLM's decoder layers (``train.fp8``).

Under LoRA the base weights never train, so their matmuls (the forward, and the gradient that
flows back through them to the input) are most of a step's work at 7B: 71% of the GPU time is
dense matmuls in a profiled step of the fast path. torchao's float8 training swaps each such
``nn.Linear`` for a ``Float8Linear`` that casts the input, the weight and the incoming gradient to
e4m3 with one dynamic scale per tensor and multiplies them with ``torch._scaled_mm``. The LoRA
adapters, the input projector, the LM head and the loss stay in the model's dtype.

The swapped module keeps its ``weight`` parameter as it was (same dtype and state-dict key), so
checkpoints, the base fingerprint and merging LoRA for inference see an ordinary linear layer.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_CUDA_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9: L4, L40S, RTX 4090) and Hopper (9.0: H100, H200) onwards."""


def fp8_targets(layers: nn.Module) -> list[str]:
    """Names (under ``layers``) of the linear layers FP8 applies to: frozen, not a LoRA adapter,
    and with both dimensions multiples of 16 (``torch._scaled_mm`` needs that)."""
    return [name for name, module in layers.named_modules() if _is_target(module, name)]


def _is_target(module: nn.Module, name: str) -> bool:
    if type(module) is not nn.Linear or "lora_" in name or module.weight.requires_grad:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def use_fp8_for_frozen_linears(layers: nn.Module, device: torch.device) -> list[str]:
    """Swap the frozen linear layers under ``layers`` (the decoder layers) for torchao's
    ``Float8Linear``; returns the swapped names. Call it before ``torch.compile``: compiled, the
    casts fuse into the surrounding kernels and the unused weight gradient is never computed."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CUDA_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"train.fp8 needs FP8 tensor cores (compute capability 8.9 or more: L4, L40S, H100, H200); "
                         f"{name} has {'.'.join(map(str, torch.cuda.get_device_capability(device)))}. Set train.fp8=false")
    try:
        from torchao.float8 import CastConfig, Float8LinearConfig, ScalingType, convert_to_float8_training
    except ImportError as err:
        raise ImportError("train.fp8 uses torchao's float8 training: pip install 'toollmm[fp8]' (torchao), "
                          "or set train.fp8=false") from err
    targets = fp8_targets(layers)
    if not targets:
        raise ValueError("train.fp8 found no frozen linear layer in the decoder layers to run in FP8: it speeds up "
                         "the frozen base under model.tuning=lora")
    chosen = set(targets)
    # The weight gradient stays out of FP8: the weights are frozen, so compiled it is never computed,
    # and its FP8 form would need the token count (its inner dimension) to be a multiple of 16,
    # which torch.compile cannot prove for dynamic sequence lengths and refuses to trace.
    config = Float8LinearConfig(cast_config_input_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED),
                                cast_config_grad_output_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED))
    convert_to_float8_training(layers, module_filter_fn=lambda module, name: name in chosen, config=config)
    if device.type == "cpu":
        log.warning("train.fp8 on the CPU: the FP8 matmuls run, but slower than bf16 (no FP8 units)")
    return targets
