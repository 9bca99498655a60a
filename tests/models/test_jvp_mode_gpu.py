"""JVP mode on the GPU in bf16 with the fused Triton attention, against a float64 reference."""
import pytest
import torch

from rcm.models.wan_dit import WanDiT, WanDiTConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bf16_jvp_mode_matches_float64(backend):
    config = WanDiTConfig(dim=256, ffn_dim=512, freq_dim=64, text_dim=64, text_len=16, num_heads=2, num_layers=2,
                          in_channels=4, out_channels=4, patch_size=(1, 2, 2), attention_backend=backend)
    torch.manual_seed(0)
    model = WanDiT(config).cuda()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.02)
    x = torch.randn(2, 4, 3, 16, 18, device="cuda")
    x_dot = torch.randn_like(x)
    timestep = torch.tensor([200.0, 800.0], device="cuda")
    timestep_dot = torch.tensor([30.0, -50.0], device="cuda")
    context = torch.randn(2, 11, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, tangent = model(x, timestep, context, x_dot=x_dot, timestep_dot=timestep_dot)
    reference = WanDiT(WanDiTConfig(**{**config.__dict__, "attention_backend": "math"})).cuda().double()
    reference.load_state_dict(model.state_dict())
    ref_out, ref_tangent = torch.func.jvp(lambda a, b: reference(a, b, context.double()), (x.double(), timestep.double()),
                                          (x_dot.double(), timestep_dot.double()))
    assert torch.isfinite(tangent).all()
    assert (out.double() - ref_out).norm() / ref_out.norm() < 2e-2
    assert (tangent.double() - ref_tangent).norm() / ref_tangent.norm() < 3e-2


def _triton_pair():
    """Two small bf16-ready DiTs on the GPU with the Triton attention and the same weights."""
    config = WanDiTConfig(dim=256, ffn_dim=512, freq_dim=64, text_dim=64, text_len=16, num_heads=2, num_layers=2,
                          in_channels=4, out_channels=4, patch_size=(1, 2, 2), attention_backend="triton")
    torch.manual_seed(0)
    first = WanDiT(config).cuda()
    with torch.no_grad():
        first.head.head.weight.normal_(std=0.02)
    second = WanDiT(config).cuda()
    second.load_state_dict(first.state_dict())
    return first, second


def _outputs_tangents_gradients(models):
    """Each model's output, tangent and parameter gradients in bf16 autocast on the same JVP-mode inputs."""
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(2, 4, 3, 16, 18, device="cuda", generator=g)
    x_dot, weights = torch.randn_like(x), torch.randn_like(x)
    timestep, timestep_dot = torch.tensor([200.0, 800.0], device="cuda"), torch.tensor([30.0, -50.0], device="cuda")
    context = torch.randn(2, 11, 64, device="cuda", generator=g)
    results = []
    for model in models:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, tangent = model(x, timestep, context, x_dot=x_dot, timestep_dot=timestep_dot)
        (out.float() * weights).sum().backward()
        results.append((out.float(), tangent.float(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    return results


def test_compiled_blocks_match_eager_on_gpu_with_triton_attention():
    """Inductor-compiled, checkpointed blocks (rCM training's GPU setup) against eager: outputs, tangents, gradients."""
    from rcm.parallel.activation_checkpointing import apply_activation_checkpointing
    from rcm.parallel.compile import apply_compile

    eager, compiled = _triton_pair()
    apply_compile(compiled)
    for model in (eager, compiled):
        apply_activation_checkpointing(model)
    for a, b in zip(*_outputs_tangents_gradients((eager, compiled))):
        assert (a - b).norm() / a.norm() < 2e-2


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_mm_only_checkpointing_matches_plain_blocks_on_gpu(compile_blocks):
    """The 14B recipe's selective checkpointing (keep matmul outputs) with the Triton JVP attention in bf16, eager
    and compiled: outputs, tangents and gradients as without checkpointing."""
    from rcm.parallel.activation_checkpointing import apply_activation_checkpointing
    from rcm.parallel.compile import apply_compile

    plain, selective = _triton_pair()
    if compile_blocks:
        apply_compile(plain)
        apply_compile(selective)
    assert apply_activation_checkpointing(selective, policy="mm_only") == 2
    for a, b in zip(*_outputs_tangents_gradients((plain, selective))):
        assert (a - b).norm() / a.norm() < 1e-2
