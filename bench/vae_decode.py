"""Wan2.1 VAE decode of one 480p latent (16×21×60×104 → 81 frames 832×480) on one GPU: dtype, cuDNN
autotuning and memory format, each in one run; with --chunks, bf16 decode by latent frames per chunk;
with --compile, bf16 decoder variants (--variants: eager or a compiled recipe of
rcm.parallel.compile.VAE_DECODER_RECIPES, NAME@K for K latent frames per chunk) at those chunk sizes, and
--best-to FILE writes the fastest; with --convs, the TFLOP/s of the decoder's three largest convolutions alone.

    python bench/vae_decode.py [--repeats 3] [--chunks 1 3 7 21] [--compile] [--convs]
    python bench/vae_decode.py --compile --variants compiled taps96 taps_all@3 taps_all@7 --best-to best.txt

Random weights (timing does not depend on them). Prints a table last.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from rcm.models.wan_vae import WanVAE
from rcm.ops.frame_convs import conv3d_as_frame_convs, conv3d_as_stacked_frame_conv
from rcm.parallel.compile import VAE_DECODER_RECIPES, speed_up_vae_decoder

VARIANTS = ["eager", *VAE_DECODER_RECIPES]

# (in channels = out channels, input frames with the 2 cached past frames, height, width) of the 3×3×3
# convolutions that hold 85 % of the decode's 275 TFLOP, as one chunk (one latent frame) runs them.
LARGEST_CONVS = ((96, 6, 480, 832), (192, 6, 240, 416), (384, 4, 120, 208))


def time_convs(repeats: int) -> None:
    """TFLOP/s of each large causal convolution: cuDNN conv3d in both layouts, as 3 summed conv2d taps and as
    one conv2d over the taps stacked along channels (`rcm.ops.frame_convs`, layout copies included)."""
    print("| channels | frames in → out | H×W | conv3d (TFLOP/s) | conv3d channels_last_3d | 3 conv2d taps, channels_last "
          "| taps (with copies) | stacked taps (with copies) |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for channels, frames, height, width in LARGEST_CONVS:
        x = torch.randn(1, channels, frames, height, width, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(channels, channels, 3, 3, 3, device="cuda", dtype=torch.bfloat16) * 0.01
        out_frames = frames - 2
        flop = 2 * channels * channels * 27 * out_frames * height * width
        x_last = x.contiguous(memory_format=torch.channels_last_3d)
        weight_last = weight.contiguous(memory_format=torch.channels_last_3d)
        frames_last = x[0].transpose(0, 1).contiguous(memory_format=torch.channels_last)  # (T, C, H, W)
        taps = [weight[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]

        def as_taps():
            return sum(F.conv2d(frames_last[k:k + out_frames], taps[k], padding=1) for k in range(3))

        rates = []
        for run in (lambda: F.conv3d(x, weight, padding=(0, 1, 1)), lambda: F.conv3d(x_last, weight_last, padding=(0, 1, 1)),
                    as_taps, lambda: conv3d_as_frame_convs(x, weight, None, (1, 1)),
                    lambda: conv3d_as_stacked_frame_conv(x, weight, None, (1, 1))):
            seconds = _median_seconds(run, repeats * 5)
            rates.append(flop / seconds / 1e12)
        print(f"| {channels} | {frames} → {out_frames} | {height}×{width} | " + " | ".join(f"{rate:.0f}" for rate in rates) + " |",
              flush=True)


def variant_and_chunks(text: str) -> tuple[str, list[int] | None]:
    """'taps96' → ('taps96', None: the --chunks sizes); 'taps96@3' → ('taps96', [3])."""
    name, _, chunk = text.partition("@")
    if name not in VARIANTS or (chunk and not (chunk.isdigit() and int(chunk) >= 1)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(VARIANTS)}, optionally @K with K ≥ 1")
    return name, [int(chunk)] if chunk else None


def _median_seconds(function, repeats: int) -> float:
    """Median seconds of ``function()`` (CUDA-synchronized) over ``repeats`` runs after one warm-up run."""
    function()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def time_decode(vae: WanVAE, latent: torch.Tensor, repeats: int, chunk_frames: int = 1) -> float:
    """Median seconds of a chunked decode after one warm-up (which compiles a compiled decoder)."""
    return _median_seconds(lambda: vae.decode(latent, chunk_frames=chunk_frames), repeats)


def main() -> None:
    """Run every variant and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", type=int, nargs="*", help="only bf16: time these latent frames per chunk")
    parser.add_argument("--compile", action="store_true", help="bf16 decoder variants (--variants) at --chunks (default 1)")
    parser.add_argument("--variants", nargs="+", default=[(name, None) for name in VARIANTS], type=variant_and_chunks, metavar="VARIANT[@CHUNK]",
                        help="with --compile: eager, or a compiled decoder recipe of rcm.parallel.compile.VAE_DECODER_RECIPES "
                             f"(its convolutions in the forms of rcm.ops.frame_convs): {', '.join(VARIANTS)}; "
                             "NAME@K times it at K latent frames per chunk instead of --chunks")
    parser.add_argument("--compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                        help="with --compile: torch.compile's mode (max-autotune also tries Triton convolution templates; "
                             "slow to compile)")
    parser.add_argument("--convs", action="store_true", help="time the largest convolutions alone")
    parser.add_argument("--best-to", metavar="FILE", help="with --compile: write the fastest compiled recipe and its chunk "
                                                          "size to FILE as 'RECIPE CHUNK_FRAMES' (for bench/generation.py)")
    args = parser.parse_args()
    latent = torch.randn(1, 16, 21, 60, 104, device="cuda")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}")
    if args.convs:
        time_convs(args.repeats)
    if args.compile:
        rows = []
        for variant, chunk_sizes in args.variants:
            # Each decoder is a new module: without a reset its guards pile up to Dynamo's recompile limit, after
            # which it silently runs eager (it did at the 5th variant).
            torch._dynamo.reset()
            vae = WanVAE().to("cuda", torch.bfloat16).eval().requires_grad_(False)
            if variant != "eager":
                # what rcm.generate --compile_vae runs for its recipe
                speed_up_vae_decoder(vae, recipe=variant, mode=args.compile_mode)
            for chunk_frames in chunk_sizes or args.chunks or [1]:
                torch.cuda.reset_peak_memory_stats()
                seconds = time_decode(vae, latent, args.repeats, chunk_frames)  # its warm-up compiles
                rows.append((variant, chunk_frames, seconds, torch.cuda.max_memory_allocated() / 2**30))
                print(rows[-1], flush=True)
            del vae
        print("| decoder | latent frames per chunk | decode (s) | peak (GiB) |\n|---|---:|---:|---:|")
        for label, chunk_frames, seconds, memory in rows:
            print(f"| {label} | {chunk_frames} | {seconds:.3f} | {memory:.1f} |")
        compiled = [row for row in rows if row[0] != "eager"]
        if args.best_to and compiled:
            recipe, chunk_frames = min(compiled, key=lambda row: row[2])[:2]
            with open(args.best_to, "w") as best:
                best.write(f"{recipe} {chunk_frames}\n")
        return
    if args.convs:
        return
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
