"""train.fp8: which linear layers multiply in FP8, that they compute what torchao's float8 training
computes, and that the loss and the LoRA gradients stay those of the bf16 model (CPU here;
compiled on CUDA in the GPU-marked test)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_LLM, gpu
from toollmm.config import ConfigError, load_config
from toollmm.model.fp8 import FrozenFloat8Linear, use_fp8_for_frozen_linears
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
    assert {name for name, kind in kinds.items() if kind == "FrozenFloat8Linear"} == set(swapped)
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


def frozen_linear(in_features: int, out_features: int, dtype: torch.dtype, bias: bool = False) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_computes_what_torchao_float8_training_computes(dtype):
    """The same outputs and input gradients, bit for bit, as torchao's Float8Linear (tensorwise
    dynamic scales) on the same frozen weight: only when the weight is cast differs."""
    from torchao.float8 import convert_to_float8_training

    linear = frozen_linear(64, 48, dtype, bias=True)
    reference = convert_to_float8_training(nn.Sequential(copy.deepcopy(linear)))[0]
    assert type(reference).__name__ == "Float8Linear"
    ours = FrozenFloat8Linear.from_linear(linear, torch.device("cpu"))
    torch.manual_seed(1)
    x = (torch.randn(2, 5, 64) * 3).to(dtype)
    x[0, 0, 0] = 1e4  # one outlier sets the input's scale
    grad = torch.randn(2, 5, 48).to(dtype)
    results = []
    for layer in (ours, reference):
        inputs = x.clone().requires_grad_()
        out = layer(inputs)
        out.backward(grad)
        results.append((out, inputs.grad))
    (out, grad_in), (expected_out, expected_grad_in) = results
    assert torch.equal(out, expected_out) and torch.equal(grad_in, expected_grad_in)
    assert not torch.equal(out, linear(x))  # FP8 rounding, not the bf16 matmul
    assert linear.weight.grad is None and ours.weight is linear.weight


def test_fp8_weight_copies_survive_dtype_and_device_moves():
    """The FP8 copies are cast once: a model-wide .to(dtype) (DeepSpeed's, a test's) leaves them as
    they are, and they stay out of the state dict."""
    ours = FrozenFloat8Linear.from_linear(frozen_linear(32, 16, torch.bfloat16), torch.device("cpu"))
    x = torch.randn(3, 32).bfloat16()
    before = ours(x)
    copies = {name: buffer.clone() for name, buffer in ours.named_buffers()}
    ours.float().bfloat16().to("cpu")
    assert {name: buffer.dtype for name, buffer in ours.named_buffers()} == {
        "weight_e4m3": torch.uint8, "weight_e4m3_t": torch.uint8, "weight_scale": torch.int32}
    assert all(torch.equal(buffer, copies[name]) for name, buffer in ours.named_buffers())
    assert torch.equal(ours(x), before)
    assert set(ours.state_dict()) == {"weight"}


class MLP(nn.Module):  # user code, as a decoder layer is: dynamo starts its graph here, not inside nn.Sequential
    def __init__(self):
        super().__init__()
        self.up, self.down = frozen_linear(64, 128, torch.bfloat16), frozen_linear(128, 64, torch.bfloat16)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


def test_fp8_compiles_into_one_graph_for_every_length():
    """train.compile traces the FP8 matmul (inductor, dynamic shapes): one graph for three lengths,
    the eager outputs and input gradients, and still no weight gradient."""
    layers = MLP()
    use_fp8_for_frozen_linears(layers, torch.device("cpu"))
    compiled = copy.deepcopy(layers)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled.compile(dynamic=True)
    for length in (7, 13, 33):
        x = torch.randn(2, length, 64).bfloat16()
        results = []
        for model in (layers, compiled):
            inputs = x.clone().requires_grad_()
            out = model(inputs)
            out.float().square().sum().backward()
            results.append((out, inputs.grad))
        (expected, expected_grad), (out, grad) = results
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        torch.testing.assert_close(grad, expected_grad, atol=2e-2, rtol=2e-2)  # the SiLU backward fuses in bf16
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    assert all(p.grad is None for p in compiled.parameters())
