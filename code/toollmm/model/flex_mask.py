"""Flex attention's block masks for packed training rows, from one compile with dynamic shapes.

transformers builds each batch's ``BlockMask`` with ``torch.compile(create_block_mask)`` under
automatic dynamic shapes: the first batch compiles for its exact rows × length, the second
recompiles with the length symbolic, and the first batch with another number of packed rows
(5 → 6) compiles a third time. At 7B on one H200, steps 2 and 22 of the fast path took 8.6 s and
5.7 s against a median step of 0.24 s, the second inside a measured epoch of 41 s; the same
batches recompile on the CPU (bench/recompile_probe.py, bench/results/speed_7b_stage3.md).
Compiled with ``dynamic=True`` from the first batch, one graph serves every packed shape
(tests/test_packing.py counts the compiles).
"""

from __future__ import annotations

from functools import cache

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, flex_attention_mask


@cache
def _dynamic_create_block_mask():
    return torch.compile(create_block_mask, dynamic=True)


def packed_block_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> BlockMask:
    """transformers' mask interface for ``flex_attention``. Rows without a padding mask or a cache
    offset (packed training batches; their examples' separation is in ``mask_function``) get the
    dynamic-shape compile; anything else goes to transformers' own ``flex_attention_mask``."""
    if attention_mask is not None or q_offset != 0 or kv_offset != 0:
        return flex_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                                   device, **kwargs)
    return _dynamic_create_block_mask()(mask_function, batch_size, None, q_length, kv_length, device=device)


def use_dynamic_block_masks() -> None:
    """Route transformers' ``flex_attention`` masks through :func:`packed_block_mask` (process-wide;
    only training runs flex attention here: checkpoints answer with SDPA)."""
    ALL_MASK_ATTENTION_FUNCTIONS.register("flex_attention", packed_block_mask)
