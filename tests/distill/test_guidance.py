"""Guidance w ≤ 1 skips the unconditional teacher pass everywhere (rcm_spec.md §4); w < 0 is refused."""
import pytest
import torch
from omegaconf import OmegaConf

from rcm.config import DistillConfig
from rcm.distill.distiller import Distiller
from rcm.distill.trigflow import denoise, guided_denoise
from rcm.eval.sampling import TEACHER, SamplerSetting, sample_batch
from tests.helpers import tiny_dit, toy_batch


class CountingNetwork(torch.nn.Module):
    """Wraps a network and records the batch size of every call."""

    def __init__(self, network):
        super().__init__()
        self.network, self.batches = network, []

    def forward(self, x, timestep, context, **kwargs):
        self.batches.append(x.shape[0])
        return self.network(x, timestep, context, **kwargs)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0])
def test_scales_up_to_one_run_only_the_conditional_branch(scale):
    teacher = CountingNetwork(tiny_dit(0))
    x0, noise, context = toy_batch()
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    out = guided_denoise(teacher, noise, t, context, None, scale)
    assert teacher.batches == [3]
    assert torch.equal(out, denoise(teacher.network, noise, t, context))


def test_scales_above_one_combine_both_branches():
    teacher = CountingNetwork(tiny_dit(0))
    x0, noise, context = toy_batch()
    negative = torch.randn(context.shape[1], context.shape[2], dtype=torch.float64)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    out = guided_denoise(teacher, noise, t, context, negative, 1.5)
    assert teacher.batches == [6]
    cond = denoise(teacher.network, noise, t, context)
    uncond = denoise(teacher.network, noise, t, negative.expand(3, -1, -1))
    assert torch.allclose(out, uncond + 1.5 * (cond - uncond), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["rcm", "dcm"])
def test_distillation_teacher_passes_without_guidance(method):
    """sCM, DMD and dCM call the teacher with the batch alone (never doubled) when w ≤ 1."""
    teacher = CountingNetwork(tiny_dit(0))
    cfg = OmegaConf.structured(DistillConfig(method=method, guidance_scale=0.8, tangent_warmup=0))
    distiller = Distiller(cfg, tiny_dit(1), teacher, tiny_dit(2), None, torch.Generator().manual_seed(0))
    x0, _, context = toy_batch()
    distiller.loss({"latent": x0, "embed": context}, iteration=0)
    assert teacher.batches and set(teacher.batches) == {3}


def test_teacher_sampler_without_guidance_and_negative_scale_refused():
    teacher = CountingNetwork(tiny_dit(0))
    x0, noise, context = toy_batch()
    sample_batch(teacher, SamplerSetting("teacher_3", TEACHER, 3, guidance_scale=1.0), noise, context, torch.Generator())
    assert teacher.batches == [3, 3, 3]
    with pytest.raises(ValueError, match="--guidance"):
        SamplerSetting("teacher_3", TEACHER, 3, guidance_scale=-1.0)
