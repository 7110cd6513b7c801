"""Speed never changes the maths: packed and length-grouped batches give the same per-example
loss as padded ones (tiny LLaMA, fp32, SDPA), media slots and caption targets included."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_LLM
from toollmm.config import load_config
from toollmm.data.dataset import Batch, Collator, Example, InstructionDataset, LengthGroupedBatchSampler, PackingCollator
from toollmm.data.records import CaptionTarget, MediaRef, Record
from toollmm.model.toollmm import build_model
from toollmm.prompts import IGNORE_INDEX, STOP_STRING, format_answer
from toollmm.recipe import TrainingRecipe, evaluate_held_out
from toollmm.signal_tokens import add_signal_tokens, run_text
from toollmm.tokenization import load_tokenizer

ENCODER_DIM = 1024
QUERIES = ["Which model can transcribe this recording?", "hi", "Classify the bird in this picture, please, I want the species",
           "Turn this text into speech", "What is in the video?", "Summarise the following long paragraph " * 3]


class Store:
    root = "memory"

    def __init__(self, shape):
        self.array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    def load(self, name):
        return self.array


@pytest.fixture(scope="module")
def setup(tiny_default):
    config = load_config(3, overrides=[f"model.llm_path={TINY_LLM}", "model.dtype=fp32", "model.outputs.enabled=true",
                                       "model.outputs.projector.hidden_size=64", "model.outputs.projector.ffn_size=128",
                                       "model.outputs.projector.encoder_layers=1", "model.outputs.projector.decoder_layers=1"])
    tokenizer = load_tokenizer(TINY_LLM)
    signal = add_signal_tokens(tokenizer, config.model.outputs)
    torch.manual_seed(0)
    model = build_model(config.model, ENCODER_DIM, stage=3, signal=signal).eval()
    media = MediaRef("image", TINY_LLM / "config.json")  # any key: the feature is given below
    items = [Record(f"q{i}", q, format_answer(f"tool/{i}"), [media] if i % 2 else []) for i, q in enumerate(QUERIES)]
    items.append(Record("gen", "draw a red bird", "Sure! " + run_text("image", 4) + STOP_STRING,
                      target=CaptionTarget("image", Store((77, 768)), "x.npy")))
    torch.manual_seed(1)
    dataset = InstructionDataset(items, tokenizer, {media: torch.randn(ENCODER_DIM)}, 256, signal)
    return model, tokenizer, [dataset[i] for i in range(len(dataset))]


def per_example_losses(model, batch: Batch, examples: list[Example]) -> tuple[dict[str, float], dict]:
    """Each example's mean answer-token loss, read from the batch's logits by locating its tokens."""
    order = batch.record_ids
    assert batch.real_tokens == sum(len(e.input_ids) for e in examples)
    batch = batch.inputs
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out["logits"], batch["labels"]
    losses = {}
    by_id = {e.record_id: e for e in examples}
    pending = list(order)  # row-major: each row's examples, then its padding
    for row in range(labels.shape[0]):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() if "position_ids" in batch else [0]
        for start in starts:
            if not pending:
                break
            example = by_id[pending[0]]
            end = start + len(example.input_ids)
            if not torch.equal(batch["input_ids"][row, start:end].cpu(), example.input_ids):
                continue  # the padding block
            pending.pop(0)
            shift_logits, shift_labels = logits[row, start:end - 1], labels[row, start + 1:end]
            losses[example.record_id] = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX).item()
    assert not pending
    return losses, out


def test_packed_rows_give_the_padded_per_example_losses(setup):
    model, tokenizer, examples = setup
    padded, padded_out = per_example_losses(model, Collator(tokenizer.pad_token_id, ENCODER_DIM)(examples), examples)
    packer = PackingCollator(tokenizer.pad_token_id, ENCODER_DIM, row_length=80)
    batch = packer(examples)
    assert batch.inputs["input_ids"].shape[0] < len(examples) and "attention_mask" not in batch.inputs  # several examples per row
    packed, packed_out = per_example_losses(model, batch, examples)
    assert padded.keys() == packed.keys()
    for record_id in padded:
        assert packed[record_id] == pytest.approx(padded[record_id], abs=1e-4), record_id
    # Control: the same rows with positions that do not restart attend across examples.
    ids = batch.inputs["input_ids"]
    with torch.no_grad():
        leaky_out = model(**dict(batch.inputs, position_ids=torch.arange(ids.shape[1]).expand_as(ids)))
    assert abs(leaky_out["loss"].item() - padded_out["loss"].item()) > 1e-3
    # The batch losses (answer-token mean + the image alignment term) agree as well.
    torch.testing.assert_close(packed_out["loss"], padded_out["loss"], atol=1e-4, rtol=0)
    torch.testing.assert_close(packed_out["mse_image"], padded_out["mse_image"], atol=1e-5, rtol=0)


def test_rounded_row_widths_keep_the_losses_and_give_few_shapes(setup):
    """train.pack_width_multiple: the rows widen to a multiple (capped at the row length) with a
    padding block of their own, and every example's loss and the batch loss stay the same."""
    model, tokenizer, examples = setup
    exact = PackingCollator(tokenizer.pad_token_id, ENCODER_DIM, row_length=80)(examples)
    rounded = PackingCollator(tokenizer.pad_token_id, ENCODER_DIM, row_length=80, width_multiple=32)(examples)
    width = exact.inputs["input_ids"].shape[1]
    assert width % 32 != 0  # else the test would prove nothing
    assert rounded.inputs["input_ids"].shape == (exact.inputs["input_ids"].shape[0], min(-(-width // 32) * 32, 80))
    assert rounded.real_tokens == exact.real_tokens and rounded.record_ids == exact.record_ids
    exact_losses, exact_out = per_example_losses(model, exact, examples)
    rounded_losses, rounded_out = per_example_losses(model, rounded, examples)
    assert rounded_losses == pytest.approx(exact_losses, abs=1e-5)
    torch.testing.assert_close(rounded_out["loss"], exact_out["loss"], atol=1e-5, rtol=0)
    # The cap: a multiple above the row length gives rows of exactly the row length.
    capped = PackingCollator(tokenizer.pad_token_id, ENCODER_DIM, row_length=80, width_multiple=1000)(examples)
    assert capped.inputs["input_ids"].shape[1] == 80


def test_right_padding_needs_no_attention_mask(setup):
    """The collator passes no mask (so SDPA can take its causal kernel): the per-example
    losses equal those of the same batch with the padding masked out, and of each example alone."""
    model, tokenizer, examples = setup
    batch = Collator(tokenizer.pad_token_id, ENCODER_DIM)(examples)
    width = batch.inputs["input_ids"].shape[1]
    assert "attention_mask" not in batch.inputs and batch.inputs["input_ids"].shape[0] == len(examples)
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    assert lengths.min() < width  # some rows are padded
    masked_batch = replace(batch, inputs=dict(batch.inputs, attention_mask=(torch.arange(width)[None, :] < lengths[:, None]).long()))
    unmasked, unmasked_out = per_example_losses(model, batch, examples)
    masked, masked_out = per_example_losses(model, masked_batch, examples)
    collate = Collator(tokenizer.pad_token_id, ENCODER_DIM)
    for e in examples:
        alone = per_example_losses(model, collate([e]), [e])[0][e.record_id]
        assert unmasked[e.record_id] == pytest.approx(masked[e.record_id], abs=1e-5), e.record_id
        assert unmasked[e.record_id] == pytest.approx(alone, abs=1e-4), e.record_id
    torch.testing.assert_close(unmasked_out["loss"], masked_out["loss"], atol=1e-5, rtol=0)
    torch.testing.assert_close(unmasked_out["mse_image"], masked_out["mse_image"], atol=1e-6, rtol=0)


def test_packing_wastes_fewer_tokens(setup):
    _, tokenizer, examples = setup
    real = sum(len(e.input_ids) for e in examples)
    padded = Collator(tokenizer.pad_token_id, ENCODER_DIM)(examples).inputs["input_ids"].numel()
    packed = PackingCollator(tokenizer.pad_token_id, ENCODER_DIM, row_length=128)(examples).inputs["input_ids"].numel()
    assert real <= packed < padded


def test_length_grouped_batches_give_the_same_per_example_losses(setup):
    model, tokenizer, examples = setup
    collate = Collator(tokenizer.pad_token_id, ENCODER_DIM)
    alone = {e.record_id: per_example_losses(model, collate([e]), [e])[0][e.record_id] for e in examples}
    sampler = LengthGroupedBatchSampler([len(e.input_ids) for e in examples], batch_size=3, seed=0)
    seen = {}
    for indices in sampler:
        group = [examples[i] for i in indices]
        seen.update(per_example_losses(model, collate(group), group)[0])
    assert seen.keys() == alone.keys()
    for record_id, loss in alone.items():
        assert seen[record_id] == pytest.approx(loss, abs=1e-4), record_id


def test_gradient_checkpointing_gives_the_same_gradients(tiny_default):
    config = load_config(3, overrides=[f"model.llm_path={TINY_LLM}", "model.dtype=fp32", "model.lora.dropout=0.0"])
    tokenizer = load_tokenizer(TINY_LLM)
    items = [Record(f"q{i}", q, format_answer(f"tool/{i}")) for i, q in enumerate(QUERIES)]
    batch = Collator(tokenizer.pad_token_id, ENCODER_DIM)(InstructionDataset(items, tokenizer, {}, 256).examples).inputs
    grads = []
    # "toggled": enabled once, then switched per batch (train.checkpoint_above_tokens): off, then on.
    for checkpointing in (False, True, "toggled"):
        torch.manual_seed(0)
        model = build_model(config.model, ENCODER_DIM)
        with torch.no_grad():  # LoRA B starts at zero: give the A gradients something to flow through
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
        if checkpointing:
            model.set_activation_checkpointing(True)
        model.train()
        calls = []
        # A module inside the layer (transformers checkpoints the layer's forward, not its hooks)
        # whose input LoRA's backward needs: torch recomputes up to it.
        layer = model.decoder_layers()[0].self_attn.q_proj
        layer.register_forward_hook(lambda *args: calls.append(1))
        if checkpointing == "toggled":
            model.set_activation_checkpointing(False)
            model(**batch)["loss"].backward()
            assert len(calls) == 1  # switched off: no recompute
            model.zero_grad()
            calls.clear()
            model.set_activation_checkpointing(True)
        model(**batch)["loss"].backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing recomputes the layer in backward
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and any("lora_A" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(grads[2][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_answer_only_logits_give_the_same_loss_and_gradients(setup, tuning):
    _, tokenizer, examples = setup
    config = load_config(3, overrides=[f"model.llm_path={TINY_LLM}", "model.dtype=fp32", "model.outputs.enabled=true",
                                       f"model.tuning={tuning}", "model.lora.dropout=0.0",
                                       "model.outputs.projector.hidden_size=64", "model.outputs.projector.ffn_size=128",
                                       "model.outputs.projector.encoder_layers=1", "model.outputs.projector.decoder_layers=1"])
    signal = add_signal_tokens(tokenizer, config.model.outputs)
    batch = PackingCollator(tokenizer.pad_token_id, ENCODER_DIM, 96)(examples).inputs
    results = []
    for answer_only in (False, True):
        torch.manual_seed(0)
        model = build_model(config.model, ENCODER_DIM, stage=3, signal=signal)
        model.answer_logits_only = answer_only
        out = model(**batch)
        out["loss"].backward()
        assert ("logits" in out) != answer_only
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}))
    (full, full_grads), (answers, answer_grads) = results
    for key in ("loss", "token_accuracy", "mse_image"):
        torch.testing.assert_close(answers[key], full[key], atol=1e-5, rtol=1e-5, msg=key)
    assert full_grads.keys() == answer_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(answer_grads[name], full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_layers_give_the_same_loss_and_gradients(tiny_default):
    """train.compile: each decoder layer through torch.compile (dynamic shapes) changes no maths,
    and a new sequence length reuses the compiled graph."""
    config = load_config(3, overrides=[f"model.llm_path={TINY_LLM}", "model.dtype=fp32", "model.lora.dropout=0.0"])
    torch.manual_seed(0)
    model = build_model(config.model, ENCODER_DIM).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    ids = torch.randint(5, 2000, (4, 37))
    labels = ids.masked_fill(torch.arange(37) < 20, IGNORE_INDEX)
    eager = model(ids, labels=labels)["loss"]
    eager.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    for layer in model.decoder_layers():
        layer.compile(dynamic=True)
    compiled = model(ids, labels=labels)["loss"]
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames > 0  # the layers really went through dynamo
    model(torch.randint(5, 2000, (3, 51)), labels=torch.randint(5, 2000, (3, 51)))["loss"].backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompile for a new length


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_training_compiles_every_decoder_layer_with_the_configured_mode(tiny_default, monkeypatch, mode):
    """The recipe's train.compile and train.compile_mode reach each decoder layer's compile call."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((self, kwargs)))
    config = load_config(3, overrides=[f"model.llm_path={TINY_LLM}", "train.compile=true", f"train.compile_mode={mode}"])
    run = TrainingRecipe(config)
    run.encoder_dim, run.signal, run.zero3, run.is_main, run.device = ENCODER_DIM, None, False, True, torch.device("cpu")
    with torch._dynamo.config.patch(specialize_float=False):  # torch's default, restored after
        model = run._build_model()
        # Layer constants (RMSNorm epsilon, LoRA dropout and scaling) traced as constants, not symbolic floats.
        assert torch._dynamo.config.specialize_float
    assert [layer for layer, _ in calls] == list(model.decoder_layers())
    assert all(kwargs == {"dynamic": True, "mode": mode} for _, kwargs in calls)


def test_held_out_lm_loss_is_the_answer_token_mean_at_any_batch_size(setup):
    """held_out.json's lm_loss and token_accuracy compare runs of different micro-batch sizes
    (bench/loss_parity.sh): answers of different lengths weigh by their tokens, not by batch."""
    model, tokenizer, _ = setup
    answers = ["tool/a", "a/much-longer-tool-name-with-many-pieces-v2", "x", "org/model " * 6, "unknown"]
    items = [Record(f"h{i}", QUERIES[i], format_answer(answer)) for i, answer in enumerate(answers)]
    examples = [*InstructionDataset(items, tokenizer, {}, 256, None)]
    collate = Collator(tokenizer.pad_token_id, ENCODER_DIM)
    try:
        by_size = {size: evaluate_held_out(model, examples, collate, size, "cpu") for size in (1, 2, len(examples))}
    finally:
        model.eval()  # evaluate_held_out hands the model back in training mode; the fixture is shared
    losses, _ = per_example_losses(model, collate(examples), examples)
    answer_tokens = {e.record_id: int((e.labels[1:] != IGNORE_INDEX).sum()) for e in examples}
    assert len(set(answer_tokens.values())) > 2
    expected = sum(losses[r] * n for r, n in answer_tokens.items()) / sum(answer_tokens.values())
    for size, result in by_size.items():
        assert result["lm_loss"] == pytest.approx(expected, abs=1e-5), size
        assert result["token_accuracy"] == pytest.approx(by_size[1]["token_accuracy"], abs=1e-6), size
    # The mean of batch losses, by row, moves with the batching: why lm_loss is reported beside it.
    assert by_size[1]["loss"] != pytest.approx(by_size[2]["loss"], abs=1e-3)


def flex_against_padded_sdpa(setup, device: str, compile_layers: bool):
    """The loss-keeping fast path (random batches, packed, ``attn_implementation: flex_attention``)
    gives the per-example losses, batch loss and (on CUDA) gradients of padded rows under SDPA: the block
    mask that transformers builds from the restarting position ids separates the examples. A
    second packing of another width runs through the same compiled kernels."""
    reference, tokenizer, examples = setup
    overrides = [f"model.llm_path={TINY_LLM}", "model.dtype=fp32", "model.outputs.enabled=true", "model.lora.dropout=0.0",
                 "model.outputs.projector.hidden_size=64", "model.outputs.projector.ffn_size=128",
                 "model.outputs.projector.encoder_layers=1", "model.outputs.projector.decoder_layers=1"]
    config = load_config(3, overrides=[*overrides, "model.attn_implementation=flex_attention"])
    signal = add_signal_tokens(tokenizer, config.model.outputs)
    flex = build_model(config.model, ENCODER_DIM, stage=3, signal=signal)
    flex.load_state_dict(reference.state_dict())
    assert flex.llm.config._attn_implementation == "flex_attention"
    with torch.no_grad():  # LoRA B starts at zero: give the LoRA A gradients something to compare
        for name, p in flex.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    sdpa = build_model(load_config(3, overrides=overrides).model, ENCODER_DIM, stage=3, signal=signal)
    sdpa.load_state_dict(flex.state_dict())
    flex.to(device), sdpa.to(device)
    on_device = lambda batch: batch.to(device)
    padded_batch = on_device(Collator(tokenizer.pad_token_id, ENCODER_DIM)(examples))
    packed_batch = on_device(PackingCollator(tokenizer.pad_token_id, ENCODER_DIM, row_length=80)(examples))
    assert packed_batch.inputs["input_ids"].shape[0] < len(examples)
    padded, padded_out = per_example_losses(sdpa.eval(), padded_batch, examples)
    if compile_layers:  # train.compile: flex attention traced inside each compiled layer
        torch._dynamo.reset()
        for layer in flex.decoder_layers():
            layer.compile(dynamic=True)
    packed, packed_out = per_example_losses(flex.eval(), packed_batch, examples)
    assert padded.keys() == packed.keys()
    for record_id in padded:
        assert packed[record_id] == pytest.approx(padded[record_id], abs=1e-4), record_id
    if device == "cpu":
        return  # no flex backward on CPU, and a second width recompiles with dynamic shapes (see below)
    assert_same_gradients((sdpa, padded_batch), (flex, packed_batch))
    wider = on_device(PackingCollator(tokenizer.pad_token_id, ENCODER_DIM, row_length=200)(examples[::-1]))
    assert wider.inputs["input_ids"].shape != packed_batch.inputs["input_ids"].shape
    torch.testing.assert_close(per_example_losses(flex.eval(), wider, examples)[1]["loss"], padded_out["loss"], atol=1e-4, rtol=0)


def assert_same_gradients(*runs):
    grads = []
    for model, batch in runs:
        model.train().zero_grad()
        out = model(**batch.inputs)
        out["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_flex_attention_on_packed_rows_trains_like_padded_sdpa(setup):
    # Forward only, one width, eager layers (transformers compiles the attention kernel itself):
    # on CPU FlexAttention has no backward, and inductor's C++ flex template fails to build with
    # dynamic shapes (torch 2.11). Gradients, compiled layers, a second width: tests/test_gpu.py.
    flex_against_padded_sdpa(setup, "cpu", compile_layers=False)


def test_packed_block_masks_compile_once_for_every_shape():
    """Packed batches of other widths and row counts reuse one compiled create_block_mask (transformers'
    own compiles again for a new length, then for a new row count) and get the block masks that
    an eager create_block_mask builds from transformers' packed-sequence mask function."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers.masking_utils import (and_masks, causal_mask_function, find_packed_sequence_indices,
                                            packed_sequence_mask_function)

    from toollmm.model import flex_mask

    def packed(lengths_by_row):  # position ids restarting at each example, as PackingCollator writes them
        width = max(sum(row) for row in lengths_by_row)
        rows = [torch.cat([torch.arange(n) for n in [*row, width - sum(row)] if n]) for row in lengths_by_row]
        mask = packed_sequence_mask_function(find_packed_sequence_indices(torch.stack(rows)))
        return len(rows), width, and_masks(causal_mask_function, mask)

    torch._dynamo.reset()
    flex_mask._dynamic_create_block_mask.cache_clear()
    shapes = [[[70, 60], [100, 29]], [[300, 20], [150, 150], [64]], [[130, 200, 1], [333], [12, 12, 12], [200]]]
    batches = [packed(lengths) for lengths in shapes]
    graphs = counters["stats"]["unique_graphs"]
    ours = [flex_mask.packed_block_mask(rows, width, width, mask_function=mask) for rows, width, mask in batches]
    assert counters["stats"]["unique_graphs"] - graphs == 1
    theirs = [create_block_mask(mask, rows, None, width, width, device="cpu") for rows, width, mask in batches]  # eager
    for (rows, width, _), mine, reference in zip(batches, ours, theirs):
        assert mine.shape == (rows, 1, width, width)
        assert torch.equal(mine.to_dense(), reference.to_dense())
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(mine, name), getattr(reference, name)), name
