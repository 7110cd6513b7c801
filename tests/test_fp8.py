"""train.fp8: which linear layers multiply in FP8, and that the loss and the LoRA gradients stay
those of the bf16 model (CPU here; compiled on CUDA in the GPU-marked test)."""

import copy
import sys

import pytest
import torch
from torch import nn

from conftest import TINY_LLM, gpu
from toollmm.config import ConfigError, load_config
from toollmm.model.fp8 import use_fp8_for_frozen_linears
from toollmm.model.toollmm import build_model
from toollmm.prompts import MEDIA_SLOT_ID, build_example, format_answer

ENCODER_DIM = 1024
BASE_LINEARS = {"self_attn.q_proj.base_layer", "self_attn.k_proj.base_layer", "self_attn.v_proj.base_layer",
                "self_attn.o_proj.base_layer", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
QUERIES = ["Transcribe this recording of a lecture into English text.", "What is in this picture?",
           "Translate 'good morning' into German.", "Classify the spoken command in this clip."]
TOOLS = ["openai/whisper-large-v2", "Salesforce/blip-image-captioning-base", "t5-base", "MIT/ast-finetuned-speech-commands-v2"]


def lora_model(tuning: str = "lora") -> nn.Module:
    torch.manual_seed(0)
    model = build_model(load_config(3, overrides=[f"model.llm_path={TINY_LLM}", "model.dtype=bf16",
                                                  f"model.tuning={tuning}"]).model, ENCODER_DIM)
    with torch.no_grad():  # LoRA B starts at zero, which would leave LoRA A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model


def batch(tokenizer, device):
    examples = [build_example(tokenizer, q, i % 2 == 1, format_answer(t), 512) for i, (q, t) in enumerate(zip(QUERIES, TOOLS))]
    length = max(len(e.input_ids) for e in examples)
    pad = lambda seq, value: seq + [value] * (length - len(seq))  # noqa: E731
    return dict(
        input_ids=torch.tensor([pad(e.input_ids, 0) for e in examples], device=device),
        labels=torch.tensor([pad(e.labels, -100) for e in examples], device=device),
        attention_mask=torch.tensor([pad([1] * len(e.input_ids), 0) for e in examples], device=device),
        slot_features=torch.randn(sum(MEDIA_SLOT_ID in e.input_ids for e in examples), ENCODER_DIM, generator=torch.Generator().manual_seed(0))
        .to(device, torch.bfloat16),
    )


def loss_and_lora_grads(model: nn.Module, inputs: dict) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(**inputs)["loss"]
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if "lora_" in n}


def test_fp8_swaps_exactly_the_frozen_base_linears(tiny_default):
    model = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    keys = set(model.state_dict())
    swapped = use_fp8_for_frozen_linears(model.decoder_layers(), torch.device("cpu"))
    layers = model.decoder_layers()
    assert set(swapped) == {f"{i}.{name}" for i in range(len(layers)) for name in BASE_LINEARS}
    kinds = {name: type(module).__name__ for name, module in layers.named_modules()}
    assert {name for name, kind in kinds.items() if kind == "Float8Linear"} == set(swapped)
    assert type(model.causal_lm().get_output_embeddings()) is nn.Linear and type(model.input_projector) is nn.Linear
    # What trains, and what a checkpoint holds, are unchanged.
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert set(model.state_dict()) == keys


def fp8_against_bf16(tokenizer, device: str, compile_layers: bool = False) -> None:
    reference = lora_model().to(device).eval()  # no LoRA dropout: compiled code draws other masks
    model = copy.deepcopy(reference)
    use_fp8_for_frozen_linears(model.decoder_layers(), torch.device(device))
    if compile_layers:
        for layer in model.decoder_layers():
            layer.compile(dynamic=True)
    inputs = batch(tokenizer, device)
    expected_loss, expected = loss_and_lora_grads(reference, inputs)
    loss, grads = loss_and_lora_grads(model, inputs)
    assert abs(loss - expected_loss) < 0.01 * expected_loss, (loss, expected_loss)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), expected[name].flatten(), dim=0).item()
        assert cosine > 0.95, (name, cosine)
    # The frozen base gets no gradient in FP8 either.
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_fp8_loss_and_lora_gradients_track_bf16(tiny_default, tokenizer):
    fp8_against_bf16(tokenizer, "cpu")


@pytest.mark.gpu
@gpu
def test_fp8_compiled_on_cuda_tracks_bf16(tiny_default, tokenizer):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9 or more")
    fp8_against_bf16(tokenizer, "cuda", compile_layers=True)


def test_fp8_refuses_what_it_cannot_speed_up(tiny_default):
    base = [f"model.llm_path={TINY_LLM}", "train.fp8=true"]
    with pytest.raises(ConfigError, match="model.tuning=full trains them all"):
        load_config(3, overrides=[*base, "model.tuning=full"])
    with pytest.raises(ConfigError, match="ZeRO-3 shards them"):
        load_config(3, overrides=[*base, "train.zero_stage=3"])
    with pytest.raises(ValueError, match="no frozen linear layer"):
        use_fp8_for_frozen_linears(lora_model("full").decoder_layers(), torch.device("cpu"))


def test_fp8_without_torchao_names_the_extra(tiny_default, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as if torchao were not installed
    with pytest.raises(ImportError, match=r"pip install 'toollmm\[fp8\]'"):
        use_fp8_for_frozen_linears(lora_model().decoder_layers(), torch.device("cpu"))
