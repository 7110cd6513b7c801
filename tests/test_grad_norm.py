"""The fused gradient norm gives DeepSpeed's ZeRO norm, and training with it clips alike.

Real DeepSpeed engines (ZeRO-2, bf16, Adam on the device as the fast path) on a small module in
this process, DeepSpeed's own ``get_grad_norm_direct`` as the reference."""

import pytest
import torch

from toollmm.engine import init_distributed
from toollmm.grad_norm import use_foreach_grad_norm


def make_engine(stage: int = 2, clip: float = 0.05):
    import deepspeed

    init_distributed()
    torch.manual_seed(0)
    # Many small tensors, as LoRA's: the case the fused norm is for.
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(12)], torch.nn.Linear(16, 1))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
              "gradient_clipping": clip, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
              "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def random_gradients() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shapes = [(32, 4096), (4096, 32), (7,), (3, 5, 11), (1,)] * 8
    return [(torch.randn(shape, generator=generator) * scale).bfloat16()
            for shape, scale in zip(shapes, torch.logspace(-4, 2, len(shapes)).tolist())]


def test_fused_norm_equals_deepspeeds_per_tensor_norm():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = make_engine().optimizer
    grads = random_gradients()
    params = [torch.empty_like(g) for g in grads]
    padding = torch.full((5,), 1e3, dtype=torch.bfloat16)
    padding._zero_padding = True  # DeepSpeed's alignment padding: left out of the norm
    expected = DeepSpeedZeroOptimizer.get_grad_norm_direct(optimizer, grads, params)
    assert use_foreach_grad_norm(optimizer)
    fused = optimizer.get_grad_norm_direct(grads + [padding], params + [torch.empty(5)])
    assert fused.dtype == expected.dtype == torch.float32
    assert torch.allclose(fused, expected, rtol=1e-6, atol=0)
    reference = torch.cat([g.double().flatten() for g in grads]).norm().float()
    assert torch.allclose(fused, reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_fused_norm_reports_a_non_finite_gradient_as_deepspeed_does(bad):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = make_engine().optimizer
    grads = random_gradients()
    grads[3][0, 0] = bad
    expected = DeepSpeedZeroOptimizer.get_grad_norm_direct(optimizer, grads, grads)
    use_foreach_grad_norm(optimizer)
    assert expected.item() == optimizer.get_grad_norm_direct(grads, grads).item() == -1.0


def train(fused: bool, steps: int = 6) -> tuple[list[float], list[float], list[torch.Tensor]]:
    engine = make_engine()
    if fused:
        assert use_foreach_grad_norm(engine.optimizer)
    generator = torch.Generator().manual_seed(2)
    losses, norms = [], []
    for _ in range(steps):
        x = torch.randn(4, 16, generator=generator).bfloat16()
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms, [p.detach().float().clone() for p in engine.module.parameters()]


def test_training_with_the_fused_norm_clips_as_deepspeed():
    losses, norms, weights = train(fused=False)
    fused_losses, fused_norms, fused_weights = train(fused=True)
    assert max(norms) > 0.05  # the clip is active: the norm decides the update
    assert fused_losses == losses
    assert fused_norms == pytest.approx(norms, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(weights, fused_weights))


def test_deepspeeds_method_stays_where_the_fused_one_does_not_apply():
    engine = make_engine(stage=0)  # bf16 without ZeRO: DeepSpeed's BF16_Optimizer, not the ZeRO optimizer
    assert not use_foreach_grad_norm(engine.optimizer)
