"""The original MLLM-Tool training script (code/train_sft.py of a checkout, 0114f7c) run in place,
unedited, with each optimizer step timed, stopped after ``--steps`` optimizer steps.

    cd RUN/code && python /path/to/bench/original/train.py --original ORIG --steps 40 --out DIR \\
        -- --model openllama_peft --stage 1 --imagebind_ckpt_path ... --llm_ckpt_path ... \\
           --max_tgt_len 512 --epochs 5 --save_path ... --log_path ... --version v1

Arguments after ``--`` are train_sft.py's own (its published scripts/train.sh). The working folder
must be the one ``make_inputs.py`` prepared (the original reads config/, dsconfig/ and ../data
relative to it). One process, one GPU: the rendezvous comes from the environment
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``), as the deepspeed launcher would set it.

What this wrapper changes, from outside (monkey-patching; the checkout's files stay as they are):

- ``patches.install()``: stand-ins for imports this stack lacks, and two fixes of behaviour that
  changed under it: DeepSpeed 0.19's broadcast of 0-dim parameters, and the slow (sentencepiece)
  tokenizer its ``use_fast=False`` asked for (see patches.py).
- Its LLaMA's rotary tables are rebuilt after ``from_pretrained``: transformers 5 creates the
  model on the meta device and leaves buffers a checkpoint does not hold (``inv_freq``,
  ``cos_cached``, ``sin_cached``) uninitialised, where transformers 4.28 had computed them in
  ``__init__``. Rebuilt, its logits match transformers' own LlamaForCausalLM to 0.0 (fp32, CPU).
- ``--sampler mixed`` (default): every file's rows once an epoch, each micro-batch from one file
  (its forward needs one modality per micro-batch), micro-batches of all files shuffled together,
  seeded. Its own sampler (``--sampler original``) takes micro-batches from the four files in
  turn, so with our rows (9451 text, 55 image, 24 audio, 23 video) three micro-batches in four
  would repeat the few short media rows. Our run draws random micro-batches from all rows.
- Its periodic checkpoint (every 200 micro-batches) and the final save are skipped: they are
  not training steps (with 40 steps, 160 micro-batches, the periodic one never comes anyway).
- Timing: the clock starts when its model and DeepSpeed engine are built (as ours does before
  its first batch); a step's time is read after ``torch.cuda.synchronize()`` at the end of the
  micro-batch that closes an accumulation window. Its step (forward, backward, ``engine.step``)
  runs unchanged.

Each optimizer step appends a line to ``DIR/metrics.jsonl`` in our runs' format (step, epoch,
loss and token accuracy averaged over the step's micro-batches, lr, samples_seen, tokens_seen
(non-padding positions the LLM sees: BOS, prompt prefix, media slot, query and answer),
padded_tokens_seen, media_seen, elapsed_s, peak_memory_gib; with fp16 overflow_skipped_steps and
loss_scale), read by bench/summarize_metrics.py.

``--cpu-dry-run``: runs it on the CPU (gloo, the CUDA calls its code hard-codes mapped to the CPU,
with the fp16-off DeepSpeed config make_inputs.py --cpu-dry-run wrote): a functional check of
the whole path, never a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class StepsDone(BaseException):
    """Raised out of the original's loop once the asked-for steps are logged."""


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to run")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.jsonl")
    p.add_argument("--sampler", choices=["mixed", "original"], default="mixed")
    p.add_argument("--seed", type=int, default=0, help="the mixed sampler's seed")
    p.add_argument("--cpu-dry-run", action="store_true")
    args = p.parse_args(argv[:split])
    sys.argv = [sys.argv[0], *argv[split + 1:]]

    sys.path.insert(0, str(HERE))
    import patches

    patches.install(cpu_dry_run=args.cpu_dry_run)
    sys.path.insert(0, str(args.original.resolve() / "code"))
    import torch
    import train_sft  # the original's entry; its main() runs below, not on import

    import dataset as original_dataset
    import model.agent as original_agent
    import model.openllama as original_model
    from model.modeling_llama import LlamaForCausalLM

    args.out.mkdir(parents=True, exist_ok=True)
    log = StepLog(args.out / "metrics.jsonl", args.steps, torch.cuda.is_available() and not args.cpu_dry_run)
    rebuild_rotary_after_load(LlamaForCausalLM)
    patches.sentencepiece_segments(original_model)
    if args.sampler == "mixed":
        original_dataset.DistributedMultiDatasetBatchSampler = mixed_sampler(args.seed)
    count_tokens(original_model.OpenLLAMAPEFTModel, log)
    time_steps(original_agent.DeepSpeedAgent, log)
    start_clock_after_build(train_sft, log)
    if args.cpu_dry_run:
        run_on_cpu(train_sft)

    try:
        train_sft.main(**vars(train_sft.parser_args()))
    except StepsDone:
        pass
    log.close()
    print(f"original: {log.step} optimizer steps logged to {log.path}", flush=True)
    sys.stdout.flush()
    # Skip the teardown of its loader worker, process group and CPU-Adam threads: nothing is saved.
    os._exit(0 if log.step >= args.steps else 1)


class StepLog:
    def __init__(self, path: Path, steps: int, cuda: bool):
        self.path, self.steps, self.cuda = path, steps, cuda
        self.file = path.open("w")
        self.step = self.samples = self.tokens = self.padded = self.media = 0
        self.micro_losses: list = []
        self.micro_accuracy: list = []
        self.epoch = 0
        self.start = None

    def now(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def rebuild_rotary_after_load(llama_class) -> None:
    load = llama_class.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        model = load(cls, *args, **kwargs)
        for layer in model.model.layers:
            attention = layer.self_attn
            rotary = attention.rotary_emb
            attention.rotary_emb = type(rotary)(attention.head_dim, max_position_embeddings=attention.max_position_embeddings)
        return model

    llama_class.from_pretrained = classmethod(from_pretrained)


def mixed_sampler(seed: int):
    import torch

    class MixedFileBatchSampler:
        """Each file's rows in a seeded random order cut into whole global batches (the last
        partial one dropped, as the original's drop_last), the batches of all files shuffled
        together; this rank's contiguous share of each (the original's split)."""

        def __init__(self, dataset, sampler=None, batch_size=4, drop_last=True, rank=0, world_size=1, **_):
            parts = dataset.datasets.datasets
            self.sizes = [len(d) for d in parts]
            self.offsets = [0, *dataset.datasets.cumulative_sizes[:-1]]
            self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
            self.epoch = 0

        def __len__(self) -> int:
            return sum(size // self.batch_size for size in self.sizes)

        def __iter__(self):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + self.epoch)
            self.epoch += 1
            batches = []
            for size, offset in zip(self.sizes, self.offsets):
                order = torch.randperm(size, generator=generator) + offset
                batches += list(order[: size // self.batch_size * self.batch_size].split(self.batch_size))
            share = self.batch_size // self.world_size
            for index in torch.randperm(len(batches), generator=generator).tolist():
                yield batches[index][self.rank * share:(self.rank + 1) * share].tolist()

    return MixedFileBatchSampler


def count_tokens(model_class, log: StepLog) -> None:
    """Tokens per micro-batch from its prompt_wrap's arguments and result shapes (no GPU sync):
    non-padding positions, padded positions, and its loss and token accuracy from forward."""
    wrap = model_class.prompt_wrap
    forward = model_class.forward

    def prompt_wrap(self, img_embeds, input_ids, target_ids, attention_mask):
        inputs_embeds, targets, mask = wrap(self, img_embeds, input_ids, target_ids, attention_mask)
        rows, width = mask.shape
        prefix = width - attention_mask.shape[1]  # BOS, "### Human: " or "### Human: <Img>" + slot
        log.tokens += int(attention_mask.sum()) + rows * prefix
        log.padded += rows * width
        log.media += rows if img_embeds is not None else 0
        return inputs_embeds, targets, mask

    def forward_logged(self, inputs):
        loss, accuracy = forward(self, inputs)
        log.micro_losses.append(loss.detach())
        log.micro_accuracy.append(accuracy)
        return loss, accuracy

    model_class.prompt_wrap = prompt_wrap
    model_class.forward = forward_logged


def time_steps(agent_class, log: StepLog) -> None:
    train_model = agent_class.train_model

    def timed(self, batch, current_step=0, pbar=None):
        import torch

        engine = self.ds_engine
        closes_step = engine.is_gradient_accumulation_boundary()  # asked before step(): this micro-batch's
        lr = engine.get_lr()[0] if closes_step else None  # the rate this optimizer step applies
        result = train_model(self, batch, current_step=current_step, pbar=pbar)
        log.samples += len(batch["output_texts"])
        if not closes_step:
            return result
        elapsed = log.now() - log.start
        log.step += 1
        losses = [float(x) for x in log.micro_losses]
        record = {"step": log.step, "epoch": log.epoch, "loss": sum(losses) / len(losses),
                  "token_accuracy": sum(log.micro_accuracy) / len(log.micro_accuracy), "lr": lr,
                  "samples_seen": log.samples, "tokens_seen": log.tokens, "padded_tokens_seen": log.padded,
                  "media_seen": log.media, "elapsed_s": round(elapsed, 3)}
        if log.cuda:
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if engine.fp16_enabled():  # the fields our runs log: a step skipped on overflow does no update
            record["overflow_skipped_steps"] = int(getattr(engine, "skipped_steps", 0))
            scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
            if isinstance(scale, (int, float)):
                record["loss_scale"] = float(scale)
        log.write(record)
        log.micro_losses.clear()
        log.micro_accuracy.clear()
        if log.step >= log.steps:
            raise StepsDone
        return result

    agent_class.train_model = timed
    agent_class.save_model = lambda self, path, current_step: None


def start_clock_after_build(train_sft, log: StepLog) -> None:
    load_model = train_sft.load_model
    loader = train_sft.load_dataset

    def load_model_then_start(args):
        agent = load_model(args)
        log.start = log.now()
        return agent

    def load_dataset_counting_epochs(args, names):
        data, iterator, sampler = loader(args, names)
        return data, EpochCounter(iterator, log), sampler

    train_sft.load_model = load_model_then_start
    train_sft.load_dataset = load_dataset_counting_epochs


class EpochCounter:
    """The original's loader, counting the epochs it starts (for the metrics' epoch field)."""

    def __init__(self, loader, log: StepLog):
        self.loader, self.log, self.started = loader, log, 0

    def __iter__(self):
        self.log.epoch = self.started
        self.started += 1
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def run_on_cpu(train_sft) -> None:
    import deepspeed
    import torch

    def initialize_distributed(args):
        args["master_ip"] = os.getenv("MASTER_ADDR", "localhost")
        args["master_port"] = os.getenv("MASTER_PORT", "6000")
        args["world_size"] = int(os.getenv("WORLD_SIZE", "1"))
        args["local_rank"] = 0
        deepspeed.init_distributed(dist_backend="gloo")

    train_sft.initialize_distributed = initialize_distributed
    # Its model keeps torch.cuda.current_device() as its device; its embedding cache calls it too.
    torch.cuda.current_device = lambda: "cpu"


if __name__ == "__main__":
    main()
