"""dCM: continuous times, the teacher's Euler walk in TrigFlow time with CFG, and the loss (rcm_spec.md §2)."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from rcm.config import DistillConfig
from rcm.distill import dcm
from rcm.distill.distiller import Distiller
from rcm.distill.time import trig_to_rf
from tests.helpers import tiny_dit, toy_batch


def _unshift(s, shift=5.0):
    return s / (shift - (shift - 1) * s)


@pytest.mark.parametrize("skip", [1, 3])
def test_times_are_continuous_delta_spaced_and_shifted(skip):
    times = dcm.dcm_times(4096, 48, skip, 5.0, torch.Generator().manual_seed(0))
    assert times.shape == (skip + 1, 4096) and times.dtype == torch.float64
    u = 1 - _unshift(trig_to_rf(times))  # u + k·Δ
    assert torch.allclose(u[1:] - u[:-1], torch.full_like(u[1:], 1 / 48), atol=1e-12)
    start = u[0]
    assert start.min() >= 0 and start.max() < 1 - skip / 48
    # Drawn continuously, not on the 48-point grid.
    assert (start * 48 - (start * 48).round()).abs().max() > 0.1
    assert (times[:-1] > times[1:]).all()


def test_skip_interval_must_leave_room():
    for bad in (0, 48, -1):
        with pytest.raises(ValueError, match="distill.dcm_skip_interval"):
            dcm.dcm_times(1, 48, bad, 5.0)


def _reference_dcm_loss(student, teacher, negative, x0, context, generator, skip, guidance, loss_scale):
    """The recipe written out in float64: same draws (u, then ε) from the same generator."""
    delta = 1 / 48
    u = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64) * (1 - skip * delta)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)

    def trig(k):
        s = 1 - (u + k * delta)
        s = 5 * s / (1 + 4 * s)
        return torch.atan2(s, 1 - s)

    def x0_hat(net, x, t, ctx):
        c = 1 / (torch.cos(t) + torch.sin(t))
        out = net(c.view(-1, 1, 1, 1, 1) * x, (1000 * torch.sin(t) * c), ctx)
        return c.view(-1, 1, 1, 1, 1) * x - (torch.sin(t) * c).view(-1, 1, 1, 1, 1) * out

    def view(v):
        return v.view(-1, 1, 1, 1, 1)

    t0 = trig(0)
    x = view(torch.cos(t0)) * x0 + view(torch.sin(t0)) * eps
    prediction = x0_hat(student, x, t0, context)
    with torch.no_grad():
        for k in range(skip):
            t, t_next = trig(k), trig(k + 1)
            cond = x0_hat(teacher, x, t, context)
            uncond = x0_hat(teacher, x, t, negative.expand(x.shape[0], -1, -1))
            guided = uncond + guidance * (cond - uncond) if guidance > 1 else cond
            velocity = (view(torch.cos(t)) * x - guided) / view(torch.sin(t))
            x = x - view(t - t_next) * velocity
        target = x0_hat(student, x, trig(skip), context)
    return loss_scale * ((prediction - target) ** 2).flatten(1).sum(1).mean()


@pytest.mark.parametrize("skip,guidance", [(1, 2.0), (2, 1.0)])
def test_distiller_dcm_loss_equals_the_recipe(skip, guidance):
    student, teacher = tiny_dit(1), tiny_dit(0)
    x0, _, context = toy_batch()
    negative = torch.randn(1, context.shape[1], context.shape[2], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cfg = OmegaConf.structured(DistillConfig(method="dcm", guidance_scale=guidance, dcm_skip_interval=skip, loss_scale=3.0))
    distiller = Distiller(cfg, student, teacher, None, negative[0], torch.Generator().manual_seed(7))
    loss = distiller.loss({"latent": x0, "embed": context}, iteration=0).loss
    expected = _reference_dcm_loss(student, teacher, negative, x0, context, torch.Generator().manual_seed(7), skip, guidance, 3.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # Gradients flow through the first student call only.
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_walk_is_euler_in_trigflow_time():
    # With an x0 predictor that knows x0, the TrigFlow ODE path is x_t = cos t·x0 + sin t·ε; one Euler step of
    # size h from t lands at x − h·F, F = −sin t·x0 + cos t·ε (not on the path: the step is in TrigFlow time).
    x0, eps = torch.randn(2, 1, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 1, 2, 2, dtype=torch.float64)
    times = torch.tensor([[1.3, 0.7], [1.1, 0.6]], dtype=torch.float64)

    def at(t):
        return torch.cos(t).view(-1, 1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1, 1) * eps

    out = dcm.teacher_trigflow_walk(lambda x, t: x0, at(times[0]), times)
    F = -torch.sin(times[0]).view(-1, 1, 1, 1, 1) * x0 + torch.cos(times[0]).view(-1, 1, 1, 1, 1) * eps
    assert torch.allclose(out, at(times[0]) - (times[0] - times[1]).view(-1, 1, 1, 1, 1) * F, atol=1e-12)
    assert not torch.allclose(out, at(times[1]), atol=1e-3)
    assert math.isclose(float(times[0, 0]), 1.3)
