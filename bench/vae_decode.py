"""Wan2.1 VAE decode of one 480p latent (16×21×60×104 → 81 frames 832×480) on one GPU: dtype, cuDNN
autotuning and memory format, each in one run; with --chunks, bf16 decode by latent frames per chunk.

    python bench/vae_decode.py [--repeats 3] [--chunks 1 3 7 21]

Random weights (timing does not depend on them). Prints a table last.
"""
from __future__ import annotations

import argparse
import time

import torch

from rcm.models.wan_vae import WanVAE


def time_decode(vae: WanVAE, latent: torch.Tensor, repeats: int, chunk_frames: int = 1) -> float:
    """Median seconds of a chunked decode after one warm-up."""
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            vae.decode(latent, chunk_frames=chunk_frames)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Run every variant and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", type=int, nargs="*", help="only bf16: time these latent frames per chunk")
    args = parser.parse_args()
    latent = torch.randn(1, 16, 21, 60, 104, device="cuda")
    if args.chunks:
        vae = WanVAE().to("cuda", torch.bfloat16).eval().requires_grad_(False)
        print("| latent frames per chunk | decode (s) | peak (GiB) |\n|---:|---:|---:|")
        for chunk_frames in args.chunks:
            torch.cuda.reset_peak_memory_stats()
            seconds = time_decode(vae, latent, args.repeats, chunk_frames)
            print(f"| {chunk_frames} | {seconds:.3f} | {torch.cuda.max_memory_allocated() / 2**30:.1f} |", flush=True)
        return
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        vae = WanVAE().to("cuda", dtype).eval().requires_grad_(False)
        for benchmark in (False, True):
            for channels_last in (False, True):
                torch.backends.cudnn.benchmark = benchmark
                layout = torch.channels_last_3d if channels_last else torch.contiguous_format
                for parameter in vae.parameters():
                    if parameter.dim() == 5:  # Conv3d weights; the rest has no 3-D layout
                        parameter.data = parameter.data.contiguous(memory_format=layout)
                torch.cuda.reset_peak_memory_stats()
                seconds = time_decode(vae, latent, args.repeats)
                rows.append((str(dtype).split(".")[1], benchmark, channels_last, seconds, torch.cuda.max_memory_allocated() / 2**30))
                print(rows[-1], flush=True)
        del vae
    print(f"\n{torch.cuda.get_device_name()}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}")
    print("| VAE dtype | cudnn.benchmark | channels_last_3d | decode (s) | peak (GiB) |\n|---|---|---|---:|---:|")
    for dtype, benchmark, channels_last, seconds, memory in rows:
        print(f"| {dtype} | {benchmark} | {channels_last} | {seconds:.3f} | {memory:.1f} |")


if __name__ == "__main__":
    main()
