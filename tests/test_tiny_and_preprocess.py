"""The embedded tiny default is deterministic and real-format; preprocess_dataset.py is reproducible."""

import hashlib
import json

import torch
from transformers import AutoConfig, AutoTokenizer

from conftest import ROOT, DATA, TINY_CONFIG, TINY_IMAGEBIND, TINY_LLM, run_entry
from toollmm.model.imagebind import ImageBindConfig, load_imagebind
from toollmm.tiny import build


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_build_is_deterministic(tiny_default, tmp_path):
    llm_dir, imagebind_file = build(tmp_path, DATA)
    for name in ("tokenizer.model", "model.safetensors", "config.json", "tokenizer.json"):
        assert digest(llm_dir / name) == digest(TINY_LLM / name), name
    a = torch.load(imagebind_file, weights_only=True)
    b = torch.load(TINY_IMAGEBIND, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_default_loads_like_real_checkpoints(tiny_default):
    config = AutoConfig.from_pretrained(TINY_LLM)
    assert config.model_type == "llama" and config.vocab_size == 3000
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLM)
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id == 1
    assert tokenizer.decode(tokenizer("a\nb", add_special_tokens=False)["input_ids"]) == "a\nb"
    encoder = load_imagebind(TINY_IMAGEBIND, ImageBindConfig.tiny())
    assert encoder(  # a tiny image batch flows to one 1024-d embedding
        "vision", torch.randn(1, 3, 224, 224)).shape == (1, 1024)


def test_preprocess_dataset_is_reproducible(tiny_default, tmp_path):
    outputs = []
    for name in ("a", "b"):
        run_entry("preprocess_dataset.py", "--config", str(TINY_CONFIG), "--output-dir", str(tmp_path / name))
        outputs.append({p.name: digest(p) for p in (tmp_path / name).iterdir()})
    assert outputs[0] == outputs[1]
    assert sorted(outputs[0]) == ["catalogue.json", "report.json", "test.json", "tools.jsonl", "train.json"]
    train = json.loads((tmp_path / "a" / "train.json").read_text())
    test = json.loads((tmp_path / "a" / "test.json").read_text())
    train_requests = {(r["conversations"][0]["value"], r["image_path"], r["audio_path"], r["video_path"]) for r in train}
    test_requests = {(r["conversations"][0]["value"], r["image_path"], r["audio_path"], r["video_path"]) for r in test}
    assert not train_requests & test_requests
    assert all(isinstance(r["conversations"][1]["value"], str) for r in train)
    assert all(isinstance(r["conversations"][1]["value"], list) for r in test)
