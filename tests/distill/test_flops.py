"""The analytic FLOP counts behind the benchmarks' MFU against torch's FlopCounterMode on a real run
(float64, CPU, the math attention backend whose every product is an aten matmul that the counter sees)."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rcm.config import DistillConfig
from rcm.distill.distiller import Distiller
from rcm.distill.flops import ForwardFlops, bf16_peak_flops, rcm_student_step_flops, wan_dit_forward_flops
from rcm.models.wan_dit import build_wan_dit

FIELDS = dict(dim=64, ffn_dim=96, freq_dim=32, text_dim=48, text_len=8, num_heads=4, num_layers=2,
              in_channels=4, out_channels=4, patch_size=(1, 2, 2), attention_backend="math")
HEIGHT = WIDTH = 8  # 16 tokens per latent frame


def tokens(frames: int) -> int:
    return frames * HEIGHT * WIDTH // 4


def counted(run) -> tuple[int, int]:
    """(linear, attention) FLOPs that FlopCounterMode sees: attention's products are its only bmm."""
    with FlopCounterMode(display=False) as counter:
        run()
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    attention = by_op.pop("aten.bmm", 0)
    return sum(by_op.values()), attention


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    student = build_wan_dit(FIELDS).double()
    with torch.no_grad():
        student.head.head.weight.normal_(std=0.02)  # Wan zero-inits the head; the DMD gradient needs it
    return student, copy.deepcopy(student), copy.deepcopy(student).requires_grad_(False)


def test_forward_flops_are_the_model_matmuls(networks):
    """One forward: the formula's linear and attention FLOPs, plus the text and time embeddings it leaves out."""
    model = networks[0]
    frames, text = 3, FIELDS["text_len"]
    x = torch.randn(1, 4, frames, HEIGHT, WIDTH, dtype=torch.float64)
    linear, attention = counted(lambda: model(x, torch.rand(1, dtype=torch.float64),
                                              torch.randn(1, text, FIELDS["text_dim"], dtype=torch.float64)))
    dim, freq = FIELDS["dim"], FIELDS["freq_dim"]
    text_embedding = text * (2 * FIELDS["text_dim"] * dim + 2 * dim * dim)
    time_embedding = 2 * freq * dim + 2 * dim * dim + 2 * dim * 6 * dim
    expected = wan_dit_forward_flops(model.config, tokens(frames), text)
    assert attention == expected.attention
    assert linear == expected.linear + text_embedding + time_embedding


@pytest.mark.parametrize("student_iteration", [0, 1, 3])
def test_student_step_flops_follow_the_step(networks, student_iteration):
    """A whole rCM student step (sCM with tangents + DMD with 1, 2 or 4 simulation steps, loss and backward).
    Between two video lengths every token-dependent FLOP changes and the text and time embeddings cancel, so
    the difference must match the formula exactly. The math backend's attention backward costs 2× (no
    recompute) and its tangent recomputes the self-attention forward (one more)."""
    student, fake_score, teacher = networks
    negative = torch.randn(FIELDS["text_len"], FIELDS["text_dim"], dtype=torch.float64)
    config = DistillConfig(method="rcm", tangent_warmup=0, student_update_freq=5)

    def run(frames: int):
        batch = {"latent": torch.randn(1, 4, frames, HEIGHT, WIDTH, dtype=torch.float64),
                 "embed": torch.randn(1, FIELDS["text_len"], FIELDS["text_dim"], dtype=torch.float64)}
        distiller = Distiller(config, student, teacher, fake_score, negative, torch.Generator().manual_seed(0))
        iteration = 5 * student_iteration  # without warmup, student step k_s is iteration 5·k_s
        assert distiller.kind(iteration) == "student"
        return counted(lambda: distiller.loss(batch, iteration).loss.backward())

    def formula(frames: int) -> tuple[float, float]:
        n = tokens(frames)
        step = rcm_student_step_flops(student.config, n, FIELDS["text_len"], student_iteration,
                                      backward=ForwardFlops(linear=2.0, attention=2.0))
        self_attention = FIELDS["num_layers"] * 4 * n * n * FIELDS["dim"]
        return step.linear, step.attention + self_attention

    (linear_a, attention_a), (linear_b, attention_b) = run(3), run(6)
    (formula_linear_a, formula_attention_a), (formula_linear_b, formula_attention_b) = formula(3), formula(6)
    assert linear_b - linear_a == formula_linear_b - formula_linear_a
    assert attention_b - attention_a == formula_attention_b - formula_attention_a
    student.zero_grad(set_to_none=True)


def test_peak_lookup():
    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16_peak_flops("NVIDIA H200") == 989e12
    assert bf16_peak_flops("cpu") is None
