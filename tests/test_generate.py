"""rcm.generate end to end on CPU with a tiny Wan2.1-shaped release saved in tmp_path (tokenizer.json, umT5,
VAE and the `tiny` DiT preset): prompt → embedding → student → VAE → mp4 plus latents, reproducibility by
seed, and the error paths; and rcm.video's mp4 writer."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rcm import generate
from rcm.config import load_config
from rcm.models.text_encoder import TextEncoder
from rcm.models.umt5 import OFFICIAL_CHECKPOINT_NAME as UMT5_FILE
from rcm.models.umt5 import UMT5Config
from rcm.models.wan_vae import OFFICIAL_CHECKPOINT_NAME as VAE_FILE
from rcm.models.wan_vae import WanVAE
from rcm.train import build_network
from rcm.video import video_to_uint8_frames, write_mp4
from tests.helpers import write_tiny_tokenizer, write_tiny_umt5, write_tiny_wan_vae

REPO = Path(__file__).resolve().parents[1]
imageio = pytest.importorskip("imageio.v2")
pytest.importorskip("imageio_ffmpeg")

# Latent (C, T, H, W) of a 9-frame 32×48 video through the 4×/8× VAE; C is the tiny preset's in_channels.
LATENT = (4, 3, 4, 6)
FRAMES, HEIGHT, WIDTH = 9, 32, 48


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Paths and JSON configs of a tiny release: the `tiny` DiT .pth, umT5 + tokenizer, and the VAE."""
    root = tmp_path_factory.mktemp("release")
    model_cfg = load_config(["model=tiny", "distill.method=flow_matching"]).model
    torch.manual_seed(0)
    dit = build_network(model_cfg)
    with torch.no_grad():
        for parameter in dit.parameters():  # Wan zero-inits the head: randomize so the text and noise matter
            parameter.add_(0.05 * torch.randn_like(parameter))
    torch.save(dit.state_dict(), root / "student.pth")
    write_tiny_tokenizer(root / "google" / "umt5-xxl")
    t5_config = write_tiny_umt5(root / UMT5_FILE, dim=model_cfg.text_dim)
    vae_config = write_tiny_wan_vae(root / VAE_FILE, z_dim=model_cfg.in_channels)
    return {"root": root, "t5_config": json.dumps(t5_config), "vae_config": json.dumps(vae_config)}


def cli_args(release, save_path, *extra, video=True, text=True):
    """Arguments for a CPU float32 run of the tiny release with 2 student steps on the 9-frame latent."""
    root = release["root"]
    args = ["--dit_path", str(root / "student.pth"), "--model", "tiny", "--num_steps", "2", "--device", "cpu",
            "--dtype", "float32", "--latent_shape", *map(str, LATENT), "--save_path", str(save_path)]
    if text:
        args += ["--t5_path", str(root / UMT5_FILE), "--tokenizer_path", str(root / "google" / "umt5-xxl"),
                 "--t5_config", release["t5_config"]]
    if video:
        args += ["--vae_path", str(root / VAE_FILE), "--vae_config", release["vae_config"]]
    return args + list(extra)


def read_mp4(path):
    """Frames (T, H, W, 3) uint8 of an mp4 and its frame rate."""
    with imageio.get_reader(path, format="FFMPEG") as reader:
        frames = [frame for frame in reader]
        fps = reader.get_meta_data()["fps"]
    return torch.from_numpy(np.stack(frames)), fps


def test_help_names_the_flags_and_official_files(capsys):
    """--help exits 0 and documents the model, text, video and output flags and the Wan2.1 file names."""
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dit_path", "--num_steps", "--sigma_max", "--num_samples", "--seed", "--prompt", "--resolution",
                 "--aspect_ratio", "--save_path", "--t5_path", "--tokenizer_path", "--vae_path", "--num_frames",
                 "--offload", "--prompts_file", "--t5_config", "--vae_config"):
        assert flag in text
    assert "Wan2.1_VAE.pth" in text and "umt5-xxl" in text


def test_prompt_to_mp4_writes_each_video_and_its_latent(release, tmp_path, capsys):
    """One mp4 per sample with the decoded frame count, size and fps, and the sampled latent next to it."""
    save_path = tmp_path / "out" / "fox.mp4"
    assert generate.main(cli_args(release, save_path, "--prompt", "a red fox runs on the snow",
                                  "--num_samples", "2", "--fps", "8")) == 0
    for sample in range(2):
        video = tmp_path / "out" / f"fox_sample{sample}.mp4"
        frames, fps = read_mp4(video)
        assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and fps == 8
        latent = torch.load(video.with_suffix(".pt"))
        assert latent.shape == (1, *LATENT) and torch.isfinite(latent).all()
    assert not save_path.exists()  # several videos: numbered names only
    assert "fox_sample1.mp4" in capsys.readouterr().out


def test_same_seed_gives_identical_latents_independent_of_the_other_outputs(release, tmp_path):
    """A seed fixes the latents: a rerun gives the same tensor, the latent next to an mp4 equals the latents-only
    run's, sample 0 does not depend on --num_samples, and another seed gives other latents."""
    prompt = ["--prompt", "a cat runs on the grass"]
    first, again = tmp_path / "first.pt", tmp_path / "again.pt"
    assert generate.main(cli_args(release, first, *prompt, "--num_samples", "2", "--seed", "7", video=False)) == 0
    assert generate.main(cli_args(release, again, *prompt, "--num_samples", "2", "--seed", "7", video=False)) == 0
    latents = torch.load(first)
    assert latents.shape == (2, *LATENT)
    assert torch.equal(latents, torch.load(again))
    assert not torch.equal(latents[0], latents[1])  # samples get their own noise

    # The VAE is given but the .pt path asks for latents only; the mp4 run stores the same latent.
    single = tmp_path / "single.pt"
    assert generate.main(cli_args(release, single, *prompt, "--seed", "7")) == 0
    torch.testing.assert_close(torch.load(single)[0], latents[0], rtol=0, atol=0)
    assert generate.main(cli_args(release, tmp_path / "cat.mp4", *prompt, "--seed", "7")) == 0
    torch.testing.assert_close(torch.load(tmp_path / "cat.pt")[0], latents[0], rtol=0, atol=0)

    other = tmp_path / "other.pt"
    assert generate.main(cli_args(release, other, *prompt, "--seed", "8", video=False)) == 0
    assert not torch.allclose(torch.load(other)[0], latents[0])


def test_prompts_file_gives_one_output_per_prompt_as_if_run_alone(release, tmp_path):
    """Each line of --prompts_file is a prompt (blank lines skipped); its latent equals a --prompt run's,
    and the text matters (two prompts, two latents)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat runs\n\n  the red fox  \n", encoding="utf-8")
    both = tmp_path / "both.pt"
    assert generate.main(cli_args(release, both, "--prompts_file", str(prompts), video=False)) == 0
    alone = tmp_path / "alone.pt"
    assert generate.main(cli_args(release, alone, "--prompt", "the red fox", video=False)) == 0
    latents = torch.load(both)
    assert latents.shape == (2, *LATENT)
    torch.testing.assert_close(latents[1], torch.load(alone)[0], rtol=0, atol=0)
    assert not torch.allclose(latents[0], latents[1])


def test_prompt_equals_its_precomputed_embedding(release, tmp_path):
    """--prompt gives the latent that --embedding gives with the same prompt's padded umT5 embedding (the text
    path is prompt → TextEncoder.encode → the DiT, nothing more)."""
    root = release["root"]
    text_encoder = TextEncoder.from_files(root / UMT5_FILE, root / "google" / "umt5-xxl", dtype=torch.float32,
                                          text_len=8, config=UMT5Config(**json.loads(release["t5_config"])))
    torch.save(text_encoder.encode(["the red fox runs"])[0][0], tmp_path / "fox.pt")
    assert generate.main(cli_args(release, tmp_path / "from_prompt.pt", "--prompt", "the red fox runs",
                                  "--offload", video=False)) == 0
    assert generate.main(cli_args(release, tmp_path / "from_embedding.pt", "--embedding", str(tmp_path / "fox.pt"),
                                  video=False, text=False)) == 0
    torch.testing.assert_close(torch.load(tmp_path / "from_embedding.pt"), torch.load(tmp_path / "from_prompt.pt"),
                               rtol=0, atol=0)


def test_embedding_and_resolution_give_the_official_latent_grid(release, tmp_path):
    """Latents-only from a precomputed embedding: 480p 9:16 with 5 frames samples a 4×2×104×60 latent."""
    embedding = tmp_path / "prompt.pt"
    torch.save(torch.randn(5, 32), embedding)
    args = cli_args(release, tmp_path / "latents.pt", "--embedding", str(embedding), "--num_steps", "1",
                    video=False, text=False)
    args = args[: args.index("--latent_shape")] + args[args.index("--latent_shape") + 5:]
    assert generate.main(args + ["--resolution", "480p", "--aspect_ratio", "9:16", "--num_frames", "5"]) == 0
    assert torch.load(tmp_path / "latents.pt").shape == (1, 4, 2, 104, 60)
    assert generate.video_size("720p", "16:9") == (720, 1280)


def test_prompt_without_text_encoder_is_a_usage_error(release, tmp_path, capsys):
    """--prompt without --t5_path/--tokenizer_path exits 2 saying which files to pass."""
    with pytest.raises(SystemExit) as exit_info:
        generate.main(cli_args(release, tmp_path / "x.pt", "--prompt", "a cat", video=False, text=False))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--t5_path" in error and UMT5_FILE in error and "--tokenizer_path" in error


def test_mid_t_must_make_a_decreasing_grid(release, tmp_path, capsys):
    """--mid_t above arctan(sigma_max) (or too few for --num_steps) exits 2 before anything loads."""
    for mids in (["1.6", "1.0", "0.5"], ["1.2"]):
        with pytest.raises(SystemExit) as exit_info:
            generate.main(cli_args(release, tmp_path / "x.mp4", "--prompt", "a cat", "--num_steps", "4", "--mid_t", *mids))
        assert exit_info.value.code == 2
        assert "--mid_t" in capsys.readouterr().err


@pytest.mark.parametrize("frames", ["80", "0"])
def test_num_frames_must_be_one_plus_four_k(release, tmp_path, capsys, frames):
    """--num_frames that the VAE cannot produce (not 1 + 4k) exits 2 with the rule and valid neighbours."""
    with pytest.raises(SystemExit) as exit_info:
        generate.main(cli_args(release, tmp_path / "x.mp4", "--prompt", "a cat", "--num_frames", frames))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--num_frames must be 1 + 4k" in error and f"got {frames}" in error


@pytest.mark.parametrize("flag, official", [("--vae_path", VAE_FILE), ("--t5_path", UMT5_FILE),
                                            ("--tokenizer_path", "tokenizer.json"), ("--dit_path", ".pth")])
def test_missing_file_exits_2_naming_the_flag_and_the_official_file(release, tmp_path, capsys, flag, official):
    """A missing input exits 2 before any model loads, with a one-line message (no traceback) naming the flag
    and the expected file; nothing is written."""
    args = cli_args(release, tmp_path / "out.mp4", "--prompt", "a cat")
    args[args.index(flag) + 1] = str(tmp_path / "missing")
    assert generate.main(args) == 2
    error = capsys.readouterr().err
    assert flag in error and official in error and "Traceback" not in error
    assert list(tmp_path.iterdir()) == []


def test_wrong_checkpoint_surfaces_the_loader_message(release, tmp_path, capsys):
    """A VAE file that does not match --vae_config exits 2 with the loader's key/shape message; the sampled
    latent is kept next to where the mp4 would be."""
    vae_config = json.loads(release["vae_config"])
    args = cli_args(release, tmp_path / "out.mp4", "--prompt", "a cat")
    args[args.index("--vae_config") + 1] = json.dumps({**vae_config, "dim": 8})
    assert generate.main(args) == 2
    error = capsys.readouterr().err
    last_line = error.strip().splitlines()[-1]  # after the progress bar's lines
    assert last_line.startswith("error: ") and "does not match the model" in last_line and VAE_FILE in last_line
    assert (tmp_path / "out.pt").is_file() and not (tmp_path / "out.mp4").exists()


def test_checkpoint_of_another_model_names_dit_path_and_model(release, tmp_path, capsys):
    """Weights that do not fit the --model preset (here the tiny student under the Wan2.1 1.3B preset) exit 2
    with the loader's key list, naming --dit_path and --model."""
    torch.save(torch.zeros(8, 4096), tmp_path / "prompt.pt")
    args = cli_args(release, tmp_path / "x.pt", "--embedding", str(tmp_path / "prompt.pt"), video=False, text=False)
    args[args.index("--model") + 1] = "wan2.1-t2v-1.3B"
    args[args.index("--latent_shape") + 1] = "16"
    assert generate.main(args) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: --dit_path") and "does not match the model" in last_line
    assert "--model wan2.1-t2v-1.3B" in last_line and not (tmp_path / "x.pt").exists()


def test_missing_video_packages_fail_before_sampling(release, tmp_path, capsys, monkeypatch):
    """Without imageio the run stops at once and says what to install."""
    monkeypatch.setitem(sys.modules, "imageio", None)  # makes `import imageio` raise ImportError
    assert generate.main(cli_args(release, tmp_path / "out.mp4", "--prompt", "a cat")) == 2
    assert "pip install rcm-slurm[video]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_mp4_output_needs_the_vae(release, tmp_path, capsys):
    """An .mp4 --save_path without --vae_path is a usage error naming the VAE file."""
    with pytest.raises(SystemExit):
        generate.main(cli_args(release, tmp_path / "out.mp4", "--prompt", "a cat", video=False))
    assert VAE_FILE in capsys.readouterr().err


# -- rcm.video (the mp4 writer the CLI uses) --

def test_uint8_frames_map_minus_one_to_zero_and_one_to_255():
    """[-1, 1] maps linearly onto 0..255 (clamped, rounded), frames last: (3, T, H, W) → (T, H, W, 3)."""
    video = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 4, 1, 1).expand(3, 4, 1, 1)
    frames = video_to_uint8_frames(video)
    assert frames.shape == (4, 1, 1, 3) and frames.dtype == torch.uint8
    assert frames[:, 0, 0, 0].tolist() == [0, 128, 255, 255]


def test_write_mp4_round_trips_frames_and_rejects_odd_sizes(tmp_path):
    """An mp4 reads back with every frame at its size and close to the written pixels (H.264 at high quality)."""
    torch.manual_seed(0)
    ramp = torch.linspace(-1, 1, 48).view(1, 1, 1, 48)
    video = (ramp + 0.3 * torch.arange(5).view(1, 5, 1, 1) - 0.6).expand(3, 5, 32, 48).clone()
    video[1] *= -1
    write_mp4(video, tmp_path / "ramp.mp4", fps=16)
    frames, fps = read_mp4(tmp_path / "ramp.mp4")
    assert frames.shape == (5, 32, 48, 3) and fps == 16
    expected = video_to_uint8_frames(video).float()
    assert (frames.float() - expected).abs().mean() < 3.0
    with pytest.raises(ValueError, match="even"):
        write_mp4(torch.zeros(3, 1, 33, 48), tmp_path / "odd.mp4")


def test_compile_vae_decodes_the_same_video(release, tmp_path, monkeypatch, capsys):
    """--compile_vae runs the sped-up decoder (frame convolutions + torch.compile) on chunks of 7 latent frames, and
    --vae_chunk_frames sets the chunk: the video written equals the plain decode's up to float32 rounding.
    aot_eager stands in for inductor (CI has no C++ compiler); the default recipe reaches all of the tiny VAE's
    3-frame convolutions."""
    from rcm.parallel import compile as compile_module

    calls = []

    def speed_up(vae):
        compile_module.speed_up_vae_decoder(vae, backend="aot_eager")
        calls.append(sum(isinstance(getattr(m, "_conv_forward", None), functools.partial) for m in vae.decoder.modules()))
        return vae

    videos = {}
    real_write = generate.write_mp4

    def write(video, path, fps):
        videos[path.name] = video.clone()
        return real_write(video, path, fps=fps)

    chunk_sizes = []
    real_decode = WanVAE.decode

    def decode(self, latent, chunked=True, chunk_frames=1):
        chunk_sizes.append(chunk_frames)
        return real_decode(self, latent, chunked=chunked, chunk_frames=chunk_frames)

    monkeypatch.setattr(generate, "speed_up_vae_decoder", speed_up)
    monkeypatch.setattr(generate, "write_mp4", write)
    monkeypatch.setattr(WanVAE, "decode", decode)
    prompt = ["--prompt", "a red fox", "--seed", "3"]
    assert generate.main(cli_args(release, tmp_path / "plain.mp4", *prompt)) == 0
    assert not calls and chunk_sizes == [1]  # Wan2.1's one latent frame at a time
    assert generate.main(cli_args(release, tmp_path / "fast.mp4", *prompt, "--compile_vae")) == 0
    assert calls and calls[0] > 0 and chunk_sizes[-1] == 7  # the fastest measured chunk at modest memory
    assert videos["fast.mp4"].shape == (3, FRAMES, HEIGHT, WIDTH)
    torch.testing.assert_close(videos["fast.mp4"], videos["plain.mp4"], rtol=0, atol=1e-5)
    assert generate.main(cli_args(release, tmp_path / "two.mp4", *prompt, "--vae_chunk_frames", "2")) == 0
    assert chunk_sizes[-1] == 2
    torch.testing.assert_close(videos["two.mp4"], videos["plain.mp4"], rtol=0, atol=1e-5)
    with pytest.raises(SystemExit):
        generate.main(cli_args(release, tmp_path / "zero.mp4", *prompt, "--vae_chunk_frames", "0"))
    assert "--vae_chunk_frames must be at least 1, got 0" in capsys.readouterr().err
    assert read_mp4(tmp_path / "fast.mp4")[0].shape == (FRAMES, HEIGHT, WIDTH, 3)


def test_safetensors_student_directory_gives_the_pth_latent(release, tmp_path):
    """--dit_path may be a directory of safetensors shards (as Wan2.1 is published): the same latent as the .pth."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = torch.load(release["root"] / "student.pth", weights_only=True)
    names = sorted(state)
    (tmp_path / "dit").mkdir()
    safetensors_torch.save_file({k: state[k].contiguous() for k in names[:4]}, tmp_path / "dit" / "a.safetensors")
    safetensors_torch.save_file({k: state[k].contiguous() for k in names[4:]}, tmp_path / "dit" / "b.safetensors")
    assert generate.main(cli_args(release, tmp_path / "pth.pt", "--prompt", "a red fox", video=False)) == 0
    argv = cli_args(release, tmp_path / "st.pt", "--prompt", "a red fox", video=False)
    argv[argv.index("--dit_path") + 1] = str(tmp_path / "dit")
    assert generate.main(argv) == 0
    torch.testing.assert_close(torch.load(tmp_path / "st.pt"), torch.load(tmp_path / "pth.pt"), rtol=0, atol=0)


def embedding_args(release, save_path, dit_path, embedding):
    """Latents only from a precomputed embedding (no text encoder, no VAE)."""
    args = cli_args(release, save_path, "--embedding", str(embedding), video=False, text=False)
    args[args.index("--dit_path") + 1] = str(dit_path)
    return args


@pytest.fixture
def embedding(tmp_path):
    """A (tokens, text_dim) embedding of the tiny preset."""
    text_dim = load_config(["model=tiny", "distill.method=flow_matching"]).model.text_dim
    torch.save(torch.randn(3, text_dim, generator=torch.Generator().manual_seed(0)), tmp_path / "prompt.pt")
    return tmp_path / "prompt.pt"


@pytest.mark.parametrize("content, expected", [
    ([1, 2, 3], "holds a list of 3 items, not a state dict of network weights"),
    (torch.zeros(4), "holds a single tensor of shape (4,), not a state dict of network weights"),
    ("text", "is not a torch checkpoint"),
])
def test_dit_path_that_is_no_checkpoint_is_one_sentence(release, tmp_path, capsys, embedding, content, expected):
    """A .pth holding a list or a tensor, or a text file, as --dit_path: exit 2 naming the flag, the file and what
    it holds; nothing is written."""
    dit_path = tmp_path / "odd.pth"
    dit_path.write_text("hello\n") if content == "text" else torch.save(content, dit_path)
    assert generate.main(embedding_args(release, tmp_path / "x.pt", dit_path, embedding)) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: --dit_path: {dit_path} ") and expected in last_line
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("content, expected", [
    ([1, 2, 3], "--embedding {path} holds a list of 3 items, not a float tensor of text embeddings"),
    ("text", "--embedding: {path} is not a torch checkpoint"),
])
def test_embedding_that_is_no_tensor_is_one_sentence(release, tmp_path, capsys, content, expected):
    path = tmp_path / "odd.pt"
    path.write_text("hello\n") if content == "text" else torch.save(content, path)
    assert generate.main(embedding_args(release, tmp_path / "x.pt", release["root"] / "student.pth", path)) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: " + expected.format(path=path))


@pytest.fixture
def damaged_run(release, tmp_path):
    """A run directory of the tiny preset with checkpoints at iterations 1 and 2 (EMA = the release's student, and
    that plus 0.01); the newest has one flipped exponent bit in its EMA's largest tensor."""
    from omegaconf import OmegaConf

    from rcm.checkpoint.manager import CheckpointManager
    from tests.checkpoint.test_load_path import flip_exponent_bit

    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(load_config(["model=tiny", "distill.method=flow_matching"]), run / "config.yaml")
    weights = torch.load(release["root"] / "student.pth", weights_only=True)
    manager = CheckpointManager(run / "checkpoints", keep_last=5)
    for iteration in (1, 2):
        ema = {name: value + 0.01 * (iteration - 1) for name, value in weights.items()}
        manager.save(iteration, {"ema": ema}, {"iteration": iteration}, wait=True)
    flip_exponent_bit(run / "checkpoints/iter_000000002")
    return run


def test_a_damaged_ema_weight_falls_back_to_the_previous_checkpoint(release, damaged_run, tmp_path, caplog, embedding):
    """The issue's case (one flipped exponent bit in an EMA weight gave NaN latents and exit 0): generate warns,
    naming the damaged shard, and samples with iteration 1's weights: the latents of the release's student."""
    args = embedding_args(release, tmp_path / "run.pt", damaged_run, embedding)
    args.remove("--model"), args.remove("tiny")
    with caplog.at_level("WARNING"):
        assert generate.main(args) == 0
    assert f"skipping damaged checkpoint {damaged_run / 'checkpoints/iter_000000002'}" in caplog.text
    assert generate.main(embedding_args(release, tmp_path / "pth.pt", release["root"] / "student.pth", embedding)) == 0
    latents = torch.load(tmp_path / "run.pt")
    assert torch.isfinite(latents).all()
    torch.testing.assert_close(latents, torch.load(tmp_path / "pth.pt"), rtol=0, atol=0)


def test_every_checkpoint_damaged_exits_2_naming_the_files(release, damaged_run, tmp_path, capsys, embedding):
    from tests.checkpoint.damage import flip_tensor_byte

    shard = flip_tensor_byte(damaged_run / "checkpoints/iter_000000001")
    args = embedding_args(release, tmp_path / "run.pt", damaged_run, embedding)
    assert generate.main(args) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: every checkpoint in {damaged_run / 'checkpoints'} is damaged")
    assert str(shard) in last_line and not (tmp_path / "run.pt").exists()


def test_non_finite_latents_are_not_written(release, tmp_path, capsys, embedding, monkeypatch):
    """Finite weights whose sampling still overflows: an error, not a file of NaN latents."""
    monkeypatch.setattr(generate, "sample_latents", lambda *args: [torch.full((1, *LATENT), float("nan"))])
    assert generate.main(embedding_args(release, tmp_path / "x.pt", release["root"] / "student.pth", embedding)) == 2
    assert "sampling gave non-finite latents" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_rcm_debug_shows_the_traceback_of_a_one_line_error(release, tmp_path, capsys, embedding, monkeypatch):
    """RCM_DEBUG=1: the same one-line error, with the traceback above it."""
    (tmp_path / "notes.pth").write_text("hello\n")
    args = embedding_args(release, tmp_path / "x.pt", tmp_path / "notes.pth", embedding)
    monkeypatch.setenv("RCM_DEBUG", "1")
    assert generate.main(args) == 2
    error = capsys.readouterr().err
    assert "Traceback (most recent call last)" in error and "NotACheckpointError" in error
    assert error.strip().splitlines()[-1].startswith("error: --dit_path:")


def test_vae_path_that_is_a_truncated_file_ends_in_one_line(release, tmp_path, embedding):
    """`python -m rcm.generate --vae_path cut.pth` (a truncated .pth; the other bad files are the loader's tests):
    exit 2 with one line naming the file, no traceback; the sampled latent is kept beside the mp4 that could not
    be written."""
    from tests.test_torch_files import BAD_FILE_MESSAGES, write_bad_torch_file

    vae_path = write_bad_torch_file(tmp_path / "cut.pth", "truncated")
    args = cli_args(release, tmp_path / "out.mp4", "--embedding", str(embedding), text=False)
    args[args.index("--vae_path") + 1] = str(vae_path)
    result = subprocess.run([sys.executable, "-m", "rcm.generate", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RCM_DEBUG": "0", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: Wan VAE weights {vae_path} {BAD_FILE_MESSAGES['truncated']}")
    assert "Traceback" not in result.stderr
    assert (tmp_path / "out.pt").is_file() and not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("flag", ["--vae_path", "--t5_path"])
def test_a_text_file_as_vae_or_encoder_fails_before_sampling(release, tmp_path, capsys, monkeypatch, flag):
    """A text file given as the VAE or the text encoder ends in one line naming the flag and the file, before any
    network loads (not after minutes of sampling)."""
    notes = tmp_path / "notes.pth"
    notes.write_text("not weights\n")
    argv = cli_args(release, tmp_path / "out.mp4", "--prompt", "a cat")
    argv[argv.index(flag) + 1] = str(notes)
    monkeypatch.setattr(generate.NetworkSource, "load", lambda *a, **k: pytest.fail("a network loaded"))
    assert generate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and str(notes) in err[0] and "not a torch checkpoint" in err[0]
