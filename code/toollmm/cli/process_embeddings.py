"""Write the caption embeddings NExT-GPT's stage 2 (and stage 3's generation rows) train towards.

    python code/process_embeddings.py --stage 2                       # every caption file of the config
    python code/process_embeddings.py --stage 2 --config my.yaml model.outputs.video.decoder_path=/ckpt/zeroscope
    python code/process_embeddings.py --modality image --decoder pretrained_checkpoint/diffusion_ckpt/stable-diffusion-v1-5 \\
        --captions data/T_X_pair_data/cc3m/cc3m.json --out data/embed/cc3m

With a config (``config/base.yaml`` + ``config/stage_<N>.yaml`` + ``--config`` files +
``key=value`` overrides), every ``data.caption_files`` and ``data.instruction_files`` entry
with an ``embeddings_dir`` gets one ``<media name>.npy`` per caption, made with the text
encoder of ``model.outputs.<modality>.decoder_path``. Comprehension files need none.
Captions are all it takes: missing media files do not matter here.

Names already in the folder are skipped (an interrupted run resumes) unless ``--overwrite``.
A folder made with another decoder, or a decoder whose output does not have the shape
``model.outputs.<modality>`` expects, stops the command (exit 1) with what to change.
Prints one JSON summary per caption file: rows, captions, already present, written,
skipped rows by reason.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from toollmm.caption_embeddings import (
    CaptionEmbeddingMismatch,
    CaptionEmbeddingStore,
    CaptionEncoder,
    DecoderFolderError,
    shape_text,
)
from toollmm.config import ConfigError, load_config, resolve_path
from toollmm.data.captions import read_caption_file
from toollmm.data.records import DataReport, Record
from toollmm.features import DTYPES
from toollmm.output_modalities import OUTPUT_MODALITIES

log = logging.getLogger("toollmm.process_embeddings")


@dataclass
class Job:
    """One caption file and where its embeddings go."""

    where: str
    """What named it, for messages: ``data.caption_files[0]`` or ``--captions``."""
    modality: str
    captions: Path
    out: Path
    decoder: Path
    expected_shape: tuple[int, ...] | None = None
    """The shape the config's ``model.outputs.<modality>`` expects (None: whatever the decoder gives)."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, default=2, help="stage whose config layer to read (default 2)")
    parser.add_argument("--config", action="append", default=[], help="extra YAML layered over base + stage")
    parser.add_argument("--modality", choices=OUTPUT_MODALITIES, help="explicit mode: the captions' modality")
    parser.add_argument("--decoder", type=Path, help="explicit mode: the diffusers decoder folder")
    parser.add_argument("--captions", type=Path, help="explicit mode: a caption file (pair index or *_generation.json)")
    parser.add_argument("--out", type=Path, help="explicit mode: the embeddings folder to fill")
    parser.add_argument("--batch-size", type=int, default=64, help="captions per text-encoder forward (default 64)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="text-encoder precision; embeddings are stored as float32")
    parser.add_argument("--overwrite", action="store_true", help="recompute names already in the folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.outputs.image.decoder_path=...")
    args = parser.parse_args(argv)
    explicit = [args.modality, args.decoder, args.captions, args.out]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            parser.error("explicit mode needs all of --modality, --decoder, --captions and --out")
        if args.config or args.overrides:
            parser.error("--config and key=value overrides select the config mode; drop them or drop --captions")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def config_jobs(args) -> list[Job]:
    """Every caption/instruction file of the config with an embeddings_dir."""
    config = load_config(args.stage, args.config, args.overrides)
    jobs = []
    for key in ("caption_files", "instruction_files"):
        for i, entry in enumerate(getattr(config.data, key)):
            if not entry.embeddings_dir:
                continue
            output = config.model.outputs.modality(entry.modality)
            paths = [resolve_path(p).resolve() for p in (entry.path, entry.embeddings_dir, output.decoder_path)]
            jobs.append(Job(f"data.{key}[{i}]", entry.modality, *paths, config.model.outputs.target_shape(entry.modality)))
    if not jobs:
        raise ConfigError("no data.caption_files or data.instruction_files entry has an embeddings_dir: nothing to embed")
    return jobs


def read_captions(job: Job) -> tuple[list[Record], DataReport]:
    if not job.captions.is_file():
        raise ConfigError(f"{job.where}.path: {job.captions} does not exist")
    try:
        records, report = read_caption_file(job.captions, job.captions.parent, job.modality, need_media=False)
    except ValueError as err:
        raise ConfigError(f"{job.where}.path: {err}") from err
    return [r for r in records if r.kind != "comprehension"], report


def check_shape(job: Job, encoder: CaptionEncoder) -> None:
    if job.expected_shape is not None and tuple(job.expected_shape) != encoder.out_shape:
        raise CaptionEmbeddingMismatch(
            f"model.outputs.{job.modality} expects {shape_text(job.expected_shape)} conditioning "
            f"but the text encoder of {job.decoder} gives {shape_text(encoder.out_shape)}: fix "
            f"model.outputs.{job.modality}.decoder_path, or its target_tokens/target_dim"
        )


def embed_file(job: Job, records: list[Record], report: DataReport, encoder: CaptionEncoder,
               batch_size: int, overwrite: bool, progress: bool) -> dict:
    """Embed the captions of one file that are not in its folder yet; returns the file's summary."""
    store = CaptionEmbeddingStore.for_writing(job.out, identity=encoder.identity, shape=encoder.out_shape,
                                              modality=job.modality, decoder=str(job.decoder))
    by_name: dict[str, str] = {}
    for record in records:  # a name listed twice keeps its first caption
        by_name.setdefault(record.embedding_name, record.caption)
    present = [name for name in by_name if name in store]
    todo = list(by_name) if overwrite else [name for name in by_name if name not in store]
    batches = range(0, len(todo), batch_size)
    for start in tqdm(batches, desc=job.captions.name, unit="batch", disable=not progress or not todo):
        names = todo[start:start + batch_size]
        for name, embedding in zip(names, encoder.encode([by_name[n] for n in names], batch_size)):
            store.save(name, embedding)
    return {
        "captions_file": str(job.captions), "where": job.where, "modality": job.modality,
        "rows": report.rows, "captions": len(records), "names": len(by_name), "already_present": len(present),
        "written": len(todo), "skipped_rows": sum(report.skipped.values()), "skipped": dict(report.skipped),
        "truncated": encoder.count_truncated([by_name[n] for n in todo]) if todo else 0,
        "embeddings_dir": str(store.root), "encoder": encoder.identity, "shape": list(encoder.out_shape),
    }


def run(jobs: list[Job], args, device: torch.device) -> list[dict]:
    read = [(job, *read_captions(job)) for job in jobs]  # every file read before any model loads
    for job, records, _ in read:
        if records and not (job.decoder / "text_encoder" / "config.json").is_file():
            raise DecoderFolderError(f"{job.where}: the {job.modality} decoder {job.decoder} has no text_encoder/config.json "
                                     f"(set model.outputs.{job.modality}.decoder_path, or pass --decoder)")
    encoders: dict[tuple[Path, str], CaptionEncoder] = {}
    summaries = []
    for job, records, report in read:
        if not records:
            summaries.append({"captions_file": str(job.captions), "where": job.where, "modality": job.modality,
                              "rows": report.rows, "captions": 0, "written": 0, "note": "no caption needs an embedding (comprehension file)"})
            log.info("%s (%s): no caption needs an embedding", job.captions, job.where)
            continue
        key = (job.decoder, job.modality)
        if key not in encoders:
            encoders[key] = CaptionEncoder(job.decoder, job.modality, device, DTYPES[args.dtype])
        check_shape(job, encoders[key])
        summary = embed_file(job, records, report, encoders[key], args.batch_size, args.overwrite, not args.quiet)
        summaries.append(summary)
        log.info("%s (%s): %d rows, %d captions, %d already present, %d written, %d rows skipped%s → %s",
                 job.captions, job.where, summary["rows"], summary["captions"], summary["already_present"],
                 summary["written"], summary["skipped_rows"], f" {summary['skipped']}" if summary["skipped"] else "",
                 summary["embeddings_dir"])
        for reason, examples in report.examples.items():
            log.warning("%s: %s, e.g. %s", job.captions.name, reason, "; ".join(examples))
    return summaries


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is visible; pass --device cpu")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.captions is not None:
            jobs = [Job("--captions", args.modality, args.captions.resolve(), args.out.resolve(), args.decoder.resolve())]
        else:
            jobs = config_jobs(args)
        summaries = run(jobs, args, device)
    except (ConfigError, CaptionEmbeddingMismatch, DecoderFolderError) as err:
        raise SystemExit(f"process_embeddings: {err}") from err
    print(json.dumps(summaries, indent=2))
    return summaries


if __name__ == "__main__":
    main()
