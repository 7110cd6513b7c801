"""Attention kernels at the shapes of batched answering: one LLaMA-7B layer's attention over a
left-padded static KV cache (32 heads of 128), a decoding step (one query a row) and a prefill
(the prompt's queries, causal), each backend timed with CUDA events (median of --repeats).

Backends: SDPA restricted to one kernel (efficient, cudnn, math; flash takes no mask, so it runs
unmasked as a floor), and transformers' eager attention (two matmuls, softmax in fp32). Each
output is compared with a float32 reference on the valid rows. Run on a GPU:

    python bench/attention_bench.py --rows 768 --cache 112 --prompt 88
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from timing import time_fn


def eager_attention(q, k, v, additive_mask):
    # transformers' eager_attention_forward for MHA: scores in the input dtype, softmax in fp32.
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + additive_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def inputs(rows: int, queries: int, cache: int, heads: int, head_dim: int, max_pad: int, seed: int = 0):
    """q, k, v and the boolean mask of rows left-padded by 0..max_pad positions. As in a static
    cache, keys span the whole cache: a prefill's queries are its first ``queries`` positions
    (causal), a decoding step's one query its last position."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shape = (rows, heads, cache, head_dim)
    k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(2))
    q = torch.randn((rows, heads, queries, head_dim), device="cuda", dtype=torch.bfloat16, generator=generator)
    pad = torch.randint(0, max_pad + 1, (rows,), device="cuda", generator=generator)
    key_position = torch.arange(cache, device="cuda")
    query_position = torch.arange(queries, device="cuda") if queries > 1 else torch.tensor([cache - 1], device="cuda")
    mask = (key_position[None, None, :] >= pad[:, None, None]) & (key_position[None, :] <= query_position[:, None])[None]
    return q, k, v, mask[:, None]  # (rows, 1, queries, cache)


def run(rows: int, queries: int, cache: int, max_pad: int, repeats: int, heads: int = 32, head_dim: int = 128) -> list[dict]:
    q, k, v, mask = inputs(rows, queries, cache, heads, head_dim, max_pad)
    additive = torch.zeros(mask.shape, device="cuda", dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    kv_bytes = 2 * k.numel() * k.element_size()
    backends = {
        "sdpa efficient": lambda: _sdpa(SDPBackend.EFFICIENT_ATTENTION, q, k, v, mask),
        "sdpa cudnn": lambda: _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, mask),
        "sdpa math": lambda: _sdpa(SDPBackend.MATH, q, k, v, mask),
        "eager (matmul, fp32 softmax)": lambda: eager_attention(q, k, v, additive),
        "sdpa flash, no mask (floor)": lambda: _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, None),
    }
    records = []
    for name, fn in backends.items():
        record = {"rows": rows, "queries": queries, "cache": cache, "backend": name}
        try:
            out = fn()
            ms = 1e3 * statistics.median(time_fn(fn, 3, repeats, torch.device("cuda")))
        except RuntimeError as err:  # a kernel that does not take these inputs
            records.append({**record, "error": str(err).splitlines()[0][:120]})
            continue
        # Padded query positions see no key (their output is undefined): compare the others.
        seen = mask.any(-1, keepdim=True)
        error = None if "floor" in name else torch.where(seen, (out.float() - reference).abs(), 0).max().item()
        records.append({**record, "ms": round(ms, 4), "kv_gb_per_s": round(kv_bytes / ms / 1e6, 1),
                        "max_abs_error": error})
    return records


def _sdpa(backend, q, k, v, mask):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[768, 256])
    parser.add_argument("--cache", type=int, default=112, help="KV-cache length (longest prompt + new tokens)")
    parser.add_argument("--prompt", type=int, default=88, help="prefill queries (the longest prompt)")
    parser.add_argument("--max-pad", type=int, default=16, help="left padding, at most, per row")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for rows in args.rows:
        for queries in (1, args.prompt):
            for record in run(rows, queries, args.cache, args.max_pad, args.repeats):
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
