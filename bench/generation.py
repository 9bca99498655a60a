"""Generation cost on one GPU, stage by stage: Wan2.1 T2V 1.3B at 480p (81 frames, 832×480), the 4-step
rCM student against the teacher's 50 Euler steps with classifier-free guidance, in one run.

    python bench/generation.py                        # triton attention, eager DiT, fp32 VAE
    python bench/generation.py --dit-compile --vae-dtype bfloat16 --teacher-steps 50
    python bench/generation.py --smoke                # tiny models on the CPU: checks that the script runs

Weights are random (timings do not depend on the values). Stages, each alone on the GPU (the model of the
previous stage is freed first, as `rcm.generate --offload` does):
  text encoding  umT5-XXL in bf16, as `TextEncoder.encode` runs it: prompts of 120 tokens padded to 512, the
                 encoder run over the 120 real positions only (`encode_token_ids`); the prompt for the student,
                 the prompt and the negative prompt (one batch of 2) for the teacher; tokenization (CPU, ~1 ms)
                 is left out;
  DiT            student: 4 steps of `sample_student`, one batch-1 forward each; teacher: `sample_teacher`
                 with `guided_denoise` (conditional and unconditional branch in one batch-2 forward per
                 step, guidance 5, shift 5 as Wan2.1), `--teacher-steps` steps;
  VAE decode     the 21×60×104 latent to 81 frames, chunked (one latent frame at a time), as rcm.generate.
Timings are CUDA-synchronized wall-clock seconds after a warm-up (which also compiles with --dit-compile):
the median of --repeats runs, except the teacher (one run: it takes about a minute). Peak memory is the
most allocated during the stage, weights included. A markdown table comes last; the progress lines are
flushed as they happen, so a cut-off log still holds the finished stages.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
from omegaconf import OmegaConf

from rcm.config import load_model_preset, model_presets
from rcm.distill.sampler import sample_student, sample_teacher
from rcm.distill.trigflow import denoise, guided_denoise
from rcm.generate import DTYPES, RESOLUTIONS, free_memory, video_size
from rcm.models.text_encoder import encode_token_ids
from rcm.models.umt5 import UMT5Config, UMT5Encoder
from rcm.models.wan_dit import build_wan_dit
from rcm.models.wan_vae import WanVAE, WanVAEConfig
from rcm.parallel.compile import DEFAULT_VAE_RECIPE, VAE_DECODER_RECIPES, apply_compile, speed_up_vae_decoder

GUIDANCE_SCALE = 5.0  # Wan2.1 T2V's sample_guide_scale; the value does not change the cost
TEACHER_SHIFT = 5.0  # Wan2.1 T2V's sample_shift
PROMPT_TOKENS = 120  # a typical prompt's length, used for the negative prompt too
STARTED = time.perf_counter()

# The smoke run's tiny models: the `tiny` DiT preset's widths, a 1-layer umT5 of its text_dim, a 4-channel VAE.
SMOKE_T5 = UMT5Config(vocab_size=64, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=1, num_buckets=8)
SMOKE_VAE = WanVAEConfig(dim=4, z_dim=4, num_res_blocks=1, latent_mean=(0.0,) * 4, latent_std=(1.0,) * 4)


def log(message: str) -> None:
    """Print a progress line with the seconds since start, flushed at once."""
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median seconds of ``function()`` over ``repeats`` runs after ``warmup`` untimed ones, and its last result."""
    result = None
    for _ in range(warmup):
        result = function()
    seconds = []
    for _ in range(repeats):
        result = None  # drop the previous result first, so the peak memory counts one
        synchronize(device)
        start = time.perf_counter()
        result = function()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def start_stage(device: torch.device) -> None:
    """Free what the previous stage left (its function has returned) and restart the peak-memory count."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Most memory allocated since `start_stage`, in GiB (NaN on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


@torch.no_grad()
def randomize_(module: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Fill every parameter of a module allocated with `to_empty` (whose memory is garbage, maybe NaN)."""
    for parameter in module.parameters():
        parameter.normal_(0.0, std)
    return module


def allocate(build: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The module ``build()`` makes, allocated on ``device`` in ``dtype`` without a float32 copy or CPU init."""
    with torch.device("meta"):
        module = build()
    return module.to(dtype).to_empty(device=device).eval().requires_grad_(False)


def bench_text(args, device: torch.device, t5_config: UMT5Config) -> dict:
    """umT5 encoding of 1 prompt (student) and of prompt + negative prompt (teacher): seconds, peak memory, embeddings."""
    start_stage(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log(f"text: building umT5 ({t5_config.num_layers} layers, dim {t5_config.dim}) in {dtype} on {device}")
    encoder = randomize_(allocate(lambda: UMT5Encoder(t5_config), device, dtype))
    generator = torch.Generator(device).manual_seed(0)
    token_ids = torch.randint(0, t5_config.vocab_size, (2, args.text_len), generator=generator, device=device)
    mask = torch.zeros_like(token_ids)
    mask[:, :min(PROMPT_TOKENS, args.text_len)] = 1

    def encode(batch: int) -> torch.Tensor:
        with torch.no_grad():
            return encode_token_ids(encoder, token_ids[:batch], mask[:batch]).float()

    # Encoding takes tens of milliseconds, so the first runs of a fresh process (GPU clocks ramping up, cuBLAS
    # choosing kernels) would weigh on it: 3 untimed runs each (session 14 saw 0.067 s for 1 prompt after one).
    one, embeddings = timed(lambda: encode(1), device, args.repeats, warmup=3)
    log(f"text: 1 prompt {one:.3f} s")
    two, embeddings = timed(lambda: encode(2), device, args.repeats, warmup=3)
    log(f"text: prompt + negative prompt {two:.3f} s; peak {peak_gib(device):.1f} GiB")
    return {"student": one, "teacher": two, "peak": peak_gib(device), "embeddings": embeddings}


def bench_dit(args, device: torch.device, model_fields: dict, shape: tuple[int, ...], embeddings: torch.Tensor) -> dict:
    """The student's --student-steps and the teacher's --teacher-steps with CFG on one latent: seconds and peak memory."""
    start_stage(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log(f"DiT: building {args.model} (attention {model_fields['attention_backend']}) in {dtype} on {device}")
    network = allocate(lambda: build_wan_dit(model_fields), device, dtype)
    with torch.no_grad():
        network.init_weights()
        network.head.head.weight.normal_(0.0, 0.02)  # Wan zero-inits the head; random weights exercise every path
    if args.dit_compile:
        log(f"DiT: torch.compile of {apply_compile(network)} blocks (compiled during the warm-ups)")
    generator = torch.Generator(device).manual_seed(0)
    noise = torch.randn((1, *shape), generator=generator, device=device)
    context, negative_context = embeddings[:1], embeddings[1]

    def student() -> torch.Tensor:
        return sample_student(lambda x, t, c: denoise(network, x, t, c), noise, context, args.student_steps, 80.0,
                              generator)

    def teacher(steps: int) -> torch.Tensor:
        return sample_teacher(lambda x, t, c: guided_denoise(network, x, t, c, negative_context, GUIDANCE_SCALE),
                              noise, context, steps, TEACHER_SHIFT)

    synchronize(device)
    warmup_start = time.perf_counter()
    student()
    synchronize(device)
    log(f"DiT: student warm-up {time.perf_counter() - warmup_start:.1f} s")
    student_seconds, latent = timed(student, device, args.repeats, warmup=0)
    student_peak = peak_gib(device)
    log(f"DiT: student {args.student_steps} steps {student_seconds:.3f} s "
        f"({student_seconds / args.student_steps:.3f} s per batch-1 forward); peak {student_peak:.1f} GiB")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    warmup_start = time.perf_counter()
    teacher(1)  # the batch-2 shape: a compiled DiT compiles again for it
    synchronize(device)
    log(f"DiT: teacher warm-up (1 step) {time.perf_counter() - warmup_start:.1f} s; now {args.teacher_steps} steps, "
        "one run")
    teacher_seconds, _ = timed(lambda: teacher(args.teacher_steps), device, repeats=1, warmup=0)
    teacher_peak = peak_gib(device)
    log(f"DiT: teacher {args.teacher_steps} steps with CFG {teacher_seconds:.3f} s "
        f"({teacher_seconds / args.teacher_steps:.3f} s per batch-2 forward); peak {teacher_peak:.1f} GiB")
    return {"student": student_seconds, "teacher": teacher_seconds, "student_peak": student_peak,
            "teacher_peak": teacher_peak, "latent": latent.float()}


def bench_vae(args, device: torch.device, vae_config: WanVAEConfig, latent: torch.Tensor) -> dict:
    """Chunked decode of one latent to video: seconds, peak memory and the video's shape."""
    start_stage(device)
    dtype = DTYPES[args.vae_dtype]
    log(f"VAE: building the Wan VAE in {dtype} on {device}")
    vae = allocate(lambda: WanVAE(vae_config), device, dtype)
    randomize_(vae)  # the norms' scales; the convolutions then get their usual init
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                module.reset_parameters()

    if args.vae_compile:  # the warm-up run below compiles
        speed_up_vae_decoder(vae, recipe=args.vae_recipe, mode=args.vae_compile_mode)

    def decode() -> torch.Tensor:
        with torch.no_grad():
            return vae.decode(latent, chunked=True, chunk_frames=args.vae_chunk_frames)

    seconds, video = timed(decode, device, args.repeats)
    log(f"VAE: decode to {tuple(video.shape)} {seconds:.3f} s; peak {peak_gib(device):.1f} GiB")
    return {"seconds": seconds, "peak": peak_gib(device), "video_shape": tuple(video.shape)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the generation benchmark."""
    presets = model_presets()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-t2v-1.3B", choices=presets, help="DiT preset (default: %(default)s)")
    parser.add_argument("--resolution", default="480p", choices=sorted(RESOLUTIONS), help="default: %(default)s")
    parser.add_argument("--num-frames", type=int, default=81, help="video frames, 1 + 4k (default: %(default)s)")
    parser.add_argument("--student-steps", type=int, default=4, choices=[1, 2, 3, 4], help="default: %(default)s")
    parser.add_argument("--teacher-steps", type=int, default=50, help="teacher Euler steps (default: %(default)s)")
    parser.add_argument("--attention", default="triton", choices=["triton", "auto"],
                        help="DiT attention backend: our Triton kernel, or auto (PyTorch SDPA) (default: %(default)s)")
    parser.add_argument("--dit-compile", action="store_true",
                        help="torch.compile each DiT block (rcm.parallel.compile.apply_compile)")
    parser.add_argument("--vae-dtype", default="float32", choices=sorted(DTYPES),
                        help="VAE decode dtype (default: %(default)s, as Wan2.1 decodes)")
    parser.add_argument("--vae-compile", action="store_true",
                        help="torch.compile the VAE decoder (rcm.parallel.compile.compile_vae_decoder)")
    parser.add_argument("--vae-recipe", default=DEFAULT_VAE_RECIPE, choices=list(VAE_DECODER_RECIPES),
                        help="with --vae-compile: the forms of the decoder's convolutions "
                             "(rcm.parallel.compile.VAE_DECODER_RECIPES; default %(default)s, what rcm.generate --compile_vae runs)")
    parser.add_argument("--vae-compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                        help="with --vae-compile: torch.compile's mode (max-autotune also tries Triton convolution templates)")
    parser.add_argument("--vae-chunk-frames", type=int, default=1,
                        help="latent frames decoded per chunk (default: %(default)s, as Wan2.1; more is faster and larger)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of the text, student and VAE stages; the median is reported (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: only checks that the script works")
    args = parser.parse_args(argv)
    if (args.num_frames - 1) % 4 or args.num_frames < 1:
        parser.error(f"--num-frames must be 1 + 4k (the VAE's temporal compression is 4), got {args.num_frames}")
    if args.teacher_steps < 1 or args.repeats < 1 or args.vae_chunk_frames < 1:
        parser.error("--teacher-steps, --repeats and --vae-chunk-frames must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the three stages for the student and the teacher and print the comparison table."""
    args = parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        model_fields = dict(OmegaConf.to_container(load_model_preset("tiny")))
        model_fields["attention_backend"] = "auto"
        t5_config, vae_config = SMOKE_T5, SMOKE_VAE
        args.model, args.teacher_steps, args.repeats, args.dit_compile = "tiny (smoke)", 3, 1, False
        args.vae_compile = False  # no C++ compiler needed for the smoke run
        shape = (vae_config.z_dim, 3, 4, 6)
    else:
        if not torch.cuda.is_available():
            print("error: this benchmark needs a CUDA GPU (or --smoke for a CPU check of the script)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        model_fields = dict(OmegaConf.to_container(load_model_preset(args.model)))
        model_fields["attention_backend"] = args.attention
        t5_config, vae_config = UMT5Config(), WanVAEConfig()
        height, width = video_size(args.resolution, "16:9")
        shape = vae_config.latent_shape(args.num_frames, height, width)
    args.text_len = model_fields["text_len"]
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    log(f"device {name}; torch {torch.__version__}; model {args.model}; latent {shape}; "
        f"attention {model_fields['attention_backend']}; DiT compile {args.dit_compile}; VAE {args.vae_dtype}, "
        f"compile {args.vae_compile}, {args.vae_chunk_frames} latent frame(s) per chunk")

    text = bench_text(args, device, t5_config)
    dit = bench_dit(args, device, model_fields, shape, text.pop("embeddings"))
    vae = bench_vae(args, device, vae_config, dit.pop("latent").to(device))

    student_total = text["student"] + dit["student"] + vae["seconds"]
    teacher_total = text["teacher"] + dit["teacher"] + vae["seconds"]
    frames, height, width = vae["video_shape"][2:]
    print(f"\n{args.model}, {frames} frames {width}×{height}, one {name}; attention {model_fields['attention_backend']}, "
          f"DiT compile {'on' if args.dit_compile else 'off'}, DiT bf16{' (fp32 on CPU)' if args.smoke else ''}, "
          f"VAE {args.vae_dtype}{f' compiled ({args.vae_recipe})' if args.vae_compile else ''}; median of {args.repeats} (teacher DiT: 1 run)\n")
    student_label = f"student {args.student_steps}-step"
    teacher_label = f"teacher {args.teacher_steps}×CFG"
    print(f"| stage | {student_label} (s) | {teacher_label} (s) | peak memory {student_label} / teacher (GiB) |")
    print("|---|---:|---:|---:|")
    print(f"| text encoding (umT5-XXL bf16) | {text['student']:.2f} | {text['teacher']:.2f} | {text['peak']:.1f} |")
    print(f"| DiT | {dit['student']:.2f} | {dit['teacher']:.2f} | {dit['student_peak']:.1f} / {dit['teacher_peak']:.1f} |")
    print(f"| VAE decode ({args.vae_dtype}, chunks of {args.vae_chunk_frames}) | {vae['seconds']:.2f} | {vae['seconds']:.2f} | {vae['peak']:.1f} |")
    print(f"| **total** | **{student_total:.2f}** | **{teacher_total:.2f}** | |")
    print(f"\nend-to-end speed-up {teacher_total / student_total:.1f}× (DiT alone {dit['teacher'] / dit['student']:.1f}×)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
