"""Inputs for a run of the original MLLM-Tool training code (a checkout, run in place), laid out
where its relative paths look (it runs from ``RUN/code``):

    RUN/code/config -> ORIGINAL/code/config               its published yaml, as is
    RUN/code/dsconfig/openllama_peft_stage_1.json         its DeepSpeed config; train_batch_size set to
                                                          micro 4 × accumulation 4 × GPUs (published
                                                          64 is for 4 GPUs: DeepSpeed refuses a mismatch)
    RUN/data/IT_data_ins/T+X-T_data/{text_t2t,image_tx2t,audio_tx2t,video_tx2t}.json
    RUN/data/IT_data_ins/T+X-T_data/mm_dataset/...        links to the bundled media those rows name
    RUN/data/embeddings/                                  its ImageBind embedding cache, filled here
    RUN/imagebind/imagebind_huge.pth                      random-init ImageBind-huge, the original's
                                                          class and key names, saved in fp16

The rows are exactly the training rows of our speed run (``bench/speed.sh``: our configs
``tiny`` + ``bench/gpu_smoke.yaml`` + ``bench/speed_published.yaml``), read with our own data code:
the 85% training split of the bundled ToolMMBench files and media requests, one row per
(request, tool), repeats dropped, tool names stripped. Rows whose media file is absent (every
bundled ToolMMBench row) train text-only in our run; here they go to ``text_t2t.json`` with input
modality ``text``, which gives the original the same prompt ("### Human: {query}\\n###
Assistant: ..."). Rows whose media exists go to the image/audio/video files with the media linked
under ``mm_dataset/`` in the original's layout.

The embedding cache is filled by the original's own ``get_*_embeddings`` methods on the random
ImageBind-huge (fp16 on the GPU, as its fp16 DeepSpeed engine runs it), so its training loop finds
every medium cached, as it does from its second epoch on; our speed run also extracts its
features before the timed loop. ``--cold`` leaves the cache empty: the original then decodes and
encodes each medium inside the loop the first time it meets it.

    python bench/original/make_inputs.py --original .original/MLLM-Tool --run /tmp/original_run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA_DIR = "data/IT_data_ins/T+X-T_data"
ROW_FILES = {"text": "text_t2t.json", "image": "image_tx2t.json", "audio": "audio_tx2t.json", "video": "video_tx2t.json"}
SPEED_LAYERS = ["tiny", "bench/gpu_smoke.yaml", "bench/speed_published.yaml"]
DS_CONFIG = "dsconfig/openllama_peft_stage_1.json"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", type=Path, required=True, help="checkout of MLLM-Tool (its code/ is read in place)")
    p.add_argument("--run", type=Path, default=Path("/tmp/original_run"))
    p.add_argument("--layers", nargs="+", default=SPEED_LAYERS, help="our config layers whose training rows to use")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--device", default=None, help="where ImageBind is built and run (default: cuda when there is one)")
    p.add_argument("--cold", action="store_true", help="leave the embedding cache empty")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="a DeepSpeed config the CPU accepts (fp16 off): a functional check, never a timing")
    args = p.parse_args(argv)

    original = args.original.resolve()
    run = args.run.resolve()
    code = run / "code"
    code.mkdir(parents=True, exist_ok=True)
    link(code / "config", original / "code" / "config")
    write_ds_config(original, code, args.world_size, args.cpu_dry_run)
    counts = write_rows(run, args.layers)
    print(f"rows for the original: {counts}", flush=True)

    sys.path.insert(0, str(HERE))
    import patches

    patches.install()
    sys.path.insert(0, str(original / "code"))
    os.chdir(code)  # the original's paths are relative to its code/ folder
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = run / "imagebind" / "imagebind_huge.pth"
    encoder = None
    if not checkpoint.is_file():
        encoder = build_imagebind(checkpoint, device)
        shutil.rmtree(run / "data" / "embeddings", ignore_errors=True)  # embeddings of an earlier random init
    if not args.cold:
        warm_embeddings(encoder, checkpoint, device)


def link(path: Path, target: Path) -> None:
    if path.is_symlink() or path.exists():
        if path.is_symlink() and path.resolve() == target.resolve():
            return
        path.unlink() if path.is_symlink() or path.is_file() else shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def write_ds_config(original: Path, code: Path, world_size: int, cpu_dry_run: bool) -> None:
    config = json.loads((original / "code" / DS_CONFIG).read_text())
    config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world_size
    # Keys DeepSpeed 0.19's config classes refuse (extra fields forbidden) and older versions
    # ignored: apex's fp16 "opt_level", and "bf16": {"enable": ...}, a misspelt "enabled" that
    # therefore never turned bf16 on. Training stays fp16, as published.
    config["fp16"].pop("opt_level", None)
    if set(config.get("bf16", {})) == {"enable"}:
        del config["bf16"]
    if cpu_dry_run:
        config["fp16"]["enabled"] = False  # DeepSpeed's CPU accelerator has no fp16 engine
    out = code / DS_CONFIG
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config, indent=2) + "\n")


def write_rows(run: Path, layers: list[str]) -> dict:
    """Our speed run's training rows, in the original's files (one per input modality)."""
    sys.path.insert(0, str(REPO / "code"))
    os.chdir(REPO)  # our config paths are relative to the repository
    from toollmm.config import load_config
    from toollmm.data import load_splits
    from toollmm.data.split import training_records

    config = load_config(3, layers)
    splits = load_splits(config.data)
    records = training_records(splits.train, config.data.duplicate_rows == "keep")
    files = {modality: [] for modality in ROW_FILES}
    media_root = run / DATA_DIR / "mm_dataset"
    shutil.rmtree(media_root, ignore_errors=True)
    for record in records:
        if len(record.media) > 1:
            raise SystemExit(f"{record.id}: {len(record.media)} media; the original's rows carry one")
        modality = record.media[0].modality if record.media else "text"
        row = {"id": len(files[modality]) + 1, "image_path": "", "video_path": "", "audio_path": "",
               "input_modality": modality, "output_modality": "text",
               "conversations": [{"from": "human", "value": record.query, "input_modality": modality},
                                 {"from": "gpt", "value": record.tools[0], "output_modality": "text"}]}
        if record.media:
            source = record.media[0].path
            name = os.path.relpath(source, REPO / "data")
            if name.startswith(".."):
                name = source.name
            # The original's layout: mm_dataset/image/<image_path>, mm_dataset/audio/<audio_path>,
            # mm_dataset/<video_path>.
            if modality == "video":
                row["video_path"] = f"video/{name}"
                target = media_root / row["video_path"]
            else:
                row[f"{modality}_path"] = name
                target = media_root / modality / name
            if not target.exists():
                link(target, source)
        files[modality].append(row)
    folder = run / DATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for modality, rows in files.items():
        (folder / ROW_FILES[modality]).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    counts = {ROW_FILES[m]: len(rows) for m, rows in files.items()}
    (run / "rows.json").write_text(json.dumps({"layers": layers, "rows": counts, "total": len(records),
                                               "our_text_only_rows": sum(not r.media for r in records)}, indent=2) + "\n")
    return counts


def build_imagebind(checkpoint: Path, device):
    """The original's ImageBind-huge class, random init (seeded), saved in fp16: its loader
    (``load_state_dict`` into the fp32 model it builds) casts back."""
    import torch
    from model.ImageBind.models import imagebind_model

    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_on(device, imagebind_model)
    model = model.half().eval()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    partial = checkpoint.with_suffix(".partial")
    torch.save(model.state_dict(), partial)
    partial.rename(checkpoint)  # a run cut short leaves no half-written checkpoint behind
    n = sum(t.numel() for t in model.parameters())
    print(f"ImageBind-huge: {n / 1e9:.3f} B parameters, random init, saved to {checkpoint} "
          f"({checkpoint.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s", flush=True)
    return model


def build_on(device, imagebind_model):
    """ImageBind-huge built directly on ``device`` (on the GPU: seconds instead of most of a
    minute of CPU initialisation), or on the CPU and moved should that construction fail."""
    import torch

    try:
        with torch.device(device):
            model, _ = imagebind_model.imagebind_huge(pretrained=False)
    except (RuntimeError, TypeError) as err:
        print(f"building ImageBind on {device} failed ({err}); building on the CPU", flush=True)
        model, _ = imagebind_model.imagebind_huge(pretrained=False)
    return model.to(device)


def warm_embeddings(encoder, checkpoint: Path, device) -> None:
    """Every medium of the rows through the original's own caching encoders
    (``OpenLLAMAPEFTModel.get_{image,audio,video}_embeddings``), so its cache holds them."""
    import torch
    from dataset.catalog import DatasetCatalog
    from dataset.utils import instantiate_from_config
    from model.openllama import OpenLLAMAPEFTModel

    catalog = DatasetCatalog()
    todo = {kind: sorted(set(instantiate_from_config(getattr(catalog, f"{kind}_instruction")).mm_path_list))
            for kind in ("image", "audio", "video")}
    cache = Path("../data/embeddings")
    missing = {k: [p for p in paths if not cached(cache, k, p)] for k, paths in todo.items()}
    if not any(missing.values()):
        print(f"embedding cache complete ({sum(map(len, todo.values()))} media)", flush=True)
        return
    start = time.perf_counter()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if encoder is None:
        from model.ImageBind.models import imagebind_model

        encoder = build_on(device, imagebind_model)
        encoder.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True))
    encoder = encoder.to(device=device, dtype=dtype).eval()
    # The original's methods on a bare instance: only the encoder, device and dtype are read.
    host = OpenLLAMAPEFTModel.__new__(OpenLLAMAPEFTModel)
    torch.nn.Module.__init__(host)
    host.visual_encoder = encoder
    host.device = device
    host.embeddings_dir = str(cache)
    host.llama_model = type("DtypeOnly", (), {"dtype": dtype})()
    methods = {"image": host.get_image_embeddings, "audio": host.get_audio_embeddings, "video": host.get_video_embeddings}
    done = Counter()
    for kind, paths in missing.items():
        for i in range(0, len(paths), 4):  # the original's micro-batch
            methods[kind](paths[i:i + 4])
            done[kind] += len(paths[i:i + 4])
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"embedding cache filled: {dict(done)} in {time.perf_counter() - start:.1f} s ({dtype})", flush=True)


def cached(cache: Path, kind: str, path: str) -> bool:
    """Whether the original will find ``path``'s embedding (its file naming: md5 of the path for
    images and audio, the file name for videos)."""
    import hashlib

    name = f"{os.path.basename(path)}.pt" if kind == "video" else hashlib.md5(path.encode()).hexdigest() + ".pt"
    return (cache / name).is_file()


if __name__ == "__main__":
    main()
