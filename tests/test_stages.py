"""Stages 1-2 and the any-to-any parts of stage 3 on the tiny LLM: what trains in each stage,
the signal tokens and their rows, the output projectors' shapes, prompts token by token,
signal-token runs cut short, and starting a stage from the previous one's checkpoint."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DATA, TINY_LLM
from toollmm.caption_embeddings import CaptionEmbeddingMismatch, CaptionEmbeddingStore
from toollmm.checkpoint import load_checkpoint, load_initial_weights, save_checkpoint
from toollmm.config import ConfigError, load_config
from toollmm.data.dataset import Collator, InstructionDataset
from toollmm.data.records import CaptionTarget, DataReport, Record
from toollmm.data.stages import caption_items, instruction_items
from toollmm.model.projectors import LinearProjector, TransformerProjector
from toollmm.model.toollmm import SIGNAL_ROWS, build_model, checkpoint_state, optimizer_groups
from toollmm.prompts import IGNORE_INDEX, MEDIA_SLOT_ID, STOP_STRING, build_example
from toollmm.signal_tokens import add_signal_tokens, run_text
from toollmm.tokenization import load_tokenizer

ENCODER_DIM = 1024
PAIRS = DATA / "t2x_pairs"
SMALL_PROJECTOR = ["model.outputs.projector.hidden_size=64", "model.outputs.projector.encoder_layers=1",
                   "model.outputs.projector.decoder_layers=1", "model.outputs.projector.ffn_size=128"]


def stage_config(stage, *overrides):
    base = [f"model.llm_path={TINY_LLM}", "model.dtype=fp32", "model.outputs.enabled=true", *SMALL_PROJECTOR]
    if stage < 3:
        base.append(f"data.caption_files=[{{modality: image, path: {PAIRS}/cc3m/cc3m.json, media_root: {PAIRS}/cc3m/images}}]")
    return load_config(stage, overrides=[*base, *overrides])


@pytest.fixture()
def signal_tokenizer(tiny_default):
    tokenizer = load_tokenizer(TINY_LLM)
    return tokenizer, add_signal_tokens(tokenizer, stage_config(2).model.outputs)


def model_for(stage, signal, *overrides):
    torch.manual_seed(0)
    return build_model(stage_config(stage, *overrides).model, ENCODER_DIM, stage=stage, signal=signal)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---- signal tokens


def test_signal_tokens_follow_the_base_vocabulary_in_order(signal_tokenizer):
    tokenizer, signal = signal_tokenizer
    assert signal.base_vocab_size == 3000 and len(tokenizer) == 3000 + 2 + 4 + 24 + 8
    assert signal.names[:6] == ["<Img>", "</Img>", "[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]"]
    assert signal.names[-1] == "[AUD7]" and signal.ids["video"] == list(range(3006, 3030))
    assert [tokenizer.encode(name) for name in signal.names] == [[i] for i in range(3000, 3038)]


def test_added_tokens_tokenize_as_the_original_slow_tokenizer(signal_tokenizer):
    tokenizer, signal = signal_tokenizer
    sp = tokenizer.sp
    # Spaces next to an added token go with it; each text piece gets sentencepiece's own encoding.
    assert tokenizer.encode("Sure thing! " + run_text("image", 4) + STOP_STRING) == \
        sp.encode("Sure thing!") + signal.ids["image"] + sp.encode(STOP_STRING)
    assert tokenizer.encode("### Human: <Img>") == sp.encode("### Human:") + [3000]
    assert tokenizer.encode("</Img> generate a caption") == [3001] + sp.encode("generate a caption")


def test_saved_tokenizer_keeps_the_signal_tokens(signal_tokenizer, tmp_path):
    tokenizer, signal = signal_tokenizer
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert add_signal_tokens(again, stage_config(2).model.outputs) == signal
    text = "Sure thing! " + run_text("audio", 8) + STOP_STRING
    assert again.encode(text) == tokenizer.encode(text)
    fewer = stage_config(2, "model.outputs.audio.signal_tokens=4").model.outputs
    with pytest.raises(ValueError, match="holds 38 added tokens but this config has 34 signal tokens"):
        add_signal_tokens(load_tokenizer(tmp_path), fewer)


# ---- what trains


def test_stage_1_trains_the_input_projector_only(signal_tokenizer):
    model = model_for(1, signal_tokenizer[1])
    assert trainable(model) == {"input_projector.weight", "input_projector.bias"}


def test_stage_2_trains_output_projectors_and_the_vocabulary_matrices(signal_tokenizer):
    model = model_for(2, signal_tokenizer[1])
    projectors = {n for n, _ in model.named_parameters() if n.startswith("output_projectors.")}
    assert {n.split(".")[1] for n in projectors} == {"image", "video", "audio"}
    assert trainable(model) == projectors | {"llm.model.embed_tokens.weight", "llm.lm_head.weight"}


def test_stage_3_trains_lora_both_projectors_and_the_vocabulary_matrices(signal_tokenizer):
    model = model_for(3, signal_tokenizer[1], "model.tuning=lora")
    layers = json.loads((TINY_LLM / "config.json").read_text())["num_hidden_layers"]
    lora = {f"llm.base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
            for i in range(layers) for proj in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"}
    projectors = {n for n, _ in model.named_parameters() if n.startswith(("output_projectors.", "input_projector."))}
    vocab = {"llm.base_model.model.model.embed_tokens.weight", "llm.base_model.model.lm_head.weight"}
    assert trainable(model) == lora | projectors | vocab


def test_tool_only_stage_3_keeps_the_vocabulary(tiny_default):
    config = load_config(3, overrides=[f"model.llm_path={TINY_LLM}", "model.dtype=fp32"])
    model = build_model(config.model, ENCODER_DIM)
    assert model.output_projectors is None and model.llm.get_input_embeddings().num_embeddings == 3000
    with pytest.raises(ValueError, match="model.outputs.enabled needs the signal tokens"):
        build_model(stage_config(3).model, ENCODER_DIM, signal=None)


def test_a_stage_2_step_moves_only_the_signal_rows(signal_tokenizer):
    tokenizer, signal = signal_tokenizer
    model = model_for(2, signal)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # AdamW with weight decay, as published: decay on the frozen rows would move them.
    optimizer = torch.optim.AdamW(optimizer_groups(model), lr=1e-2, weight_decay=0.001)
    batch = collate(tokenizer, [dataset_item(tokenizer, signal, "image"), dataset_item(tokenizer, signal, "audio")])
    model(**batch)["loss"].backward()
    optimizer.step()
    after = dict(model.named_parameters())
    for name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
        assert torch.equal(after[name][:3000], before[name][:3000]), name
        changed = (after[name][3000:] != before[name][3000:]).any(1)
        # The image and audio runs (and their neighbours in the softmax) moved; <Img>/</Img> rows
        # got gradient only through the LM head's softmax.
        assert changed[2:6].all() and changed[30:].all(), name
    assert not torch.equal(after["output_projectors.image.model.weight"], before["output_projectors.image.model.weight"])
    frozen = [n for n in before if not after[n].requires_grad]
    assert frozen and all(torch.equal(after[n], before[n]) for n in frozen)


def test_train_rows_all_trains_every_vocabulary_row_with_weight_decay(signal_tokenizer):
    tokenizer, signal = signal_tokenizer
    vocab = {"llm.model.embed_tokens.weight", "llm.lm_head.weight"}
    stage_1 = model_for(1, signal, "model.outputs.train_rows=all")  # NExT-GPT: every stage, stage 1 included
    assert trainable(stage_1) == {"input_projector.weight", "input_projector.bias"} | vocab
    model = model_for(2, signal, "model.outputs.train_rows=all")
    assert [len(group["params"]) for group in optimizer_groups(model)] == [len(trainable(model))]  # one group: decayed
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_groups(model), lr=1e-2, weight_decay=0.001)
    batch = collate(tokenizer, [dataset_item(tokenizer, signal, "image"), dataset_item(tokenizer, signal, "audio")])
    model(**batch)["loss"].backward()
    optimizer.step()
    after = dict(model.named_parameters())
    for name in vocab:
        assert (after[name][:3000] != before[name][:3000]).any(1).all(), name  # weight decay moves every row
    assert set(checkpoint_state(model)) >= vocab | set(SIGNAL_ROWS)


def collate(tokenizer, examples):
    """The model inputs of a padded batch; its bookkeeping stays beside them."""
    batch = Collator(tokenizer.pad_token_id, ENCODER_DIM)(examples)
    assert batch.record_ids == [e.record_id for e in examples]
    assert batch.real_tokens == sum(len(e.input_ids) for e in examples)
    assert set(batch.inputs) == {"input_ids", "labels", "slot_features", "targets"}
    return batch.inputs


def dataset_item(tokenizer, signal, modality, caption="a dog runs on the beach"):
    shape = stage_config(2).model.outputs.target_shape(modality)
    store = FixedStore(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    item = Record("r", caption, run_text(modality, len(signal.ids[modality])) + STOP_STRING,
                target=CaptionTarget(modality, store, "x.npy"))
    return InstructionDataset([item], tokenizer, {}, 512, signal)[0]


class FixedStore:
    def __init__(self, array):
        self.array, self.root = array, "memory"

    def load(self, name):
        return self.array


# ---- output projectors


def test_published_transformer_projector_structure():
    outputs = load_config(2, overrides=["model.outputs.enabled=true", "data.caption_files=[{path: x}]"]).model.outputs
    projector = TransformerProjector(4096, outputs.image, outputs.projector)
    tfm = projector.tfm
    assert (projector.fc.in_features, projector.fc.out_features) == (4096, 512)
    assert len(tfm.encoder.layers) == 4 and len(tfm.decoder.layers) == 4
    layer = tfm.encoder.layers[0]
    assert layer.self_attn.num_heads == 4 and layer.linear1.out_features == 2048 and layer.norm_first
    assert layer.self_attn.batch_first and layer.dropout.p == 0.0
    assert projector.query_embs.shape == (1, 77, 512) and projector.model.out_features == 768
    assert TransformerProjector(4096, outputs.audio, outputs.projector).query_embs.shape == (1, 1, 512)


@pytest.mark.parametrize("mode", ["transformer", "linear"])
def test_projector_outputs_have_each_decoders_shape(signal_tokenizer, mode):
    tokenizer, signal = signal_tokenizer
    model = model_for(2, signal, f"model.outputs.projector.mode={mode}")
    kind = {"transformer": TransformerProjector, "linear": LinearProjector}[mode]
    assert all(isinstance(p, kind) for p in model.output_projectors.values())
    expected = {"image": (2, 77, 768), "video": (2, 77, 1024), "audio": (2, 1, 512)}
    for modality, shape in expected.items():
        n = len(signal.ids[modality])
        hidden, embeds = torch.randn(2, n, 256), torch.randn(2, n, 256)
        assert model.output_projectors[modality](hidden, embeds).shape == shape
    # Stored targets (AudioLDM's is one 512-vector) fit the projector's output.
    batch = collate(tokenizer, [dataset_item(tokenizer, signal, m) for m in expected])
    assert batch["targets"]["audio"].shape == (1, 512) and batch["targets"]["video"].shape == (1, 77, 1024)
    out = model(**batch)
    assert {"mse_image", "mse_video", "mse_audio", "l2_image"} <= set(out)


def test_unknown_projector_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="model.outputs.projector.mode: 'qformer' is not one of"):
        stage_config(2, "model.outputs.projector.mode=qformer")


def test_alignment_loss_is_the_published_l2_and_scaled(signal_tokenizer):
    tokenizer, signal = signal_tokenizer
    model = model_for(2, signal, "model.outputs.image.loss_scale=2.0").eval()
    batch = collate(tokenizer, [dataset_item(tokenizer, signal, "image")])
    out = model(**batch)
    hidden_states = model.llm(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
    prediction = model.project_runs("image", hidden_states, model.embed_inputs(batch["input_ids"], None), batch["labels"])
    distance = (prediction - batch["targets"]["image"]).pow(2).sum(-1).sqrt().mean()
    torch.testing.assert_close(out["l2_image"], distance)
    lm = torch.nn.functional.cross_entropy(out["logits"][0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out["loss"], lm + 2.0 * distance)


# ---- prompts and runs


def test_stage_prompts_token_by_token(signal_tokenizer):
    tokenizer, signal = signal_tokenizer
    sp = tokenizer.sp
    one = build_example(tokenizer, "generate a caption", True, "a dog" + STOP_STRING, 512)
    prefix = [1] + sp.encode("### Human:") + [3000, MEDIA_SLOT_ID]
    prompt = [3001] + sp.encode("generate a caption\n### Assistant: ")
    answer = sp.encode("a dog\n###")
    assert one.input_ids == prefix + prompt + answer
    assert one.labels == [IGNORE_INDEX] * (len(prefix) + len(prompt)) + answer
    two = build_example(tokenizer, "a dog", False, run_text("image", 4) + STOP_STRING, 512)
    prompt = sp.encode("### Human: ") + sp.encode("a dog\n### Assistant: ")
    assert two.input_ids == [1] + prompt + signal.ids["image"] + sp.encode(STOP_STRING)
    assert two.labels == [IGNORE_INDEX] * (1 + len(prompt)) + signal.ids["image"] + sp.encode(STOP_STRING)


def test_runs_cut_short_are_counted_and_skipped(signal_tokenizer):
    tokenizer, signal = signal_tokenizer
    store = FixedStore(np.zeros((77, 1024), np.float32))
    video = run_text("video", 24)
    # A query long enough that max_tgt_len (80) cuts the 24-token run in the middle.
    long_query = next(q for q in ("a cat " * n for n in range(1, 80))
                      if 60 < len(build_example(tokenizer, q, False, None, 1 << 30).input_ids) < 70)
    items = [
        Record("whole", "a cat", video + STOP_STRING, target=CaptionTarget("video", store, "a.npy")),
        Record("long", long_query, video + STOP_STRING, target=CaptionTarget("video", store, "b.npy")),
        Record("broken", "a cat", run_text("video", 10) + STOP_STRING, target=CaptionTarget("video", store, "c.npy")),
        Record("orphan", "a cat", video + STOP_STRING),
        Record("text", "a cat", "a cat" + STOP_STRING),
    ]
    report = DataReport(rows=5, used=5)
    dataset = InstructionDataset(items, tokenizer, {}, 80, signal, report)
    assert [e.record_id for e in dataset.examples] == ["whole", "text"]
    assert dataset.skipped == {
        "signal-token run cut by max_tgt_len": 1,
        "incomplete video signal-token run in the data": 1,
        "signal-token runs do not match the caption embeddings (one run per generation answer)": 1,
    }
    assert report.used == 2 and report.skipped == dataset.skipped


# ---- caption data per stage


def test_caption_items_per_stage(tiny_default):
    webvid = f"{{modality: video, path: {PAIRS}/webvid/webvid.json, media_root: {PAIRS}/webvid/videos}}"
    config = stage_config(1, f"data.caption_files=[{webvid}]", "data.split.test_fraction=0.3")
    report = DataReport()
    train, test = caption_items(config, 1, report)
    # Three of the 11 videos are missing: counted, reported, not fatal.
    assert report.rows == 11 and report.used == 8 and report.skipped == {"missing media": 3}
    assert len(train) + len(test) == 8 and test
    first = train[0]
    assert first.query == "generate a caption" and first.answer.endswith(STOP_STRING) and len(first.media) == 1


def test_stage_2_refuses_embeddings_of_another_decoder(tiny_default, tmp_path):
    store = CaptionEmbeddingStore.for_writing(tmp_path / "embed", identity="sd", shape=(77, 768), modality="video",
                                              decoder="tiny_sd")
    store.save("00169473.mp4.npy", np.zeros((77, 768), np.float32))
    webvid = f"{{modality: video, path: {PAIRS}/webvid/webvid.json, media_root: x, embeddings_dir: {tmp_path / 'embed'}}}"
    config = stage_config(2, f"data.caption_files=[{webvid}]")
    with pytest.raises(CaptionEmbeddingMismatch, match="77×768.*model.outputs.video expects 77×1024"):
        caption_items(config, 2, DataReport())


def test_stage_2_counts_captions_without_embeddings(tiny_default, tmp_path):
    store = CaptionEmbeddingStore.for_writing(tmp_path / "embed", identity="x", shape=(512,), modality="audio", decoder="d")
    store.save("107819.wav.npy", np.ones(512, np.float32))
    audio = f"{{modality: audio, path: {PAIRS}/audiocap/audiocap.json, media_root: x, embeddings_dir: {tmp_path / 'embed'}}}"
    report = DataReport()
    train, test = caption_items(stage_config(2, f"data.caption_files=[{audio}]"), 2, report)
    assert len(train + test) == 1 and report.skipped == {"caption embedding missing": 7}
    assert (train + test)[0].answer == run_text("audio", 8) + STOP_STRING


def test_generation_rows_put_the_run_where_the_tag_was(tiny_default, tmp_path):
    store = CaptionEmbeddingStore.for_writing(tmp_path / "embed", identity="x", shape=(77, 768), modality="image", decoder="d")
    store.save("001312382.jpg.npy", np.ones((77, 768), np.float32))
    files = (f"[{{modality: image, path: {PAIRS}/cc3m/cc3m_generation.json, embeddings_dir: {tmp_path / 'embed'}}},"
             f" {{modality: image, path: {PAIRS}/cc3m/cc3m_comprehension.json, media_root: {PAIRS}/cc3m/images}}]")
    report = DataReport()
    items = instruction_items(stage_config(3, f"data.instruction_files={files}"), report)
    generation = [i for i in items if i.target is not None]
    assert len(generation) == 1 and generation[0].answer == "Sure thing! [IMG0] [IMG1] [IMG2] [IMG3]" + STOP_STRING
    assert generation[0].query.startswith("Can you illustrate me a scene of")
    comprehension = [i for i in items if i.media]
    assert len(comprehension) == 20 and comprehension[0].query == "What's the image really about?"
    assert report.skipped == {"caption embedding missing": 19}
    with pytest.raises(ConfigError, match="generation rows need signal tokens"):
        instruction_items(stage_config(3, f"data.instruction_files={files}", "model.outputs.enabled=false"), DataReport())


# ---- checkpoints and chaining


def test_checkpoint_stores_the_signal_rows_not_the_matrices(signal_tokenizer, tmp_path):
    tokenizer, signal = signal_tokenizer
    model = model_for(2, signal)
    with torch.no_grad():
        model.llm.get_input_embeddings().weight[3000:] += 1.0
    state = checkpoint_state(model)
    assert state[SIGNAL_ROWS[0]].shape == (38, 256) and state[SIGNAL_ROWS[1]].shape == (38, 256)
    assert not any(name.startswith("llm.") for name in state)
    assert "input_projector.weight" in state  # frozen here, but the next stage needs it
    config = stage_config(2)
    save_checkpoint(tmp_path / "ck", model, config, tokenizer, {"step": 1}, "encoder")
    loaded, loaded_tokenizer, _, meta = load_checkpoint(tmp_path / "ck")
    assert len(loaded_tokenizer) == 3038 and meta["outputs"]["signal_tokens"]["base_vocab_size"] == 3000
    for name, param in model.state_dict().items():
        assert torch.equal(param, loaded.state_dict()[name]), name


def test_stage_3_starts_from_stage_2_and_checks_it(signal_tokenizer, tmp_path):
    tokenizer, signal = signal_tokenizer
    stage_2 = model_for(2, signal)
    with torch.no_grad():
        for p in stage_2.output_projectors.parameters():
            p.add_(0.5)
    save_checkpoint(tmp_path / "s2", stage_2, stage_config(2), tokenizer, {"step": 5}, "encoder")
    config = stage_config(3, "model.tuning=lora")
    stage_3 = build_model(config.model, ENCODER_DIM, stage=3, signal=signal)
    load_initial_weights(stage_3, config, tmp_path / "s2")
    own = stage_3.state_dict()
    for name, tensor in stage_2.state_dict().items():
        if not name.startswith("llm."):
            assert torch.equal(own[name], tensor), name
    embeddings = stage_3.llm.get_input_embeddings().weight
    assert torch.equal(embeddings, stage_2.llm.get_input_embeddings().weight)

    other = stage_config(3, "model.outputs.projector.hidden_size=32")
    mismatched = build_model(other.model, ENCODER_DIM, stage=3, signal=signal)
    with pytest.raises(ValueError, match="other signal tokens or output projectors: projector"):
        load_initial_weights(mismatched, other, tmp_path / "s2")
    tool_only = load_config(3, overrides=[f"model.llm_path={TINY_LLM}", "model.dtype=fp32"])
    with pytest.raises(ValueError, match="has signal tokens and output projectors.*model.outputs.enabled=true"):
        load_initial_weights(build_model(tool_only.model, ENCODER_DIM), tool_only, tmp_path / "s2")
    meta = json.loads((tmp_path / "s2" / "checkpoint.json").read_text())
    meta["base_model"]["hidden_size"] = 4096
    (tmp_path / "s2" / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hidden_size: checkpoint 4096 vs base 256"):
        load_initial_weights(stage_3, config, tmp_path / "s2")
