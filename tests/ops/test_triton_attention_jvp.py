"""Tests for rcm/ops/triton_attention_jvp.py, the Triton attention with a fused tangent (JVP).

CPU (CI): the Triton kernels run under the Triton interpreter in a child process (TRITON_INTERPRET
must be set before triton is imported), in float32, against the float64 closed form; the torch
emulation of the block algorithm is checked against the closed form; input errors are checked.
GPU (`gpu` marker, run through the device tool): bf16/fp16 at odd lengths and cross-attention
against float64, the backward against SDPA's, forward-mode AD against the fused path.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcm.ops.triton_attention_jvp_reference import attention_jvp_blockwise, attention_jvp_reference

REPO_ROOT = Path(__file__).resolve().parents[2]


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (NaN stays NaN)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def random_inputs(batch, n_queries, n_keys, heads, head_dim, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v, q_dot, k_dot, v_dot in (B, N, H, D), standard normal."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(n):
        return torch.randn(batch, n, heads, head_dim, generator=generator, device=device).to(dtype)

    return draw(n_queries), draw(n_keys), draw(n_keys), draw(n_queries), draw(n_keys), draw(n_keys)


# ---------------------------------------------------------------------------------------------
# The block algorithm itself (pure torch, no Triton)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_queries,n_keys,block_m,block_n", [(37, 37, 16, 8), (20, 53, 32, 16), (5, 3, 16, 16)])
def test_blockwise_emulation_matches_closed_form_float32(n_queries, n_keys, block_m, block_n):
    """The online-softmax tangent recurrence (one merged tangent accumulator) equals the closed form."""
    inputs = random_inputs(2, n_queries, n_keys, 3, 64, seed=1)
    expected = attention_jvp_reference(*inputs, scale=0.2)
    actual = attention_jvp_blockwise(*inputs, scale=0.2, block_m=block_m, block_n=block_n)
    for got, want in zip(actual, expected):
        assert relative_error(got, want) < 1e-5


def test_blockwise_emulation_bf16_rounding_stays_within_one_percent():
    """Rounding P and P⊙Ṡ to bf16 before the PV products, as the kernel does, costs < 1e-2 relative."""
    inputs = random_inputs(1, 70, 90, 2, 128, dtype=torch.bfloat16, seed=2)
    expected = attention_jvp_reference(*inputs)
    actual = attention_jvp_blockwise(*inputs, block_m=32, block_n=16)
    assert relative_error(actual[0], expected[0]) < 1e-2
    assert relative_error(actual[1], expected[1]) < 1e-2


# ---------------------------------------------------------------------------------------------
# Input checks (no kernel launch, no GPU)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def jvp_module():
    """The kernel module (needs triton importable, not a GPU)."""
    pytest.importorskip("triton", reason="triton is not installed; the kernel module needs it")
    from rcm.ops import triton_attention_jvp

    return triton_attention_jvp


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(head_dim=96), "head_dim 96 is not supported"),
        (dict(dtype=torch.float64), "dtype torch.float64 is not supported"),
        (dict(transposed=True), "head_dim axis must be contiguous"),
        (dict(keys_heads=3), "k and v must be"),
        (dict(empty=True), "empty sequence"),
    ],
)
def test_unsupported_inputs_raise_one_clear_error(jvp_module, change, message):
    """Unsupported head dims, dtypes, strides and shapes fail with a ValueError naming the problem."""
    head_dim = change.get("head_dim", 64)
    dtype = change.get("dtype", torch.bfloat16)
    q = torch.zeros(1, 8, 2, head_dim, dtype=dtype)
    k = torch.zeros(1, 8, change.get("keys_heads", 2), head_dim, dtype=dtype)
    if change.get("transposed"):
        q = torch.zeros(1, 8, head_dim, 2, dtype=dtype).transpose(-1, -2)
    if change.get("empty"):
        k = torch.zeros(1, 0, 2, head_dim, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        jvp_module._check_inputs(q, k, k, q, k, k)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_non_positive_scale_is_refused(jvp_module, scale):
    """The base-2 softmax assumes a positive finite scale; anything else is a clear ValueError."""
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        jvp_module._resolve_scale(scale, 64)


def test_cpu_tensors_without_interpreter_are_refused(jvp_module):
    """Outside the interpreter the kernel asks for CUDA tensors instead of crashing in Triton."""
    if jvp_module.is_interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is set in this process")
    inputs = random_inputs(1, 8, 8, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA device"):
        jvp_module.attention_jvp(*inputs)


# ---------------------------------------------------------------------------------------------
# The Triton kernels under the CPU interpreter (child process)
# ---------------------------------------------------------------------------------------------


def _interpreter_cases() -> dict:
    """Run every interpreter case in this (interpreting) process; returns {case: {metric: value}}."""
    import torch.autograd.forward_ad as forward_ad

    from rcm.ops import triton_attention_jvp as tj

    def forward_case(shape, scale=None, config=None, make_inputs=None, seed=0):
        batch, n_queries, n_keys, heads, head_dim = shape
        inputs = make_inputs() if make_inputs else random_inputs(batch, n_queries, n_keys, heads, head_dim, seed=seed)
        q = inputs[0]
        out = torch.full((batch, n_queries, heads, head_dim), float("nan"))
        out_dot, lse = torch.full_like(out, float("nan")), torch.full((batch, heads, n_queries), float("nan"))
        tj._forward(*inputs, scale, config=config, out=out, out_dot=out_dot, lse=lse)
        ref_out, ref_dot, ref_lse = attention_jvp_reference(*inputs, scale=scale)
        plain_out, _, plain_lse = tj._forward(*inputs[:3], scale=scale, config=config)
        return {
            "out": relative_error(out, ref_out), "out_dot": relative_error(out_dot, ref_dot),
            "lse": relative_error(lse, ref_lse), "plain_out": relative_error(plain_out, ref_out),
            "plain_lse": relative_error(plain_lse, ref_lse),
            "unwritten": int(sum(t.isnan().sum().item() for t in (out, out_dot, lse))), "q_shape": list(q.shape),
        }

    def fused_qkv_inputs():
        # q, k, v (and their tangents) as views into (B, N, 3, H, D) buffers, as a fused projection gives.
        qkv = torch.randn(2, 33, 3, 2, 64)
        qkv_dot = torch.randn_like(qkv)
        return (*qkv.unbind(2), *qkv_dot.unbind(2))

    tma = tj.KernelConfig(32, 16, 4, 1, True)
    rescaling = tj.KernelConfig(32, 16, 4, 1, True, fixed_max=False)

    def growing_keys(seed):
        # Key norms grow 40x along the sequence: the first block cannot bound later scores, so
        # the kernel must fall back to rescaling the accumulators.
        q, k, v, q_dot, k_dot, v_dot = random_inputs(1, 33, 96, 2, 64, seed=seed)
        return q, k * torch.linspace(1, 40, 96)[None, :, None, None], v, q_dot, k_dot, v_dot

    results = {
        "self_attention_d64": forward_case((2, 37, 37, 2, 64)),
        "cross_attention_d128_scale": forward_case((2, 45, 23, 1, 128), scale=0.3, seed=1),
        "shorter_than_one_block": forward_case((1, 3, 5, 2, 64), seed=2),
        "tensor_descriptor_path": forward_case((1, 40, 70, 2, 64), config=tma, seed=3),
        "tensor_descriptor_cross_d128": forward_case((1, 17, 50, 2, 128), config=tma, seed=4),
        "fused_qkv_views": forward_case((2, 33, 33, 2, 64), make_inputs=fused_qkv_inputs),
        "fused_qkv_views_tensor_descriptor": forward_case((2, 33, 33, 2, 64), config=tma, make_inputs=fused_qkv_inputs),
        "always_rescaling": forward_case((1, 40, 70, 2, 64), config=rescaling, seed=6),
        "prescaled_tangents_d128": forward_case(
            (1, 29, 45, 2, 128), scale=0.2, config=tj.KernelConfig(32, 16, 4, 1, True, prescale_tangents=True), seed=8),
        "growing_scores_fall_back_to_rescaling": forward_case((1, 33, 96, 2, 64), config=tma, make_inputs=lambda: growing_keys(7)),
    }

    q, k, v, q_dot, k_dot, v_dot = random_inputs(1, 29, 41, 2, 64, seed=5)
    _, ref_dot, _ = attention_jvp_reference(q, k, v, q_dot, k_dot, v_dot)
    fused_out, fused_dot = tj.attention_jvp(q, k, v, q_dot, k_dot, v_dot)
    func_out, func_dot = torch.func.jvp(tj.attention, (q, k, v), (q_dot, k_dot, v_dot))
    with forward_ad.dual_level():
        dual = tj.attention(*(forward_ad.make_dual(p, t) for p, t in ((q, q_dot), (k, k_dot), (v, v_dot))))
        ad_dot = forward_ad.unpack_dual(dual).tangent
    _, ref_q_only, _ = attention_jvp_reference(q, k, v, q_dot, torch.zeros_like(k), torch.zeros_like(v))
    _, q_only_dot = torch.func.jvp(lambda query: tj.attention(query, k, v), (q,), (q_dot,))
    results["forward_mode_ad"] = {
        "func_jvp_vs_fused": relative_error(func_dot, fused_dot), "func_jvp_out_vs_fused": relative_error(func_out, fused_out),
        "forward_ad_vs_fused": relative_error(ad_dot, fused_dot), "fused_vs_reference": relative_error(fused_dot, ref_dot),
        "query_tangent_only": relative_error(q_only_dot, ref_q_only),
    }

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, out_dot = tj.attention_jvp(*leaves, q_dot, k_dot, v_dot)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves64)).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double())
    results["backward_through_out"] = {
        f"d{name}": relative_error(g, r) for name, g, r in zip("qkv", grads, ref_grads)
    }
    results["backward_through_out"]["tangent_requires_grad"] = int(out_dot.requires_grad)
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    """Run `_interpreter_cases` once in a child process with TRITON_INTERPRET=1."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run([sys.executable, __file__, "--interpreter-cases"], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    marker = [line for line in child.stdout.splitlines() if line.startswith("INTERPRETER_RESULTS ")]
    if child.returncode != 0 or not marker:
        tail = (child.stderr or child.stdout)[-3000:]
        if "interpret" in tail.lower() and ("not supported" in tail.lower() or "no module" in tail.lower()):
            pytest.skip(f"the Triton interpreter cannot run here: {tail[-300:]}")
        pytest.fail(f"interpreter child process failed (exit {child.returncode}):\n{tail}")
    return json.loads(marker[-1].split(" ", 1)[1])


FORWARD_CASES = [
    "self_attention_d64", "cross_attention_d128_scale", "shorter_than_one_block", "tensor_descriptor_path",
    "tensor_descriptor_cross_d128", "fused_qkv_views", "fused_qkv_views_tensor_descriptor", "always_rescaling",
    "prescaled_tangents_d128", "growing_scores_fall_back_to_rescaling",
]


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_interpreted_kernel_matches_float64(interpreter_results, case):
    """Under the interpreter (float32) O, Ȯ and LSE match float64 and every output element is written."""
    result = interpreter_results[case]
    assert result["unwritten"] == 0
    tolerance = 1e-4 if case.startswith("growing") else 1e-5  # near-one-hot softmax rows amplify fp32 rounding
    for metric in ("out", "out_dot", "lse", "plain_out", "plain_lse"):
        assert result[metric] < tolerance, (metric, result)


def test_interpreted_forward_mode_ad_matches_fused_path(interpreter_results):
    """torch.func.jvp and forward_ad over `attention` give the fused kernel's tangent, also for one tangent."""
    result = interpreter_results["forward_mode_ad"]
    assert all(value < 1e-5 for value in result.values()), result


def test_interpreted_backward_flows_through_out_only(interpreter_results):
    """Gradients of `attention_jvp`'s out match float64 autograd; the tangent output carries no graph."""
    result = interpreter_results["backward_through_out"]
    assert result.pop("tangent_requires_grad") == 0
    assert all(value < 1e-5 for value in result.values()), result


# ---------------------------------------------------------------------------------------------
# GPU (bf16 / fp16), run through the device tool
# ---------------------------------------------------------------------------------------------

GPU_SHAPES = [  # (batch, n_queries, n_keys, heads, head_dim, dtype)
    (2, 999, 999, 3, 64, torch.bfloat16),
    (1, 4097, 4097, 2, 128, torch.bfloat16),
    (1, 1000, 4097, 2, 128, torch.float16),
    (2, 130, 999, 4, 64, torch.bfloat16),
    (1, 4096, 77, 2, 128, torch.bfloat16),
]


def _gpu_config_variants(tj, head_dim):
    """The default tile table entry, the same tiles through plain pointer loads, and always rescaling."""
    default = tj.DEFAULT_CONFIGS[(head_dim, True)]
    pointer = dataclasses.replace(default, use_tma=False)
    rescaling = dataclasses.replace(default, fixed_max=False)
    return {"default": default, "pointer_loads": pointer, "always_rescaling": rescaling}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(str(x) for x in s[:5]) + str(s[5])[-4:])
@pytest.mark.parametrize("variant", ["default", "pointer_loads", "always_rescaling", "large_logits"])
def test_gpu_forward_matches_float64(jvp_module, shape, variant):
    """bf16/fp16 O and Ȯ within 1e-2 relative of float64, LSE close, no NaN, every element written.

    `large_logits` multiplies q by 8 so that scores span far more than 2^64 between blocks in
    some rows and the kernel must take its rescaling path.
    """
    batch, n_queries, n_keys, heads, head_dim, dtype = shape
    inputs = random_inputs(batch, n_queries, n_keys, heads, head_dim, dtype=dtype, device="cuda", seed=n_keys)
    if variant == "large_logits":
        inputs = (inputs[0] * 8, *inputs[1:])
        variant = "default"
    config = _gpu_config_variants(jvp_module, head_dim)[variant]
    out = torch.full((batch, n_queries, heads, head_dim), float("nan"), dtype=dtype, device="cuda")
    out_dot = torch.full_like(out, float("nan"))
    lse = torch.full((batch, heads, n_queries), float("nan"), device="cuda")
    jvp_module._forward(*inputs, 0.1, config=config, out=out, out_dot=out_dot, lse=lse)
    torch.cuda.synchronize()
    ref_out, ref_dot, ref_lse = attention_jvp_reference(*inputs, scale=0.1)
    for name, tensor in (("out", out), ("out_dot", out_dot), ("lse", lse)):
        assert not tensor.isnan().any(), f"{name} has NaN (unwritten or broken)"
    assert relative_error(out, ref_out) < 1e-2
    assert relative_error(out_dot, ref_dot) < 1e-2
    assert relative_error(lse, ref_lse) < 1e-3
    emulated = attention_jvp_blockwise(*inputs, scale=0.1, block_m=config.block_m, block_n=config.block_n)
    assert relative_error(out_dot, emulated[1]) < 1e-2


@pytest.mark.gpu
def test_gpu_fused_qkv_views_read_in_place(jvp_module):
    """q, k, v sliced out of one (B, N, 3, H, D) projection are read through their strides, no copy."""
    qkv = torch.randn(2, 777, 3, 4, 128, device="cuda", dtype=torch.bfloat16)
    qkv_dot = torch.randn_like(qkv)
    inputs = (*qkv.unbind(2), *qkv_dot.unbind(2))
    out, out_dot = jvp_module.attention_jvp(*inputs)
    ref_out, ref_dot, _ = attention_jvp_reference(*inputs)
    assert relative_error(out, ref_out) < 1e-2
    assert relative_error(out_dot, ref_dot) < 1e-2


def _sdpa_grads(q, k, v, grad_out, scale, backend=None):
    """dQ, dK, dV of PyTorch's SDPA for (B, N, H, D) inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    backends = [backend] if backend is not None else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(backends):
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), scale=scale)
    return torch.autograd.grad(out.transpose(1, 2), leaves, grad_out)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("shape", [(2, 999, 999, 3, 64), (1, 1000, 4097, 2, 128), (1, 4097, 4097, 2, 128)])
def test_gpu_backward_matches_sdpa(jvp_module, backend, shape):
    """dQ, dK, dV from our O and LSE match SDPA's backward and float64 within 1e-2 (bf16)."""
    batch, n_queries, n_keys, heads, head_dim = shape
    q, k, v, q_dot, k_dot, v_dot = random_inputs(batch, n_queries, n_keys, heads, head_dim, torch.bfloat16, "cuda", seed=7)
    grad_out = torch.randn(batch, n_queries, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    out, _, lse = jvp_module._forward(q, k, v, q_dot, k_dot, v_dot, 0.1)
    try:
        grads = jvp_module.primal_backward(grad_out, q, k, v, out, lse, 0.1, backend=backend)
    except RuntimeError as error:
        if backend == "flash":
            raise
        pytest.skip(f"{backend} backward unavailable here: {error}")
    reference = _sdpa_grads(q, k, v, grad_out, 0.1)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref64 = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves64), scale=0.1)
    grads64 = torch.autograd.grad(ref64.transpose(1, 2), leaves64, grad_out.double())
    for name, got, sdpa, exact in zip("qkv", grads, reference, grads64):
        assert not got.isnan().any(), f"d{name} has NaN"
        assert relative_error(got, sdpa) < 1e-2, f"d{name} vs SDPA"
        assert relative_error(got, exact) < 1e-2, f"d{name} vs float64"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_default_backward_on_fused_qkv_views(jvp_module, dtype):
    """The default backward (cuDNN, flash as fallback) handles strided q, k, v views and fp16."""
    qkv = torch.randn(2, 999, 3, 4, 64, device="cuda", dtype=dtype, requires_grad=True)
    q, k, v = qkv.unbind(2)
    q_dot, k_dot, v_dot = torch.randn_like(qkv).unbind(2)
    out, _ = jvp_module.attention_jvp(q, k, v, q_dot, k_dot, v_dot)
    grad_out = torch.randn_like(out)
    (grad_qkv,) = torch.autograd.grad(out, qkv, grad_out)
    for got, want in zip(grad_qkv.unbind(2), _sdpa_grads(q, k, v, grad_out, None)):
        assert not got.isnan().any()
        assert relative_error(got, want) < 1e-2


@pytest.mark.gpu
def test_gpu_autograd_paths_agree(jvp_module):
    """attention_jvp's gradients equal SDPA's; torch.func.jvp over `attention` equals the fused tangent."""
    q, k, v, q_dot, k_dot, v_dot = random_inputs(1, 1025, 1025, 4, 128, torch.bfloat16, "cuda", seed=11)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, out_dot = jvp_module.attention_jvp(*leaves, q_dot, k_dot, v_dot)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    for got, want in zip(grads, _sdpa_grads(q, k, v, grad_out, None)):
        assert relative_error(got, want) < 1e-2
    _, func_dot = torch.func.jvp(jvp_module.attention, (q, k, v), (q_dot, k_dot, v_dot))
    assert relative_error(func_dot, out_dot) < 1e-3


if __name__ == "__main__" and "--interpreter-cases" in sys.argv:
    print("INTERPRETER_RESULTS " + json.dumps(_interpreter_cases()))
