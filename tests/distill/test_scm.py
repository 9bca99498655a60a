"""sCM: the JVP tangent, the target direction g, the one-forward path and the gradient path."""

import pytest
import torch

from rcm.distill.jvp import velocity_and_tangent, velocity_tangent_two_pass
from rcm.distill.scm import scm_loss, scm_target_direction, tangent_warmup_ratio
from rcm.distill.trigflow import denoise, velocity
from tests.helpers import tiny_dit, toy_batch


def _setup():
    student, teacher = tiny_dit(0), tiny_dit(1)
    x0, noise, context = toy_batch()
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    return student, teacher, x0, noise, context, t


def test_tangent_equals_a_float64_finite_difference():
    student, teacher, x0, noise, context, t = _setup()
    x_t = torch.cos(t).view(-1, 1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1, 1) * noise
    x_dot = torch.randn_like(x_t)
    t_dot = torch.cos(t) * torch.sin(t)
    _, tangent = velocity_and_tangent(student, x_t, t, x_dot, t_dot, context)
    h = 1e-6
    with torch.no_grad():
        plus = velocity(student, x_t + h * x_dot, t + h * t_dot, context)
        minus = velocity(student, x_t - h * x_dot, t - h * t_dot, context)
    finite_difference = (plus - minus) / (2 * h)
    assert (tangent - finite_difference).norm() / finite_difference.norm() < 1e-7


def test_one_forward_equals_the_two_pass_reference():
    student, _, x0, noise, context, t = _setup()
    x_t = torch.cos(t).view(-1, 1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1, 1) * noise
    x_dot, t_dot = torch.randn_like(x_t), torch.cos(t) * torch.sin(t)
    primal, tangent = velocity_and_tangent(student, x_t, t, x_dot, t_dot, context)
    primal_ref, tangent_ref = velocity_tangent_two_pass(student, x_t, t, x_dot, t_dot, context)
    assert torch.allclose(primal, primal_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(tangent, tangent_ref, rtol=1e-10, atol=1e-12)
    assert primal.requires_grad and not tangent.requires_grad


def test_target_direction_matches_the_scm_formula_after_warmup():
    # With r = 1 the rearranged g equals sCM's −cos²t·(F_sg − F_T) − cos t·sin t·x_t − dF.
    _, _, x0, noise, _, t = _setup()
    f_s, f_t, df = torch.randn_like(x0), torch.randn_like(x0), torch.randn_like(x0)
    cos_t, sin_t = torch.cos(t).view(-1, 1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1, 1)
    g = scm_target_direction(x0, t, f_s, df, f_t, 1.0)
    assert torch.allclose(g, -(cos_t**2) * (f_s - f_t) - cos_t * sin_t * x0 - df, atol=1e-14)
    g0 = scm_target_direction(x0, t, f_s, df, f_t, 0.0)
    assert torch.allclose(g0, -cos_t * (f_s - f_t) - df, atol=1e-14)


def test_warmup_ratio():
    assert tangent_warmup_ratio(0, 1000) == 0.0
    assert tangent_warmup_ratio(500, 1000) == 0.5
    assert tangent_warmup_ratio(5000, 1000) == 1.0
    assert tangent_warmup_ratio(3, 0) == 1.0


def test_gradient_reaches_the_student_through_the_primal_only():
    """∇L must equal ∇ of scale·mean Σ −2·g·F_θ with g a constant: no gradient through dF."""
    student, teacher, x0, noise, context, t = _setup()
    with torch.no_grad():
        x_t = torch.cos(t).view(-1, 1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1, 1) * noise
        teacher_x0 = denoise(teacher, x_t, t, context)
    out = scm_loss(student, x0, noise, t, context, teacher_x0, iteration=600, tangent_warmup=1000, loss_scale=100.0)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    # Reference: the two-pass reference computes g as a constant, then differentiates F_θ alone.
    teacher_velocity = (torch.cos(t).view(-1, 1, 1, 1, 1) * x_t - teacher_x0) / torch.sin(t).view(-1, 1, 1, 1, 1)
    cos_sin = torch.cos(t) * torch.sin(t)
    f_theta, df = velocity_tangent_two_pass(student, x_t, t, cos_sin.view(-1, 1, 1, 1, 1) * teacher_velocity, cos_sin, context)
    g = scm_target_direction(x_t, t, f_theta.detach(), df, teacher_velocity, 0.6)
    g = g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1) + 0.1)
    surrogate = 100.0 * (-2 * g * f_theta).flatten(1).sum(1).mean()
    surrogate.backward()
    for name, p in student.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-8, atol=1e-12), name
    assert sum(g.abs().sum() for g in grads.values()) > 0


def test_loss_value_is_the_normalized_target_norm():
    student, teacher, x0, noise, context, t = _setup()
    with torch.no_grad():
        x_t = torch.cos(t).view(-1, 1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1, 1) * noise
        teacher_x0 = denoise(teacher, x_t, t, context)
    out = scm_loss(student, x0, noise, t, context, teacher_x0, 2000, 1000, loss_scale=100.0)
    # Per sample Σ g² = ‖g‖²/(‖g‖+0.1)², slightly below 1.
    assert 0.5 * 100 < out.loss.item() < 100.0


def test_nonfinite_samples_are_zeroed_and_counted():
    student, teacher, x0, noise, context, t = _setup()

    def broken_student(x, timestep, ctx):
        out = student(x, timestep, ctx)
        return torch.cat([out[:1] * float("nan"), out[1:]])

    with torch.no_grad():
        x_t = torch.cos(t).view(-1, 1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1, 1) * noise
        teacher_x0 = denoise(teacher, x_t, t, context)
    out = scm_loss(broken_student, x0, noise, t, context, teacher_x0, 2000, 1000, 100.0)
    assert out.num_nonfinite == 1
    assert torch.isfinite(out.loss)
    clean = scm_loss(student, x0[1:], noise[1:], t[1:], context[1:], teacher_x0[1:], 2000, 1000, 100.0)
    # The NaN sample contributes 0 to the batch mean over 3 samples.
    assert out.loss.item() == pytest.approx(clean.loss.item() * 2 / 3, rel=1e-10)


def test_target_vanishes_for_the_exact_consistency_function():
    """For Gaussian data N(μ, s²) the PF-ODE and its consistency function are known in closed form:
    f(x_t, t) = μ + s·(x_t − cos t·μ)/sqrt(cos²t·s² + sin²t). A student equal to f, distilled from the
    exact teacher E[x0|x_t], must get g = 0 (after warmup) — this checks g, the JVP and the
    preconditioning together."""
    from rcm.distill.time import rf_to_trig

    mu, s = 0.7, 0.3

    def exact_consistency(x_t, t):
        cos_t, sin_t = torch.cos(t).view(-1, 1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1, 1)
        return mu + s * (x_t - cos_t * mu) / torch.sqrt(cos_t**2 * s**2 + sin_t**2)

    def oracle_student(x_s, timestep, context):  # a flow network whose TrigFlow x0̂ is f
        rf = timestep.double() / 1000
        t = rf_to_trig(rf)
        x_t = x_s * (torch.cos(t) + torch.sin(t)).view(-1, 1, 1, 1, 1)
        return (x_s - exact_consistency(x_t, t)) / rf.view(-1, 1, 1, 1, 1)

    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 1, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.6, 1.1, 1.5], dtype=torch.float64)
    cos_t, sin_t = torch.cos(t).view(-1, 1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1, 1)
    teacher_x0 = mu + cos_t * s**2 / (cos_t**2 * s**2 + sin_t**2) * (x_t - cos_t * mu)  # E[x0 | x_t]
    teacher_velocity = (cos_t * x_t - teacher_x0) / sin_t
    cos_sin = torch.cos(t) * torch.sin(t)
    f_theta, df = velocity_and_tangent(oracle_student, x_t, t, cos_sin.view(-1, 1, 1, 1, 1) * teacher_velocity, cos_sin, None)
    direction = scm_target_direction(x_t, t, f_theta, df, teacher_velocity, warmup_ratio=1.0)
    assert direction.abs().max().item() < 1e-10
    # ...and a slightly wrong student gets a non-zero direction.
    wrong = lambda x_s, timestep, c: 1.01 * oracle_student(x_s, timestep, c)  # noqa: E731
    f_wrong, df_wrong = velocity_and_tangent(wrong, x_t, t, cos_sin.view(-1, 1, 1, 1, 1) * teacher_velocity, cos_sin, None)
    assert scm_target_direction(x_t, t, f_wrong, df_wrong, teacher_velocity, 1.0).abs().max().item() > 1e-3


def test_explicit_tangent_mode_equals_forward_mode_ad():
    """WanDiT's JVP mode (explicit tangents) and generic forward-mode AD give the same (F, dF) and gradients."""
    student, _, x0, noise, context, t = _setup()
    assert student.carries_tangents
    x_t = torch.cos(t).view(-1, 1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1, 1) * noise
    x_dot, t_dot = torch.randn_like(x_t), torch.cos(t) * torch.sin(t)
    as_plain_function = lambda x, timestep, ctx: student(x, timestep, ctx)  # noqa: E731  (no carries_tangents)
    f_explicit, df_explicit = velocity_and_tangent(student, x_t, t, x_dot, t_dot, context)
    f_ad, df_ad = velocity_and_tangent(as_plain_function, x_t, t, x_dot, t_dot, context)
    assert torch.allclose(f_explicit, f_ad, rtol=1e-13, atol=1e-13)
    assert (df_explicit - df_ad).norm() / df_ad.norm() < 1e-10
    weights = torch.randn_like(f_ad)
    (f_explicit * weights).sum().backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    (f_ad * weights).sum().backward()
    assert all(torch.allclose(a, p.grad, rtol=1e-11, atol=1e-14) for a, p in zip(grads, student.parameters()))
