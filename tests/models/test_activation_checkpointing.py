"""Checkpointed blocks give the same outputs, tangents and gradients as plain blocks."""
import pytest
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


@pytest.mark.parametrize("policy,every,wrapped", [("block", 2, 2), ("mm_only", 1, 3)])
def test_checkpointed_blocks_match_plain_blocks_in_both_modes(policy, every, wrapped):
    """Whole-block and selective (keep matmul outputs, recompute the rest) checkpointing give the same outputs,
    tangents and gradients as plain blocks, with and without tangents."""
    for with_tangent in (False, True):
        plain = tiny_dit(0, num_layers=3)
        checkpointed = tiny_dit(0, num_layers=3)
        assert apply_activation_checkpointing(checkpointed, every=every, policy=policy) == wrapped
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


def test_mm_only_keeps_the_primal_matmuls_and_recomputes_the_rest():
    """The policy saves matmul outputs computed with gradients (primal) and nothing of the tangent (no_grad),
    so backward reruns the element-wise work but no matmul of the primal."""
    from torch.utils.checkpoint import CheckpointPolicy

    from rcm.parallel.activation_checkpointing import _keep_primal_matmuls

    mm, gelu = torch.ops.aten.mm.default, torch.ops.aten.gelu.default
    assert _keep_primal_matmuls(None, mm) == CheckpointPolicy.MUST_SAVE
    assert _keep_primal_matmuls(None, gelu) == CheckpointPolicy.PREFER_RECOMPUTE
    with torch.no_grad():
        assert _keep_primal_matmuls(None, mm) == CheckpointPolicy.PREFER_RECOMPUTE


def test_mm_only_recomputes_fewer_matmuls_than_block():
    """Backward of an mm_only block runs no forward matmul again; a block-checkpointed one reruns them all."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.count += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for policy in ("none", "block", "mm_only"):
        model = tiny_dit(0, num_layers=2)
        if policy != "none":
            apply_activation_checkpointing(model, every=1, policy=policy)
        x, timestep, context, _, _ = _inputs()
        out = model(x, timestep, context)
        with CountMatmuls() as counter:
            out.sum().backward()
        counts[policy] = counter.count
    assert counts["mm_only"] == counts["none"] < counts["block"], counts
    assert counts["block"] > counts["none"]


def test_unknown_policy_names_the_key():
    with pytest.raises(ValueError, match="parallel.activation_checkpointing"):
        apply_activation_checkpointing(tiny_dit(0), policy="everything")
