"""Which iterations update which network, and the counters behind EMA and DMD (rcm_spec.md §4)."""
import random

import pytest
from omegaconf import OmegaConf

from rcm.config import DistillConfig
from rcm.distill import schedule
from rcm.distill.distiller import FAKE_SCORE, STUDENT, Distiller, dmd_active, step_kind


def kinds(method, n=16, warmup=6, freq=5, loss_scale_dmd=1.0):
    return [step_kind(i, method, warmup, freq, loss_scale_dmd) for i in range(n)]


def test_rcm_is_scm_only_during_warmup_then_alternates_from_the_warmups_end():
    got = kinds("rcm")
    assert got[:6] == [STUDENT] * 6
    # The phase counts from the end of the warmup (6, 11, 16, ...), not from iteration 0 (10, 15, ...).
    assert [i for i in range(6, 16) if got[i] == STUDENT] == [6, 11]
    assert [dmd_active(i, "rcm", 6, 1.0) for i in (0, 5, 6, 10)] == [False, False, True, True]


def test_scm_and_dcm_train_only_the_student():
    assert kinds("scm") == [STUDENT] * 16
    assert kinds("dcm") == [STUDENT] * 16
    assert not any(dmd_active(i, "scm", 6, 1.0) for i in range(16))


def test_dmd_alternates_from_the_start():
    got = kinds("dmd")
    assert [i for i, k in enumerate(got) if k == STUDENT] == [0, 5, 10, 15]
    assert dmd_active(0, "dmd", 6, 1.0)


def test_rcm_without_dmd_is_scm():
    assert kinds("rcm", loss_scale_dmd=0.0) == [STUDENT] * 16


def test_the_14b_schedule_without_warmup():
    got = kinds("rcm", n=25, warmup=0, freq=10)
    assert [i for i, k in enumerate(got) if k == STUDENT] == [0, 10, 20]
    assert dmd_active(0, "rcm", 0, 1.0)


@pytest.mark.parametrize("method", ["rcm", "dmd"])
def test_counters_count_the_steps_each_network_took_before(method):
    """k_s at a student step is the number of student steps before it; k_c at a critic step the number of
    critic steps before it (the reference's effective iterations), for any warmup and frequency."""
    rng = random.Random(0)
    for _ in range(40):
        warmup, freq = rng.randrange(0, 30), rng.randrange(1, 12)
        args = (method, warmup, freq, 1.0)
        students = critics = 0
        for i in range(120):
            if step_kind(i, *args) == STUDENT:
                assert schedule.student_iteration(i, *args) == students, (warmup, freq, i)
                students += 1
            else:
                assert schedule.critic_iteration(i, *args) == critics, (warmup, freq, i)
                critics += 1


def test_critic_simulation_steps_use_the_critics_own_counter():
    cfg = OmegaConf.structured(DistillConfig(method="rcm", tangent_warmup=6, student_update_freq=5))
    distiller = Distiller(cfg, None, None, None, None, None)
    steps = {i: distiller.simulation_steps(i) for i in range(6, 17)}
    # 6, 11 and 16 are student steps (k_s = 6, 7, 8); the critic steps between count 0, 1, 2, ... on their own.
    assert steps == {6: 3, 7: 1, 8: 2, 9: 3, 10: 4, 11: 4, 12: 1, 13: 2, 14: 3, 15: 4, 16: 1}
    cfg.max_simulation_steps = 2
    assert [distiller.simulation_steps(i) for i in (7, 8, 9, 10)] == [1, 2, 1, 2]
