"""JVP mode of the DiT: one forward returns the output and its tangent (rcm/models/tangent.py)."""
import pytest
import torch

from tests.helpers import LATENT_SHAPE, TINY, tiny_dit


def _inputs(batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *LATENT_SHAPE, generator=g, dtype=torch.float64)
    timestep = torch.tensor([130.0, 870.0], dtype=torch.float64)[:batch]
    context = torch.randn(batch, TINY["text_len"] - 1, TINY["text_dim"], generator=g, dtype=torch.float64)
    x_dot = torch.randn(x.shape, generator=g, dtype=torch.float64)
    timestep_dot = torch.tensor([40.0, -25.0], dtype=torch.float64)[:batch]
    return x, timestep, context, x_dot, timestep_dot


@pytest.mark.parametrize("variant", [{}, {"qk_norm": False}, {"cross_attn_norm": False}, {"num_layers": 2}])
def test_tangent_equals_torch_func_jvp(variant):
    model = tiny_dit(0, **variant)
    x, timestep, context, x_dot, timestep_dot = _inputs()
    out, tangent = model(x, timestep, context, x_dot=x_dot, timestep_dot=timestep_dot)
    with torch.no_grad():
        reference_out, reference_tangent = torch.func.jvp(lambda a, b: model(a, b, context), (x, timestep), (x_dot, timestep_dot))
    assert torch.allclose(out, reference_out, rtol=0, atol=1e-13)
    relative = (tangent - reference_tangent).norm() / reference_tangent.norm()
    assert relative < 1e-10, relative


def test_time_only_and_x_only_tangents():
    model = tiny_dit(1)
    x, timestep, context, x_dot, timestep_dot = _inputs()
    for xd, td in ((None, timestep_dot), (x_dot, None)):
        _, tangent = model(x, timestep, context, x_dot=xd, timestep_dot=td)
        _, reference = torch.func.jvp(
            lambda a, b: model(a, b, context), (x, timestep),
            (torch.zeros_like(x) if xd is None else xd, torch.zeros_like(timestep) if td is None else td))
        assert (tangent - reference.detach()).norm() / reference.norm() < 1e-10


def test_gradients_flow_through_the_primal_only():
    model = tiny_dit(2)
    x, timestep, context, x_dot, timestep_dot = _inputs()
    weights = torch.randn(x.shape, dtype=torch.float64)
    out, tangent = model(x, timestep, context, x_dot=x_dot, timestep_dot=timestep_dot)
    assert out.requires_grad and not tangent.requires_grad
    (out * weights).sum().backward()
    jvp_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (model(x, timestep, context) * weights).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(jvp_grads[name], p.grad, rtol=1e-12, atol=1e-14), name


def test_jvp_mode_keeps_no_tangent_activations_for_backward():
    """The autograd graph of the JVP-mode forward is the plain forward's: tangents are never saved."""
    model = tiny_dit(0).float()
    x, timestep, context, x_dot, timestep_dot = (t.float() for t in _inputs())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(x, timestep, context)
    plain = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(x, timestep, context, x_dot=x_dot, timestep_dot=timestep_dot)
    assert sum(saved) == plain


def test_linear_patch_embedding_of_the_rcm_release_loads():
    """rCM's released students store patch_embedding as a Linear [dim, C·kt·kh·kw]; both layouts load strictly."""
    source = tiny_dit(4)
    state = source.state_dict()
    conv_weight = state["patch_embedding.weight"]
    state["patch_embedding.weight"] = conv_weight.reshape(conv_weight.shape[0], -1).clone()
    target = tiny_dit(5)
    target.load_state_dict(state, strict=True)
    assert torch.equal(target.patch_embedding.weight, conv_weight)
    x, timestep, context, _, _ = _inputs()
    assert torch.equal(target(x, timestep, context), source(x, timestep, context))
