"""Evaluate a trained student (1–4 steps) or teacher (N Euler steps with CFG), sharded over ranks.

    python -m rcm.evaluate --run runs/toy_rcm --steps 1 2 4
    python -m rcm.evaluate --run runs/toy_teacher --teacher-steps 50 --guidance 2.0
    python -m rcm.evaluate --run runs/toy_rcm --reference-teacher runs/toy_teacher   # + student/teacher agreement
    torchrun --nproc_per_node=8 -m rcm.evaluate --checkpoint runs/wan_rcm --prompts embeddings/
    srun python -m rcm.evaluate ... --shard-index $SLURM_ARRAY_TASK_ID --num-shards $SLURM_ARRAY_TASK_COUNT
    python -m rcm.evaluate ... --gather-only            # the report alone, once every shard has finished

Prompts are the toy's classes (``--prompts toy``) or a file (see rcm/eval/prompts.py): a directory of
text-embedding ``.pt`` files or a list file. Prompt i goes to rank i mod world size (within the
``--shard-index`` of ``--num-shards`` array tasks when given) and its noise comes from the seed
(--seed, i) alone, so the results do not depend on how many ranks or tasks share the work.

Each prompt's samples (every sampler setting, from the same noise) are written to
``OUT/samples/prompt_NNNNN.pt`` through a temporary file, so a killed run leaves no partial file; a rerun
skips the prompts whose file exists (``--overwrite`` redoes them). Rank 0 then reads every prompt file and
writes ``OUT/eval.json`` (summary, per-prompt rows, the configuration) and ``OUT/eval.md``.

Metrics: toy prompts get precision, mode recall, mode KL and sliced W2 against the ground truth; every
prompt gets the diversity of its samples; with ``--reference-teacher`` each student setting gets its
agreement (MSE, cosine, PSNR) with the teacher's samples from the same noise; ``--metric NAME=PATH`` adds
a plug-in metric with local weights (rcm/eval/metrics_plugins.py; built in: latent_stats).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rcm.data.toy import ToyMixture
from rcm.eval.cli import HelpFormatter, run_on_every_rank
from rcm.eval.metrics_plugins import parse_metric_spec, registered_metrics
from rcm.eval.networks import DTYPES, NetworkSource, load_network, load_run_config, network_dtype_name
from rcm.eval.prompts import TOY_PROMPTS, Prompt, resolve_prompt_inputs
from rcm.eval.report import markdown_table, prompt_rows, summarize, summary_rows
from rcm.eval.sampling import STUDENT, TEACHER, SamplerSetting, sample_prompt
from rcm.atomic_files import atomic_torch_save, atomic_write_bytes
from rcm.eval.sharding import WorkShard, item_seed, resolve_work_shard
from rcm.parallel.distributed import DistributedInfo, barrier

__all__ = [
    "generate_toy_samples", "load_network", "load_run_config", "main", "markdown_table", "summarize",
]

PROMPT_FILE_FORMAT = "rcm-eval-prompt-v1"
SAMPLES_DIR = "samples"


@torch.no_grad()
def generate_toy_samples(
    network: torch.nn.Module,
    mixture: ToyMixture,
    samples_per_class: int,
    seed: int,
    student_steps: int | None = None,
    teacher_steps: int = 50,
    guidance_scale: float = 1.0,
    shift: float = 5.0,
    sigma_max: float = 80.0,
    text_len: int | None = None,
    progress: bool = False,
    mid_times: tuple[float, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples (N,C,T,H,W), class_ids (N,)) for every class; student if ``student_steps`` else teacher."""
    if student_steps:
        mids = None if mid_times is None else tuple(mid_times[: student_steps - 1])
        setting = SamplerSetting(f"student_{student_steps}", STUDENT, student_steps, sigma_max=sigma_max, mid_times=mids)
    else:
        setting = SamplerSetting(f"teacher_{teacher_steps}", TEACHER, teacher_steps, guidance_scale, shift)
    all_samples, all_ids = [], []
    for class_id in tqdm(range(mixture.config.num_classes), disable=not progress, desc="sampling", leave=False):
        samples = sample_prompt(
            network, setting, mixture.embeddings[class_id], samples_per_class, mixture.config.latent_shape,
            item_seed(seed, class_id), text_len, mixture.negative_embedding,
        )
        all_samples.append(samples)
        all_ids.append(torch.full((samples_per_class,), class_id, dtype=torch.long))
    return torch.cat(all_samples), torch.cat(all_ids)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the evaluation."""
    parser = argparse.ArgumentParser(prog="rcm-evaluate", description=__doc__, formatter_class=HelpFormatter)
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--run", "--checkpoint", dest="run", required=True, help="training run directory (config.yaml + "
                      "checkpoints/), or a checkpoint (.pth / DCP directory) together with --model. Under torchrun spell "
                      "it --checkpoint: torchrun's own parser takes --run for its --run-path")
    what.add_argument("--model", default=None, help="model preset (configs/model/NAME.yaml) when --run is a bare checkpoint")
    what.add_argument("--weights", choices=["ema", "student"], default="ema", help="which weights of the checkpoint to use")
    what.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="student sampling steps to evaluate (1-4)")
    what.add_argument("--teacher-steps", type=int, default=0, help="evaluate --run as a teacher with this many Euler steps instead")
    what.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: the run's "
                      "distill.guidance_scale; 1 for a bare checkpoint)")
    what.add_argument("--shift", type=float, default=5.0, help="teacher sampling time shift")
    what.add_argument("--sigma-max", type=float, default=None, help="student's initial noise level (default: the "
                      "run's distill.sample_sigma_max, 200 in the 14B recipe; 80 for a bare checkpoint)")
    what.add_argument("--mid-times", type=float, nargs="+", default=None, metavar="T",
                      help="student's intermediate TrigFlow times; n steps use the first n-1 "
                           "(default: the paper's 1.5 1.4 1.0)")
    what.add_argument("--reference-teacher", default=None, help="teacher (run directory or checkpoint) sampled from the "
                      "same noise as the student, for the agreement metrics")
    what.add_argument("--reference-steps", type=int, default=50, help="Euler steps of the reference teacher")
    data = parser.add_argument_group("prompts and samples")
    data.add_argument("--prompts", default=TOY_PROMPTS, help="'toy' (the ground truth's classes), a directory of prompt "
                      "embeddings NAME.pt (+ NAME.txt), or a list file (one embedding path or toy prompt per line)")
    data.add_argument("--ground-truth", default=None, help="ground_truth.pt of the toy data (default: the run's data.ground_truth)")
    data.add_argument("--negative-embedding", default=None, help="CFG negative prompt embedding .pt (default: the toy's, "
                      "else the run's data.negative_embedding)")
    data.add_argument("--latent-shape", type=int, nargs=4, metavar=("C", "T", "H", "W"), default=None,
                      help="latent shape for non-toy prompts (default: the run's data.latent_shape)")
    data.add_argument("--samples-per-prompt", "--samples-per-class", dest="samples_per_prompt", type=int, default=256,
                      help="samples drawn per prompt (each with its own noise)")
    data.add_argument("--seed", type=int, default=0, help="evaluation seed; prompt i draws from the seed (seed, i)")
    data.add_argument("--metric", action="append", default=[], metavar="NAME=PATH",
                      help=f"add a plug-in metric with its local weights (registered: {', '.join(registered_metrics())}); repeatable")
    work = parser.add_argument_group("work sharing and resuming")
    work.add_argument("--out", default=None, help="where samples/, eval.json and eval.md go (default: the run directory)")
    work.add_argument("--overwrite", action="store_true", help="regenerate every prompt (by default prompts whose "
                      "samples file exists are skipped)")
    work.add_argument("--shard-index", type=int, default=None, help="this job's shard (Slurm array: $SLURM_ARRAY_TASK_ID); "
                      "default: the rank")
    work.add_argument("--num-shards", type=int, default=None, help="number of shards (Slurm array: $SLURM_ARRAY_TASK_COUNT); "
                      "default: the world size")
    work.add_argument("--gather-only", action="store_true", help="generate nothing: compute the report from the prompt files")
    work.add_argument("--device", default="auto", help="'auto' (this rank's GPU if any, else CPU), 'cpu' or 'cuda'")
    work.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                      help="the networks' dtype (default: bfloat16 on CUDA, float32 on CPU); part of what a prompt "
                           "file records")
    args = parser.parse_args(argv)
    try:
        args.metric_specs = [parse_metric_spec(text) for text in args.metric]
        resolve_work_shard(DistributedInfo(), args.shard_index, args.num_shards)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if args.samples_per_prompt < 1:
        parser.error("--samples-per-prompt must be at least 1")
    return args


@dataclass
class EvaluationPlan:
    """Everything decided before sampling: sources, prompts, settings, shapes, and where files go."""

    source: NetworkSource
    reference: NetworkSource | None
    prompts: list[Prompt]
    mixture: ToyMixture | None
    settings: list[SamplerSetting]
    labels: dict[str, str]
    reference_setting: str | None
    latent_shape: tuple[int, int, int, int]
    negative_embedding: torch.Tensor | None
    out: Path
    checkpoint: str  # the checkpoint actually read, recorded in every prompt file
    reference_checkpoint: str | None

    @property
    def samples_dir(self) -> Path:
        """Directory of the per-prompt files."""
        return self.out / SAMPLES_DIR

    def prompt_file(self, index: int) -> Path:
        """The samples file of prompt `index`."""
        return self.samples_dir / f"prompt_{index:05d}.pt"


DEFAULT_SIGMA_MAX = 80.0  # rcm_spec.md §5


def plan_evaluation(args: argparse.Namespace) -> EvaluationPlan:
    """Resolve the run, prompts, ground truth, sampler settings and output directory from the options."""
    source = NetworkSource.open(args.run, args.model)
    inputs = resolve_prompt_inputs(args.prompts, source, args.ground_truth, args.negative_embedding, args.latent_shape)

    guidance = args.guidance if args.guidance is not None else float(source.run_setting("distill.guidance_scale", 1.0))
    sigma_max = (args.sigma_max if args.sigma_max is not None
                 else float(source.run_setting("distill.sample_sigma_max", DEFAULT_SIGMA_MAX)))
    reference = None
    if args.teacher_steps:
        if args.reference_teacher:
            raise ValueError("--reference-teacher compares a student with a teacher; it does not go with --teacher-steps")
        settings = [SamplerSetting(f"teacher_{args.teacher_steps}", TEACHER, args.teacher_steps, guidance, args.shift)]
        labels = {settings[0].name: f"teacher (CFG {guidance:g})"}
    else:
        settings = [
            SamplerSetting(f"student_{steps}", STUDENT, steps, sigma_max=sigma_max,
                           mid_times=None if args.mid_times is None else tuple(args.mid_times[:steps - 1]))
            for steps in dict.fromkeys(args.steps)
        ]
        labels = {setting.name: "student" for setting in settings}
        if args.reference_teacher:
            reference = NetworkSource.open(args.reference_teacher, fallback_model_cfg=source.model_cfg)
            name = f"reference_teacher_{args.reference_steps}"
            settings.append(SamplerSetting(name, TEACHER, args.reference_steps, guidance, args.shift))
            labels[name] = f"reference teacher (CFG {guidance:g})"

    if guidance > 1.0 and inputs.negative_embedding is None and any(s.kind == TEACHER for s in settings):
        raise ValueError(f"CFG scale {guidance:g} needs the negative prompt's embedding: pass --negative-embedding PATH "
                         "(or --guidance 1)")
    if args.out is None and source.run_cfg is None:
        raise ValueError("--run is a bare checkpoint: say where results go with --out DIR")
    out = Path(args.out or args.run)
    return EvaluationPlan(
        source=source, reference=reference, prompts=inputs.prompts, mixture=inputs.mixture, settings=settings,
        labels=labels, reference_setting=settings[-1].name if reference else None, latent_shape=inputs.latent_shape,
        negative_embedding=inputs.negative_embedding, out=out, checkpoint=source.checkpoint(),
        reference_checkpoint=reference.checkpoint() if reference else None,
    )


def generation_record(plan: EvaluationPlan, args: argparse.Namespace, prompt: Prompt) -> dict[str, Any]:
    """What determines a prompt's samples; a prompt file is reused only if it records exactly this."""
    return {
        "checkpoint": plan.checkpoint,
        "weights": args.weights,
        "reference_checkpoint": plan.reference_checkpoint,
        "settings": [setting.describe() for setting in plan.settings],
        "samples_per_prompt": args.samples_per_prompt,
        "seed": args.seed,
        "dtype": args.dtype,
        "latent_shape": list(plan.latent_shape),
        "prompt_index": prompt.index,
        "prompt": prompt.text,
        "embedding_sha256": prompt.embedding_digest(),
    }


def read_prompt_file(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Load a prompt's samples file and check it was written by this same evaluation."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} cannot be read ({error}); delete it and run again") from error
    if not isinstance(record, dict) or record.get("format") != PROMPT_FILE_FORMAT:
        raise ValueError(f"{path} is not a samples file of rcm.evaluate; delete it or choose another --out")
    if record["generation"] != expected:
        differing = sorted(key for key in expected if record["generation"].get(key) != expected[key])
        raise ValueError(
            f"{path} was written by a different evaluation (differs in: {', '.join(differing)}); "
            "pass --overwrite to regenerate, or choose another --out"
        )
    return record


def generate_prompt_files(plan: EvaluationPlan, args: argparse.Namespace, shard: WorkShard, info: DistributedInfo,
                          device: torch.device) -> tuple[int, int]:
    """Sample this shard's prompts that have no file yet; returns (generated, skipped)."""
    plan.samples_dir.mkdir(parents=True, exist_ok=True)
    networks: dict[str, torch.nn.Module] = {}
    generated = skipped = 0
    indices = shard.items(len(plan.prompts))
    for index in tqdm(indices, disable=not info.is_main, desc=f"sampling prompts (shard {shard.index} of {shard.count})"):
        prompt, path = plan.prompts[index], plan.prompt_file(index)
        expected = generation_record(plan, args, prompt)
        if path.exists() and not args.overwrite:
            read_prompt_file(path, expected)
            skipped += 1
            continue
        if not networks:  # loaded on first need: a fully resumed shard never reads a checkpoint
            dtype = DTYPES[args.dtype]
            networks[STUDENT] = plan.source.load(args.weights, device, dtype)
            if plan.reference is not None:
                networks[TEACHER] = plan.reference.load("ema", device, dtype)
        samples = {}
        for setting in plan.settings:
            network = networks[TEACHER] if setting.name == plan.reference_setting else networks[STUDENT]
            samples[setting.name] = sample_prompt(
                network, setting, prompt.embedding, args.samples_per_prompt, plan.latent_shape,
                item_seed(args.seed, index), plan.source.model_cfg.text_len, plan.negative_embedding,
            ).cpu()
        atomic_torch_save({
            "format": PROMPT_FILE_FORMAT, "prompt_index": index, "prompt": prompt.text, "class_id": prompt.class_id,
            "seed": item_seed(args.seed, index), "generation": expected, "samples": samples,
        }, path)
        generated += 1
    return generated, skipped


def write_report(plan: EvaluationPlan, args: argparse.Namespace, records: list[dict]) -> str:
    """Compute the metrics of every prompt file and write eval.json and eval.md; returns the summary table."""
    summary = summary_rows(records, plan.settings, plan.labels, plan.mixture, plan.reference_setting, args.metric_specs)
    per_prompt = prompt_rows(records, plan.settings, plan.labels, plan.mixture, plan.reference_setting)
    config = {key: value for key, value in vars(args).items() if key != "metric_specs"}
    config.update(
        checkpoint=plan.checkpoint, settings=[setting.describe() for setting in plan.settings],
        num_prompts=len(plan.prompts), latent_shape=list(plan.latent_shape), samples_dir=str(plan.samples_dir),
    )
    report = {"config": config, "summary": summary, "prompts": per_prompt}
    atomic_write_bytes(plan.out / "eval.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    table = markdown_table(summary)
    markdown = f"# Evaluation of {args.run}\n\n{table}\n\n## Per prompt\n\n{markdown_table(per_prompt)}\n"
    atomic_write_bytes(plan.out / "eval.md", markdown.encode())
    return table


def evaluate(args: argparse.Namespace, info: DistributedInfo, device: torch.device) -> int:
    """Generate this process's share, wait for the others, then (rank 0) gather and report."""
    args.dtype = network_dtype_name(args.dtype, device)  # resolved here: prompt files record it
    plan = plan_evaluation(args)
    shard = resolve_work_shard(info, args.shard_index, args.num_shards)
    if not args.gather_only:
        generated, skipped = generate_prompt_files(plan, args, shard, info, device)
        if info.is_main:
            print(f"[evaluate] shard {shard.index} of {shard.count}: {generated} prompt(s) sampled, {skipped} already done",
                  flush=True)
    barrier(info)
    if not info.is_main:
        return 0
    missing = [index for index in range(len(plan.prompts)) if not plan.prompt_file(index).exists()]
    if missing:
        shown = ", ".join(plan.prompt_file(index).name for index in missing[:5]) + (" ..." if len(missing) > 5 else "")
        message = (f"{len(plan.prompts) - len(missing)} of {len(plan.prompts)} prompts are done in {plan.samples_dir} "
                   f"(missing: {shown})")
        if args.gather_only:
            print(f"error: {message}; run the missing shards first", file=sys.stderr)
            return 1
        print(f"[evaluate] {message}; once every shard has finished, run again with --gather-only", flush=True)
        return 0
    records = [
        read_prompt_file(plan.prompt_file(prompt.index), generation_record(plan, args, prompt))
        for prompt in tqdm(plan.prompts, desc="reading prompt files", leave=False)
    ]
    table = write_report(plan, args, records)
    print(table)
    print(f"[evaluate] wrote {plan.out / 'eval.json'} and {plan.out / 'eval.md'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (one process, torchrun, or Slurm tasks)."""
    args = parse_args(argv)
    return run_on_every_rank(lambda info, device: evaluate(args, info, device), args.device)


if __name__ == "__main__":
    from rcm.cli_errors import run_cli

    sys.exit(run_cli(main, "rcm.evaluate"))
