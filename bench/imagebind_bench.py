"""ImageBind-huge forward throughput and precision: ours (toollmm.model.imagebind) vs Meta's reference.

Random-init weights of the real huge shapes, built on the device; ours is initialised, then
its vision/audio state dict is copied into the reference ``imagebind_huge(pretrained=False)``
(identical key names), so both compute the same function on the same inputs.

Measures (one process, one GPU):
  * throughput in bf16 (module and inputs cast to bf16, eval, inference_mode): images/s
    ([B,3,224,224]), audio inputs/s ([B,3,1,128,204]: one input = 3 clips), videos/s
    ([B,15,3,2,224,224]: 5 clips x 3 crops); median of --iters timed iterations (CUDA
    events) after --warmup; ours and the reference alternate batch size by batch size;
  * optionally ours under torch.compile (marked "ours+compile"), at the best eager batch size;
  * agreement: ours bf16 / fp16 vs ours fp32 (min cosine, max |diff|), ours fp32 vs
    reference fp32 (max |diff|, TF32 off);
  * MFU of the vision forward (FLOP formula in ``vision_flops``) against --peak-tflops;
  * torch.profiler top kernels of one vision forward at batch 128, ours and reference.

Prints a short table last and writes JSON to $OUT/imagebind_bench.json (or --out).

Device:  PYTHONPATH=$PWD/code:/tmp/site python3 bench/imagebind_bench.py
CPU dry: PYTHONPATH=code .venv/bin/python bench/imagebind_bench.py --tiny --iters 2 --warmup 1
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from timing import sync, time_fn  # bench/timing.py: the script's folder is on the import path

from toollmm.model.imagebind import ImageBindConfig, ImageBindEncoder

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# --------------------------------------------------------------------------- reference import


def import_reference():
    """``imagebind.models.imagebind_model`` without ``imagebind/__init__`` (which imports
    data.py -> pytorchvideo, torchaudio, decord: not needed for the model)."""
    try:  # pytorchvideo 0.1.5 needs this alias if anything does import imagebind.data
        import torchvision.transforms._functional_tensor as _ft

        sys.modules.setdefault("torchvision.transforms.functional_tensor", _ft)
    except ImportError:
        pass
    spec = importlib.util.find_spec("imagebind")
    if spec is None:
        raise ImportError("imagebind-unofficial is not installed")
    if "imagebind" not in sys.modules:
        pkg = types.ModuleType("imagebind")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["imagebind"] = pkg
    try:
        import iopath.common.file_io  # noqa: F401
    except ImportError:  # only the text tokenizer uses it
        for name in ("iopath", "iopath.common", "iopath.common.file_io"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["iopath.common.file_io"].g_pathmgr = None
    from imagebind.models import imagebind_model

    return imagebind_model


def build_reference(ref_mod, config: ImageBindConfig, tiny: bool):
    if not tiny:
        return ref_mod.imagebind_huge(pretrained=False)
    c = config
    small = dict(embed_dim=32, num_blocks=1, num_heads=2)
    others = {f"{m}_{k}": v for m in ("text", "depth", "thermal", "imu") for k, v in small.items()}
    return ref_mod.ImageBindModel(
        vision_embed_dim=c.vision_embed_dim,
        vision_num_blocks=c.vision_num_blocks,
        vision_num_heads=c.vision_num_heads,
        audio_embed_dim=c.audio_embed_dim,
        audio_num_blocks=c.audio_num_blocks,
        audio_num_heads=c.audio_num_heads,
        out_embed_dim=c.out_embed_dim,
        **others,
    )


# --------------------------------------------------------------------------- helpers


def vision_flops(c: ImageBindConfig) -> dict:
    """Forward FLOPs of one image (multiply-add = 2 FLOPs).

    per block, N tokens, width D: linear layers 2*N*(3D^2 + D^2 + 4D^2 + 4D^2) = 24*N*D^2,
    attention scores + weighted sum 2*N^2*D + 2*N^2*D = 4*N^2*D; plus the patch stem
    2*(N-1)*(3*kt*kh*kw)*D and the head 2*D*out. LayerNorm/GELU/softmax are not counted.
    """
    n, d, layers = c.num_tokens("vision"), c.vision_embed_dim, c.vision_num_blocks
    kt, kh, kw = c.vision_kernel
    linear = 24 * n * d * d
    attn = 4 * n * n * d
    stem = 2 * (n - 1) * 3 * kt * kh * kw * d
    head = 2 * d * c.out_embed_dim
    total = layers * (linear + attn) + stem + head
    return {
        "tokens": n,
        "width": d,
        "blocks": layers,
        "formula": "L*(24*N*D^2 + 4*N^2*D) + 2*(N-1)*(3*2*14*14)*D + 2*D*1024",
        "flops_per_image": total,
        "gflops_per_image": total / 1e9,
    }


def audio_flops(c: ImageBindConfig) -> float:
    n, d, layers = c.num_tokens("audio"), c.audio_embed_dim, c.audio_num_blocks
    return 3 * (layers * (24 * n * d * d + 4 * n * (n + 1) * d) + 2 * (n - 1) * 16 * 16 * d + 2 * d * c.out_embed_dim)


def make_inputs(branch: str, batch: int, device, dtype, c: ImageBindConfig, gen=None):
    if branch == "image":
        shape = (batch, 3, c.image_size, c.image_size)
    elif branch == "video":
        shape = (batch, 15, 3, 2, c.image_size, c.image_size)
    else:
        shape = (batch, 3, 1, c.audio_num_mel_bins, c.audio_target_len)
    return torch.randn(shape, device=device, dtype=torch.float32, generator=gen).to(dtype)


def modality(branch: str) -> str:
    return "audio" if branch == "audio" else "vision"


def runner(kind: str, model):
    if kind == "ref":
        return lambda branch, x: model({modality(branch): x})[modality(branch)]
    return lambda branch, x: model(modality(branch), x)


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.double(), want.double()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    return {
        "min_cosine": cos.min().item(),
        "max_abs_diff": (got - want).abs().max().item(),
        "rel_l2": ((got - want).norm() / want.norm()).item(),
        "mean_norm_ratio": (got.norm(dim=-1) / want.norm(dim=-1)).mean().item(),
        "finite": bool(torch.isfinite(got).all().item()),
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU dry run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image-batches", default="32,64,128,256")
    p.add_argument("--audio-batches", default="64,128,256,512")
    p.add_argument("--video-batches", default="4,8,16")
    p.add_argument("--compile", choices=("off", "on"), default="on", help="also time torch.compile(ours) at the best batch")
    p.add_argument("--profile", choices=("off", "on"), default="on")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak (KINDS.md: 769-798 measured)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip optional sections past this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = p.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = ImageBindConfig.tiny() if args.tiny else ImageBindConfig.huge()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "config": "tiny" if args.tiny else "huge",
        "settings": vars(args),
        "notes": [],
    }

    def save():
        (out_dir / "imagebind_bench.json").write_text(json.dumps(res, indent=1))

    # ---- models: ours random-init (fp32), copied into the reference
    torch.manual_seed(0)
    with torch.device(device):
        ours32 = ImageBindEncoder(config).eval()
    ref_mod = import_reference()
    with torch.device(device):
        ref = build_reference(ref_mod, config, args.tiny).eval()
    ours_sd = ours32.state_dict()
    missing, unexpected = ref.load_state_dict(ours_sd, strict=False)
    missing_va = [k for k in missing if k.split(".")[1] in ("vision", "audio")]
    assert not unexpected and not missing_va, (unexpected[:5], missing_va[:5])
    n_params = {b: sum(v.numel() for k, v in ours_sd.items() if k.split(".")[1] == b) for b in ("vision", "audio")}
    res["params"] = n_params
    log("built; params", n_params, "device", res["machine"]["device"])

    # ---- agreement
    gen = torch.Generator(device=device).manual_seed(1)
    agree_in = {
        "image": make_inputs("image", 16, device, torch.float32, config, gen),
        "video": make_inputs("video", 2, device, torch.float32, config, gen),
        "audio": make_inputs("audio", 16, device, torch.float32, config, gen),
    }
    agreement: dict = {"inputs": {k: list(v.shape) for k, v in agree_in.items()}}
    with torch.inference_mode():
        fp32 = {k: runner("ours", ours32)(k, x) for k, x in agree_in.items()}
        ref32 = {k: runner("ref", ref)(k, x) for k, x in agree_in.items()}
    agreement["ours_fp32_vs_ref_fp32"] = {k: compare(fp32[k], ref32[k]) for k in agree_in}
    ref = ref.to(torch.bfloat16)
    del ref32
    low = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        m = copy.deepcopy(ours32).to(dtype)
        with torch.inference_mode():
            agreement[f"ours_{name}_vs_ours_fp32"] = {k: compare(runner("ours", m)(k, x.to(dtype)), fp32[k]) for k, x in agree_in.items()}
        low[name] = m
    with torch.inference_mode():
        agreement["ref_bf16_vs_ours_fp32"] = {
            k: compare(runner("ref", ref)(k, x.to(torch.bfloat16)), fp32[k]) for k, x in agree_in.items()
        }
    del low["fp16"], ours32
    ours = low.pop("bf16")
    res["agreement"] = agreement
    save()
    log("agreement done")
    for k, v in agreement.items():
        if k != "inputs":
            log(k, {m: (round(d["min_cosine"], 6), f"{d['max_abs_diff']:.2e}") for m, d in v.items()})
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- throughput (bf16), ours and reference alternating per batch size
    batches = {
        "image": [int(b) for b in args.image_batches.split(",")],
        "audio": [int(b) for b in args.audio_batches.split(",")],
        "video": [int(b) for b in args.video_batches.split(",")],
    }
    if args.tiny:
        batches = {k: v[:2] for k, v in batches.items()}
    thr: dict = {}
    models = {"ours": ours, "ref": ref}
    for branch, sizes in batches.items():
        thr[branch] = {}
        for bs in sizes:
            x = make_inputs(branch, bs, device, torch.bfloat16, config)
            row = {}
            for kind, m in models.items():
                f = runner(kind, m)
                try:
                    with torch.inference_mode():
                        ts = time_fn(lambda: f(branch, x), args.warmup, args.iters, device)
                except torch.OutOfMemoryError:
                    row[kind] = {"oom": True}
                    torch.cuda.empty_cache()
                    continue
                med = statistics.median(ts)
                row[kind] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "per_s": bs / med}
            if "per_s" in row.get("ours", {}) and "per_s" in row.get("ref", {}):
                row["speedup"] = row["ours"]["per_s"] / row["ref"]["per_s"]
            thr[branch][bs] = row
            log(branch, bs, {k: round(v["per_s"], 1) if "per_s" in v else v for k, v in row.items() if k != "speedup"},
                "x%.3f" % row.get("speedup", float("nan")))
            del x
            res["throughput_bf16"] = thr
            save()

    def best(branch, kind):
        rows = [(r[kind]["per_s"], bs) for bs, r in thr[branch].items() if "per_s" in r.get(kind, {})]
        return max(rows) if rows else (float("nan"), None)

    summary = {}
    for branch in thr:
        (o, obs), (r, rbs) = best(branch, "ours"), best(branch, "ref")
        summary[branch] = {"ours_per_s": o, "ours_batch": obs, "ref_per_s": r, "ref_batch": rbs, "speedup_best_vs_best": o / r}
    fl = vision_flops(config)
    for kind in ("ours", "ref"):
        per_s = summary["image"][f"{kind}_per_s"]
        summary["image"][f"{kind}_tflops"] = per_s * fl["flops_per_image"] / 1e12
        summary["image"][f"{kind}_mfu"] = per_s * fl["flops_per_image"] / 1e12 / args.peak_tflops
        a = summary["audio"][f"{kind}_per_s"]
        summary["audio"][f"{kind}_tflops"] = a * audio_flops(config) / 1e12
    res["vision_flops"] = fl
    res["audio_flops_per_input"] = audio_flops(config)
    res["peak_tflops_assumed"] = args.peak_tflops
    res["summary"] = summary
    save()

    # ---- torch.compile variant of ours (optional, at the best eager batch)
    if args.compile == "on" and time.time() - T0 < args.budget_s:
        comp = {}
        cm = torch.compile(ours)
        for branch in ("image", "audio"):
            if time.time() - T0 > args.budget_s:
                res["notes"].append(f"compile {branch} skipped: time budget")
                break
            bs = summary[branch]["ours_batch"]
            x = make_inputs(branch, bs, device, torch.bfloat16, config)
            try:
                t = time.time()
                with torch.inference_mode():
                    y = cm(modality(branch), x)
                    sync(device)
                    ctime = time.time() - t
                    ye = ours(modality(branch), x)
                    ts = time_fn(lambda: cm(modality(branch), x), args.warmup, args.iters, device)
                med = statistics.median(ts)
                comp[branch] = {
                    "batch": bs,
                    "compile_s": ctime,
                    "median_s": med,
                    "per_s": bs / med,
                    "speedup_vs_ref_best": (bs / med) / summary[branch]["ref_per_s"],
                    "vs_eager": compare(y, ye),
                }
                log("compile", branch, bs, round(bs / med, 1), "compile %.0fs" % ctime)
            except Exception as err:  # noqa: BLE001 - optional variant
                comp[branch] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                log("compile failed", comp[branch])
            res["compile_variant"] = comp
            save()

    # ---- profile one vision forward of each at batch 128 (or the smallest image batch in tiny)
    if args.profile == "on" and time.time() - T0 < args.budget_s + 60:
        from torch.profiler import ProfilerActivity, profile

        bs = 128 if not args.tiny else batches["image"][0]
        x = make_inputs("image", bs, device, torch.bfloat16, config)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof_res = {}
        for kind, m in models.items():
            f = runner(kind, m)
            with torch.inference_mode():
                f("image", x)
                sync(device)
                with profile(activities=acts) as prof:
                    f("image", x)
                    sync(device)
            attr = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            evs = [e for e in prof.key_averages() if (device.type != "cuda" or e.device_type.name == "CUDA" or getattr(e, attr, 0) > 0)]
            if device.type == "cuda":
                # kernels only: events whose own device time is nonzero and that are not ATen ops
                evs = [e for e in prof.key_averages() if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
                total = sum(e.self_device_time_total for e in evs)
                top = sorted(evs, key=lambda e: e.self_device_time_total, reverse=True)[:12]
                prof_res[kind] = {
                    "batch": bs,
                    "total_kernel_ms": total / 1e3,
                    "top": [
                        {"kernel": e.key[:140], "ms": e.self_device_time_total / 1e3, "pct": 100 * e.self_device_time_total / total, "calls": e.count}
                        for e in top
                    ],
                }
            else:
                top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
                prof_res[kind] = {"batch": bs, "top": [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in top]}
        res["profile_vision"] = prof_res
        save()
        for kind, pr in prof_res.items():
            print(f"\n-- profile {kind} vision batch {pr['batch']}" + (f", kernels {pr['total_kernel_ms']:.1f} ms" if "total_kernel_ms" in pr else ""))
            for e in pr["top"]:
                name = e.get("kernel", e.get("op"))
                print(f"  {e['ms']:8.2f} ms {e.get('pct', 0):5.1f}% x{e['calls']:<4d} {name[:100]}")

    res["elapsed_s"] = time.time() - T0
    if device.type == "cuda":
        res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    save()

    # ---- table (last)
    print(f"\nImageBind {res['config']} forward, bf16, {res['machine']['device']}, torch {torch.__version__}")
    print(f"{'modality':<8} {'batch':>5} {'ours/s':>9} {'ref/s':>9} {'x':>6}")
    for branch, rows in thr.items():
        for bs, r in rows.items():
            o, f = r.get("ours", {}).get("per_s", float("nan")), r.get("ref", {}).get("per_s", float("nan"))
            print(f"{branch:<8} {bs:>5} {o:9.1f} {f:9.1f} {o / f:6.3f}")
    print("best:")
    for branch, s in summary.items():
        extra = f"  MFU ours {100 * s['ours_mfu']:.1f}% ref {100 * s['ref_mfu']:.1f}%" if branch == "image" else ""
        print(f"  {branch:<6} ours {s['ours_per_s']:.1f}/s @{s['ours_batch']}  ref {s['ref_per_s']:.1f}/s @{s['ref_batch']}  x{s['speedup_best_vs_best']:.3f}{extra}")
    for branch, c in res.get("compile_variant", {}).items():
        if "per_s" in c:
            print(f"  ours+compile {branch} {c['per_s']:.1f}/s @{c['batch']} x{c['speedup_vs_ref_best']:.3f} vs ref best (compile {c['compile_s']:.0f}s)")
        else:
            print(f"  ours+compile {branch}: {c.get('error')}")
    print("agreement (min cosine / max |diff|):")
    for k, v in agreement.items():
        if k != "inputs":
            print(f"  {k:<24} " + "  ".join(f"{m} {d['min_cosine']:.6f}/{d['max_abs_diff']:.2e}" for m, d in v.items()))
    print(f"vision GFLOP/image {fl['gflops_per_image']:.1f} ({fl['formula']}); elapsed {res['elapsed_s']:.0f}s")


if __name__ == "__main__":
    main()
