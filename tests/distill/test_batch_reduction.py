"""Every loss is summed over a sample's elements and averaged over the batch (docs/recipe.md, "Batch
reduction"): the loss and the gradient of a batch are the means of those of its samples taken alone, so a
learning rate means the same at any batch size (the reference sums; with its batch of 1 per rank the two agree)."""
import pytest
import torch

from rcm.distill import dcm, dmd
from rcm.distill.scm import scm_loss
from tests.helpers import tiny_dit, toy_batch


def _loss_and_grad(student, loss_fn, rows):
    student.zero_grad(set_to_none=True)
    loss = loss_fn(rows)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])


def _check_mean_of_samples(student, loss_fn, batch):
    whole_loss, whole_grad = _loss_and_grad(student, loss_fn, slice(None))
    singles = [_loss_and_grad(student, loss_fn, slice(i, i + 1)) for i in range(batch)]
    assert whole_loss.item() == pytest.approx(sum(s[0].item() for s in singles) / batch, rel=1e-12)
    assert torch.allclose(whole_grad, sum(s[1] for s in singles) / batch, rtol=1e-10, atol=1e-14)
    # ... which is 1/B of the reference's sum over the batch.
    assert whole_loss.item() * batch == pytest.approx(sum(s[0].item() for s in singles), rel=1e-12)


def test_scm_loss_is_the_batch_mean():
    student, teacher = tiny_dit(1), tiny_dit(0)
    x0, noise, context = toy_batch()
    t = torch.tensor([0.4, 0.9, 1.3], dtype=torch.float64)
    with torch.no_grad():
        from rcm.distill.trigflow import denoise, noisy

        teacher_x0 = denoise(teacher, noisy(x0, noise, t), t, context)

    def loss_fn(rows):
        return scm_loss(student, x0[rows], noise[rows], t[rows], context[rows], teacher_x0[rows], 500, 1000, 100.0).loss

    _check_mean_of_samples(student, loss_fn, 3)


def test_dmd_fake_score_and_dcm_losses_are_batch_means():
    student = tiny_dit(1)
    x0, noise, context = toy_batch()
    t = torch.tensor([0.4, 0.9, 1.3], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    fake, real = torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.randn(x0.shape, generator=g, dtype=torch.float64)
    from rcm.distill.trigflow import denoise

    def generated(rows):
        return denoise(student, noise[rows], t[rows], context[rows])

    _check_mean_of_samples(student, lambda rows: dmd.dmd_loss(generated(rows), fake[rows], real[rows], 1.0).loss, 3)
    _check_mean_of_samples(student, lambda rows: dmd.fake_score_loss(real[rows], generated(rows), t[rows]), 3)
    _check_mean_of_samples(student, lambda rows: dcm.dcm_loss(generated(rows), fake[rows], 100.0), 3)
