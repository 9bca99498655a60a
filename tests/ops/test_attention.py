"""Tests for rcm.ops.attention: backends agree, the SDPA JVP rule and backward are exact, errors are clear."""
import importlib.util

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from rcm.ops import attention as attention_module
from rcm.ops.attention import attention, attention_backend_names, attention_jvp_reference, register_attention_backend

F64 = torch.float64


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_qkv(num_queries=7, num_keys=7, batch=2, heads=3, head_dim=8, dtype=F64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_queries, heads, head_dim, dtype=dtype, generator=generator)
    k = torch.randn(batch, num_keys, heads, head_dim, dtype=dtype, generator=generator)
    v = torch.randn(batch, num_keys, heads, head_dim, dtype=dtype, generator=generator)
    return q, k, v


@pytest.mark.parametrize("num_keys", [7, 11])
def test_sdpa_equals_math(num_keys):
    """The default (SDPA) backend and the explicit softmax agree, for self- and cross-attention."""
    q, k, v = random_qkv(num_keys=num_keys)
    for scale in (None, 0.3):
        sdpa = attention(q, k, v, scale=scale, backend="sdpa")
        math = attention(q, k, v, scale=scale, backend="math")
        assert sdpa.shape == q.shape
        assert relative_error(sdpa, math) < 1e-12
    assert torch.equal(attention(q, k, v), attention(q, k, v, backend="sdpa"))


@pytest.mark.parametrize("num_keys", [7, 11])
def test_sdpa_jvp_rule_equals_jvp_of_math(num_keys):
    """torch.func.jvp through the SDPA backend (its JVP rule) equals autodiff JVP of the math backend."""
    primals = random_qkv(num_keys=num_keys)
    tangents = random_qkv(num_keys=num_keys, seed=1)
    out_sdpa, tangent_sdpa = torch.func.jvp(lambda q, k, v: attention(q, k, v, backend="sdpa"), primals, tangents)
    out_math, tangent_math = torch.func.jvp(lambda q, k, v: attention(q, k, v, backend="math"), primals, tangents)
    assert relative_error(out_sdpa, out_math) < 1e-12
    assert relative_error(tangent_sdpa, tangent_math) < 1e-10


@pytest.mark.parametrize("moving", ["q", "k", "v", "qk"])
def test_sdpa_jvp_rule_with_some_tangents_absent(moving):
    """Inputs without a tangent (closed over, or None in the rule) count as constants."""
    q, k, v = random_qkv(num_queries=5, num_keys=9)
    dq, dk, dv = random_qkv(num_queries=5, num_keys=9, seed=1)
    names = dict(q=q, k=k, v=v)

    def function(backend):
        def run(*moving_values):
            values = dict(names, **dict(zip(moving, moving_values)))
            return attention(values["q"], values["k"], values["v"], backend=backend)
        return run

    primals = tuple(names[n] for n in moving)
    tangents = tuple(dict(q=dq, k=dk, v=dv)[n] for n in moving)
    _, tangent_sdpa = torch.func.jvp(function("sdpa"), primals, tangents)
    _, tangent_math = torch.func.jvp(function("math"), primals, tangents)
    assert relative_error(tangent_sdpa, tangent_math) < 1e-10

    # The rule itself, called with None for the tangents that are absent.
    to_bhnd = lambda t: None if t is None else t.transpose(1, 2)  # noqa: E731
    rule = attention_jvp_reference(
        *(t.transpose(1, 2) for t in (q, k, v)),
        *(to_bhnd(dict(q=dq, k=dk, v=dv)[n] if n in moving else None) for n in "qkv"),
        scale=8**-0.5,
    ).transpose(1, 2)
    assert relative_error(rule, tangent_math) < 1e-10


def test_jvp_rule_in_query_chunks(monkeypatch):
    """The JVP rule gives the same tangent when it walks the queries in several blocks."""
    primals = random_qkv(num_queries=13, num_keys=6)
    tangents = random_qkv(num_queries=13, num_keys=6, seed=1)
    run = lambda q, k, v: attention(q, k, v)  # noqa: E731
    _, whole = torch.func.jvp(run, primals, tangents)
    monkeypatch.setattr(attention_module, "_JVP_SCORE_BLOCK_ELEMENTS", 2 * 3 * 6 * 4)  # 4 queries a block
    _, chunked = torch.func.jvp(run, primals, tangents)
    assert relative_error(chunked, whole) < 1e-14


def test_forward_ad_dual_tensors_match_func_jvp():
    """torch.autograd.forward_ad dual tensors through the default backend give torch.func.jvp's tangent."""
    primals = random_qkv(num_keys=10)
    tangents = random_qkv(num_keys=10, seed=1)
    _, expected = torch.func.jvp(lambda q, k, v: attention(q, k, v, backend="math"), primals, tangents)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        tangent = fwAD.unpack_dual(attention(*duals)).tangent
    assert relative_error(tangent, expected) < 1e-10


@pytest.mark.parametrize("num_keys", [7, 11])
def test_sdpa_backward_equals_autograd_through_math(num_keys):
    """Gradients of the wrapped SDPA with respect to q, k, v equal autograd through the explicit softmax."""
    inputs = random_qkv(num_keys=num_keys)
    weights = torch.randn(inputs[0].shape, dtype=F64)
    grads = {}
    for backend in ("sdpa", "math"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        (attention(*leaves, backend=backend) * weights).sum().backward()
        grads[backend] = [leaf.grad for leaf in leaves]
    for sdpa_grad, math_grad in zip(grads["sdpa"], grads["math"]):
        assert relative_error(sdpa_grad, math_grad) < 1e-12

    # Only some inputs needing gradients is fine too.
    q, k, v = inputs
    k = k.clone().requires_grad_()
    (attention(q, k, v) * weights).sum().backward()
    assert relative_error(k.grad, grads["math"][1]) < 1e-12


def test_forward_ad_primal_backpropagates():
    """The primal of a forward-AD pass carries gradients, as the sCM loss needs."""
    q, k, v = random_qkv()
    dq = torch.randn_like(q)
    weights = torch.randn(q.shape, dtype=F64)
    k_leaf = k.clone().requires_grad_()
    with fwAD.dual_level():
        out = attention(fwAD.make_dual(q, dq), k_leaf, v)
        (fwAD.unpack_dual(out).primal * weights).sum().backward()
    k_reference = k.clone().requires_grad_()
    (attention(q, k_reference, v, backend="math") * weights).sum().backward()
    assert relative_error(k_leaf.grad, k_reference.grad) < 1e-12


def test_math_backend_computes_low_precision_in_float32():
    """bfloat16 inputs are attended in float32: the result is the float32 result rounded once."""
    q, k, v = (t.to(torch.bfloat16) for t in random_qkv(dtype=torch.float32))
    out = attention(q, k, v, backend="math")
    reference = attention(q.float(), k.float(), v.float(), backend="math")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.to(torch.bfloat16))


def test_registered_backend_is_dispatched():
    """A backend added with register_attention_backend is reachable by name, with the resolved scale."""
    seen = {}

    def recording_backend(q, k, v, scale):
        seen["scale"] = scale
        return attention(q, k, v, scale=scale, backend="math")

    name = "test_recording_backend"
    register_attention_backend(name, recording_backend, replace=True)
    try:
        assert name in attention_backend_names()
        q, k, v = random_qkv(head_dim=16)
        attention(q, k, v, backend=name)
        assert seen["scale"] == 0.25
        with pytest.raises(ValueError, match="already registered"):
            register_attention_backend(name, recording_backend)
    finally:
        attention_module._BACKENDS.pop(name)


def test_clear_errors():
    """Bad shapes, mixed dtypes and unknown backends fail with a sentence naming the problem."""
    q, k, v = random_qkv(num_keys=5)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'.*auto"):
        attention(q, k, v, backend="fast")
    with pytest.raises(ValueError, match=r"\(batch, tokens, heads, head_dim\)"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="as many keys as values"):
        attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="number of heads"):
        attention(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="one dtype"):
        attention(q, k.float(), v)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attn_backend_without_package_says_how_to_fix():
    """Asking for flash_attn where the package is missing names the package and the alternative."""
    with pytest.raises(ImportError, match="pip install flash-attn.*backend='sdpa'"):
        attention(*random_qkv(), backend="flash_attn")
