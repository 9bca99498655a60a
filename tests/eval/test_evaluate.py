"""The sharded evaluation CLI: results do not depend on the number of ranks or array tasks, a rerun only
samples the prompts that have no file, and the report holds the toy, agreement and plug-in metrics."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcm.data.toy import ToyMixture
from rcm.eval.metrics_plugins import save_latent_statistics
from rcm.evaluate import generate_toy_samples, main
from tests.eval.tiny_checkpoints import TINY_PRESET, write_ground_truth, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
NUM_PROMPTS = 8
SAMPLES_PER_PROMPT = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """student.pth, teacher.pth, ground_truth.pt and a latent_stats reference file."""
    root = tmp_path_factory.mktemp("eval_inputs")
    write_tiny_checkpoint(root / "student.pth", seed=1)
    write_tiny_checkpoint(root / "teacher.pth", seed=0)
    mixture = write_ground_truth(root / "ground_truth.pt")
    reference = mixture.sample(torch.arange(NUM_PROMPTS).repeat(16), torch.Generator().manual_seed(0))
    save_latent_statistics(reference, root / "latent_stats.pt")
    return root


def evaluate_args(inputs: Path, out: Path, *extra: str) -> list[str]:
    """A student evaluation (--checkpoint: torchrun would take --run for itself) at 1 and 2 steps with a 2-step CFG reference teacher and the latent_stats plug-in."""
    return [
        "--checkpoint", str(inputs / "student.pth"), "--model", TINY_PRESET, "--ground-truth", str(inputs / "ground_truth.pt"),
        "--steps", "1", "2", "--reference-teacher", str(inputs / "teacher.pth"), "--reference-steps", "2",
        "--guidance", "2", "--samples-per-prompt", str(SAMPLES_PER_PROMPT), "--seed", "3", "--device", "cpu",
        "--metric", f"latent_stats={inputs / 'latent_stats.pt'}", "--out", str(out), *extra,
    ]


def run_in_process(argv: list[str]) -> int:
    """main() with one thread, like each torchrun worker, so float results can be compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def prompt_files(out: Path) -> list[Path]:
    """The per-prompt sample files of an evaluation, in prompt order."""
    return sorted((out / "samples").glob("prompt_*.pt"))


def assert_same_results(a: Path, b: Path) -> None:
    """Same samples for every prompt and setting, same summary and per-prompt rows."""
    files_a, files_b = prompt_files(a), prompt_files(b)
    assert [f.name for f in files_a] == [f.name for f in files_b] and len(files_a) == NUM_PROMPTS
    for file_a, file_b in zip(files_a, files_b):
        samples_a, samples_b = torch.load(file_a)["samples"], torch.load(file_b)["samples"]
        assert samples_a.keys() == samples_b.keys()
        for name in samples_a:
            assert torch.equal(samples_a[name], samples_b[name]), (file_a.name, name)
    report_a, report_b = (json.loads((path / "eval.json").read_text()) for path in (a, b))
    assert report_a["summary"] == report_b["summary"]
    assert report_a["prompts"] == report_b["prompts"]


@pytest.fixture(scope="module")
def single_run(inputs, tmp_path_factory) -> Path:
    """The evaluation in one process."""
    out = tmp_path_factory.mktemp("single")
    assert run_in_process(evaluate_args(inputs, out)) == 0
    return out


def test_report_holds_toy_agreement_and_plugin_metrics(single_run):
    """eval.json has the config, one summary row per setting (toy metrics incl. sliced W2, diversity, agreement
    for the students, the plug-in's Fréchet distance) and a row per (prompt, setting); eval.md has both tables."""
    report = json.loads((single_run / "eval.json").read_text())
    assert report["config"]["samples_per_prompt"] == SAMPLES_PER_PROMPT and report["config"]["num_prompts"] == NUM_PROMPTS
    summary = {row["setting"]: row for row in report["summary"]}
    assert list(summary) == ["student_1", "student_2", "reference_teacher_2"]
    for row in summary.values():
        for key in ("precision", "recall", "mode_kl", "sliced_wasserstein", "diversity", "latent_frechet"):
            assert row[key] >= 0, key
    assert {"agreement_mse", "agreement_cosine", "agreement_psnr"} <= summary["student_1"].keys()
    assert "agreement_mse" not in summary["reference_teacher_2"]
    assert len(report["prompts"]) == NUM_PROMPTS * 3
    markdown = (single_run / "eval.md").read_text()
    assert "sliced W2" in markdown and "latent_frechet" in markdown and "toy prompt 7" in markdown


def test_student_samples_keep_the_legacy_seeds(single_run, inputs):
    """A prompt file's student samples equal generate_toy_samples' (the demo's and benchmark's entry point)."""
    from rcm.eval.networks import NetworkSource

    network = NetworkSource.open(inputs / "student.pth", TINY_PRESET).load()
    mixture = ToyMixture.load(inputs / "ground_truth.pt")
    samples, class_ids = generate_toy_samples(network, mixture, SAMPLES_PER_PROMPT, seed=3, student_steps=2, text_len=8)
    record = torch.load(single_run / "samples" / "prompt_00005.pt")
    assert torch.allclose(record["samples"]["student_2"], samples[class_ids == 5], atol=1e-6)


def test_two_ranks_give_the_single_process_results(single_run, inputs, tmp_path):
    """torchrun with 2 gloo ranks: the same samples per prompt and the same report as one process."""
    out = tmp_path / "two_ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "-m", "rcm.evaluate", *evaluate_args(inputs, out)]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard 0 of 2: 4 prompt(s) sampled" in result.stdout  # rank 0 sampled only its half
    assert_same_results(single_run, out)


def test_rerun_samples_only_the_missing_prompt(single_run, inputs, tmp_path, capsys):
    """Delete one prompt file and rerun: only that prompt is sampled again, and the results are unchanged."""
    out = tmp_path / "resumed"
    shutil.copytree(single_run, out)
    before = {path.name: path.stat().st_mtime_ns for path in prompt_files(out)}
    (out / "samples" / "prompt_00003.pt").unlink()
    capsys.readouterr()
    assert run_in_process(evaluate_args(inputs, out)) == 0
    assert "1 prompt(s) sampled, 7 already done" in capsys.readouterr().out
    after = {path.name: path.stat().st_mtime_ns for path in prompt_files(out)}
    assert [name for name in after if after[name] != before[name]] == ["prompt_00003.pt"]
    assert_same_results(single_run, out)


def test_array_tasks_then_gather_only(single_run, inputs, tmp_path, capsys):
    """Two array tasks (--shard-index i --num-shards 2) then --gather-only give the single-process report;
    gathering before every shard is done fails and names the missing files."""
    out = tmp_path / "array"
    assert run_in_process(evaluate_args(inputs, out, "--shard-index", "0", "--num-shards", "2")) == 0
    assert not (out / "eval.json").exists() and len(prompt_files(out)) == NUM_PROMPTS // 2
    assert "run again with --gather-only" in capsys.readouterr().out
    assert run_in_process(evaluate_args(inputs, out, "--gather-only")) == 1
    assert "prompt_00001.pt" in capsys.readouterr().err
    assert run_in_process(evaluate_args(inputs, out, "--shard-index", "1", "--num-shards", "2")) == 0
    (out / "eval.json").unlink()
    assert run_in_process(evaluate_args(inputs, out, "--gather-only")) == 0
    assert_same_results(single_run, out)


def test_other_settings_do_not_reuse_old_files(single_run, inputs, tmp_path, capsys):
    """Prompt files written with another seed are refused with the differing key and what to do."""
    out = tmp_path / "changed"
    shutil.copytree(single_run, out)
    argv = evaluate_args(inputs, out)
    argv[argv.index("--seed") + 1] = "4"
    assert run_in_process(argv) == 2
    error = capsys.readouterr().err
    assert "differs in: seed" in error and "--overwrite" in error


def test_missing_plugin_weights_fail_before_sampling(inputs, tmp_path, capsys):
    """--metric NAME=PATH with a path that does not exist stops at start, naming the metric and the path."""
    missing = tmp_path / "no_such_stats.pt"
    argv = evaluate_args(inputs, tmp_path / "out", "--metric", f"latent_stats={missing}")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "'latent_stats'" in error and str(missing) in error
    assert not (tmp_path / "out").exists()


def test_teacher_on_embedding_prompts_reports_diversity(inputs, tmp_path):
    """A teacher on a directory of prompt embeddings (real-latent mode, no ground truth): diversity but no
    toy metrics, prompt texts from NAME.txt."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    generator = torch.Generator().manual_seed(0)
    for name, length in (("cat", 3), ("dog", 8)):
        torch.save(torch.randn(length, 32, generator=generator), prompts / f"{name}.pt")
        (prompts / f"{name}.txt").write_text(f"a {name}\n")
    out = tmp_path / "teacher"
    argv = ["--run", str(inputs / "teacher.pth"), "--model", TINY_PRESET, "--prompts", str(prompts), "--teacher-steps", "2",
            "--latent-shape", "4", "2", "8", "8", "--samples-per-prompt", "3", "--device", "cpu", "--out", str(out)]
    assert run_in_process(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [row["prompt"] for row in report["prompts"]] == ["a cat", "a dog"]
    (row,) = report["summary"]
    assert row["model"] == "teacher (CFG 1)" and row["diversity"] > 0 and "precision" not in row


@pytest.mark.slurm
def test_slurm_array_job_gives_the_single_process_results(single_run, inputs, tmp_path):
    """A real 2-task Slurm array (slurm/local_cluster.sh): each task takes its shard from SLURM_ARRAY_TASK_ID /
    SLURM_ARRAY_TASK_COUNT, the last one to finish writes the report, equal to the single-process run."""
    from tests.launch.test_slurm import JOB_ENV, wait_for_job_end

    out = tmp_path / "slurm_array"
    arguments = " ".join(evaluate_args(inputs, out))
    command = (f"{sys.executable} -m rcm.evaluate {arguments} "
               "--shard-index $SLURM_ARRAY_TASK_ID --num-shards $SLURM_ARRAY_TASK_COUNT")
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--job-name=rcmtest-eval-array", "--time=5", "--cpus-per-task=1",
         f"--output={tmp_path / 'task_%a.log'}", f"--wrap={command}"],
        cwd=REPO, env=JOB_ENV, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        for task in (0, 1):
            record = wait_for_job_end(f"{job_id}_{task}", timeout=180)
            logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("task_*.log"))
            assert record.get("ExitCode", "").startswith("0:0"), logs[-3000:]
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    assert (out / "eval.json").is_file(), "the last array task did not write the report"
    assert_same_results(single_run, out)


def test_other_intermediate_times_are_used_and_recorded(inputs, tmp_path, capsys):
    """--mid-times: the 2-step student re-noises at the given time (other samples, recorded in the report);
    an impossible grid stops before sampling."""
    out = tmp_path / "mid"
    argv = ["--checkpoint", str(inputs / "student.pth"), "--model", TINY_PRESET, "--ground-truth",
            str(inputs / "ground_truth.pt"), "--steps", "1", "2", "--samples-per-prompt", "2", "--device", "cpu",
            "--out", str(out)]
    assert run_in_process([*argv, "--mid-times", "1.1"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert json.dumps(report["config"]).count("1.1") >= 1
    default_out = tmp_path / "default"
    assert run_in_process([*argv[:-1], str(default_out)]) == 0
    ours, default = (torch.load(path / "samples" / "prompt_00000.pt")["samples"] for path in (out, default_out))
    assert torch.equal(ours["student_1"], default["student_1"]) and not torch.equal(ours["student_2"], default["student_2"])
    capsys.readouterr()
    assert run_in_process([*argv[:-1], str(tmp_path / "bad"), "--mid-times", "1.57"]) == 2
    assert "must decrease" in capsys.readouterr().err


def test_dtype_is_used_and_recorded(single_run, inputs, tmp_path, capsys):
    """--dtype bfloat16 samples with bf16 networks (other samples than float32, close to them) and records it, so
    float32 prompt files are not reused for it."""
    out = tmp_path / "bf16"
    shutil.copytree(single_run, out)
    assert run_in_process(evaluate_args(inputs, out, "--dtype", "bfloat16")) == 2
    assert "differs in: dtype" in capsys.readouterr().err
    assert run_in_process(evaluate_args(inputs, out, "--dtype", "bfloat16", "--overwrite")) == 0
    ours, reference = (torch.load(path / "samples" / "prompt_00000.pt") for path in (out, single_run))
    assert ours["generation"]["dtype"] == "bfloat16" and reference["generation"]["dtype"] == "float32"
    a, b = ours["samples"]["student_1"], reference["samples"]["student_1"]
    assert not torch.equal(a, b)
    assert (a.float() - b.float()).norm() < 0.05 * b.float().norm()


def test_student_sigma_max_defaults_to_the_runs_recipe(inputs, tmp_path):
    """Without --sigma-max a run's students are sampled at its distill.sample_sigma_max (200 in the 14B recipe);
    --sigma-max overrides it, and a bare checkpoint uses the paper's 80."""
    from rcm.config import load_config
    from rcm.data.toy import ToyMixtureConfig, build_toy_dataset
    from rcm.evaluate import parse_args, plan_evaluation
    from rcm.train import train

    data = tmp_path / "data"
    build_toy_dataset(data, num_samples=32, samples_per_shard=32, mixture_config=ToyMixtureConfig(), seed=0)
    run = tmp_path / "run"
    train(load_config(["experiment=toy_teacher", f"run_dir={run}", f"data.shards={data}", "train.max_iters=1",
                       "train.batch_size=2", "train.progress_bar=false", "train.device=cpu",
                       "distill.sample_sigma_max=200"]))
    common = ["--ground-truth", str(data / "ground_truth.pt"), "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "o")]
    plan = plan_evaluation(parse_args(["--checkpoint", str(run), *common]))
    assert [s.sigma_max for s in plan.settings] == [200.0]
    plan = plan_evaluation(parse_args(["--checkpoint", str(run), *common, "--sigma-max", "1600"]))
    assert [s.sigma_max for s in plan.settings] == [1600.0]
    plan = plan_evaluation(parse_args(["--checkpoint", str(inputs / "student.pth"), "--model", TINY_PRESET, *common]))
    assert [s.sigma_max for s in plan.settings] == [80.0]


@pytest.mark.parametrize("content, model, expected", [
    ("text", None, "is not a torch checkpoint"),
    ([1, 2, 3], TINY_PRESET, "holds a list of 3 items, not a state dict of network weights"),
])
def test_run_that_is_no_checkpoint_is_one_sentence(inputs, tmp_path, capsys, content, model, expected):
    """--run notes.txt, or a .pth holding a list: exit 2 with one line naming the file and what it is."""
    path = tmp_path / ("notes.txt" if content == "text" else "list.pth")
    path.write_text("some notes\n") if content == "text" else torch.save(content, path)
    argv = ["--run", str(path), "--ground-truth", str(inputs / "ground_truth.pt"), "--steps", "1",
            "--samples-per-prompt", "1", "--device", "cpu", "--out", str(tmp_path / "out")]
    assert main(argv + (["--model", model] if model else [])) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(f"error: {path} {expected}") and "Traceback" not in "\n".join(error)


def test_every_checkpoint_damaged_ends_in_one_line_without_traceback(inputs, tmp_path):
    """`python -m rcm.evaluate` on a run whose every checkpoint is damaged: exit 1, one line naming the damaged
    shard (no traceback; RCM_DEBUG=1 would show it), no prompt file written."""
    from omegaconf import OmegaConf

    from rcm.checkpoint.manager import CheckpointManager
    from rcm.config import load_config
    from tests.checkpoint.damage import flip_tensor_byte

    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(load_config([f"model={TINY_PRESET}", "distill.method=flow_matching"]), run / "config.yaml")
    weights = torch.load(inputs / "student.pth", weights_only=True)
    checkpoint = CheckpointManager(run / "checkpoints").save(1, {"ema": weights}, {"iteration": 1}, wait=True)
    shard = flip_tensor_byte(checkpoint)
    result = subprocess.run([sys.executable, "-m", "rcm.evaluate", "--run", str(run), "--ground-truth",
                             str(inputs / "ground_truth.pt"), "--steps", "1", "--samples-per-prompt", "1",
                             "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RCM_DEBUG": "0"})
    assert result.returncode == 1, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"rcm.evaluate: error: every checkpoint in {run / 'checkpoints'} is damaged")
    assert str(shard) in last_line and "Traceback" not in result.stderr
    assert not (run / "samples").exists()


def test_prompts_file_that_is_no_embedding_ends_in_one_line(inputs, tmp_path):
    """`python -m rcm.evaluate --prompts list.pt` (a .pt holding a list; the other bad files are the loader's
    tests): exit 2 with one line naming the file and the (L, text_dim) tensor expected, no traceback, nothing
    sampled."""
    from tests.test_torch_files import BAD_FILE_MESSAGES, write_bad_torch_file

    path = write_bad_torch_file(tmp_path / "list.pt", "list")
    result = subprocess.run([sys.executable, "-m", "rcm.evaluate", "--checkpoint", str(inputs / "student.pth"),
                             "--model", TINY_PRESET, "--prompts", str(path), "--latent-shape", "4", "1", "4", "4",
                             "--steps", "1", "--samples-per-prompt", "1", "--device", "cpu", "--out",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RCM_DEBUG": "0", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: prompt embedding {path} {BAD_FILE_MESSAGES['list']} an (L, text_dim) tensor")
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "samples").exists()
