"""Checkpointed blocks give the same outputs, tangents and gradients as plain blocks."""
import torch

from rcm.parallel.activation_checkpointing import apply_activation_checkpointing
from tests.helpers import tiny_dit
from tests.models.test_jvp_mode import _inputs


def _grads(model, with_tangent):
    x, timestep, context, x_dot, timestep_dot = _inputs()
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    model.zero_grad()
    if with_tangent:
        out, tangent = model(x, timestep, context, x_dot=x_dot, timestep_dot=timestep_dot)
    else:
        out, tangent = model(x, timestep, context), None
    (out * weights).sum().backward()
    return out.detach(), tangent, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointed_blocks_match_plain_blocks_in_both_modes():
    for with_tangent in (False, True):
        plain = tiny_dit(0, num_layers=3)
        checkpointed = tiny_dit(0, num_layers=3)
        assert apply_activation_checkpointing(checkpointed, every=2) == 2
        out_a, tangent_a, grads_a = _grads(plain, with_tangent)
        out_b, tangent_b, grads_b = _grads(checkpointed, with_tangent)
        assert torch.allclose(out_a, out_b, rtol=0, atol=1e-14)
        if with_tangent:
            assert torch.allclose(tangent_a, tangent_b, rtol=0, atol=1e-14)
        for name in grads_a:
            assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-12, atol=1e-15), name


def test_checkpointing_keeps_parameter_names():
    model = tiny_dit(0, num_layers=2)
    names = list(model.state_dict())
    apply_activation_checkpointing(model)
    assert list(model.state_dict()) == names
