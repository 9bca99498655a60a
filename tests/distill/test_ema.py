"""Power-function EMA: γ from σ_rel and the averaging weights it implies."""
import pytest
import torch

from rcm.distill.ema import PowerEMA, power_ema_beta, power_ema_gamma


def test_gamma_is_the_largest_root():
    gamma = power_ema_gamma(0.1)
    assert gamma**3 + 7 * gamma**2 + (16 - 100) * gamma + 12 - 100 == pytest.approx(0, abs=1e-9)
    assert gamma == pytest.approx(6.94, abs=0.01)  # EDM2's value for σ_rel = 0.1
    with pytest.raises(ValueError):
        power_ema_gamma(0.5)


def test_ema_is_the_power_weighted_average():
    """β(i) = (i/(i+1))^(γ+1) makes the EMA after n updates Σ w_i p_i / Σ w_i with w_i = (i+1)^(γ+1) − i^(γ+1)."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = PowerEMA(model, sigma_rel=0.1)
    values = torch.randn(30, dtype=torch.float64)
    for i, value in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model, i)
    gamma = ema.gamma
    idx = torch.arange(30, dtype=torch.float64)
    w = (idx + 1) ** (gamma + 1) - idx ** (gamma + 1)
    expected = (w * values).sum() / w.sum()
    assert ema.shadow["weight"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert power_ema_beta(0, gamma) == 0.0


def test_copy_to_and_state_dict_round_trip():
    model = torch.nn.Linear(2, 2)
    ema = PowerEMA(model)
    other = torch.nn.Linear(2, 2)
    ema.copy_to(other)
    assert torch.equal(other.weight, model.weight)
    restored = PowerEMA(torch.nn.Linear(2, 2))
    restored.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    assert all(torch.equal(restored.shadow[k], ema.shadow[k]) for k in ema.shadow)
