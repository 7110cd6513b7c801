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


def test_padded_benchmark_tokenizer_has_only_special_added_tokens(tmp_path):
    """bench/make_random_llm.py pads the trained vocabulary to a real model's size: the filler
    pieces are ordinary entries no merge reaches, not added tokens (each added token slows every
    tokenizer load), and real text encodes to the same pieces as without them."""
    from toollmm.tiny import VOCAB_SIZE, corpus, train_tokenizer
    from toollmm.tokenization import load_tokenizer

    texts = corpus(DATA, [])
    padded = train_tokenizer(texts, tmp_path / "padded", vocab_size=VOCAB_SIZE + 400, unused_pieces=400)
    plain = train_tokenizer(texts, tmp_path / "plain")
    padded.save_pretrained(tmp_path / "saved")
    loaded = load_tokenizer(tmp_path / "saved")
    assert len(loaded) == VOCAB_SIZE + 400 and loaded.hf.vocab_size == VOCAB_SIZE + 400
    assert sorted(loaded.hf.get_added_vocab()) == ["</s>", "<s>", "<unk>"]
    filler = {loaded.sp.piece_to_id(f"<unused_{i}>") for i in range(400)}
    assert len(filler) == 400 and 0 not in filler  # all in the vocabulary (0 is <unk>)
    for text in texts[::40] + ["<unused_7> is text, not a piece"]:
        ids = loaded.encode(text)
        assert not filler & (set(ids) | set(loaded.hf(text, add_special_tokens=False)["input_ids"]))
        assert [loaded.sp.id_to_piece(i) for i in ids] == [plain.sp.id_to_piece(i) for i in plain.encode(text)]
        assert loaded.decode(ids) == text
