"""Import of the original MLLM-Tool delta (pytorch_model_<step>.pt): the round trip gives identical
logits, and a delta that does not fit is refused with the problem named."""

import argparse
import json

import pytest
import torch

from conftest import TINY_IMAGEBIND, TINY_LLM
from toollmm.checkpoint import load_checkpoint
from toollmm.cli.import_checkpoint import main as import_main
from toollmm.config import load_config
from toollmm.convert import DeltaError, import_delta
from toollmm.model.toollmm import build_model, checkpoint_state
from toollmm.prompts import MEDIA_SLOT_ID, build_example, format_answer

ENCODER_DIM = 1024
OVERRIDES = ["model.dtype=fp32", "model.imagebind_size=tiny"]
LAYER = "llama_model.base_model.model.model.layers.{}.self_attn.{}.lora_{}.default.weight"


def run_config(*extra):
    return load_config(3, overrides=[f"model.llm_path={TINY_LLM}", "model.tuning=lora", *OVERRIDES, *extra])


def to_original(name: str) -> str:
    if name.startswith("input_projector."):
        return "llama_proj." + name[len("input_projector."):]
    assert name.startswith("llm.")
    return "llama_model." + name[len("llm."):]


@pytest.fixture(scope="module")
def source(tiny_default):
    """A tiny LoRA model with non-zero LoRA B and projector, and its delta under the original's names."""
    torch.manual_seed(0)
    model = build_model(run_config().model, ENCODER_DIM)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("input_projector."):
                p.normal_(std=0.02)
    delta = {to_original(name): t for name, t in checkpoint_state(model).items()}
    return model.eval(), delta


def save(delta, tmp_path, name="pytorch_model_5.pt"):
    path = tmp_path / name
    torch.save(delta, path)
    return path


def test_import_gives_identical_logits(source, tokenizer, tmp_path):
    model, delta = source
    layers = json.loads((TINY_LLM / "config.json").read_text())["num_hidden_layers"]
    assert set(delta) == {"llama_proj.weight", "llama_proj.bias"} | {
        LAYER.format(i, proj, ab) for i in range(layers) for proj in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"}
    path = save(delta, tmp_path)

    out = import_main(["--delta", str(path), "--llm-path", str(TINY_LLM), "--imagebind-path", str(TINY_IMAGEBIND),
                       "--output", str(tmp_path / "imported"), *OVERRIDES])
    loaded, _, config, meta = load_checkpoint(out)
    assert meta["step"] == 5 and meta["imported_from"] == str(path.resolve()) and meta["stage"] == 3
    assert meta["encoder"].startswith("imagebind-tiny-")
    assert config.model.imagebind_path == str(TINY_IMAGEBIND) and config.model.lora.r == 32

    example = build_example(tokenizer, "Which tool captions this image?", True, format_answer("unknown"), 512)
    ids = torch.tensor([example.input_ids])
    assert (ids == MEDIA_SLOT_ID).sum() == 1
    feature = torch.randn(1, ENCODER_DIM)
    with torch.no_grad():
        expected = model(ids, torch.ones_like(ids), slot_features=feature)["logits"]
        actual = loaded(ids, torch.ones_like(ids), slot_features=feature)["logits"]
    assert torch.equal(expected, actual)

    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        import_main(["--delta", str(path), "--llm-path", str(TINY_LLM), "--output", str(out), *OVERRIDES])


def test_missing_lora_key(source, tmp_path):
    delta = dict(source[1])
    del delta[LAYER.format(1, "v_proj", "B")]
    with pytest.raises(DeltaError, match=r"missing keys .*: llama_model\.base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B"):
        import_delta(save(delta, tmp_path), run_config(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", ["llama_model.base_model.model.lm_head.weight", "visual_encoder.head.weight"])
def test_extra_key(source, tmp_path, extra):
    delta = {**source[1], extra: torch.zeros(3, 3)}
    with pytest.raises(DeltaError, match=f"extra keys .*: {extra}"):
        import_delta(save(delta, tmp_path), run_config(), tmp_path / "out")


def test_wrong_rank_names_the_fix(source, tmp_path):
    delta = {name: t[:16] if ".lora_A." in name else t[:, :16] if ".lora_B." in name else t for name, t in source[1].items()}
    path = save(delta, tmp_path)
    with pytest.raises(DeltaError, match=r"LoRA rank is 16 .* but model\.lora\.r=32: pass model\.lora\.r=16"):
        import_delta(path, run_config(), tmp_path / "out")
    loaded, _, config, _ = load_checkpoint(import_delta(path, run_config("model.lora.r=16"), tmp_path / "out"))
    assert config.model.lora.r == 16 and loaded.llm.peft_config["default"].r == 16


def test_wrong_base_layer_count(source, tmp_path):
    delta = {name: t for name, t in source[1].items() if ".layers.3." not in name}
    with pytest.raises(DeltaError, match="3 layers\\) but the base at .* has num_hidden_layers=4: wrong base LLM"):
        import_delta(save(delta, tmp_path), run_config(), tmp_path / "out")


def test_non_tensor_objects_are_refused(source, tmp_path):
    pickled = save({**source[1], "args": argparse.Namespace(lora_r=32)}, tmp_path)
    with pytest.raises(DeltaError, match="is not a plain state dict: it holds non-tensor objects.*argparse.Namespace"):
        import_delta(pickled, run_config(), tmp_path / "out")
    nested = save({"model": source[1], "step": 5}, tmp_path, "nested.pt")
    with pytest.raises(DeltaError, match=r"is not a plain state dict: entries model \(dict\), step \(int\) are not tensors"):
        import_delta(nested, run_config(), tmp_path / "out")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(DeltaError, match="is not a file written by torch.save"):
        import_delta(tmp_path / "notes.pt", run_config(), tmp_path / "out")


# ---- NExT-GPT checkpoints: the same converter, recognised by its output-projector keys
NEXTGPT_PROJECTORS = {"image": "gen_text_hidden_fcs.0.", "video": "gen_text_hidden_fcs_video.0.",
                      "audio": "gen_text_hidden_fcs_audio.0."}
SMALL_PROJECTOR = "model.outputs.projector={hidden_size: 64, encoder_layers: 1, decoder_layers: 1, heads: 4, ffn_size: 128}"


def nextgpt_source(stage: int, base_rows_trained: bool):
    """A tiny model with signal tokens, random trained parts, and its state under NExT-GPT's names
    (what its save_model writes: requires_grad parameters + projectors, the vocabulary matrices whole)."""
    from toollmm.signal_tokens import add_signal_tokens
    from toollmm.tokenization import load_tokenizer

    config = run_config("model.outputs.enabled=true", SMALL_PROJECTOR)
    signal = add_signal_tokens(load_tokenizer(TINY_LLM), config.model.outputs)
    torch.manual_seed(1)
    model = build_model(config.model, ENCODER_DIM, stage=stage, signal=signal)
    embed, head = model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith(("input_projector.", "output_projectors.")):
                p.normal_(std=0.02)
        for weight in (embed, head):
            rows = weight if base_rows_trained else weight[signal.base_vocab_size:]
            rows.add_(torch.randn_like(rows) * 0.01)
    llm = "llama_model.base_model.model." if stage == 3 else "llama_model."
    state = {f"{llm}model.embed_tokens.weight": embed.detach().clone(), f"{llm}lm_head.weight": head.detach().clone()}
    for name, tensor in checkpoint_state(model).items():
        if name.startswith("input_projector."):
            state["llama_proj." + name[len("input_projector."):]] = tensor
        elif name.startswith("output_projectors."):
            modality, rest = name[len("output_projectors."):].split(".", 1)
            state[NEXTGPT_PROJECTORS[modality] + rest] = tensor
        elif ".lora_" in name:
            state["llama_model." + name[len("llm."):]] = tensor
    return model.eval(), state, signal


def assert_same_outputs(source, loaded, signal, tokenizer):
    example = build_example(tokenizer, "Draw a bird.", True, "[IMG0] [IMG1] [IMG2] [IMG3]###", 512)
    ids = torch.tensor([example.input_ids])
    feature = torch.randn(1, ENCODER_DIM)
    with torch.no_grad():
        expected = source(ids, torch.ones_like(ids), slot_features=feature)["logits"]
        actual = loaded(ids, torch.ones_like(ids), slot_features=feature)["logits"]
        assert (expected - actual).abs().max() <= 1e-6
        for modality, run in signal.ids.items():
            hidden, embeds = torch.randn(2, len(run), 256), torch.randn(2, len(run), 256)
            got = loaded.output_projectors[modality](hidden, embeds)
            assert (source.output_projectors[modality](hidden, embeds) - got).abs().max() <= 1e-6


def test_nextgpt_stage_3_checkpoint_round_trip(tiny_default, tmp_path):
    source, state, signal = nextgpt_source(stage=3, base_rows_trained=True)
    assert signal.base_vocab_size == 3000 and signal.ids["image"] == [3002, 3003, 3004, 3005]
    path = save(state, tmp_path, "pytorch_model.pt")
    out = import_main(["--delta", str(path), "--llm-path", str(TINY_LLM), "--output", str(tmp_path / "imported"),
                       *OVERRIDES, SMALL_PROJECTOR])
    loaded, tokenizer, config, meta = load_checkpoint(out)
    assert meta["stage"] == 3 and meta["format"] == "nextgpt" and config.model.outputs.enabled
    # Its base rows moved in training: both matrices are kept whole.
    assert config.model.outputs.train_rows == "all" and loaded.parts >= {"lora", "vocab_rows", "output_projectors"}
    assert torch.equal(loaded.llm.get_input_embeddings().weight, source.llm.get_input_embeddings().weight)
    assert_same_outputs(source, loaded, signal, tokenizer)


def test_nextgpt_stage_2_checkpoint_takes_the_signal_rows(tiny_default, tmp_path):
    source, state, signal = nextgpt_source(stage=2, base_rows_trained=False)
    assert "llama_model.model.embed_tokens.weight" in state and not any(".lora_" in k for k in state)
    config = run_config("model.outputs.enabled=true", SMALL_PROJECTOR)
    from toollmm.convert import import_nextgpt

    loaded, tokenizer, config, meta = load_checkpoint(import_nextgpt(save(state, tmp_path), config, tmp_path / "out"))
    assert meta["stage"] == 2 and config.model.outputs.train_rows == "signal"
    assert not (tmp_path / "out" / "adapter").exists()
    assert_same_outputs(source, loaded, signal, tokenizer)


def test_nextgpt_checkpoint_keys_are_checked(tiny_default, tmp_path):
    from toollmm.convert import import_nextgpt

    _, state, _ = nextgpt_source(stage=3, base_rows_trained=False)
    config = lambda *extra: run_config("model.outputs.enabled=true", SMALL_PROJECTOR, *extra)  # noqa: E731
    with pytest.raises(DeltaError, match="none of NExT-GPT's .*: gen_text_hidden_fcs.1.fc.weight"):
        import_nextgpt(save({**state, "gen_text_hidden_fcs.1.fc.weight": torch.zeros(1)}, tmp_path), config(), tmp_path / "o")
    missing = {k: v for k, v in state.items() if k != "gen_text_hidden_fcs_audio.0.query_embs"}
    with pytest.raises(DeltaError, match="missing keys .*: gen_text_hidden_fcs_audio.0.query_embs"):
        import_nextgpt(save(missing, tmp_path), config(), tmp_path / "o")
    with pytest.raises(DeltaError, match=r"have .* rows, but .* make 3037: set model.outputs.*signal_tokens"):
        import_nextgpt(save(state, tmp_path), config("model.outputs.image.signal_tokens=3"), tmp_path / "o")
