"""Which iterations update which network, for every method."""
from rcm.distill.distiller import FAKE_SCORE, STUDENT, dmd_active, step_kind


def kinds(method, n=16, warmup=6, freq=5, loss_scale_dmd=1.0):
    return [step_kind(i, method, warmup, freq, loss_scale_dmd) for i in range(n)]


def test_rcm_is_scm_only_during_warmup_then_alternates():
    got = kinds("rcm")
    assert got[:6] == [STUDENT] * 6
    assert [i for i in range(6, 16) if got[i] == STUDENT] == [10, 15]
    assert all(got[i] == FAKE_SCORE for i in range(6, 16) if i % 5)
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
