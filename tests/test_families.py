"""Each LLM family users bring, as a tiny random model (AutoConfig/from_config) with a tokenizer of
its kind, through the whole path on CPU: stage-3 LoRA training, checkpoint, resume (llama),
inference (free, constrained, top-k) and reload, with the exact set of trainable parameter names."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import ROOT, TINY_CONFIG, TINY_LLM
from toollmm.checkpoint import load_for_inference
import toollmm.cli.inference as inference_cli
from toollmm.config import load_config
from toollmm.data import load_splits
from toollmm.model.families import LORA_TARGETS, lora_targets
from toollmm.model.toollmm import build_model
from toollmm.tokenization import load_tokenizer

LAYERS = 2
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
# family: (config.json model_type, tokenizer kind, config fields, LoRA-adapted modules written out
# here, not read from the table under test)
FAMILIES = {
    "llama": ("llama", "sentencepiece", {"num_key_value_heads": 4}, QKVO),
    "llama3": ("llama", "bpe", {"num_key_value_heads": 2, "rope_theta": 500000.0}, QKVO),  # GQA + BPE
    "mistral": ("mistral", "sentencepiece", {"num_key_value_heads": 2}, QKVO),
    "qwen2": ("qwen2", "bpe_no_bos", {"num_key_value_heads": 2}, QKVO),  # q/k/v biases, no BOS token
    "phi3": ("phi3", "sentencepiece", {"num_key_value_heads": 4}, ("qkv_proj", "o_proj")),  # fused qkv
    "gemma": ("gemma", "sentencepiece", {"num_key_value_heads": 1, "head_dim": 16}, QKVO),
}
# The bundled media rows only (120, half of their requests held out, the catalogue their 22 tools):
# a few steps need no more, and the rows pass through the encoder.
DATA = ["data.train_files=[{path: data/toolmmbench_sample/media_requests.json, media_root: data}]", "data.eval_files=[]",
        "data.split.test_fraction=0.5"]


def family_tokenizer(kind: str, request):
    if kind == "sentencepiece":
        return load_tokenizer(TINY_LLM)
    small_llm = request.getfixturevalue("small_llm")
    tokenizer = load_tokenizer(small_llm)
    if kind == "bpe_no_bos":
        tokenizer.hf.bos_token = None
    return tokenizer


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_default, tmp_path_factory):
    """(name, folder of a tiny random model of that family with its tokenizer)."""
    name = request.param
    model_type, kind, fields, _ = FAMILIES[name]
    tokenizer = family_tokenizer(kind, request)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **fields)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(name) / "llm"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return name, folder


def expected_trainable(name: str) -> set[str]:
    modules = FAMILIES[name][3]
    return {"input_projector.weight", "input_projector.bias"} | {
        f"llm.base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.default.weight"
        for i in range(LAYERS) for m in modules for ab in "AB"}


def overrides(folder, out):
    return [f"model.llm_path={folder}", "model.tuning=lora", f"train.output_dir={out}", *DATA,
            "train.micro_batch_size=4", "train.save_every_steps=1", "train.learning_rate=0.001"]


def train(*args: str) -> None:
    """One training process (a process can set up and tear down torch.distributed only once)."""
    result = subprocess.run([sys.executable, str(ROOT / "code" / "train.py"), "--stage", "3", "--config", str(TINY_CONFIG), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "code")})
    assert result.returncode == 0, result.stderr[-4000:]


def test_table_rows_are_the_published_choice_per_family():
    assert LORA_TARGETS["llama"] == QKVO and LORA_TARGETS["phi3"] == ("qkv_proj", "o_proj")
    config = load_config(3).model.lora
    assert config.target_modules is None and lora_targets(config, "llama") == list(QKVO)
    with pytest.raises(ValueError, match="model.lora.target_modules"):
        lora_targets(config, "gpt2")
    config.target_modules = ["all-linear"]
    assert lora_targets(config, "gpt2") == "all-linear"


def test_all_linear_override_adapts_every_decoder_linear_layer(tiny_default):
    config = load_config(3, [TINY_CONFIG], [f"model.llm_path={TINY_LLM}", "model.tuning=lora", "model.lora.target_modules=[all-linear]"])
    model = build_model(config.model, 1024)
    modules = {n.split(".lora_")[0].split("layers.0.")[1] for n, p in model.named_parameters() if p.requires_grad and "layers.0." in n}
    assert modules == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert not any("lm_head" in n or "embed" in n for n, p in model.named_parameters() if p.requires_grad)


def test_family_trains_resumes_answers_and_reloads(family, tmp_path):
    name, folder = family
    expected = expected_trainable(name)
    config = load_config(3, [TINY_CONFIG], overrides(folder, tmp_path / "unused"))
    model = build_model(config.model, 1024)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    if name == "qwen2":  # the biases beside LoRA stay frozen
        assert not model.llm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias.requires_grad
    del model

    out = tmp_path / "run"
    # Resuming is DeepSpeed's state, the same for every family: one family resumes (a training
    # launch costs ~9 s of CI time), the others train their 3 steps in one go.
    if name == "llama":
        train(*overrides(folder, out), "train.max_steps=2")
        train("--resume", *overrides(folder, out), "train.max_steps=3")
    else:
        train(*overrides(folder, out), "train.max_steps=3")
    saved = load_file(out / "checkpoint-2" / "trainable.safetensors")
    assert set(saved) == expected
    final = out / "final"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    weights = load_file(final / "trainable.safetensors")
    assert set(weights) == expected
    assert any(not torch.equal(weights[k], saved[k]) for k in expected)  # step 3 trained on from step 2

    free, constrained = tmp_path / "free.json", tmp_path / "constrained.json"
    inference_cli.main(["--ckpt", str(final), "--split", "test", "--limit", "3", "inference.constrained=false",
                        "inference.max_new_tokens=6", "--output", str(free)])
    inference_cli.main(["--ckpt", str(final), "--split", "test", "--limit", "3", "inference.constrained=true",
                        "inference.top_k=3", "--output", str(constrained)])
    model, tokenizer, config, _ = load_for_inference(final, "cpu")
    catalogue = set(load_splits(config.data).catalogue)
    free_rows, rows = json.loads(free.read_text()), json.loads(constrained.read_text())
    assert len(free_rows) == len(rows) == 3 and all(isinstance(r["response"], str) for r in free_rows)
    for row in rows:
        assert len({t["tool"] for t in row["top_k"]}) == 3
        assert row["tool"] in catalogue and {t["tool"] for t in row["top_k"]} <= catalogue
    # Reload: the checkpoint's weights are the model's (LoRA folded in or not, the state matches by name).
    reloaded = {n: p for n, p in model.named_parameters()}
    assert torch.equal(reloaded["input_projector.weight"], weights["input_projector.weight"])
