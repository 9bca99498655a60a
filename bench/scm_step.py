"""One sCM student step of Wan2.1 1.3B at 480p (32,760 tokens, batch 1, bf16 autocast) on one GPU:
the fused one-forward JVP step (tangents carried through the network, Triton JVP attention) against the
reference's two passes (torch.func.jvp without grad, then a forward with grad), in one run.

    python bench/scm_step.py [--layers 30] [--frames 21 --height 60 --width 104] [--iters 5] [--compile]

Both variants checkpoint every block's activations (they do not fit otherwise) and use our Triton
attention for the primal (cuDNN backward from our log-sum-exp). Two two-pass references: the reference's
``torch.func.jvp`` pass, and our explicit tangent forward run as a separate no-grad pass (the fastest
JVP pass there is; with ``--compile`` only this one, as functorch transforms do not enter compiled
blocks). The primal forward F and the tangent forward are timed alone too: two-pass − fused is one F,
so fused / two-pass = fused / (fused + F) is the best a one-forward step can do. Prints a table last.
"""
from __future__ import annotations

import argparse
import time

import torch

from rcm.distill.flops import BACKWARD, TANGENT, wan_dit_forward_flops
from rcm.distill.jvp import velocity_and_tangent, velocity_tangent_two_pass
from rcm.distill.scm import scm_loss
from rcm.distill.trigflow import velocity
from rcm.models.wan_dit import WanDiT, WanDiTConfig
from rcm.parallel.activation_checkpointing import apply_activation_checkpointing
from rcm.parallel.compile import apply_compile

H100_BF16_DENSE_PEAK = 989e12


def velocity_tangent_two_pass_explicit(network, x_t, t, x_dot, t_dot, context):
    """A separate no-grad pass of the explicit tangent forward, then a forward with grad."""
    with torch.no_grad():
        _, tangent = velocity_and_tangent(network, x_t, t, x_dot, t_dot, context)
    return velocity(network, x_t, t, context), tangent


def time_no_grad(function, iters: int) -> float:
    """Median seconds of ``function()`` under no_grad and bf16 autocast (after one warm-up)."""
    times = []
    for i in range(iters + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            function()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_variant(model, inputs, jvp, iters: int):
    x0, noise, t, context, teacher_x0 = inputs
    times = []
    cuda = x0.is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(iters + 2):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=cuda):
            out = scm_loss(model, x0, noise, t, context, teacher_x0, 2000, 1000, 100.0, jvp=jvp)
        out.loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    grad_norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None)).item()
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return sorted(times)[len(times) // 2], memory, out.loss.item(), grad_norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=60)
    parser.add_argument("--width", type=int, default=104)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--no-checkpointing", action="store_true", help="keep all activations (fits only short videos)")
    parser.add_argument("--compile", action="store_true", help="also measure with torch.compile of each block (rcm/parallel/compile.py)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that only checks the script works")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.frames, args.height, args.width, args.iters = 1, 1, 4, 4, 1
    torch.manual_seed(0)
    config = WanDiTConfig(dim=1536, ffn_dim=8960, freq_dim=256, text_dim=4096, text_len=512, num_heads=12,
                          num_layers=args.layers, in_channels=16, out_channels=16, patch_size=(1, 2, 2),
                          attention_backend="auto" if args.smoke else "triton")
    device = torch.device("cpu" if args.smoke else "cuda")
    model = WanDiT(config).to(device)
    with torch.no_grad():  # Wan zero-inits the head; random weights exercise every path
        model.head.head.weight.normal_(std=0.02)
    builds = [("eager", model)]
    if args.compile:
        compiled = WanDiT(config).to(device)
        compiled.load_state_dict(model.state_dict())
        apply_compile(compiled)
        builds.append(("compiled", compiled))
    if not args.no_checkpointing:
        for _, network in builds:
            apply_activation_checkpointing(network)
    shape = (1, 16, args.frames, args.height, args.width)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(shape, device=device, generator=g)
    noise = torch.randn(shape, device=device, generator=g)
    teacher_x0 = x0 + 0.1 * torch.randn(shape, device=device, generator=g)
    context = torch.randn(1, 512, 4096, device=device, generator=g)
    t = torch.tensor([0.9], dtype=torch.float64, device=device)
    inputs = (x0, noise, t, context, teacher_x0)
    x_t = torch.cos(t).float() * x0 + torch.sin(t).float() * noise
    x_dot, t_dot = torch.randn_like(x_t), torch.cos(t) * torch.sin(t)

    # Agreement of the fused and torch.func.jvp tangents at this shape (bf16).
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        _, fused_tangent = velocity_and_tangent(model, x_t, t, x_dot, t_dot, context)
        _, reference_tangent = velocity_tangent_two_pass(model, x_t, t, x_dot, t_dot, context)
    tangent_error = ((fused_tangent - reference_tangent).norm() / reference_tangent.norm()).item()
    del fused_tangent, reference_tangent

    forward = wan_dit_forward_flops(config, tokens, 512)
    step_flops = forward.linear * (1 + TANGENT.linear + BACKWARD.linear) + forward.attention * (1 + TANGENT.attention + BACKWARD.attention)
    rows = []
    for build, network in builds:
        fused = run_variant(network, inputs, velocity_and_tangent, args.iters)
        rows.append((f"{build}: fused one-forward (ours)", fused))
        if build == "eager":
            rows.append((f"{build}: two-pass, torch.func.jvp (reference)", run_variant(network, inputs, velocity_tangent_two_pass, args.iters)))
        two_pass = run_variant(network, inputs, velocity_tangent_two_pass_explicit, args.iters)
        rows.append((f"{build}: two-pass, explicit tangent pass", two_pass))
        if device.type == "cuda":
            primal = time_no_grad(lambda: velocity(network, x_t, t, context), args.iters)
            tangent = time_no_grad(lambda: velocity_and_tangent(network, x_t, t, x_dot, t_dot, context), args.iters)
            rows.append((f"{build}: primal forward F alone (no grad)", (primal, 0.0, float("nan"), float("nan"))))
            rows.append((f"{build}: tangent forward alone (no grad)", (tangent, 0.0, float("nan"), float("nan"))))
            rows.append((f"{build}: floor fused / (fused + F)", (fused[0] / (fused[0] + primal), 0.0, float("nan"), float("nan"))))
        rows.append((f"{build}: fused / two-pass explicit", (fused[0] / two_pass[0], 0.0, float("nan"), float("nan"))))
        if build == "eager":
            rows.append((f"{build}: fused / two-pass torch.func.jvp", (fused[0] / rows[1][1][0], 0.0, float("nan"), float("nan"))))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    print(f"\ndevice {name}; torch {torch.__version__}; layers {args.layers}; tokens {tokens}; bf16 autocast; "
          f"activation checkpointing {'off' if args.no_checkpointing else 'on every block'}; tangent rel. error fused vs func.jvp {tangent_error:.2e}")
    print(f"step model FLOPs (fwd+tangent+bwd, recompute excluded): {step_flops / 1e12:.1f} TFLOP")
    print("| variant | step time (s) or ratio | peak memory (GiB) | TFLOP/s | MFU vs 989 | loss | grad norm |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, (seconds, memory, loss, grad_norm) in rows:
        if memory == 0.0:
            print(f"| {label} | {seconds:.3f} | | | | | |")
            continue
        tflops = step_flops / seconds / 1e12
        print(f"| {label} | {seconds:.3f} | {memory:.1f} | {tflops:.0f} | {tflops * 1e12 / H100_BF16_DENSE_PEAK:.1%} | {loss:.3f} | {grad_norm:.4g} |")


if __name__ == "__main__":
    main()
