"""Few-step student sampler and the teacher's flow-matching Euler sampler."""
import math

import pytest
import torch

from rcm.distill.sampler import sample_student, sample_teacher, student_time_grid, teacher_euler_step, teacher_time_grid


def test_student_time_grid():
    assert student_time_grid(1) == [math.atan(80.0), 0.0]
    assert student_time_grid(2) == [math.atan(80.0), 1.5, 0.0]
    assert student_time_grid(4, sigma_max=1600) == [math.atan(1600.0), 1.5, 1.4, 1.0, 0.0]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="1 to 4"):
            student_time_grid(bad)


def test_student_time_grid_with_other_intermediate_times():
    assert student_time_grid(3, mid_times=(1.2, 0.8, 0.5)) == [math.atan(80.0), 1.2, 0.8, 0.0]
    with pytest.raises(ValueError, match="need 2 intermediate times"):
        student_time_grid(3, mid_times=(1.2,))
    with pytest.raises(ValueError, match="must decrease"):
        student_time_grid(3, mid_times=(1.0, 1.2))
    with pytest.raises(ValueError, match="must decrease"):
        student_time_grid(2, mid_times=(1.6,))  # above arctan(80) = 1.5583


def test_student_sampler_visits_the_grid_and_returns_the_last_x0():
    seen = []
    target = torch.full((2, 1, 1, 1, 1), 3.0)

    def denoiser(x, t, ctx):
        seen.append(t[0].item())
        return target

    out = sample_student(denoiser, torch.randn(2, 1, 1, 1, 1), None, 3, generator=torch.Generator().manual_seed(0))
    assert seen == pytest.approx(student_time_grid(3)[:-1])
    assert torch.equal(out, target)
    seen.clear()
    sample_student(denoiser, torch.randn(2, 1, 1, 1, 1), None, 3, generator=torch.Generator().manual_seed(0),
                   mid_times=(1.2, 0.7))
    assert seen == pytest.approx([math.atan(80.0), 1.2, 0.7])


def test_teacher_grid_and_exact_sampling_of_a_point_mass():
    grid = teacher_time_grid(50, 5.0)
    assert grid[0].item() == pytest.approx(math.pi / 2) and grid[-1].item() == 0.0
    assert (grid[:-1] > grid[1:]).all()
    # A denoiser that always predicts the true x0 of a point mass: Euler is then exact.
    x0 = torch.randn(3, 2, 1, 2, 2, dtype=torch.float64)
    out = sample_teacher(lambda x, t, ctx: x0, torch.randn_like(x0), None, num_steps=7, shift=3.0)
    assert torch.allclose(out, x0, atol=1e-12)


def test_teacher_euler_step_stays_on_the_noising_path():
    x0, eps = torch.randn(2, 1, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 1, 2, 2, dtype=torch.float64)
    t, t_next = torch.tensor([1.2, 0.8], dtype=torch.float64), torch.tensor([0.9, 0.3], dtype=torch.float64)

    def at(time):
        return torch.cos(time).view(-1, 1, 1, 1, 1) * x0 + torch.sin(time).view(-1, 1, 1, 1, 1) * eps

    assert torch.allclose(teacher_euler_step(at(t), t, t_next, x0), at(t_next), atol=1e-12)
