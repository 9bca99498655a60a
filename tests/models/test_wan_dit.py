"""Tests for rcm.models.wan_dit: Wan2.1 naming and sizes, forward-mode AD, gradients, padding, validation."""
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import yaml

from rcm.models import WanDiT, WanDiTConfig, build_wan_dit
from rcm.models.wan_dit import apply_rope, rope_cos_sin

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
F64 = torch.float64


def load_preset(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny_model() -> WanDiT:
    """The tiny preset in float64 with a non-zero head (Wan initializes the head to zero)."""
    torch.manual_seed(0)
    model = build_wan_dit(load_preset("tiny")).to(F64)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.head.weight, std=0.1)
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.02)
    return model


def tiny_inputs(batch=2, frames=3, height=4, width=6, text_tokens=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, height, width, dtype=F64, generator=generator)
    timestep = torch.tensor([137.0, 912.5][:batch], dtype=F64)
    context = torch.randn(batch, text_tokens, 32, dtype=F64, generator=generator)
    return x, timestep, context


def test_output_shape_follows_the_input_video(tiny_model):
    """The velocity has the input's (B, C, T, H, W) for any patch-divisible size."""
    for frames, height, width in [(3, 4, 6), (1, 2, 2), (2, 6, 4)]:
        x, timestep, context = tiny_inputs(frames=frames, height=height, width=width)
        assert tiny_model(x, timestep, context).shape == x.shape


def test_state_dict_uses_wan_names_and_shapes(tiny_model):
    """Keys and shapes follow the official Wan2.1 .pth layout; RoPE tables are not in the state dict."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tiny_model.state_dict().items()}
    expected = {
        "patch_embedding.weight": (64, 4, 1, 2, 2),
        "patch_embedding.bias": (64,),
        "text_embedding.0.weight": (64, 32),
        "text_embedding.2.weight": (64, 64),
        "time_embedding.0.weight": (64, 32),
        "time_embedding.2.bias": (64,),
        "time_projection.1.weight": (384, 64),
        "blocks.0.modulation": (1, 6, 64),
        "blocks.0.self_attn.q.weight": (64, 64),
        "blocks.0.self_attn.norm_q.weight": (64,),
        "blocks.0.self_attn.norm_k.weight": (64,),
        "blocks.1.self_attn.o.bias": (64,),
        "blocks.0.norm3.weight": (64,),
        "blocks.0.norm3.bias": (64,),
        "blocks.1.cross_attn.k.weight": (64, 64),
        "blocks.1.cross_attn.norm_k.weight": (64,),
        "blocks.0.ffn.0.weight": (128, 64),
        "blocks.0.ffn.2.weight": (64, 128),
        "head.head.weight": (16, 64),
        "head.modulation": (1, 2, 64),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    per_block = {name.split(".", 2)[2] for name in shapes if name.startswith("blocks.0.")}
    assert per_block == {"modulation", "norm3.weight", "norm3.bias", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight",
                         "ffn.2.bias"} | {f"{attn}.{layer}.{kind}" for attn in ("self_attn", "cross_attn")
                                          for layer in "qkvo" for kind in ("weight", "bias")} | {
                         f"{attn}.norm_{n}.weight" for attn in ("self_attn", "cross_attn") for n in "qk"}
    assert len(shapes) == 12 + 2 * len(per_block) + 3
    assert not any("freq" in name or "rope" in name for name in shapes)


@pytest.mark.parametrize("preset, expected", [("wan2.1-t2v-1.3B", 1_418_996_800), ("wan2.1-t2v-14B", 14_288_491_584)])
def test_official_presets_have_the_official_parameter_count(preset, expected):
    """The 1.3B and 14B yaml presets, built on the meta device, have exactly the official counts."""
    with torch.device("meta"):
        model = build_wan_dit(load_preset(preset))
    assert model.num_parameters() == expected
    assert model.config.head_dim == 128 and model.config.patch_size == (1, 2, 2)


def test_jvp_matches_central_finite_difference(tiny_model):
    """torch.func.jvp over (x, timestep) equals a central finite difference of the whole model (float64)."""
    x, timestep, context = tiny_inputs()
    generator = torch.Generator().manual_seed(2)
    x_tangent = torch.randn(x.shape, dtype=F64, generator=generator)
    t_tangent = torch.tensor([3.0, -5.0], dtype=F64)
    run = lambda x_, t_: tiny_model(x_, t_, context)  # noqa: E731
    _, tangent = torch.func.jvp(run, (x, timestep), (x_tangent, t_tangent))
    h = 1e-5
    forward_step = run(x + h * x_tangent, timestep + h * t_tangent)
    backward_step = run(x - h * x_tangent, timestep - h * t_tangent)
    finite = (forward_step - backward_step) / (2 * h)
    assert relative_error(tangent, finite) < 1e-6


def test_forward_ad_matches_func_jvp(tiny_model):
    """Dual tensors (torch.autograd.forward_ad) give the same tangent as torch.func.jvp."""
    x, timestep, context = tiny_inputs()
    x_tangent, t_tangent = torch.randn_like(x), torch.tensor([1.0, 0.5], dtype=F64)
    primal, expected = torch.func.jvp(lambda x_, t_: tiny_model(x_, t_, context), (x, timestep), (x_tangent, t_tangent))
    with fwAD.dual_level():
        out = tiny_model(fwAD.make_dual(x, x_tangent), fwAD.make_dual(timestep, t_tangent), context)
        dual_primal, tangent = fwAD.unpack_dual(out)
    assert relative_error(tangent, expected) < 1e-10
    assert relative_error(dual_primal, primal) < 1e-12


def test_forward_ad_primal_backpropagates_to_parameters(tiny_model):
    """Backward through the primal of a forward-AD pass (dual tensors or torch.func.jvp) gives the
    gradients of a plain forward/backward.

    The backward runs after the dual level closes: torch has no forward-AD formula for some backward
    ops (silu_backward), so a backward inside the dual level fails in torch itself.
    """
    x, timestep, context = tiny_inputs()
    weights = torch.randn_like(x)

    def parameter_grads(output_of_model):
        tiny_model.zero_grad()
        (output_of_model() * weights).sum().backward()
        grads = {name: p.grad.clone() for name, p in tiny_model.named_parameters()}
        tiny_model.zero_grad()
        return grads

    def through_dual_tensors():
        with fwAD.dual_level():
            out = tiny_model(fwAD.make_dual(x, torch.randn_like(x)),
                             fwAD.make_dual(timestep, torch.ones_like(timestep)), context)
            return fwAD.unpack_dual(out).primal

    def through_func_jvp():
        primal, _ = torch.func.jvp(lambda x_, t_: tiny_model(x_, t_, context), (x, timestep),
                                   (torch.randn_like(x), torch.ones_like(timestep)))
        return primal

    plain = parameter_grads(lambda: tiny_model(x, timestep, context))
    for forward_ad_pass in (through_dual_tensors, through_func_jvp):
        grads = parameter_grads(forward_ad_pass)
        for name, grad in grads.items():
            assert relative_error(grad, plain[name]) < 1e-10, (forward_ad_pass.__name__, name)


def test_float32_model_runs_under_jvp(tiny_model):
    """A float32 model's JVP is close to the float64 one (the usual training precision on CPU)."""
    model32 = build_wan_dit(tiny_model.config)
    model32.load_state_dict(tiny_model.state_dict())
    x, timestep, context = tiny_inputs()
    x_tangent = torch.randn_like(x)
    t_tangent = torch.tensor([1.0, 2.0], dtype=F64)
    _, tangent64 = torch.func.jvp(lambda a, b: tiny_model(a, b, context), (x, timestep), (x_tangent, t_tangent))
    out32, tangent32 = torch.func.jvp(lambda a, b: model32(a, b, context.float()),
                                      (x.float(), timestep.float()), (x_tangent.float(), t_tangent.float()))
    assert out32.dtype == torch.float32
    assert relative_error(tangent32.double(), tangent64) < 1e-4


def test_short_context_is_zero_padded_to_text_len(tiny_model):
    """A context shorter than text_len gives the output of the same context explicitly zero-padded."""
    x, timestep, context = tiny_inputs(text_tokens=3)
    padded = torch.cat([context, context.new_zeros(2, 8 - 3, 32)], dim=1)
    assert relative_error(tiny_model(x, timestep, context), tiny_model(x, timestep, padded)) < 1e-14


def test_rope_equals_wan_complex_rotation():
    """Real-arithmetic RoPE equals Wan's complex product with its per-axis frequency tables."""
    head_dim, grid = 16, (2, 3, 4)
    x = torch.randn(1, 24, 2, head_dim, dtype=F64)
    c = head_dim // 2
    tables = []
    for axis_dim in (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)):
        inverse_frequency = 1.0 / 10000 ** (torch.arange(0, axis_dim, 2, dtype=F64) / axis_dim)
        angles = torch.outer(torch.arange(16, dtype=F64), inverse_frequency)
        tables.append(torch.polar(torch.ones_like(angles), angles))
    frames, rows, cols = torch.cat(tables, dim=1).split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    rotation = torch.cat([frames[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                          rows[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                          cols[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(24, 1, -1)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(1, 24, 2, -1, 2)) * rotation).flatten(3)
    cos, sin = rope_cos_sin(grid, WanDiTConfig(**{**load_preset("tiny"), "dim": 32, "num_heads": 2}).rope_axis_dims)
    assert torch.allclose(apply_rope(x, cos, sin), expected, rtol=0, atol=1e-13)


def test_config_validation_names_each_problem():
    """An impossible config fails at construction with one sentence per problem."""
    preset = load_preset("tiny")
    with pytest.raises(ValueError, match=r"dim \(64\) must be divisible by num_heads \(5\)"):
        WanDiTConfig(**{**preset, "num_heads": 5})
    with pytest.raises(ValueError, match="head_dim = dim / num_heads = 4 must be even and at least 6"):
        WanDiTConfig(**{**preset, "num_heads": 16})
    with pytest.raises(ValueError, match="ffn_dim must be a positive integer.*patch_size must be three"):
        WanDiTConfig(**{**preset, "ffn_dim": 0, "patch_size": [1, 2]})
    with pytest.raises(ValueError, match="attention_backend must be one of auto"):
        WanDiTConfig(**{**preset, "attention_backend": "flash3"})
    with pytest.raises(ValueError, match=r"unknown WanDiTConfig keys \['heads'\]"):
        build_wan_dit({**preset, "heads": 4})
    config = WanDiTConfig(**preset)
    assert config.patch_size == (1, 2, 2) and config.head_dim == 16 and config.rope_axis_dims == (8, 4, 4)


def test_bad_inputs_fail_with_clear_errors(tiny_model):
    """Inputs that do not fit the configuration are rejected before any compute."""
    x, timestep, context = tiny_inputs()
    with pytest.raises(ValueError, match="divisible by patch_size"):
        tiny_model(x[..., :5], timestep, context)
    with pytest.raises(ValueError, match="one timestep per sample"):
        tiny_model(x, timestep[0], context)
    with pytest.raises(ValueError, match="more than text_len=8"):
        tiny_model(x, timestep, torch.zeros(2, 9, 32, dtype=F64))


def test_bfloat16_autocast_keeps_time_path_and_head_wide(tiny_model):
    """Under bfloat16 autocast (and its JVP) the model runs, returns float32 and stays near the float32 result."""
    model32 = build_wan_dit(tiny_model.config)
    model32.load_state_dict(tiny_model.state_dict())
    x, timestep, context = (t.float() for t in tiny_inputs())
    run = lambda x_, t_: model32(x_, t_, context)  # noqa: E731
    tangents = (torch.randn_like(x), torch.ones_like(timestep))
    reference, reference_tangent = torch.func.jvp(run, (x, timestep), tangents)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, tangent = torch.func.jvp(run, (x, timestep), tangents)
    assert out.dtype == tangent.dtype == torch.float32
    assert relative_error(out, reference) < 3e-2
    assert relative_error(tangent, reference_tangent) < 3e-2
