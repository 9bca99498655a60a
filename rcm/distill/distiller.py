"""One training iteration of every method: which network updates, and its loss.

The schedule (rcm_spec.md §4, ``rcm.distill.schedule``): during the tangent warmup only the student trains
(sCM alone). Afterwards, for methods with a fake score (rCM, DMD), every ``student_update_freq``-th iteration
counted from the warmup's end is a student step (sCM + DMD gradients summed) and the others update the fake
score. Each loss is summed over a sample's elements and averaged over the batch (docs/recipe.md says why).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rcm.distill import dcm, dmd, schedule
from rcm.distill.flow_matching import flow_matching_loss
# Re-exported: callers name the roles and ask about the method through this module.
from rcm.distill.schedule import FAKE_SCORE, STUDENT, dmd_active, step_kind, uses_fake_score, uses_scm  # noqa: F401
from rcm.distill.scm import scm_loss
from rcm.distill.time import TimeSamplerConfig, as_time_sampler_config, sample_rf_time, sample_trig_time
from rcm.distill.trigflow import denoise, guided_denoise, noisy


@dataclass
class StepResult:
    """The loss to backpropagate and the numbers to log."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Distiller:
    """Losses of one method for a batch; owns no optimizer (the training loop does)."""

    def __init__(
        self,
        cfg: Any,
        student: nn.Module,
        teacher: nn.Module | None,
        fake_score: nn.Module | None,
        negative_embedding: torch.Tensor | None,
        generator: torch.Generator,
    ):
        self.cfg = cfg
        self.method = cfg.method
        self.student = student
        self.teacher = teacher
        self.fake_score = fake_score
        self.negative_embedding = negative_embedding
        self.generator = generator

    # -- random draws, all from the run's generator so a resumed run draws the same numbers --
    def _randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def _trig_time(self, sampler: TimeSamplerConfig, n: int, device) -> torch.Tensor:
        return sample_trig_time(as_time_sampler_config(sampler), n, self.generator, device)

    def _teacher_x0(self, x_t, t, context) -> torch.Tensor:
        with torch.no_grad():
            return guided_denoise(self.teacher, x_t, t, context, self.negative_embedding, self.cfg.guidance_scale)

    def _schedule_args(self) -> tuple:
        c = self.cfg
        return self.method, c.tangent_warmup, c.student_update_freq, c.loss_scale_dmd

    def kind(self, iteration: int) -> str:
        """STUDENT or FAKE_SCORE for this iteration."""
        return step_kind(iteration, *self._schedule_args())

    def simulation_steps(self, iteration: int) -> int:
        """Backward-simulation steps of this iteration's DMD generator: from the student's counter k_s at a
        student step, from the critic's own counter k_c at a fake-score step."""
        counter = schedule.student_iteration if self.kind(iteration) == STUDENT else schedule.critic_iteration
        return schedule.num_simulation_steps(counter(iteration, *self._schedule_args()), self.cfg.max_simulation_steps)

    def loss(self, batch: dict[str, torch.Tensor], iteration: int) -> StepResult:
        """The loss of this iteration's step for the network ``kind(iteration)`` names; every counter the step
        needs derives from ``iteration`` (``rcm.distill.schedule``)."""
        if self.method == "flow_matching":
            return self._flow_matching(batch)
        if self.kind(iteration) == FAKE_SCORE:
            return self._fake_score_step(batch, iteration)
        return self._student_step(batch, iteration)

    def _flow_matching(self, batch) -> StepResult:
        x0, context = batch["latent"], batch["embed"]
        drop = torch.rand(x0.shape[0], generator=self.generator, device=x0.device) < self.cfg.unconditional_probability
        if self.negative_embedding is not None and drop.any():
            negative = self.negative_embedding.to(context.dtype).expand(x0.shape[0], -1, -1)
            context = torch.where(drop[:, None, None], negative, context)
        s = sample_rf_time(as_time_sampler_config(self.cfg.flow_matching_time), x0.shape[0], self.generator, x0.device)
        loss = flow_matching_loss(self.student, x0, self._randn_like(x0), s, context)
        return StepResult(loss, {"loss/flow_matching": loss.item()})

    def _student_step(self, batch, iteration: int) -> StepResult:
        c = self.cfg
        x0, context = batch["latent"], batch["embed"]
        total = x0.new_zeros((), dtype=torch.float64)
        logs: dict[str, float] = {}
        if self.method == "dcm":
            total = total + self._dcm_loss(x0, context)
            logs["loss/dcm"] = total.item()
        elif uses_scm(self.method, c.loss_scale):
            t = self._trig_time(c.scm_time, x0.shape[0], x0.device)
            noise = self._randn_like(x0)
            teacher_x0 = self._teacher_x0(noisy(x0, noise, t), t, context)
            out = scm_loss(
                self.student, x0, noise, t, context, teacher_x0, iteration, c.tangent_warmup, c.loss_scale
            )
            total = total + out.loss
            logs.update({"loss/scm": out.loss.item(), "scm/nonfinite": out.num_nonfinite, "scm/g_norm": out.g_norm})
        if dmd_active(iteration, self.method, c.tangent_warmup, c.loss_scale_dmd):
            generated = self._generate(x0, context, self.simulation_steps(iteration), with_grad=True)
            fake_x0, real_x0, _ = self._critic_targets(generated, context, need_real=True)
            out = dmd.dmd_loss(generated, fake_x0, real_x0, c.loss_scale_dmd)
            total = total + out.loss
            logs.update({"loss/dmd": out.loss.item(), "dmd/nonfinite": out.num_nonfinite})
        return StepResult(total, logs)

    def _fake_score_step(self, batch, iteration: int) -> StepResult:
        x0, context = batch["latent"], batch["embed"]
        with torch.no_grad():
            generated = self._generate(x0, context, self.simulation_steps(iteration), with_grad=False)
        fake_x0, _, t = self._critic_targets(generated, context, need_real=False, fake_with_grad=True)
        loss = dmd.fake_score_loss(generated, fake_x0, t)
        return StepResult(loss, {"loss/fake_score": loss.item()})

    def _generate(self, like: torch.Tensor, context, num_steps: int, with_grad: bool) -> torch.Tensor:
        c = self.cfg
        batch = like.shape[0]
        times = dmd.backward_simulation_times(
            num_steps, batch, as_time_sampler_config(c.dmd_time), c.dmd_fix_timesteps, self.generator, like.device
        )
        student_x0 = lambda x, t, ctx: denoise(self.student, x, t, ctx)  # noqa: E731
        return dmd.backward_simulation(
            student_x0, self._randn_like(like), times, context, lambda: self._randn_like(like), grad_last_step=with_grad
        )

    def _critic_targets(self, generated, context, need_real: bool, fake_with_grad: bool = False):
        t = self._trig_time(self.cfg.dmd_time, generated.shape[0], generated.device)
        x_d = noisy(generated.detach(), self._randn_like(generated), t)
        with torch.set_grad_enabled(fake_with_grad):
            fake_x0 = denoise(self.fake_score, x_d, t, context)
        real_x0 = self._teacher_x0(x_d, t, context) if need_real else None
        return fake_x0, real_x0, t

    def _dcm_loss(self, x0, context) -> torch.Tensor:
        c = self.cfg
        times = dcm.dcm_times(x0.shape[0], c.dcm_num_steps, c.dcm_skip_interval, c.dcm_shift, self.generator, x0.device)
        x_start = noisy(x0, self._randn_like(x0), times[0])
        x_end = dcm.teacher_trigflow_walk(lambda x, t: self._teacher_x0(x, t, context), x_start, times)
        with torch.no_grad():
            target = denoise(self.student, x_end, times[-1], context)
        return dcm.dcm_loss(denoise(self.student, x_start, times[0], context), target, c.loss_scale)
