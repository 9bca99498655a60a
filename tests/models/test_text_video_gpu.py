"""umT5 encoder and Wan VAE on the GPU in bf16 (as rcm.generate runs them) against float64 on the CPU."""
import pytest
import torch

from rcm.models.umt5 import UMT5Config, UMT5Encoder
from rcm.models.wan_vae import WanVAE, WanVAEConfig

pytestmark = pytest.mark.gpu


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def test_bf16_umt5_on_cuda_matches_float64():
    config = UMT5Config(vocab_size=64, dim=256, dim_attn=256, dim_ffn=512, num_heads=4, num_layers=3, num_buckets=32)
    torch.manual_seed(0)
    reference = UMT5Encoder(config).double()
    encoder = UMT5Encoder(config).to("cuda", torch.bfloat16)
    encoder.load_state_dict(reference.state_dict())
    tokens = torch.randint(3, 64, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad():
        expected = reference(tokens, mask)
        got = encoder(tokens.cuda(), mask.cuda())
    assert torch.isfinite(got).all()
    assert relative_error(got[0], expected[0]) < 3e-2
    assert relative_error(got[1, :25], expected[1, :25]) < 3e-2


def test_bf16_vae_decode_on_cuda_matches_float64():
    torch.manual_seed(0)
    reference = WanVAE(WanVAEConfig(dim=32, num_res_blocks=1)).double().eval()
    vae = WanVAE(WanVAEConfig(dim=32, num_res_blocks=1)).to("cuda", torch.bfloat16).eval()
    vae.load_state_dict(reference.state_dict())
    latent = torch.randn(1, 16, 3, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = reference.decode(latent, chunked=False)
        got = vae.decode(latent.cuda())
    assert got.shape == (1, 3, 9, 48, 64) and got.dtype == torch.bfloat16
    assert relative_error(got, expected) < 5e-2
