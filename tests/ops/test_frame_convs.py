"""The forms of rcm.ops.frame_convs equal conv3d (float64), alone and swapped into the Wan VAE decoder."""
import pytest
import torch
import torch.nn.functional as F

from rcm.ops.frame_convs import FORMS, conv3d_as_frame_convs, conv3d_as_stacked_frame_conv, use_frame_convs
from tests.models.test_wan_vae import random_tiny_vae, relative_error


@pytest.mark.parametrize("function", [conv3d_as_frame_convs, conv3d_as_stacked_frame_conv])
@pytest.mark.parametrize("batch,taps,kernel_hw,padding", [(1, 3, (3, 3), (1, 1)), (2, 3, (3, 3), (1, 1)),
                                                          (2, 2, (3, 3), (0, 1)), (2, 3, (1, 3), (0, 1))])
def test_frame_convs_equal_conv3d(function, batch, taps, kernel_hw, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 5, 6, 7, 9, dtype=torch.float64, generator=g)
    weight = torch.randn(4, 5, taps, *kernel_hw, dtype=torch.float64, generator=g)
    bias = torch.randn(4, dtype=torch.float64, generator=g)
    expected = F.conv3d(x, weight, bias, padding=(0, *padding))
    actual = function(x, weight, bias, padding)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-13
    without_bias = function(x, weight, None, padding)
    assert relative_error(without_bias, F.conv3d(x, weight, None, padding=(0, *padding))) < 1e-13


@pytest.mark.parametrize("form", FORMS)
def test_vae_decode_with_frame_convs_equals_plain_decode(form):
    """Chunked decode through the causal cache, with the small-channel 3×3×3 convolutions swapped."""
    plain, swapped = random_tiny_vae(), random_tiny_vae()
    switched = use_frame_convs(swapped, max_channels=8, form=form)
    # the tiny decoder's 3×3×3 convolutions of ≤ 8 input channels, in encoder and decoder; no 1-frame kernels
    assert switched == sum(1 for m in swapped.modules() if isinstance(m, torch.nn.Conv3d)
                           and m.in_channels <= 8 and m.kernel_size[0] == 3 and m.stride == (1, 1, 1)) > 0
    latent = torch.randn(1, 16, 3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, actual = plain.decode(latent), swapped.decode(latent)
    assert relative_error(actual, expected) < 1e-12


def test_channel_range_selects_modules_and_bad_form_is_refused():
    vae = random_tiny_vae()
    total = use_frame_convs(random_tiny_vae(), max_channels=10**6)
    low = use_frame_convs(vae, max_channels=8, form="stacked")
    high = use_frame_convs(vae, min_channels=9, max_channels=10**6, form="channels_last_3d")
    assert low > 0 and high > 0 and low + high == total
    with pytest.raises(ValueError, match="form must be one of taps, stacked, channels_last_3d"):
        use_frame_convs(vae, form="winograd")


@pytest.mark.gpu
@pytest.mark.parametrize("function", [conv3d_as_frame_convs, conv3d_as_stacked_frame_conv])
def test_gpu_bf16_frame_convs_are_as_accurate_as_cudnn_conv3d(function):
    """On CUDA in bf16 (channels-last conv2d kernels), the error against float64 is that of bf16 conv3d."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 96, 6, 48, 80, dtype=torch.float64, generator=g)
    weight = torch.randn(96, 96, 3, 3, 3, dtype=torch.float64, generator=g) / 50
    bias = torch.randn(96, dtype=torch.float64, generator=g)
    reference = F.conv3d(x, weight, bias, padding=(0, 1, 1))
    x16, w16, b16 = (t.to("cuda", torch.bfloat16) for t in (x, weight, bias))
    ours = function(x16, w16, b16, (1, 1)).double().cpu()
    cudnn = F.conv3d(x16, w16, b16, padding=(0, 1, 1)).double().cpu()
    assert relative_error(cudnn, reference) < 1e-2
    assert relative_error(ours, reference) < 2 * relative_error(cudnn, reference) + 1e-3
