"""Candidate speed-ups of our ImageBind forward, measured as bench-only patches (the model
file is untouched): same random huge weights, bf16, eval, inference_mode, one GPU.

variants (applied to the bf16 copy of ours by monkeypatching instances):
  stem   vision patch stem as one GEMM over unfolded 14x14 patches; for a still image
         (both frames equal) the Conv3d weight is summed over its 2 frames first, so the
         GEMM has K=588 instead of 1176 (no repeat, no cuDNN implicit conv)
  gelu   fc1 + exact GELU replaced by cuBLASLt's bias+GELU epilogue
         (torch._addmm_activation(use_gelu=True): the tanh approximation of GELU)
  flash / efficient / cudnn   SDPA backend forced with torch.nn.attention.sdpa_kernel
Each variant: throughput (median of --iters after --warmup, CUDA events) for images
(batch --image-batch) and audio (--audio-batch), and agreement with ours fp32.
Also torch.profiler top kernels of the best eager combination, and of torch.compile(ours)
for images (to see why compile did not help there).

Device:  PYTHONPATH=$PWD/code:/tmp/site python3 bench/imagebind_variants.py
CPU dry: PYTHONPATH=code .venv/bin/python bench/imagebind_variants.py --tiny --iters 2 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# `python bench/imagebind_variants.py` puts bench/ first on the import path.
from imagebind_bench import (  # noqa: E402
    build_reference,
    compare,
    import_reference,
    make_inputs,
    runner,
    vision_flops,
)
from timing import time_fn  # noqa: E402

from toollmm.model import imagebind as ib  # noqa: E402

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def stem_forward(self, x):
    """Patch embedding as a GEMM. self: the vision _PatchStem (proj = [_RepeatFrames, Conv3d])."""
    conv = self.proj[1]
    w = conv.weight  # [D, 3, kt, kh, kw]
    d, c, kt, kh, kw = w.shape
    if x.ndim == 5 and x.shape[2] == 1:
        x = x[:, :, 0]
    if x.ndim == 4:  # still image: every frame equal -> sum the kernel over time
        b, _, h, wd = x.shape
        w2 = w.float().sum(2).to(w.dtype).reshape(d, c * kh * kw)
        p = x.view(b, c, h // kh, kh, wd // kw, kw).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * kh * kw)
    else:  # [B, 3, T, H, W], T == kt
        b, _, t, h, wd = x.shape
        w2 = w.reshape(d, c * kt * kh * kw)
        p = x.view(b, c, t, h // kh, kh, wd // kw, kw).permute(0, 3, 5, 1, 2, 4, 6).reshape(-1, c * kt * kh * kw)
    tokens = (p @ w2.t()).view(b, -1, d)
    if self.norm_layer is not None:
        tokens = self.norm_layer(tokens)
    return tokens


def mlp_gelu_epilogue(self, x):
    shape = x.shape
    h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, shape[-1]), self.fc1.weight.t(), use_gelu=True)
    return self.fc2(h.view(*shape[:-1], -1))


def audio_tokenizer_pad(self, x):
    """The audio tokens plus one trailing dummy token (zeros): the slot of bias_k / bias_v."""
    return F.pad(ib._Tokenizer.forward(self, x), (0, 0, 0, 1))


def attention_kvpad(self, x):
    """add_bias_kv without torch.cat: the last token is a dummy whose projected key and value
    are overwritten by bias_k / bias_v in place, so every real query sees the n real keys
    plus the bias key, as before; the dummy's own output is never read by a real token."""
    b, n, d = x.shape
    qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
    qkv[:, -1, d : 2 * d] = self.bias_k.view(d)
    qkv[:, -1, 2 * d :] = self.bias_v.view(d)
    h = self.num_heads
    q, k, v = (t.unflatten(-1, (h, d // h)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


def patch(model, stem: bool, gelu: bool, kvpad: bool = False):
    m = copy.deepcopy(model)
    if kvpad and "audio" in m.modality_preprocessors:
        t = m.modality_preprocessors["audio"]
        t.forward = types.MethodType(audio_tokenizer_pad, t)
        for mod in m.modality_trunks["audio"].modules():
            if isinstance(mod, ib._Attention) and mod.bias_k is not None:
                mod.forward = types.MethodType(attention_kvpad, mod)
    if stem and "vision" in m.modality_preprocessors:
        s = m.modality_preprocessors["vision"].rgbt_stem
        s.forward = types.MethodType(stem_forward, s)
    if gelu:
        for mod in m.modules():
            if isinstance(mod, ib._Mlp):
                mod.forward = types.MethodType(mlp_gelu_epilogue, mod)
    return m


BACKENDS = {
    "default": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def ctx(backend):
    return sdpa_kernel([BACKENDS[backend]]) if BACKENDS[backend] is not None else contextlib.nullcontext()


def top_kernels(fn, device, n=10):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
    total = sum(e.self_device_time_total for e in evs)
    top = sorted(evs, key=lambda e: e.self_device_time_total, reverse=True)[:n]
    return {
        "total_kernel_ms": total / 1e3,
        "top": [{"kernel": e.key[:140], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in top],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image-batch", type=int, default=128)
    p.add_argument("--audio-batch", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--variants", default="ours+stem,ours+gelu,ours+flash,ours+efficient,ours+stem+gelu,ours+kvpad,ours+stem+gelu+kvpad")
    p.add_argument("--profiles", default="ours+stem+gelu image,ours audio,ref audio,compile image")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = ib.ImageBindConfig.tiny() if args.tiny else ib.ImageBindConfig.huge()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__},
        "settings": vars(args),
    }

    def save():
        (out / "imagebind_variants.json").write_text(json.dumps(res, indent=1))

    torch.manual_seed(0)
    with torch.device(device):
        ours32 = ib.ImageBindEncoder(config).eval()
    ref = build_reference(import_reference(), config, args.tiny)
    ref.load_state_dict(ours32.state_dict(), strict=False)
    ref = ref.to(device=device, dtype=torch.bfloat16).eval()
    gen = torch.Generator(device=device).manual_seed(1)
    agree_in = {
        "image": make_inputs("image", 16, device, torch.float32, config, gen),
        "video": make_inputs("video", 2, device, torch.float32, config, gen),
        "audio": make_inputs("audio", 16, device, torch.float32, config, gen),
    }
    with torch.inference_mode():
        fp32 = {k: runner("ours", ours32)(k, x) for k, x in agree_in.items()}
    base = copy.deepcopy(ours32).to(torch.bfloat16)
    del ours32
    # stem check in fp32-free form: the GEMM stem vs the conv stem on the bf16 model
    xb = {k: make_inputs(k, args.image_batch if k == "image" else args.audio_batch, device, torch.bfloat16, config) for k in ("image", "audio")}

    variants = {
        "ours": (False, False, "default", False),
        "ours+stem": (True, False, "default", False),
        "ours+gelu": (False, True, "default", False),
        "ours+flash": (False, False, "flash", False),
        "ours+efficient": (False, False, "efficient", False),
        "ours+stem+gelu": (True, True, "default", False),
        "ours+kvpad": (False, False, "default", True),
        "ours+stem+gelu+kvpad": (True, True, "default", True),
    }
    keep = args.variants.split(",")
    variants = {k: v for k, v in variants.items() if k in keep or k == "ours"}
    rows = {}
    for name, (stem, gelu, backend, kvpad) in variants.items():
        m = patch(base, stem, gelu, kvpad) if (stem or gelu or kvpad) else base
        row = {}
        try:
            with torch.inference_mode(), ctx(backend):
                row["agreement_vs_fp32"] = {
                    k: compare(runner("ours", m)(k, x.to(torch.bfloat16)), fp32[k]) for k, x in agree_in.items()
                }
                for k in ("image", "audio"):
                    ts = time_fn(lambda: runner("ours", m)(k, xb[k]), args.warmup, args.iters, device)
                    row[k] = {"batch": xb[k].shape[0], "median_s": statistics.median(ts), "per_s": xb[k].shape[0] / statistics.median(ts)}
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rows[name] = row
        log(name, {k: round(v["per_s"], 1) for k, v in row.items() if isinstance(v, dict) and "per_s" in v}, row.get("error", ""))
        if m is not base:
            del m
        res["variants"] = rows
        save()
        if name == "ours":  # reference in the same run, right after the baseline
            rr = {}
            with torch.inference_mode():
                for k in ("image", "audio"):
                    ts = time_fn(lambda: runner("ref", ref)(k, xb[k]), args.warmup, args.iters, device)
                    rr[k] = {"batch": xb[k].shape[0], "per_s": xb[k].shape[0] / statistics.median(ts)}
            rows["ref"] = rr
            log("ref", {k: round(v["per_s"], 1) for k, v in rr.items()})
    # best sdpa backend combined with stem+gelu
    best_backend = max(
        ("default", "flash", "efficient"),
        key=lambda b: rows.get("ours" if b == "default" else f"ours+{b}", {}).get("image", {}).get("per_s", 0),
    )
    if best_backend != "default" and "ours+stem+gelu" in variants:
        m = patch(base, True, True)
        with torch.inference_mode(), ctx(best_backend):
            r = {"agreement_vs_fp32": {k: compare(runner("ours", m)(k, x.to(torch.bfloat16)), fp32[k]) for k, x in agree_in.items()}}
            for k in ("image", "audio"):
                ts = time_fn(lambda: runner("ours", m)(k, xb[k]), args.warmup, args.iters, device)
                r[k] = {"batch": xb[k].shape[0], "per_s": xb[k].shape[0] / statistics.median(ts)}
        rows[f"ours+stem+gelu+{best_backend}"] = r
        log(f"ours+stem+gelu+{best_backend}", {k: round(v["per_s"], 1) for k, v in r.items() if "per_s" in v})
    res["variants"] = rows
    save()

    fl = vision_flops(config)["flops_per_image"]
    for name, r in rows.items():
        for k in ("image", "audio"):
            if "per_s" in r.get(k, {}):
                r[k]["speedup_vs_ref"] = r[k]["per_s"] / rows["ref"][k]["per_s"]
        if "per_s" in r.get("image", {}):
            r["image"]["mfu"] = r["image"]["per_s"] * fl / 1e12 / args.peak_tflops
    save()

    if cuda:
        prof = {}
        want = args.profiles.split(",")
        m = patch(base, True, True, True)
        with torch.inference_mode():
            if "ours+stem+gelu image" in want:
                prof["ours+stem+gelu image"] = top_kernels(lambda: runner("ours", m)("image", xb["image"]), device)
            if "ours+stem+gelu+kvpad audio" in want:
                prof["ours+stem+gelu+kvpad audio"] = top_kernels(lambda: runner("ours", m)("audio", xb["audio"]), device)
            if "ours audio" in want:
                prof["ours audio"] = top_kernels(lambda: runner("ours", base)("audio", xb["audio"]), device)
            if "ref audio" in want:
                prof["ref audio"] = top_kernels(lambda: runner("ref", ref)("audio", xb["audio"]), device)
        res["profiles"] = prof
        save()
        if "compile image" in want and time.time() - T0 < args.budget_s:
            try:
                cm = torch.compile(base)
                with torch.inference_mode():
                    cm("vision", xb["image"])
                    prof["compile image"] = top_kernels(lambda: cm("vision", xb["image"]), device)
            except Exception as err:  # noqa: BLE001
                prof["compile image"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            save()
        for name, pr in prof.items():
            if "top" in pr:
                print(f"\n-- {name}: kernels {pr['total_kernel_ms']:.1f} ms")
                for e in pr["top"]:
                    print(f"  {e['ms']:8.2f} ms x{e['calls']:<4d} {e['kernel'][:110]}")
    res["elapsed_s"] = time.time() - T0
    save()

    print(f"\nvariants, bf16, {res['machine']['device']}: images @{args.image_batch}, audio inputs @{args.audio_batch}")
    print(f"{'variant':<28} {'img/s':>8} {'x ref':>6} {'MFU':>6} {'aud/s':>8} {'x ref':>6}  min cos img/vid/aud  max|d| img/vid/aud")
    for name, r in rows.items():
        if "image" not in r:
            print(f"{name:<28} {r.get('error')}")
            continue
        i, a = r["image"], r["audio"]
        ag = r.get("agreement_vs_fp32", {})
        cos = "/".join(f"{ag[k]['min_cosine']:.5f}" for k in ag) if ag else "-"
        mx = "/".join(f"{ag[k]['max_abs_diff']:.1e}" for k in ag) if ag else "-"
        print(
            f"{name:<28} {i['per_s']:8.1f} {i.get('speedup_vs_ref', 1):6.3f} {100 * i.get('mfu', 0):5.1f}% "
            f"{a['per_s']:8.1f} {a.get('speedup_vs_ref', 1):6.3f}  {cos}  {mx}"
        )


if __name__ == "__main__":
    main()
