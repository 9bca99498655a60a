"""Time conversions, TrigFlow preconditioning and time samplers against their formulas."""
import math

import pytest
import torch

from rcm.distill import time as T
from rcm.distill.trigflow import denoise, trigflow_coefficients, velocity, velocity_from_x0


def test_round_trips_between_rf_trig_and_sigma():
    s = torch.rand(1000, dtype=torch.float64) * 0.999 + 1e-4
    assert torch.allclose(T.trig_to_rf(T.rf_to_trig(s)), s, rtol=0, atol=1e-14)
    assert torch.allclose(T.sigma_to_rf(T.rf_to_sigma(s)), s, rtol=0, atol=1e-14)
    sigma = T.rf_to_sigma(s)
    assert torch.allclose(T.trig_to_sigma(T.sigma_to_trig(sigma)), sigma, rtol=1e-12)
    assert torch.allclose(T.rf_to_trig(s), torch.atan(sigma), atol=1e-14)


def test_endpoints_map_exactly():
    assert T.rf_to_trig(torch.tensor([1.0])).item() == pytest.approx(math.pi / 2, abs=0)
    assert T.rf_to_trig(torch.tensor([0.0])).item() == 0.0
    assert torch.isfinite(T.rf_to_sigma(torch.tensor([1.0]))).all()


def test_coefficients_match_the_formulas():
    t = torch.linspace(0.01, math.pi / 2, 50, dtype=torch.float64)
    c = trigflow_coefficients(t)
    scale = 1 / (torch.cos(t) + torch.sin(t))
    assert torch.equal(c.c_in, scale)
    assert torch.allclose(c.c_noise, 1000 * torch.sin(t) * scale)
    assert torch.equal(c.c_skip, scale)
    assert torch.allclose(c.c_out, -torch.sin(t) * scale)
    # c_noise is 1000·s: the RF time of the same point.
    assert torch.allclose(c.c_noise / 1000, T.trig_to_rf(t), atol=1e-15)


def test_denoise_recovers_x0_from_an_oracle_flow_network():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.7, 1.2, 1.55], dtype=torch.float64)
    x_t = torch.cos(t).view(-1, 1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1, 1) * eps

    def oracle(x_s, timestep, context):
        s = (timestep / 1000).view(-1, 1, 1, 1, 1)
        # Checks the input too: x_s must be (1−s)·x0 + s·ε.
        assert torch.allclose(x_s, (1 - s) * x0 + s * eps, atol=1e-12)
        return eps - x0

    assert torch.allclose(denoise(oracle, x_t, t, None), x0, atol=1e-12)
    # Velocity is dx_t/dt along the TrigFlow path.
    expected_velocity = -torch.sin(t).view(-1, 1, 1, 1, 1) * x0 + torch.cos(t).view(-1, 1, 1, 1, 1) * eps
    assert torch.allclose(velocity(oracle, x_t, t, None), expected_velocity, atol=1e-11)
    assert torch.allclose(velocity_from_x0(x_t, t, x0), expected_velocity, atol=1e-11)


def test_lognormal_sampler_statistics():
    g = torch.Generator().manual_seed(0)
    s = T.sample_rf_time(T.TimeSamplerConfig("lognormal", 0.7, 1.6), 200_000, g)
    log_sigma = T.rf_to_sigma(s).log()
    assert log_sigma.mean().item() == pytest.approx(0.7, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.6, abs=0.02)


def test_uniform_shift_sampler_quantiles():
    g = torch.Generator().manual_seed(0)
    s = T.sample_rf_time(T.TimeSamplerConfig("uniform_shift", shift=5.0), 200_000, g)
    for q in (0.1, 0.5, 0.9):
        expected = 5.0 * q / (1 + 4.0 * q)  # s is monotone in u, so quantiles map through the shift
        assert torch.quantile(s.float(), q).item() == pytest.approx(expected, abs=0.01)
    assert ((s > 0) & (s < 1)).all()


def test_bad_sampler_kind_is_rejected():
    with pytest.raises(ValueError, match="lognormal"):
        T.TimeSamplerConfig("gamma")
