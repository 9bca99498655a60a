"""Drawing latents for prompts: the student's few-step sampler or the teacher's Euler sampler with CFG,
from noise seeded per prompt (or per shard) so the result does not depend on who draws it."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from rcm.distill.sampler import sample_student, sample_teacher, student_time_grid
from rcm.distill.trigflow import check_guidance_scale, denoise, guided_denoise, pad_tokens, uses_guidance

STUDENT, TEACHER = "student", "teacher"


@dataclass(frozen=True)
class SamplerSetting:
    """One way of sampling a network: `kind` student (1–4 steps) or teacher (`steps` Euler steps with CFG)."""

    name: str  # key of the samples in outputs, e.g. "student_2", "teacher_50"
    kind: str
    steps: int
    guidance_scale: float = 1.0  # teacher only
    shift: float = 5.0  # teacher only
    sigma_max: float = 80.0  # student only
    mid_times: tuple[float, ...] | None = None  # student only; None: the paper's (1.5, 1.4, 1.0)

    def __post_init__(self):
        if self.kind not in (STUDENT, TEACHER):
            raise ValueError(f"sampler kind must be {STUDENT!r} or {TEACHER!r}, got {self.kind!r}")
        if self.kind == STUDENT and not 1 <= self.steps <= 4:
            raise ValueError(f"the student samples with 1 to 4 steps, got {self.steps}")
        if self.kind == TEACHER and self.steps < 1:
            raise ValueError(f"the teacher needs at least 1 step, got {self.steps}")
        if self.kind == STUDENT:
            student_time_grid(self.steps, self.sigma_max, self.mid_times)  # a bad grid fails here, before sampling
        check_guidance_scale(self.guidance_scale, f"{self.name}: the CFG scale (--guidance)")

    def describe(self) -> dict:
        """The setting as a plain dict (recorded in outputs, compared on resume)."""
        return asdict(self)


@torch.no_grad()
def sample_batch(
    network: torch.nn.Module,
    setting: SamplerSetting,
    noise: torch.Tensor,
    context_BLD: torch.Tensor,
    generator: torch.Generator,
    negative_embedding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latents (B,C,T,H,W) from initial noise (B,C,T,H,W) and padded contexts (B,L,D).

    The student draws its re-noising from `generator`; the teacher is deterministic given the noise.
    """
    if setting.kind == STUDENT:
        x0 = lambda x, t, ctx: denoise(network, x, t, ctx)  # noqa: E731
        return sample_student(x0, noise, context_BLD, setting.steps, setting.sigma_max, generator, setting.mid_times)
    if uses_guidance(setting.guidance_scale) and negative_embedding is None:
        raise ValueError(
            f"{setting.name}: CFG scale {setting.guidance_scale} needs the negative prompt's embedding; "
            "pass --negative-embedding PATH (or --guidance 1)"
        )
    x0 = lambda x, t, ctx: guided_denoise(network, x, t, ctx, negative_embedding, setting.guidance_scale)  # noqa: E731
    return sample_teacher(x0, noise, context_BLD, setting.steps, setting.shift)


def sample_prompt(
    network: torch.nn.Module,
    setting: SamplerSetting,
    embedding_LD: torch.Tensor,
    count: int,
    latent_shape: tuple[int, ...],
    seed: int,
    text_len: int | None = None,
    negative_embedding: torch.Tensor | None = None,
) -> torch.Tensor:
    """`count` latents (count,C,T,H,W) of one prompt, from a generator seeded with `seed` alone.

    Every setting of a prompt starts from the same noise, so teacher and student samples pair up.
    """
    device = next(network.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    embedding = embedding_LD.to(device).unsqueeze(0)
    context = pad_tokens(embedding, text_len or embedding.shape[1]).expand(count, -1, -1)
    noise = torch.randn((count, *latent_shape), generator=generator, device=device)
    negative = None if negative_embedding is None else negative_embedding.to(device)
    return sample_batch(network, setting, noise, context, generator, negative)
