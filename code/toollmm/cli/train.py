"""Train one stage with DeepSpeed: setup → data → model → loop → save.

    bash scripts/train.sh --stage 3 [--config my.yaml ...] [key=value ...]

``scripts/train.sh`` runs this under ``torchrun`` (one process per GPU, or one CPU process
with the gloo backend). Config: ``config/base.yaml`` + ``config/stage_<N>.yaml`` + ``--config``
files + overrides; see ``toollmm.config``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from toollmm.checkpoint import save_checkpoint
from toollmm.config import ConfigError, check_batch_arithmetic, check_paths, load_config, resolve_path
from toollmm.data import load_splits
from toollmm.data.dataset import Collator, LengthGroupedBatchSampler, ToolDataset
from toollmm.data.split import training_pairs
from toollmm.engine import (
    RESUME_DIR,
    MetricLogger,
    Stopwatch,
    deepspeed_config,
    init_distributed,
    latest_resume_tag,
    planned_steps,
)
from toollmm.features import FeatureCache, FrozenEncoder, featurize
from toollmm.model.toollmm import build_model
from toollmm.tokenization import load_tokenizer

log = logging.getLogger("toollmm.train")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, required=True, choices=[3], help="training stage (stages 1-2: later)")
    parser.add_argument("--config", action="append", default=[], help="extra YAML layered over base + stage")
    parser.add_argument("--resume", action="store_true", help="continue from the newest state in train.output_dir")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed's launcher
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # ---- setup: everything that can be wrong in the config fails here, before any model is built
    config = load_config(args.stage, args.config, args.overrides + (["train.resume=true"] if args.resume else []))
    check_paths(config)
    out_dir = resolve_path(config.train.output_dir)
    resume_tag = latest_resume_tag(out_dir)
    if config.train.resume and resume_tag is None:
        raise ConfigError(f"--resume given but {out_dir / RESUME_DIR} holds no training state; drop --resume to start fresh")
    if not config.train.resume and resume_tag is not None:
        raise ConfigError(
            f"{out_dir} already holds a run (state {resume_tag}). Pass --resume to continue it, "
            "or set train.output_dir to a new folder."
        )
    check_batch_arithmetic(config, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world_size, device = init_distributed()
    is_main = rank == 0
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(config.train.seed + rank)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        log.info("resolved config:\n%s", yaml.safe_dump(config.to_dict(), sort_keys=False))

    # ---- data: rows → records → cached encoder features → tokenized examples
    tokenizer = load_tokenizer(resolve_path(config.model.llm_path))
    encoder = FrozenEncoder(resolve_path(config.model.imagebind_path), config.model.imagebind_size, device)
    splits = load_splits(config.data)
    cache = FeatureCache(resolve_path(config.data.feature_cache_dir), encoder.identity)
    # Rank 0 fills the cache first and the other ranks then only read it: otherwise every rank
    # would decode and encode every file.
    if not is_main:
        dist.barrier()
    train_records, features = featurize(splits.train, encoder, cache, splits.report)
    if is_main:
        dist.barrier()
    encoder_dim = encoder.out_dim
    del encoder  # frees the encoder's memory before the LLM loads
    dataset = ToolDataset(training_pairs(train_records), tokenizer, features, config.data.max_tgt_len)
    if is_main:
        log.info("data:\n%s", splits.report.summary())
        log.info("%d training examples from %d rows (%d truncated at max_tgt_len)", len(dataset), len(train_records), dataset.truncated)
        (out_dir / "data_report.json").write_text(json.dumps(splits.report.to_dict(), indent=2))
    if config.train.group_by_length:
        sampler = LengthGroupedBatchSampler([len(e.input_ids) for e in dataset.examples], config.train.micro_batch_size,
                                            world_size, rank, config.train.seed)
        batching = {"batch_sampler": sampler}
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.train.seed)
        batching = {"batch_size": config.train.micro_batch_size, "sampler": sampler}
    loader = DataLoader(
        dataset,
        **batching,
        collate_fn=Collator(tokenizer.pad_token_id, encoder_dim),
        num_workers=config.train.num_workers,
        # Its own generator: creating a loader iterator would otherwise draw from the global
        # RNG and shift the dropout stream of a resumed run.
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    total_steps = planned_steps(len(dataset), config, world_size)

    # ---- model + engine
    import deepspeed

    model = build_model(config.model, encoder_dim)
    ds_config = deepspeed_config(config, world_size, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
    )
    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "samples_seen": 0}
    if config.train.resume:
        _, client_state = engine.load_checkpoint(str(out_dir / RESUME_DIR), tag=resume_tag, load_module_strict=False)
        progress.update(client_state["progress"])
        restore_rng(out_dir / RESUME_DIR / resume_tag, rank)
        log.info("resumed from %s at step %d (epoch %d)", resume_tag, progress["step"], progress["epoch"])

    # ---- loop
    metrics = MetricLogger(out_dir, enabled=is_main)
    clock = Stopwatch()
    bar = tqdm(total=total_steps, initial=progress["step"], disable=not is_main, desc="train")
    window = torch.zeros(3, device=device)  # loss sum, token-accuracy sum, micro-batches
    done = progress["step"] >= total_steps
    for epoch in range(progress["epoch"], config.train.epochs):
        if done:
            break
        sampler.set_epoch(epoch)
        skip = progress["batches_in_epoch"] if epoch == progress["epoch"] else 0
        progress.update(epoch=epoch, batches_in_epoch=skip)
        for index, batch in enumerate(loader):
            if index < skip:
                continue  # already trained on before the resumed checkpoint
            batch = {k: v.to(device) for k, v in batch.items()}
            out = engine(**batch)
            engine.backward(out["loss"])
            boundary = engine.is_gradient_accumulation_boundary()
            lr = engine.get_lr()[0]  # the rate this optimizer step uses (the scheduler moves on in step())
            engine.step()
            window += torch.stack([out["loss"].detach().float(), out["token_accuracy"].float(), torch.ones((), device=device)])
            progress["batches_in_epoch"] = index + 1
            progress["samples_seen"] += batch["input_ids"].shape[0] * world_size
            if not boundary:
                continue
            progress["step"] += 1
            dist.all_reduce(window)
            record = {
                "epoch": epoch,
                "loss": (window[0] / window[2]).item(),
                "token_accuracy": (window[1] / window[2]).item(),
                "lr": lr,
                "samples_seen": progress["samples_seen"],
                "elapsed_s": round(clock.elapsed(), 3),
            }
            if device.type == "cuda":
                record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            window.zero_()
            if progress["step"] % config.train.log_every_steps == 0:
                metrics.log(progress["step"], record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['token_accuracy']:.2f}")
            out_of_time = config.train.max_time_s and clock.elapsed() > config.train.max_time_s
            done = progress["step"] >= total_steps or bool(out_of_time)
            every = config.train.save_every_steps
            if done or (every and progress["step"] % every == 0):
                save(engine, model, config, tokenizer, progress, cache, out_dir, is_main)
            if done:
                break
        else:
            progress.update(epoch=epoch + 1, batches_in_epoch=0)
            if not config.train.save_every_steps:
                save(engine, model, config, tokenizer, progress, cache, out_dir, is_main)
    bar.close()
    metrics.close()
    final = out_dir / "final"
    if is_main:
        latest = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(latest, final)
        log.info("training done: %d steps in %.1f s; final checkpoint %s", progress["step"], clock.elapsed(), final)
    dist.barrier()
    dist.destroy_process_group()
    return final


def save(engine, model, config, tokenizer, progress, cache, out_dir: Path, is_main: bool) -> None:
    """Resumable DeepSpeed state (all ranks) + a self-describing checkpoint (rank 0)."""
    tag = f"step_{progress['step']}"
    if (out_dir / f"checkpoint-{progress['step']}").exists():
        return  # the end of an epoch can coincide with a periodic save
    # The frozen base stays out of the resume state: for a 7B model it would add 13+ GB per save.
    engine.save_checkpoint(str(out_dir / RESUME_DIR), tag=tag, client_state={"progress": dict(progress)},
                           exclude_frozen_parameters=True)
    save_rng(out_dir / RESUME_DIR / tag, dist.get_rank())
    if is_main:
        save_checkpoint(out_dir / f"checkpoint-{progress['step']}", model, config, tokenizer, dict(progress),
                        cache.root.name)
        prune(out_dir, config.train.keep_last)
    dist.barrier()


def prune(out_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints and resume states."""
    if keep_last < 1:
        return
    for pattern, parse in (("checkpoint-*", lambda p: int(p.name.split("-")[1])), (f"{RESUME_DIR}/step_*", lambda p: int(p.name.split("_")[1]))):
        folders = sorted((p for p in out_dir.glob(pattern) if p.is_dir() and not p.name.endswith(".partial")), key=parse)
        for old in folders[:-keep_last]:
            shutil.rmtree(old)


def save_rng(folder: Path, rank: int) -> None:
    """Each rank's torch RNG (LoRA dropout draws from it), so a resumed run continues the same stream."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, folder / f"rng_rank{rank}.pt")


def restore_rng(folder: Path, rank: int) -> None:
    path = folder / f"rng_rank{rank}.pt"
    if not path.is_file():
        log.warning("%s missing: dropout masks after resuming will differ from an uninterrupted run", path)
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


if __name__ == "__main__":
    main()
