"""Per-tap 2-D convolutions over frames equal conv3d (float64), alone and swapped into the Wan VAE decoder."""
import pytest
import torch
import torch.nn.functional as F

from rcm.ops.frame_convs import conv3d_as_frame_convs, use_frame_convs
from tests.models.test_wan_vae import random_tiny_vae, relative_error


@pytest.mark.parametrize("batch,taps,padding", [(1, 3, (1, 1)), (2, 3, (1, 1)), (2, 2, (0, 1))])
def test_frame_convs_equal_conv3d(batch, taps, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 5, 6, 7, 9, dtype=torch.float64, generator=g)
    weight = torch.randn(4, 5, taps, 3, 3, dtype=torch.float64, generator=g)
    bias = torch.randn(4, dtype=torch.float64, generator=g)
    expected = F.conv3d(x, weight, bias, padding=(0, *padding))
    actual = conv3d_as_frame_convs(x, weight, bias, padding)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-13


def test_vae_decode_with_frame_convs_equals_plain_decode():
    """Chunked decode through the causal cache, with the small-channel 3×3×3 convolutions swapped."""
    plain, swapped = random_tiny_vae(), random_tiny_vae()
    switched = use_frame_convs(swapped, max_channels=8)
    # the tiny decoder's 3×3×3 convolutions of ≤ 8 input channels, in encoder and decoder; no 1-frame kernels
    assert switched == sum(1 for m in swapped.modules() if isinstance(m, torch.nn.Conv3d)
                           and m.in_channels <= 8 and m.kernel_size[0] == 3 and m.stride == (1, 1, 1)) > 0
    latent = torch.randn(1, 16, 3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, actual = plain.decode(latent), swapped.decode(latent)
    assert relative_error(actual, expected) < 1e-12


@pytest.mark.gpu
def test_gpu_bf16_frame_convs_are_as_accurate_as_cudnn_conv3d():
    """On CUDA in bf16 (channels-last conv2d kernels), the error against float64 is that of bf16 conv3d."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 96, 6, 48, 80, dtype=torch.float64, generator=g)
    weight = torch.randn(96, 96, 3, 3, 3, dtype=torch.float64, generator=g) / 50
    bias = torch.randn(96, dtype=torch.float64, generator=g)
    reference = F.conv3d(x, weight, bias, padding=(0, 1, 1))
    x16, w16, b16 = (t.to("cuda", torch.bfloat16) for t in (x, weight, bias))
    ours = conv3d_as_frame_convs(x16, w16, b16, (1, 1)).double().cpu()
    cudnn = F.conv3d(x16, w16, b16, padding=(0, 1, 1)).double().cpu()
    assert relative_error(cudnn, reference) < 1e-2
    assert relative_error(ours, reference) < 2 * relative_error(cudnn, reference) + 1e-3
