"""Compiled blocks give the same outputs, tangents and gradients as eager blocks, alone and checkpointed."""
import functools

import pytest
import torch

from rcm.parallel.activation_checkpointing import apply_activation_checkpointing
from rcm.parallel.compile import apply_compile
from tests.helpers import tiny_dit
from tests.models.test_activation_checkpointing import _grads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_blocks_match_eager_blocks_in_both_modes(checkpointed):
    for with_tangent in (False, True):
        eager = tiny_dit(0, num_layers=2)
        compiled = tiny_dit(0, num_layers=2)
        # aot_eager traces forward and backward graphs like inductor but runs them without codegen (no C++ compiler in CI).
        assert apply_compile(compiled, backend="aot_eager") == 2
        if checkpointed:
            apply_activation_checkpointing(compiled)
        out_a, tangent_a, grads_a = _grads(eager, with_tangent)
        torch._dynamo.utils.counters.clear()
        out_b, tangent_b, grads_b = _grads(compiled, with_tangent)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the blocks really ran compiled
        assert torch.allclose(out_a, out_b, rtol=1e-12, atol=1e-13)
        if with_tangent:
            assert torch.allclose(tangent_a, tangent_b, rtol=1e-12, atol=1e-13)
        for name in grads_a:
            assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-10, atol=1e-13), name


def test_compile_refuses_to_run_after_checkpointing():
    model = tiny_dit(0, num_layers=1)
    apply_activation_checkpointing(model)
    with pytest.raises(ValueError, match="before apply_activation_checkpointing"):
        apply_compile(model)


def test_compile_keeps_parameter_names():
    model = tiny_dit(0, num_layers=2)
    names = list(model.state_dict())
    apply_compile(model, backend="aot_eager")
    assert list(model.state_dict()) == names


def test_compiled_vae_decoder_matches_eager_chunk_by_chunk():
    """The compiled per-chunk decoder (one graph for the first chunk, one for the rest) gives the eager video."""
    from rcm.parallel.compile import compile_vae_decoder
    from tests.models.test_wan_vae import random_tiny_vae, relative_error

    eager, compiled = random_tiny_vae(), random_tiny_vae()
    compile_vae_decoder(compiled, backend="aot_eager")
    compile_vae_decoder(compiled, backend="aot_eager")  # a second call keeps the one compiled forward
    latent = torch.randn(1, 16, 4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        expected, actual = eager.decode(latent), compiled.decode(latent)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # first chunk, later chunks: no breaks
    assert relative_error(actual, expected) < 1e-12


@pytest.mark.parametrize("recipe", ["taps96", "stacked_all", "stacked96_cl3d"])
def test_vae_decoder_recipes_decode_as_eager(recipe):
    """A recipe swaps convolution forms (tiny VAE: 'up to 96 channels' is all of them) and compiles; same video."""
    from rcm.parallel.compile import speed_up_vae_decoder
    from tests.models.test_wan_vae import random_tiny_vae, relative_error

    eager, fast = random_tiny_vae(), random_tiny_vae()
    speed_up_vae_decoder(fast, backend="aot_eager", recipe=recipe)
    assert any(isinstance(getattr(m, "_conv_forward", None), functools.partial) for m in fast.decoder.modules())
    latent = torch.randn(1, 16, 3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert relative_error(fast.decode(latent), eager.decode(latent)) < 1e-12


def test_unknown_vae_decoder_recipe_is_refused():
    from rcm.parallel.compile import speed_up_vae_decoder
    from tests.models.test_wan_vae import random_tiny_vae

    with pytest.raises(ValueError, match="unknown recipe 'fastest'; choose from compiled, taps96"):
        speed_up_vae_decoder(random_tiny_vae(), recipe="fastest")


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_vae_decoder_refuses_cuda_graph_modes(mode):
    from rcm.parallel.compile import compile_vae_decoder
    from tests.models.test_wan_vae import random_tiny_vae

    vae = random_tiny_vae()
    with pytest.raises(ValueError, match="CUDA graphs, which overwrite each chunk's output"):
        compile_vae_decoder(vae, mode=mode)
    assert not getattr(vae.decoder, "_rcm_compiled", False)
