"""One stage's training: setup → data → model and engine → train loop → evaluate → save.

:class:`TrainingRecipe` runs in every process that ``scripts/train.sh`` starts (one per GPU, or
one CPU process with the gloo backend); ``toollmm.cli.train`` builds its config from the command
line. Each method is one step of :meth:`TrainingRecipe.run`, in the order it calls them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from toollmm.checkpoint import load_initial_weights, save_checkpoint
from toollmm.config import (
    ConfigError,
    RunConfig,
    check_batch_arithmetic,
    check_paths,
    check_training_device,
    resolve_path,
)
from toollmm.data import load_splits
from toollmm.data.dataset import (
    Batch,
    Collator,
    InstructionDataset,
    LengthGroupedBatchSampler,
    PackingCollator,
    PublishedBatchSampler,
)
from toollmm.data.records import DataReport
from toollmm.data.split import training_records
from toollmm.data.stages import caption_items, instruction_items
from toollmm.divergence import DivergenceGuard, TrainingDiverged, all_finite, weights_finite
from toollmm.engine import (
    MetricLogger,
    StepMetrics,
    StepProfiler,
    Stopwatch,
    deepspeed_config,
    init_distributed,
    loss_scale_events,
    planned_steps,
)
from toollmm.features import FeatureCache, FrozenEncoder, featurize
from toollmm.grad_norm import use_foreach_grad_norm
from toollmm.media import set_limits as set_media_limits
from toollmm.model.fp8 import use_fp8_for_frozen_linears
from toollmm.model.toollmm import avoid_cudnn_attention, build_model, checkpoint_parameters, optimizer_groups
from toollmm.output_modalities import OUTPUT_MODALITIES
from toollmm.prompts import IGNORE_INDEX
from toollmm.run_state import (
    TrainState,
    check_output_dir,
    drop_after,
    last_checkpoint,
    mark_complete,
    open_run_folder,
    prune,
    publish_final,
    resume,
    save_resume_state,
    seed_everything,
    state_saved,
    with_earlier_held_out,
    write_held_out,
)
from toollmm.signal_tokens import add_signal_tokens
from toollmm.tokenization import load_tokenizer

log = logging.getLogger("toollmm.train")


class TrainingRecipe:
    """A stage's training run from its resolved config: :meth:`run` calls the steps in order."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.out_dir = resolve_path(config.train.output_dir)
        self.state = TrainState()
        self.held_out: dict = {}

    def run(self) -> Path:
        """Train the stage; returns the final checkpoint folder."""
        self.setup()
        self.load_data()
        self.build_engine()
        self.start()
        self.train()
        self.evaluate("after")
        return self.finish()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything that can be wrong in the config fails here, before any model is built;
        then the process group, the seeds and the run folder."""
        config = self.config
        check_paths(config)
        set_media_limits(config.data.media_limits)
        check_batch_arithmetic(config, int(os.environ.get("WORLD_SIZE", "1")))
        check_training_device(config, "cuda" if torch.cuda.is_available() else "cpu")  # the device init_distributed picks
        earlier_run = check_output_dir(self.out_dir, config)
        self.rank, self.world_size, self.device = init_distributed()
        avoid_cudnn_attention(self.device)
        self.is_main = self.rank == 0
        if not self.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        seed_everything(config.train.seed + self.rank)
        if self.is_main:
            # Held while the recipe lives; the kernel drops it when the process ends, however it ends.
            self.lock = open_run_folder(self.out_dir, config, earlier_run)
            log.info("resolved config:\n%s", yaml.safe_dump(config.to_dict(), sort_keys=False))

    # ------------------------------------------------------------------ data

    def load_data(self) -> None:
        """Rows → records → cached encoder features → tokenized examples → a loader of micro-batches."""
        config = self.config
        self.tokenizer = load_tokenizer(resolve_path(config.model.llm_path))
        self.signal = add_signal_tokens(self.tokenizer, config.model.outputs) if config.model.outputs.enabled else None
        encoder = FrozenEncoder(resolve_path(config.model.imagebind_path), config.model.imagebind_size, self.device)
        report = DataReport()
        tool_records, items, test_items = self._read_records(report)
        self.cache = FeatureCache(resolve_path(config.data.feature_cache_dir), encoder.identity, encoder.out_dim)
        tool_records, items, test_items, features = self._featurize(encoder, report, tool_records, items, test_items)
        self.encoder_dim = encoder.out_dim
        del encoder  # frees the encoder's memory before the LLM loads
        # Seeded again: extracting the features a cold cache misses (rank 0 only) draws from the RNG,
        # and the model's initialisation and dropout must not depend on how warm the cache was.
        seed_everything(config.train.seed + self.rank)
        items = training_records(tool_records, config.data.duplicate_rows == "keep") + items
        length = config.data.max_tgt_len
        self.dataset = InstructionDataset(items, self.tokenizer, features, length, self.signal, report)
        self.test_set = InstructionDataset(test_items, self.tokenizer, features, length, self.signal, report)
        self._report_data(report)
        self._check_pack_length()
        self.loader, self.sampler, epoch_batches = self._loader()
        self.total_steps = planned_steps(len(self.dataset), config, self.world_size, epoch_batches)

    def _read_records(self, report: DataReport) -> tuple[list, list, list]:
        """(tool rows, other training items, held-out items) of this stage's data files."""
        config = self.config
        if config.train.stage in (1, 2):
            items, test_items = caption_items(config, config.train.stage, report)
            return [], items, test_items
        tool_records, test_items = [], []
        if config.data.train_files:
            splits = load_splits(config.data)
            report.merge(splits.report)
            tool_records = splits.train
            if config.train.held_out_tools:
                test_items = training_records(splits.test)
        return tool_records, instruction_items(config, report), test_items

    def _featurize(self, encoder, report: DataReport, *groups: list) -> tuple:
        """Each group with its media's features, and the features by key. Rank 0 fills the cache
        first and the other ranks then only read it: otherwise every rank would decode and
        encode every file."""
        if not self.is_main:
            dist.barrier()
        kept, features = [], {}
        for group in groups:
            group, found = featurize(group, encoder, self.cache, report)
            kept.append(group)
            features.update(found)
        if self.is_main:
            dist.barrier()
        return (*kept, features)

    def _report_data(self, report: DataReport) -> None:
        if self.is_main:
            log.info("data:\n%s", report.summary())
            log.info("%d training examples (%d truncated at max_tgt_len), %d held out", len(self.dataset),
                     self.dataset.truncated, len(self.test_set))
            (self.out_dir / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        if not len(self.dataset):
            raise ConfigError(f"no training examples left (see {self.out_dir / 'data_report.json'} for why rows were skipped)")

    def _check_pack_length(self) -> None:
        # Checked before the model loads: the packing collator would otherwise stop the run at the
        # first batch that holds such an example, possibly hours in.
        t = self.config.train
        if not t.packing:
            return
        longest = max(len(e.input_ids) for e in [*self.dataset.examples, *self.test_set.examples])
        if longest > t.pack_length:
            raise ConfigError(f"train.pack_length={t.pack_length} is shorter than the longest example "
                              f"({longest} tokens, prompt included): set train.pack_length={longest} or more")

    def _loader(self) -> tuple[DataLoader, object, int | None]:
        """The micro-batch loader, its sampler (``set_epoch`` each epoch), and an epoch's
        micro-batches per rank where the sampler decides them (published sampling)."""
        config, examples = self.config, self.dataset.examples
        t, epoch_batches = config.train, None
        if config.data.sampling == "published":
            try:
                sampler = PublishedBatchSampler([e.source for e in examples], t.micro_batch_size, self.world_size,
                                                self.rank, t.seed)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            batching, epoch_batches = {"batch_sampler": sampler}, len(sampler)
            if self.is_main:
                log.info("published sampling: %d micro-batches per rank an epoch (%d examples over the ranks) from %d "
                         "files", len(sampler), len(sampler) * t.micro_batch_size * self.world_size, len(sampler.groups))
        elif t.group_by_length:
            sampler = LengthGroupedBatchSampler([len(e.input_ids) for e in examples], t.micro_batch_size,
                                                self.world_size, self.rank, t.seed, t.length_group_batches)
            batching = {"batch_sampler": sampler}
        else:
            sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                         seed=t.seed)
            batching = {"batch_size": t.micro_batch_size, "sampler": sampler}
        pad = self.tokenizer.pad_token_id
        collate = (PackingCollator(pad, self.encoder_dim, t.pack_length, t.pack_width_multiple) if t.packing
                   else Collator(pad, self.encoder_dim))
        # Its own generator: creating a loader iterator would otherwise draw from the global RNG
        # and shift the dropout stream of a resumed run.
        loader = DataLoader(self.dataset, **batching, collate_fn=collate, num_workers=t.num_workers,
                            generator=torch.Generator().manual_seed(t.seed))
        return loader, sampler, epoch_batches

    # ------------------------------------------------------------------ model and engine

    def build_engine(self) -> None:
        """The model (built under ZeRO-3's sharded loading when that is on), its stage's
        initial weights, and the DeepSpeed engine around it."""
        import deepspeed

        ds_config = deepspeed_config(self.config, self.world_size, self.total_steps)
        self.zero3 = ds_config["zero_optimization"]["stage"] == 3
        if self.zero3:
            # transformers then builds and loads the base under deepspeed.zero.Init, each rank keeping
            # only its shard (the whole 13B base would not fit a 24 GB card even once). Kept for the
            # run's life: transformers reads it through a weak reference.
            from transformers.integrations import HfDeepSpeedConfig

            self.zero3_loading = HfDeepSpeedConfig(ds_config)
        self.model = self._build_model()
        if self.config.train.init_from:
            # Under ZeRO-3 each rank holds 1/N of every weight: rank 0 writes them whole, and they are
            # sharded again on leaving (a no-op without ZeRO-3 weights).
            with deepspeed.zero.GatheredParameters(checkpoint_parameters(self.model), modifier_rank=0):
                load_initial_weights(self.model, self.config, resolve_path(self.config.train.init_from))
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, model_parameters=optimizer_groups(self.model),
                                                    config=ds_config)
        use_foreach_grad_norm(self.engine.optimizer)  # ZeRO-1/2 on the device: one launch, not one per tensor
        # from_pretrained leaves the base in eval mode: without this, the decoder layers skip activation
        # checkpointing (it checks ``self.training``), and any dropout of the base stays off.
        self.engine.train()
        if self.zero3 and self.is_main:
            log.info("ZeRO-3: between uses, rank 0 holds %s", held_share(self.model.parameters()))

    def _build_model(self):
        t = self.config.train
        model = build_model(self.config.model, self.encoder_dim, stage=t.stage, signal=self.signal)
        if self.zero3 and self.is_main:
            log.info("ZeRO-3: the LLM loaded as shards, rank 0 holding %s", held_share(model.llm.parameters()))
        model.answer_logits_only = t.answer_logits_only
        if t.gradient_checkpointing or t.checkpoint_above_tokens:
            model.set_activation_checkpointing(t.gradient_checkpointing)
        if t.fp8:
            swapped = use_fp8_for_frozen_linears(model.decoder_layers(), self.device)
            if self.is_main:
                log.info("train.fp8: %d frozen linear layers of the decoder multiply in FP8", len(swapped))
        if t.compile and self.zero3 and self.is_main:
            log.warning("train.compile under ZeRO-3 gains little: torch.compile breaks each layer's graph at DeepSpeed's "
                        "per-module weight-gathering hooks and reaches its recompile limit (two CPU ranks: steps no "
                        "faster than eager); the first step still pays the compile. Consider train.compile=false")
        if t.compile:
            # Constants such as the RMSNorm epsilon and LoRA's dropout and scaling would otherwise be
            # symbolic floats under dynamic=True, re-checked by a Python guard at every layer call
            # (2-core CPU, bench/guard_time.py: 234 against 138 us of guard time a layer call).
            torch._dynamo.config.specialize_float = True
            # Per layer, not the whole model: the 32 identical layers share one compiled graph
            # (compile time of one layer), and the loss code around them stays eager.
            for layer in model.decoder_layers():
                layer.compile(dynamic=True, mode=t.compile_mode)
        return model

    def start(self) -> None:
        """A new run measures the held-out examples before training; a resumed one loads its
        newest resume state (weights, optimizer, scheduler, data position, RNG)."""
        if len(self.test_set) and not self.config.train.resume:
            self.evaluate("before")
        if self.config.train.resume:
            self.state = resume(self.engine, self.out_dir, self.rank)
            if self.is_main:
                drop_after(self.out_dir, self.state.step)
        self.guard = DivergenceGuard(self.config.train.max_nonfinite_in_a_row,
                                     last_checkpoint(self.out_dir) if self.config.train.resume else None)

    # ------------------------------------------------------------------ train loop

    def train(self) -> None:
        t = self.config.train
        self.metrics = MetricLogger(self.out_dir, enabled=self.is_main, after_step=self.state.step)
        self.clock = Stopwatch()
        self.bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.is_main, desc="train")
        self.step_metrics = StepMetrics(OUTPUT_MODALITIES, self.device)
        self.profiler = StepProfiler(self.out_dir, t.profile_steps, enabled=self.is_main)
        done = self.state.step >= self.total_steps
        # An epoch can end between optimizer steps (DeepSpeed's accumulation runs on across epochs);
        # its save then waits for the next step, when no gradient is half-accumulated: a state saved
        # with an accumulation tail would resume without it.
        save_due = False
        for epoch in range(self.state.epoch, t.epochs):
            if done:
                break
            done, save_due = self._train_epoch(epoch, save_due)
        if save_due:  # the last epoch ended with an accumulation tail: no step follows to take it
            self.save()
        self.bar.close()
        self.metrics.close()

    def _train_epoch(self, epoch: int, save_due: bool) -> tuple[bool, bool]:
        """One epoch from the state's position in it; returns (run done, a save waits for the next step)."""
        t = self.config.train
        self.sampler.set_epoch(epoch)
        skip = self.state.batches_in_epoch if epoch == self.state.epoch else 0
        self.state.epoch, self.state.batches_in_epoch = epoch, skip
        for index, batch in enumerate(self.loader):
            if index < skip:
                continue  # already trained on before the resumed checkpoint
            if not self._micro_step(index, batch):
                continue
            done = self._end_step(epoch)
            if done or save_due or (t.save_every_steps and self.state.step % t.save_every_steps == 0):
                self.save()
                save_due = False
            if done:
                return True, save_due
        self.state.epoch, self.state.batches_in_epoch = epoch + 1, 0
        save_due = not t.save_every_steps
        if save_due and self.engine.micro_steps % self.engine.gradient_accumulation_steps() == 0:
            self.save()
            save_due = False
        return False, save_due

    def _micro_step(self, index: int, batch: Batch) -> bool:
        """Forward and backward of one micro-batch; True when it ended an optimizer step."""
        t = self.config.train
        batch_ids, batch_tokens = batch.record_ids, batch.real_tokens
        batch = batch.to(self.device).inputs
        if t.checkpoint_above_tokens and not t.gradient_checkpointing:
            self.model.set_activation_checkpointing(batch["input_ids"].numel() > t.checkpoint_above_tokens)
        out = self.engine(**batch)
        self.state.batches_in_epoch = index + 1
        if not all_finite(out["loss"]):
            # Skipped on every rank alike: no backward, no optimizer step, the data moves on.
            self.state.nonfinite_skipped += 1
            self.guard.nonfinite_loss(f"batch {index} of epoch {self.state.epoch} ({', '.join(batch_ids[:3])}...)",
                                      self.state.nonfinite_skipped)
            return False
        self.guard.finite_loss()
        self.engine.backward(out["loss"])
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.lr = self.engine.get_lr()[0]  # the rate this optimizer step uses (the scheduler moves on in step())
        self.engine.step()
        self.step_metrics.add(out)
        self.state.samples_seen += len(batch_ids) * self.world_size
        self.state.tokens_seen += batch_tokens * self.world_size  # rank 0's count × ranks (ranks see similar batches)
        return boundary

    def _end_step(self, epoch: int) -> bool:
        """Count and log the optimizer step just taken; returns whether the run is done."""
        t, state = self.config.train, self.state
        state.step += 1
        record = {"epoch": epoch, **self.step_metrics.reduce(), "lr": self.lr, "samples_seen": state.samples_seen,
                  "tokens_seen": state.tokens_seen, "elapsed_s": round(self.clock.elapsed(), 3)}
        if self.device.type == "cuda":
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        if state.nonfinite_skipped:
            record["nonfinite_skipped"] = state.nonfinite_skipped
        record.update(loss_scale_events(self.engine, self.config))
        self.profiler.step_done(state.step)
        if state.step % t.log_every_steps == 0:
            self.metrics.log(state.step, record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['token_accuracy']:.2f}")
        out_of_time = t.max_time_s and self.clock.elapsed() > t.max_time_s
        return state.step >= self.total_steps or bool(out_of_time)

    # ------------------------------------------------------------------ evaluate

    def evaluate(self, when: str) -> None:
        """The held-out figures ``before`` or ``after`` training, into held_out.json (rank 0)."""
        if not len(self.test_set):
            return
        collate = Collator(self.tokenizer.pad_token_id, self.encoder_dim)
        self.held_out[when] = evaluate_held_out(self.engine, self.test_set, collate, self.config.train.micro_batch_size,
                                                self.device)
        if not self.is_main:
            return
        # Written at once: a run cut off before its end keeps the before-training figures for the
        # resumed run to report.
        self.held_out = with_earlier_held_out(self.out_dir, self.held_out)
        write_held_out(self.out_dir, len(self.test_set), self.held_out)
        if when == "after":
            log.info("held-out examples (%d): %s", len(self.test_set), self.held_out)

    # ------------------------------------------------------------------ save

    def save(self) -> None:
        """Resumable DeepSpeed state (all ranks) and a self-describing checkpoint (rank 0), unless
        this step was saved already. Weights that are not finite are not written: the run stops,
        naming the checkpoint to go back to."""
        import deepspeed

        step = self.state.step
        if state_saved(self.out_dir, step):
            return  # saved at this step already (an epoch that ended right after a save)
        if not weights_finite(self.model):
            raise TrainingDiverged(f"the weights after step {step} hold NaN or infinite values: not saved, stopped. "
                                   f"{self.guard.advice(latest_untried=False)}; lower the learning rate "
                                   "(train.learning_rate).")
        save_resume_state(self.engine, self.out_dir, self.state)
        dist.barrier()
        checkpoint = self.out_dir / f"checkpoint-{step}"
        # Under ZeRO-3 a rank holds 1/N of each weight, and a checkpoint read from it would be cut:
        # every rank enters, so they are whole for the save (a no-op without ZeRO-3 weights).
        with deepspeed.zero.GatheredParameters(checkpoint_parameters(self.model)):
            if self.is_main:
                save_checkpoint(checkpoint, self.model, self.config, self.tokenizer, self.state.to_dict(),
                                self.cache.root.name)
                # Marked last: a run killed before this line resumes from the previous state, and
                # the checkpoint folder of this step is written again, the same, when it gets here.
                mark_complete(self.out_dir, f"step_{step}")
                prune(self.out_dir, self.config.train.keep_last)
        dist.barrier()
        self.guard.saved(checkpoint)

    def finish(self) -> Path:
        """Copy the last checkpoint to final/ and leave the process group."""
        final = self.out_dir / "final"
        if self.is_main:
            publish_final(self.out_dir)
            log.info("training done: %d steps in %.1f s; final checkpoint %s", self.state.step, self.clock.elapsed(), final)
        dist.barrier()
        dist.destroy_process_group()
        return final


def held_share(params) -> str:
    """How much of the ZeRO-3 sharded weights among ``params`` this rank holds."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    held, whole = sum(p.ds_tensor.numel() for p in sharded), sum(p.ds_numel for p in sharded)
    return f"{held} of the {whole} weight elements ({100 * held / max(whole, 1):.1f}%)"


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
        collated = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out = engine(**collated.to(device).inputs)
        batch = collated.inputs
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
