"""JPEG files → cached ImageBind-huge features, end to end, on one GPU (goal: 800 images/s).

Random-init huge weights of the real shapes are saved like imagebind_huge.pth and loaded the
way training loads them; N synthetic JPEGs (smooth random images with noise, 500×375, like
CC3M photos in size) are written first; then `extract_features` runs with DataLoader workers
decoding and the encoder in bf16, into an empty cache (cold), and again (warm: all hits).

Device:  PYTHONPATH=$PWD/code:/tmp/site python3 bench/feature_pipeline_bench.py --images 4000
CPU dry: PYTHONPATH=code .venv/bin/python bench/feature_pipeline_bench.py --tiny --images 16 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toollmm.data.toolmmbench import MediaRef
from toollmm.features import FeatureCache, FrozenEncoder, default_num_workers, extract_features
from toollmm.model.imagebind import ImageBindConfig, ImageBindEncoder, save_imagebind


def write_jpeg(args: tuple[int, str]) -> None:
    index, folder = args
    rng = np.random.default_rng(index)
    small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    pixels = np.asarray(small, dtype=np.int16) + rng.integers(-12, 12, (375, 500, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(f"{folder}/{index:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    work = Path(tempfile.mkdtemp())
    images = work / "images"
    images.mkdir()
    start = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        pool.map(write_jpeg, [(i, str(images)) for i in range(args.images)])
    jpeg_s = time.perf_counter() - start
    size = "tiny" if args.tiny else "huge"
    torch.manual_seed(0)
    with torch.device(device):  # random weights built where they run, never carried
        encoder = ImageBindEncoder(ImageBindConfig.tiny() if args.tiny else ImageBindConfig.huge())
    save_imagebind(encoder, work / "imagebind.pth")
    del encoder
    frozen = FrozenEncoder(work / "imagebind.pth", size, device, dtype)
    refs = [MediaRef("image", p) for p in sorted(images.glob("*.jpg"))]
    workers = args.num_workers if args.num_workers is not None else default_num_workers()
    results = {}
    # Ceiling of the CPU side: the same DataLoader decoding the JPEGs, nothing encoded.
    from torch.utils.data import DataLoader

    from toollmm.features import _collate, _DecodeDataset

    loader = DataLoader(_DecodeDataset(refs), batch_size=args.batch_size, collate_fn=_collate, num_workers=workers,
                        pin_memory=device == "cuda")
    start = time.perf_counter()
    decoded = sum(len(batch["indices"]) for batch in loader)
    seconds = time.perf_counter() - start
    results["decode_only"] = {"seconds": round(seconds, 3), "images_per_s": round(decoded / seconds, 1)}
    print("decode_only", results["decode_only"], flush=True)
    for phase in ("cold", "warm"):
        cache = FeatureCache(work / "cache", frozen.identity)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = extract_features(refs, frozen, cache, batch_size=args.batch_size, num_workers=workers,
                                  keep_features=False, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results[phase] = {"seconds": round(seconds, 3), "images_per_s": round(len(refs) / seconds, 1),
                          "extracted": len(result.extracted), "cached": len(result.cached), "failed": len(result.failed)}
        print(phase, results[phase], flush=True)
    report = {
        "what": "JPEG files -> cached ImageBind features (extract_features), bf16 on GPU",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cpu_cores": os.cpu_count(), "num_workers": workers, "batch_size": args.batch_size,
        "images": args.images, "model": size, "dtype": str(dtype), "jpeg_write_s": round(jpeg_s, 1),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), **results,
    }
    Path(args.out, "feature_pipeline.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
