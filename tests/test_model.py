"""The composed model: what trains, where media features land, checkpoint round trips, generation."""

import json

import pytest
import torch

from conftest import TINY_LLM
from toollmm.checkpoint import load_checkpoint, save_checkpoint
from toollmm.config import load_config
from toollmm.generate import generate_responses, left_pad
from toollmm.model.toollmm import TORCH_DTYPES, build_model, causal_lm_loss
from toollmm.prompts import IGNORE_INDEX, MEDIA_SLOT_ID, build_example, format_answer

ENCODER_DIM = 1024


def config(tuning="lora", *overrides):
    return load_config(3, overrides=[f"model.llm_path={TINY_LLM}", f"model.tuning={tuning}", "model.dtype=fp32", *overrides])


@pytest.fixture(scope="module")
def lora_model(tiny_default):
    torch.manual_seed(0)
    model = build_model(config().model, ENCODER_DIM)
    # LoRA B starts at zero; give it values so a round trip that dropped it would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.eval()


def test_exact_trainable_parameters_lora(lora_model):
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    layers = json.loads((TINY_LLM / "config.json").read_text())["num_hidden_layers"]
    expected = {"input_projector.weight", "input_projector.bias"} | {
        f"llm.base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
        for i in range(layers) for proj in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"
    }
    assert trainable == expected
    lora_a = dict(lora_model.named_parameters())["llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert lora_a.shape[0] == 32
    peft_config = lora_model.llm.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (32, 32, 0.1)


def test_trainable_weights_share_the_training_dtype(tiny_default):
    # ZeRO-3's optimizer flattens every trainable tensor into one buffer of one dtype (it failed
    # on GPUs with PEFT's fp32 adapters under a bf16 base); ZeRO-1/2 cast the module anyway.
    for dtype in ("bf16", "fp16"):
        model = build_model(load_config(3, overrides=[f"model.llm_path={TINY_LLM}", f"model.dtype={dtype}"]).model,
                            ENCODER_DIM)
        trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        assert any(".lora_A." in n for n in trainable)
        assert set(trainable.values()) == {TORCH_DTYPES[dtype]}


def test_full_tuning_trains_the_llm_and_projector(tiny_default):
    model = build_model(config("full").model, ENCODER_DIM)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.named_parameters()}
    assert "llm.model.embed_tokens.weight" in names and "input_projector.weight" in names


def test_media_feature_lands_in_its_slot(lora_model, tokenizer):
    example = build_example(tokenizer, "What is this?", True, format_answer("unknown"), 512)
    text = build_example(tokenizer, "What is this?", False, format_answer("unknown"), 512)
    ids, mask = left_pad([torch.tensor(example.input_ids), torch.tensor(text.input_ids)], tokenizer.pad_token_id)
    feature = torch.randn(1, ENCODER_DIM)
    embeds = lora_model.embed_inputs(ids, feature)
    slot = (ids == MEDIA_SLOT_ID).nonzero()
    assert slot.tolist() == [[0, ids.shape[1] - len(example.input_ids) + example.input_ids.index(MEDIA_SLOT_ID)]]
    torch.testing.assert_close(embeds[0, slot[0, 1]], lora_model.input_projector(feature)[0])
    table = lora_model.llm.get_input_embeddings().weight
    torch.testing.assert_close(embeds[1], table[ids[1]])
    with pytest.raises(ValueError, match="1 media slots but 2 features"):
        lora_model.embed_inputs(ids, torch.randn(2, ENCODER_DIM))


def test_loss_covers_answer_tokens_only():
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX]])
    out = causal_lm_loss(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([3, 4]))
    torch.testing.assert_close(out["loss"], expected)
    assert out["token_accuracy"] == ((logits[0, 1:3].argmax(-1) == torch.tensor([3, 4])).float().mean())


def test_checkpoint_round_trip_gives_identical_logits(lora_model, tokenizer, tmp_path):
    run_config = config()
    save_checkpoint(tmp_path / "ck", lora_model, run_config, tokenizer, {"step": 7}, "encoder-id")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "adapter", "checkpoint.json", "config.yaml", "tokenizer", "trainable.safetensors"]
    assert (tmp_path / "ck" / "adapter" / "adapter_model.safetensors").is_file()
    meta = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert meta["base_model"]["vocab_size"] == len(tokenizer) and meta["step"] == 7 and meta["stage"] == 3

    loaded, loaded_tokenizer, _, _ = load_checkpoint(tmp_path / "ck")
    example = build_example(tokenizer, "Caption this.", True, format_answer("unknown"), 512)
    ids = torch.tensor([example.input_ids])
    feature = torch.randn(1, ENCODER_DIM)
    with torch.no_grad():
        expected = lora_model(ids, torch.ones_like(ids), slot_features=feature)["logits"]
        actual = loaded(ids, torch.ones_like(ids), slot_features=feature)["logits"]
    assert torch.equal(expected, actual)
    assert loaded_tokenizer.encode("### Human: ") == tokenizer.encode("### Human: ")


def test_checkpoint_trained_with_flex_attention_answers_with_sdpa(lora_model, tokenizer, tmp_path):
    save_checkpoint(tmp_path / "ck", lora_model, config("lora", "model.attn_implementation=flex_attention"), tokenizer, {"step": 1}, "encoder-id")
    assert "attn_implementation: flex_attention" in (tmp_path / "ck" / "config.yaml").read_text()
    loaded, _, loaded_config, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.llm.config._attn_implementation == "sdpa" == loaded_config.model.attn_implementation


def test_checkpoint_refuses_another_base(lora_model, tokenizer, tmp_path):
    save_checkpoint(tmp_path / "ck", lora_model, config(), tokenizer, {"step": 1}, "encoder-id")
    meta_path = tmp_path / "ck" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"]["vocab_size"] = 32000
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="vocab_size: checkpoint 32000 vs base"):
        load_checkpoint(tmp_path / "ck")


def test_checkpoint_with_wrong_tuning_is_refused(lora_model, tokenizer, tmp_path):
    save_checkpoint(tmp_path / "ck", lora_model, config(), tokenizer, {"step": 1}, "encoder-id")
    text = (tmp_path / "ck" / "config.yaml").read_text().replace("tuning: lora", "tuning: full")
    (tmp_path / "ck" / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match="weights do not match this model \\(trains: input_projector, llm\\)"):
        load_checkpoint(tmp_path / "ck")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Tool_LMM checkpoint: missing trainable.safetensors"):
        load_checkpoint(tmp_path)


def test_batched_generation_equals_one_at_a_time(lora_model, tokenizer):
    queries = ["Please transcribe this.", "What objects are in this picture and where are they?", "Hi"]
    prompts = [torch.tensor(build_example(tokenizer, q, i == 1, None, 512).input_ids) for i, q in enumerate(queries)]
    features = [None, torch.randn(ENCODER_DIM), None]
    batched = generate_responses(lora_model, tokenizer, prompts, features, batch_size=3, max_new_tokens=12, show_progress=False)
    single = [generate_responses(lora_model, tokenizer, [p], [f], batch_size=1, max_new_tokens=12, show_progress=False)[0]
              for p, f in zip(prompts, features)]
    assert batched == single
    assert all(r for r in batched)


def test_merged_lora_answers_as_the_adapters_do(lora_model, tokenizer):
    """Inference folds LoRA into the base weights (inference.merge_lora): same logits within
    fp32 rounding, same greedy answers, and no LoRA module left."""
    import copy

    from peft import PeftModel

    merged = copy.deepcopy(lora_model)
    merged.merge_lora()
    assert not isinstance(merged.llm, PeftModel)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    queries = ["Please transcribe this.", "What objects are in this picture and where are they?", "Hi"]
    prompts = [torch.tensor(build_example(tokenizer, q, i == 1, None, 512).input_ids) for i, q in enumerate(queries)]
    features = [None, torch.randn(ENCODER_DIM), None]
    ids = prompts[1][None]
    with torch.no_grad():
        expected = lora_model(ids, torch.ones_like(ids), slot_features=features[1][None])["logits"]
        actual = merged(ids, torch.ones_like(ids), slot_features=features[1][None])["logits"]
    assert (expected - actual).abs().max() > 0  # really another computation
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    answers = [generate_responses(m, tokenizer, prompts, features, batch_size=3, max_new_tokens=12, show_progress=False)
               for m in (lora_model, merged)]
    assert answers[0] == answers[1]
