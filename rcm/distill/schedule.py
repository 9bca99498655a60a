"""Which network an iteration updates, and the counters that depend on it (rcm_spec.md §4).

Every quantity is a function of the 0-based iteration alone, so a resumed run (or another world size)
follows the same schedule without storing it. With a fake score (rCM, DMD):

- a student step is ``i < warmup or (i − warmup) mod freq == 0``; the others update the fake score;
- the effective student iteration is ``k_s(i) = i`` before the warmup ends, ``warmup + (i − warmup) // freq``
  after it (at a student step it counts the student steps before this one);
- the critic iteration is ``k_c(i) = i − k_s(i) − 1`` (at a critic step, the critic steps before this one).

EMA β and the student's DMD simulation steps use ``k_s``; the critic's simulation steps use ``k_c``.
The warmup is sCM's tangent warmup, so it shapes the schedule of rCM only: DMD alone has no sCM term to
warm up and starts alternating at iteration 0 (the reference's DMD baseline sets the warmup to 0).
"""
from __future__ import annotations

STUDENT = "student"
FAKE_SCORE = "fake_score"


def uses_scm(method: str, loss_scale: float) -> bool:
    """Whether the sCM term is active."""
    return method in ("rcm", "scm") and loss_scale > 0


def uses_fake_score(method: str, loss_scale_dmd: float) -> bool:
    """Whether a fake score (critic) is trained, i.e. DMD is active."""
    return method in ("rcm", "dmd") and loss_scale_dmd > 0


def schedule_warmup(method: str, tangent_warmup: int) -> int:
    """The iterations at the start that update only the student with sCM alone (0 for DMD-only)."""
    return max(0, tangent_warmup) if method == "rcm" else 0


def step_kind(iteration: int, method: str, tangent_warmup: int, student_update_freq: int, loss_scale_dmd: float) -> str:
    """Which network iteration ``iteration`` (0-based) updates: STUDENT or FAKE_SCORE."""
    if not uses_fake_score(method, loss_scale_dmd):
        return STUDENT
    warmup = schedule_warmup(method, tangent_warmup)
    if iteration < warmup or (iteration - warmup) % student_update_freq == 0:
        return STUDENT
    return FAKE_SCORE


def student_iteration(iteration: int, method: str, tangent_warmup: int, student_update_freq: int, loss_scale_dmd: float) -> int:
    """The effective student iteration k_s(i): student steps taken before iteration i (at a student step)."""
    if not uses_fake_score(method, loss_scale_dmd):
        return iteration
    warmup = schedule_warmup(method, tangent_warmup)
    if iteration < warmup:
        return iteration
    return warmup + (iteration - warmup) // student_update_freq


def critic_iteration(iteration: int, method: str, tangent_warmup: int, student_update_freq: int, loss_scale_dmd: float) -> int:
    """The critic iteration k_c(i) = i − k_s(i) − 1: critic steps taken before iteration i (at a critic step)."""
    return iteration - student_iteration(iteration, method, tangent_warmup, student_update_freq, loss_scale_dmd) - 1


def dmd_active(iteration: int, method: str, tangent_warmup: int, loss_scale_dmd: float) -> bool:
    """DMD joins the student loss once the sCM warmup is over (rCM) or from the start (DMD-only)."""
    if not uses_fake_score(method, loss_scale_dmd):
        return False
    return iteration >= schedule_warmup(method, tangent_warmup)


def num_simulation_steps(counter: int, max_steps: int = 4) -> int:
    """Backward-simulation steps n = (counter mod max_steps) + 1: the generator cycles through 1..max_steps."""
    return counter % max_steps + 1
