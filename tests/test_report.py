"""rcm.report: curves.png and summary.md from a metrics.jsonl (a resumed run's repeated iterations once, a cut
line skipped); a directory without metrics is one sentence."""
from __future__ import annotations

import json

import pytest

from rcm.cli_errors import run_cli
from rcm.report import curve_groups, main, read_metrics


def write_metrics(run_dir, iterations):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"iteration": i, "role": "student", "loss/total": 1 / i, "loss/scm": 0.5 / i,
                         "grad_norm/student": 2.0, "time/step_s": 0.1, "throughput/samples_per_s": 20.0,
                         "gpu/temperature_c": 60.0, "gpu/throttle_reasons": 4.0, "skipped_updates": 0.0})
             for i in iterations]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"iteration": 9, "loss/to')


def test_curves_and_summary_of_a_run(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    write_metrics(run_dir, [1, 2, 3, 2, 3, 4])  # a requeued launch logged 2 and 3 again
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert main([str(run_dir)]) == 0
    curves = run_dir / "report" / "curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 10_000
    summary = (run_dir / "report" / "summary.md").read_text()
    assert "Iterations 1 to 4 (4 logged)" in summary and "| loss/total | 0.25 |" in summary
    assert "mean throughput/samples_per_s" in summary and "skipped (non-finite) updates: 0" in summary
    groups = curve_groups(read_metrics(run_dir / "metrics.jsonl"))
    assert list(groups) == ["loss", "grad_norm/student", "time/step_s", "throughput/samples_per_s", "gpu/temperature_c",
                            "skipped_updates"]  # the throttle-reason code is no curve


def test_a_directory_without_metrics_is_one_sentence(tmp_path, capsys):
    assert run_cli(main, "rcm.report", [str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"rcm.report: error: {tmp_path} holds no metrics.jsonl") and "\n" not in error
