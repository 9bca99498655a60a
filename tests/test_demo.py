"""The README's main command in its quick form: every stage runs and writes its outputs."""
import json

import pytest
import torch

from rcm import generate
from rcm.demo import main


def test_demo_quick_runs_end_to_end(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["steps"] for r in rows] == [8, 1, 2, 4, 1, 2, 4, 2, 4]
    assert rows[-1]["model"] == "rcm student, mid-times 1.2/0.8/0.5"
    for row in rows:
        for key in ("precision", "recall", "mode_kl"):
            assert 0.0 <= row[key] and (key == "mode_kl" or row[key] <= 1.0)
    assert (tmp_path / "samples.png").stat().st_size > 10_000
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "summary.md").is_file()
    assert (tmp_path / "toy_rcm" / "checkpoints").is_dir()
    # A second call resumes every stage instead of redoing it.
    assert main(["--quick", "--out", str(tmp_path)]) == 0

    # The inference CLI samples from the distilled run.
    out_file = tmp_path / "latents.pt"
    assert generate.main(["--dit_path", str(tmp_path / "toy_rcm"), "--toy_prompt", "2", "--num_steps", "2",
                          "--num_samples", "3", "--save_path", str(out_file)]) == 0
    latents = torch.load(out_file)
    assert latents.shape == (3, 4, 2, 8, 8) and torch.isfinite(latents).all()
    with pytest.raises(SystemExit):
        generate.main(["--dit_path", str(tmp_path / "toy_rcm"), "--prompt", "a cat"])
