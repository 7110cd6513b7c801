"""Train one stage with DeepSpeed: setup → data → model → loop → save.

    bash scripts/train.sh --stage 3 [--config my.yaml ...] [key=value ...]

``scripts/train.sh`` runs this under ``torchrun`` (one process per GPU, or one CPU process
with the gloo backend). Config: the packaged ``base.yaml`` + ``stage_<N>.yaml`` + ``--config``
layers (a YAML file, or a packaged config's name such as ``tiny``) + overrides; see ``toollmm.config``.
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

from toollmm.checkpoint import load_initial_weights, non_finite, save_checkpoint
from toollmm.config import (
    ConfigError,
    check_batch_arithmetic,
    check_paths,
    check_training_device,
    load_config,
    packaged_configs,
    resolve_path,
)
from toollmm.data import load_splits
from toollmm.data.dataset import (
    Collator,
    InstructionDataset,
    LengthGroupedBatchSampler,
    PackingCollator,
    PublishedBatchSampler,
)
from toollmm.data.records import DataReport
from toollmm.data.split import training_records
from toollmm.data.stages import caption_items, instruction_items
from toollmm.engine import (
    CHECKPOINT_NAME,
    COMPLETE,
    RESUME_DIR,
    STATE_NAME,
    MetricLogger,
    StepProfiler,
    Stopwatch,
    UnsafeStateFile,
    checkpoints,
    deepspeed_config,
    init_distributed,
    latest_resume_tag,
    load_resume_state,
    load_state_file,
    mark_complete,
    numbered,
    planned_steps,
    resume_tags,
)
from toollmm.features import FeatureCache, FrozenEncoder, featurize
from toollmm.media import set_limits as set_media_limits
from toollmm.model.toollmm import avoid_cudnn_attention, build_model, checkpoint_parameters, optimizer_groups
from toollmm.output_modalities import OUTPUT_MODALITIES
from toollmm.prompts import IGNORE_INDEX
from toollmm.signal_tokens import add_signal_tokens
from toollmm.tokenization import load_tokenizer

log = logging.getLogger("toollmm.train")

HELD_OUT_FILE = "held_out.json"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, required=True, choices=[1, 2, 3],
                        help="1: encoder alignment, 2: decoder alignment, 3: instruction tuning")
    parser.add_argument("--config", action="append", default=[],
                        help=f"a YAML file, or a packaged config's name ({', '.join(packaged_configs())}), "
                             "layered over base + stage; repeatable")
    parser.add_argument("--resume", action="store_true", help="continue from the newest state in train.output_dir")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed's launcher
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
    return parser.parse_intermixed_args(argv)  # --config may follow overrides


def main(argv: list[str] | None = None) -> Path:
    """``train`` with its expected failures (config, data, resume state, divergence) as a
    one-line message and exit status 1 instead of a traceback."""
    try:
        return train(argv)
    except (ConfigError, TrainingDiverged) as err:
        raise SystemExit(f"train: {err}") from None


def train(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # ---- setup: everything that can be wrong in the config fails here, before any model is built
    config = load_config(args.stage, args.config, args.overrides + (["train.resume=true"] if args.resume else []))
    check_paths(config)
    set_media_limits(config.data.media_limits)
    check_batch_arithmetic(config, int(os.environ.get("WORLD_SIZE", "1")))
    check_training_device(config, "cuda" if torch.cuda.is_available() else "cpu")  # the device init_distributed picks
    out_dir = resolve_path(config.train.output_dir)
    earlier_run = check_output_dir(out_dir, config)
    rank, world_size, device = init_distributed()
    avoid_cudnn_attention(device)
    is_main = rank == 0
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(config.train.seed + rank)
    if is_main:
        for path in earlier_run:  # train.overwrite=true: the earlier run's files only
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = hold_run_lock(out_dir)  # noqa: F841 (held until the process ends, however it ends)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        log.info("resolved config:\n%s", yaml.safe_dump(config.to_dict(), sort_keys=False))

    # ---- data: rows → records → cached encoder features → tokenized examples
    tokenizer = load_tokenizer(resolve_path(config.model.llm_path))
    signal = add_signal_tokens(tokenizer, config.model.outputs) if config.model.outputs.enabled else None
    encoder = FrozenEncoder(resolve_path(config.model.imagebind_path), config.model.imagebind_size, device)
    report = DataReport()
    tool_records, test_items = [], []
    if config.train.stage in (1, 2):
        items, test_items = caption_items(config, config.train.stage, report)
    else:
        if config.data.train_files:
            splits = load_splits(config.data)
            report.merge(splits.report)
            tool_records = splits.train
            if config.train.held_out_tools:
                test_items = training_records(splits.test)
        items = instruction_items(config, report)
    cache = FeatureCache(resolve_path(config.data.feature_cache_dir), encoder.identity, encoder.out_dim)
    # Rank 0 fills the cache first and the other ranks then only read it: otherwise every rank
    # would decode and encode every file.
    if not is_main:
        dist.barrier()
    tool_records, features = featurize(tool_records, encoder, cache, report)
    items, more = featurize(items, encoder, cache, report)
    test_items, held_out = featurize(test_items, encoder, cache, report)
    features.update(more)
    features.update(held_out)
    if is_main:
        dist.barrier()
    encoder_dim = encoder.out_dim
    del encoder  # frees the encoder's memory before the LLM loads
    # Seeded again: extracting the features a cold cache misses (rank 0 only) draws from the RNG,
    # and the model's initialisation and dropout must not depend on how warm the cache was.
    seed_everything(config.train.seed + rank)
    items = training_records(tool_records, config.data.duplicate_rows == "keep") + items
    dataset = InstructionDataset(items, tokenizer, features, config.data.max_tgt_len, signal, report)
    test_set = InstructionDataset(test_items, tokenizer, features, config.data.max_tgt_len, signal, report)
    if is_main:
        log.info("data:\n%s", report.summary())
        log.info("%d training examples (%d truncated at max_tgt_len), %d held out", len(dataset), dataset.truncated, len(test_set))
        (out_dir / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    if not len(dataset):
        raise ConfigError(f"no training examples left (see {out_dir / 'data_report.json'} for why rows were skipped)")
    if config.train.packing:
        # Checked before the model loads: the packing collator would otherwise stop the run at the
        # first batch that holds such an example, possibly hours in.
        longest = max(len(e.input_ids) for e in [*dataset.examples, *test_set.examples])
        if longest > config.train.pack_length:
            raise ConfigError(f"train.pack_length={config.train.pack_length} is shorter than the longest example "
                              f"({longest} tokens, prompt included): set train.pack_length={longest} or more")
    epoch_batches = None
    if config.data.sampling == "published":
        try:
            sampler = PublishedBatchSampler([e.source for e in dataset.examples], config.train.micro_batch_size,
                                            world_size, rank, config.train.seed)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        batching, epoch_batches = {"batch_sampler": sampler}, len(sampler)
        if is_main:
            log.info("published sampling: %d micro-batches per rank an epoch (%d examples over the ranks) from %d files",
                     len(sampler), len(sampler) * config.train.micro_batch_size * world_size, len(sampler.groups))
    elif config.train.group_by_length:
        sampler = LengthGroupedBatchSampler([len(e.input_ids) for e in dataset.examples], config.train.micro_batch_size,
                                            world_size, rank, config.train.seed, config.train.length_group_batches)
        batching = {"batch_sampler": sampler}
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.train.seed)
        batching = {"batch_size": config.train.micro_batch_size, "sampler": sampler}
    loader = DataLoader(
        dataset,
        **batching,
        collate_fn=(PackingCollator(tokenizer.pad_token_id, encoder_dim, config.train.pack_length) if config.train.packing
                    else Collator(tokenizer.pad_token_id, encoder_dim)),
        num_workers=config.train.num_workers,
        # Its own generator: creating a loader iterator would otherwise draw from the global
        # RNG and shift the dropout stream of a resumed run.
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    total_steps = planned_steps(len(dataset), config, world_size, epoch_batches)

    # ---- model + engine
    import deepspeed

    ds_config = deepspeed_config(config, world_size, total_steps)
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    if zero3:
        # transformers then builds and loads the base under deepspeed.zero.Init, each rank keeping
        # only its shard (the whole 13B base would not fit a 24 GB card even once); kept alive
        # until the engine exists.
        from transformers.integrations import HfDeepSpeedConfig

        zero3_loading = HfDeepSpeedConfig(ds_config)  # noqa: F841
    model = build_model(config.model, encoder_dim, stage=config.train.stage, signal=signal)
    if zero3 and is_main:
        log.info("ZeRO-3: the LLM loaded as shards, rank 0 holding %s", held_share(model.llm.parameters()))
    model.answer_logits_only = config.train.answer_logits_only
    if config.train.gradient_checkpointing or config.train.checkpoint_above_tokens:
        model.set_activation_checkpointing(config.train.gradient_checkpointing)
    if config.train.compile and zero3 and is_main:
        log.warning("train.compile under ZeRO-3 gains little: torch.compile breaks each layer's graph at DeepSpeed's "
                    "per-module weight-gathering hooks and reaches its recompile limit (two CPU ranks: steps no faster "
                    "than eager); the first step still pays the compile. Consider train.compile=false")
    if config.train.compile:
        # Per layer, not the whole model: the 32 identical layers share one compiled graph
        # (compile time of one layer), and the loss code around them stays eager.
        for layer in model.decoder_layers():
            layer.compile(dynamic=True)
    if config.train.init_from:
        # Under ZeRO-3 each rank holds 1/N of every weight: rank 0 writes them whole, and they are
        # sharded again on leaving (a no-op without ZeRO-3 weights).
        with deepspeed.zero.GatheredParameters(checkpoint_parameters(model), modifier_rank=0):
            load_initial_weights(model, config, resolve_path(config.train.init_from))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model), config=ds_config)
    # from_pretrained leaves the base in eval mode: without this, the decoder layers skip activation
    # checkpointing (it checks ``self.training``), and any dropout of the base stays off.
    engine.train()
    if zero3 and is_main:
        log.info("ZeRO-3: between uses, rank 0 holds %s", held_share(model.parameters()))
    collate = Collator(tokenizer.pad_token_id, encoder_dim)
    held_out = {}
    if len(test_set) and not config.train.resume:
        held_out["before"] = evaluate_held_out(engine, test_set, collate, config.train.micro_batch_size, device)
        if is_main:  # written now: a run cut off before its end keeps it for the resumed run to report
            write_held_out(out_dir, len(test_set), held_out)
    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "samples_seen": 0, "tokens_seen": 0, "nonfinite_skipped": 0}
    if config.train.resume:
        progress.update(resume(engine, out_dir, rank))
        if is_main:
            drop_after(out_dir, progress["step"])

    # ---- loop
    metrics = MetricLogger(out_dir, enabled=is_main, after_step=progress["step"])
    clock = Stopwatch()
    bar = tqdm(total=total_steps, initial=progress["step"], disable=not is_main, desc="train")
    # loss sum, token-accuracy sum, micro-batches, then (MSE sum, runs batches) per output modality
    window = torch.zeros(3 + 2 * len(OUTPUT_MODALITIES), device=device)
    done = progress["step"] >= total_steps
    # An epoch can end between optimizer steps (DeepSpeed's accumulation runs on across epochs);
    # its save then waits for the next step, when no gradient is half-accumulated: a state saved
    # with an accumulation tail would resume without it.
    save_due = False
    # The newest checkpoint whose weights then gave a finite loss, and the newest one not yet
    # tried: finite weights can still be too large (|w| ~ 1e9 after a huge step) to give one.
    trusted, untried = None, (last_checkpoint(out_dir) if config.train.resume else None)
    nonfinite_in_a_row = 0
    profiler = StepProfiler(out_dir, config.train.profile_steps, enabled=is_main)
    for epoch in range(progress["epoch"], config.train.epochs):
        if done:
            break
        sampler.set_epoch(epoch)
        skip = progress["batches_in_epoch"] if epoch == progress["epoch"] else 0
        progress.update(epoch=epoch, batches_in_epoch=skip)
        for index, batch in enumerate(loader):
            if index < skip:
                continue  # already trained on before the resumed checkpoint
            batch_ids, batch_tokens = batch.record_ids, batch.real_tokens
            batch_examples = len(batch_ids)
            batch = to_device(batch.inputs, device)
            if config.train.checkpoint_above_tokens and not config.train.gradient_checkpointing:
                model.set_activation_checkpointing(batch["input_ids"].numel() > config.train.checkpoint_above_tokens)
            out = engine(**batch)
            finite = all_finite(out["loss"])
            if finite and untried is not None:
                trusted, untried = untried, None
            if not finite:
                # Skipped on every rank alike: no backward, no optimizer step, the data moves on.
                progress["batches_in_epoch"] = index + 1
                progress["nonfinite_skipped"] += 1
                nonfinite_in_a_row += 1
                log.warning("non-finite loss on batch %d of epoch %d (%s...): skipped (%d so far, %d in a row)", index, epoch,
                            ", ".join(batch_ids[:3]), progress["nonfinite_skipped"], nonfinite_in_a_row)
                if nonfinite_in_a_row >= config.train.max_nonfinite_in_a_row:
                    raise TrainingDiverged(
                        f"{nonfinite_in_a_row} micro-batches in a row had a non-finite loss (train.max_nonfinite_in_a_row="
                        f"{config.train.max_nonfinite_in_a_row}): stopped. {trusted_checkpoint(trusted, untried)}; lower "
                        "the learning rate (train.learning_rate) and check the data rows named above."
                    )
                continue
            nonfinite_in_a_row = 0
            engine.backward(out["loss"])
            boundary = engine.is_gradient_accumulation_boundary()
            lr = engine.get_lr()[0]  # the rate this optimizer step uses (the scheduler moves on in step())
            engine.step()
            window += step_metrics(out, device)
            progress["batches_in_epoch"] = index + 1
            progress["samples_seen"] += batch_examples * world_size
            progress["tokens_seen"] += batch_tokens * world_size  # rank 0's count × ranks (ranks see similar batches)
            if not boundary:
                continue
            progress["step"] += 1
            dist.all_reduce(window)
            record = {
                "epoch": epoch,
                "loss": (window[0] / window[2]).item(),
                "token_accuracy": (window[1] / window[2]).item(),
                **{f"mse_{m}": (window[3 + 2 * i] / window[4 + 2 * i]).item()
                   for i, m in enumerate(OUTPUT_MODALITIES) if window[4 + 2 * i] > 0},
                "lr": lr,
                "samples_seen": progress["samples_seen"],
                "tokens_seen": progress["tokens_seen"],
                "elapsed_s": round(clock.elapsed(), 3),
            }
            if device.type == "cuda":
                record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if progress["nonfinite_skipped"]:
                record["nonfinite_skipped"] = progress["nonfinite_skipped"]
            record.update(loss_scale_events(engine, config))
            window.zero_()
            profiler.step_done(progress["step"])
            if progress["step"] % config.train.log_every_steps == 0:
                metrics.log(progress["step"], record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['token_accuracy']:.2f}")
            out_of_time = config.train.max_time_s and clock.elapsed() > config.train.max_time_s
            done = progress["step"] >= total_steps or bool(out_of_time)
            every = config.train.save_every_steps
            if done or save_due or (every and progress["step"] % every == 0):
                untried = save(engine, model, config, tokenizer, progress, cache, out_dir, is_main, trusted) or untried
                save_due = False
            if done:
                break
        else:
            progress.update(epoch=epoch + 1, batches_in_epoch=0)
            save_due = not config.train.save_every_steps
            if save_due and engine.micro_steps % engine.gradient_accumulation_steps() == 0:
                untried = save(engine, model, config, tokenizer, progress, cache, out_dir, is_main, trusted) or untried
                save_due = False
    if save_due:  # the last epoch ended with an accumulation tail: no step follows to take it
        save(engine, model, config, tokenizer, progress, cache, out_dir, is_main, trusted)
    bar.close()
    metrics.close()
    if len(test_set):
        held_out["after"] = evaluate_held_out(engine, test_set, collate, config.train.micro_batch_size, device)
        if is_main:
            previous = out_dir / HELD_OUT_FILE
            if "before" not in held_out and previous.is_file():  # a resumed run measured it when it started
                held_out = {**json.loads(previous.read_text()), **held_out}
            write_held_out(out_dir, len(test_set), held_out)
            log.info("held-out examples (%d): %s", len(test_set), held_out)
    final = out_dir / "final"
    if is_main:
        latest = last_checkpoint(out_dir)  # a ".partial" folder left by a kill is not one
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(latest, final)
        log.info("training done: %d steps in %.1f s; final checkpoint %s", progress["step"], clock.elapsed(), final)
    dist.barrier()
    dist.destroy_process_group()
    return final


RUN_FILES = ("config.yaml", "metrics.jsonl", "data_report.json", HELD_OUT_FILE, "final", RESUME_DIR, "tensorboard",
             "profile.txt", "profile_trace.json")
"""What a run writes into its output_dir besides its numbered checkpoints."""


def run_files(out_dir: Path) -> list[Path]:
    """The files and folders a training run wrote into ``out_dir`` (exact names; others are the user's)."""
    found = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    return found + [p for _, p in numbered(out_dir, CHECKPOINT_NAME) + numbered(out_dir, CHECKPOINT_NAME, ".partial")]


def check_output_dir(out_dir: Path, config) -> list[Path]:
    """Refuse an output_dir that cannot hold this run, before any model loads; returns the earlier
    run's files that ``train.overwrite`` deletes (a resumed run keeps them)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.output_dir: {out_dir} is a file, not a folder; set train.output_dir to a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"train.output_dir: cannot create {out_dir} ({err.strerror}); set train.output_dir to a "
                          "writable folder") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir: {out_dir} is not writable; set train.output_dir to a writable folder")
    earlier = run_files(out_dir)
    state = latest_resume_tag(out_dir)
    if config.train.resume:
        if state is None:
            raise ConfigError(f"--resume given but {out_dir / RESUME_DIR} holds no complete training state; "
                              + ("start over with train.overwrite=true or " if earlier else "drop --resume to start fresh, or ")
                              + "set train.output_dir to a new folder")
        return []
    if earlier and not config.train.overwrite:
        held = f"state {state}" if state else ", ".join(sorted(p.name for p in earlier)[:5])
        raise ConfigError(
            f"{out_dir} already holds a run ({held}). Pass --resume to continue it, set train.output_dir to a "
            "new folder, or train.overwrite=true to delete that run's files and start over."
        )
    return earlier


def hold_run_lock(out_dir: Path):
    """An exclusive lock on the run folder for this process's life. The kernel drops it when the
    process dies, even by SIGKILL; a second trainer on the same folder (a resume started while
    an orphaned worker still runs) stops instead of interleaving its writes."""
    import fcntl

    handle = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise ConfigError(f"another training process (pid {handle.read().strip() or '?'}) is writing to {out_dir}; "
                          "stop it (or wait for it) before starting or resuming this run") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (all ranks must skip a step together)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def loss_scale_events(engine, config) -> dict:
    """fp16 only: the dynamic loss scale and the optimizer steps skipped on overflow so far."""
    if config.model.dtype != "fp16":
        return {}
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    events = {"overflow_skipped_steps": int(getattr(engine, "skipped_steps", 0))}
    if isinstance(scale, (int, float)):
        events["loss_scale"] = float(scale)
    return events


def last_checkpoint(out_dir: Path) -> Path | None:
    found = checkpoints(out_dir)  # a ".partial" folder left by a kill is not one
    return found[-1] if found else None


def resume(engine, out_dir: Path, rank: int) -> dict:
    """Load the newest complete resume state; a truncated or corrupt one is reported and the
    previous one used. A file holding anything but tensors and plain data stops the run unread."""
    for tag in resume_tags(out_dir):
        folder = out_dir / RESUME_DIR / tag
        try:
            rng = read_rng(folder, rank)  # before the engine's state: a bad RNG file falls back like any other
            client_state = load_resume_state(engine, folder)
            if client_state is None:
                raise RuntimeError("DeepSpeed found no state under this tag")
        except UnsafeStateFile as err:
            raise ConfigError(f"{err}. If you did not put it there, the run folder was tampered with: delete {folder} "
                              "to resume from the previous state, or start a new run") from None
        except Exception as err:  # a truncated or corrupt file surfaces as any of pickle/zip/runtime errors
            log.error("resume state %s is unreadable (%s: %s); trying the previous one", folder, type(err).__name__,
                      str(err)[:200])
            continue
        restore_rng(rng)
        progress = client_state["progress"]
        log.info("resumed from %s at step %d (epoch %d)", tag, progress["step"], progress["epoch"])
        return progress
    raise ConfigError(f"no readable resume state under {out_dir / RESUME_DIR}: start a new run (drop --resume)")


def to_device(batch: dict, device) -> dict:
    """A collated batch's model inputs on ``device`` (``targets`` maps output modalities to tensors)."""
    return {k: {m: t.to(device) for m, t in v.items()} if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


def step_metrics(out: dict, device) -> torch.Tensor:
    values = [out["loss"].detach().float(), out["token_accuracy"].float(), torch.ones((), device=device)]
    for modality in OUTPUT_MODALITIES:
        present = f"mse_{modality}" in out
        values += [out[f"mse_{modality}"].float() if present else torch.zeros((), device=device),
                   torch.tensor(float(present), device=device)]
    return torch.stack(values)


def write_held_out(out_dir: Path, examples: int, figures: dict) -> None:
    # Written through a temporary file: a resumed run reads the before-training figures back, and
    # a kill mid-write must not leave it half a JSON.
    tmp = out_dir / (HELD_OUT_FILE + ".partial")
    tmp.write_text(json.dumps({"examples": examples, **figures}, indent=2))
    os.replace(tmp, out_dir / HELD_OUT_FILE)


@torch.no_grad()
def evaluate_held_out(engine, dataset, collate, batch_size: int, device) -> dict:
    """Loss, per-token LM loss and accuracy, and per-modality alignment (MSE, l2) on the held-out
    examples. ``lm_loss`` and ``token_accuracy`` are means over all answer tokens, so they do not
    depend on ``batch_size``; ``loss`` (LM + alignment) is the mean of the batches' losses, by row.
    Every rank runs it on the whole (small) set; the numbers are the same everywhere."""
    engine.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]).inputs
        out = engine(**to_device(batch, device))
        rows = batch["input_ids"].shape[0]
        answer_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        for key in ["loss", "lm_loss", "token_accuracy"] + [k for k in out if k.startswith(("mse_", "l2_"))]:
            if key == "loss":
                weight = rows
            elif key in ("lm_loss", "token_accuracy"):
                weight = answer_tokens
            else:
                weight = batch["targets"][key.split("_", 1)[1]].shape[0]
            sums[key] = sums.get(key, 0.0) + out[key].float().item() * weight
            counts[key] = counts.get(key, 0) + weight
    engine.train()
    return {key: round(sums[key] / counts[key], 6) for key in sums if counts[key]}


def trusted_checkpoint(trusted: Path | None, untried: Path | None) -> str:
    """Which checkpoint to go back to after a divergence, in words."""
    later = f" ({untried.name}, written since, gave no finite loss yet)" if untried is not None else ""
    if trusted is None:
        return f"No checkpoint of this run is known to give a finite loss{later}: start again"
    return f"The last checkpoint whose weights gave a finite loss is {trusted}{later}: start from it (train.init_from)"


def save(engine, model, config, tokenizer, progress, cache, out_dir: Path, is_main: bool, trusted: Path | None) -> Path | None:
    """Resumable DeepSpeed state (all ranks) + a self-describing checkpoint (rank 0); returns the
    checkpoint folder, or None when this step was saved already. Weights that are not finite
    are not written: the run stops, naming the checkpoint to go back to."""
    import deepspeed

    tag = f"step_{progress['step']}"
    if (out_dir / RESUME_DIR / tag / COMPLETE).is_file():
        return None  # saved at this step already (an epoch that ended right after a save)
    if not weights_finite(model):
        raise TrainingDiverged(f"the weights after step {progress['step']} hold NaN or infinite values: not saved, "
                               f"stopped. {trusted_checkpoint(trusted, None)}; lower the learning rate (train.learning_rate).")
    # The frozen base stays out of the resume state: for a 7B model it would add 13+ GB per save.
    engine.save_checkpoint(str(out_dir / RESUME_DIR), tag=tag, client_state={"progress": dict(progress)},
                           exclude_frozen_parameters=True, save_latest=False)
    save_rng(out_dir / RESUME_DIR / tag, dist.get_rank())
    dist.barrier()
    # Under ZeRO-3 a rank holds 1/N of each weight, and a checkpoint read from it would be cut:
    # every rank enters, so they are whole for the save (a no-op without ZeRO-3 weights).
    with deepspeed.zero.GatheredParameters(checkpoint_parameters(model)):
        if is_main:
            save_checkpoint(out_dir / f"checkpoint-{progress['step']}", model, config, tokenizer, dict(progress),
                            cache.root.name)
            # Marked last: a run killed before this line resumes from the previous state, and
            # the checkpoint folder of this step is written again, the same, when it gets here.
            mark_complete(out_dir, tag)
            prune(out_dir, config.train.keep_last)
    dist.barrier()
    return out_dir / f"checkpoint-{progress['step']}"


def weights_finite(model) -> bool:
    """Whether every trainable weight is finite on every rank (each checks the shard it holds)."""
    held = [(n, getattr(p, "ds_tensor", p)) for n, p in model.named_parameters() if p.requires_grad]
    finite = torch.tensor([0.0 if non_finite(held) else 1.0], device=held[0][1].device if held else "cpu")
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def held_share(params) -> str:
    """How much of the ZeRO-3 sharded weights among ``params`` this rank holds."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    held, whole = sum(p.ds_tensor.numel() for p in sharded), sum(p.ds_numel for p in sharded)
    return f"{held} of the {whole} weight elements ({100 * held / max(whole, 1):.1f}%)"


def prune(out_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints and resume states; only folders named as
    training names them (``checkpoint-<step>``, ``resume/step_<step>``) are touched."""
    if keep_last < 1:
        return
    found = checkpoints(out_dir)
    keep = set(found[-keep_last:])
    keep |= {out_dir / RESUME_DIR / tag for tag in resume_tags(out_dir)[:keep_last]}
    # Everything else goes, including what a killed run left half-written: resume states without
    # their marker and ".partial" checkpoint folders.
    stale = [p for _, p in numbered(out_dir / RESUME_DIR, STATE_NAME) + numbered(out_dir, CHECKPOINT_NAME, ".partial")]
    for old in found + stale:
        if old not in keep:
            shutil.rmtree(old)


def drop_after(out_dir: Path, step: int) -> None:
    """Checkpoints and resume states past the state a run resumes from (written before a kill,
    or past an unreadable state): the resumed run writes them again, and left in place they
    would be pruned as newest, or copied to final/ by a run that stops before reaching them."""
    for later, path in numbered(out_dir, CHECKPOINT_NAME) + numbered(out_dir / RESUME_DIR, STATE_NAME):
        if later > step:
            log.warning("removing %s, past the resumed step %d", path, step)
            shutil.rmtree(path)


def save_rng(folder: Path, rank: int) -> None:
    """Each rank's torch RNG (LoRA dropout draws from it), so a resumed run continues the same stream."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, folder / f"rng_rank{rank}.pt")


def read_rng(folder: Path, rank: int) -> dict | None:
    path = folder / f"rng_rank{rank}.pt"
    if not path.is_file():
        log.warning("%s missing: dropout masks after resuming will differ from an uninterrupted run", path)
        return None
    state = load_state_file(path)
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor):
        raise ValueError(f"{path} holds no CPU RNG state")
    return state


def restore_rng(state: dict | None) -> None:
    if state is None:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


if __name__ == "__main__":
    main()
