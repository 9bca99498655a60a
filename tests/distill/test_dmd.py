"""DMD and the fake-score loss: values, gradients, backward simulation times."""
import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from rcm.config import DistillConfig
from rcm.distill import dmd
from rcm.distill.distiller import Distiller
from rcm.distill.schedule import num_simulation_steps
from rcm.distill.time import TimeSamplerConfig
from tests.helpers import tiny_dit, toy_batch


def test_dmd_gradient_is_the_normalized_score_difference():
    g = torch.Generator().manual_seed(0)
    generated = torch.randn(3, 2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    fake, real = torch.randn(generated.shape, generator=g, dtype=torch.float64), torch.randn(generated.shape, generator=g, dtype=torch.float64)
    out = dmd.dmd_loss(generated, fake, real, loss_scale=2.0)
    out.loss.backward()
    weight = (generated.detach() - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
    expected_direction = (fake - real) / weight
    # L = scale·mean_b Σ(G − sg(G − d))² → ∂L/∂G = scale·2·d / B
    assert torch.allclose(generated.grad, 2.0 * 2 * expected_direction / 3, rtol=1e-12)
    assert out.loss.item() == pytest.approx(2.0 * (expected_direction**2).flatten(1).sum(1).mean().item(), rel=1e-12)


def test_dmd_gives_zero_gradient_when_fake_score_equals_teacher():
    teacher = tiny_dit(0)
    student = tiny_dit(1)
    cfg = OmegaConf.structured(DistillConfig(method="dmd", guidance_scale=1.0, dmd_time=TimeSamplerConfig("uniform_shift", shift=5.0)))
    distiller = Distiller(cfg, student, teacher, copy.deepcopy(teacher), None, torch.Generator().manual_seed(0))
    x0, _, context = toy_batch()
    result = distiller.loss({"latent": x0, "embed": context}, iteration=0)
    assert result.loss.item() == 0.0
    result.loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads, "the student must be in the graph"
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    # ...and a different fake score gives a non-zero gradient.
    student.zero_grad()
    distiller.fake_score = tiny_dit(2)
    distiller.loss({"latent": x0, "embed": context}, 0).loss.backward()
    assert any(torch.count_nonzero(p.grad) > 0 for p in student.parameters() if p.grad is not None)


def test_backward_simulation_times():
    fixed = dmd.backward_simulation_times(4, 2, TimeSamplerConfig("uniform_shift", shift=5.0), fixed=True)
    assert torch.allclose(fixed[:, 0], torch.tensor([math.pi / 2, 1.5, 1.4, 1.0, 0.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    random = dmd.backward_simulation_times(4, 64, TimeSamplerConfig("uniform_shift", shift=5.0), fixed=False, generator=g)
    assert random.shape == (5, 64)
    assert (random[:-1] >= random[1:]).all(), "times must not increase"
    assert (random[0] == math.pi / 2).all() and (random[-1] == 0).all()
    with pytest.raises(ValueError):
        dmd.backward_simulation_times(5, 1, TimeSamplerConfig(), fixed=True)
    assert [num_simulation_steps(i) for i in range(6)] == [1, 2, 3, 4, 1, 2]


def test_backward_simulation_keeps_gradient_only_on_the_last_step():
    calls = []
    weight = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def student(x, t, ctx):
        calls.append(torch.is_grad_enabled())
        return weight * x

    times = torch.tensor([[math.pi / 2], [1.0], [0.0]], dtype=torch.float64)
    noise = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    out = dmd.backward_simulation(student, noise, times, None, lambda: torch.zeros_like(noise))
    assert calls == [False, True]
    # x1 = cos(1)·(0.5·1) (fresh noise 0); G = 0.5·x1 and only the last factor is differentiated.
    out.sum().backward()
    assert weight.grad.item() == pytest.approx(math.cos(1.0) * 0.5)


def test_fake_score_loss_formula():
    generated = torch.ones(2, 1, 1, 1, 1, dtype=torch.float64)
    fake = torch.zeros(2, 1, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([math.pi / 2, math.pi / 6], dtype=torch.float64)
    assert dmd.fake_score_loss(generated, fake, t).item() == pytest.approx((1 / 1 + 1 / 0.25) / 2)
