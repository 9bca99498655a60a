"""tools/encode_negative_prompt.py end to end on a tiny tokenizer and a tiny umT5 saved in tmp_path: the file it
writes is what the training loader (`rcm.train.load_negative_embedding`) reads as data.negative_embedding."""
import json
from pathlib import Path

import pytest
import torch

from rcm.models.text_encoder import TextEncoder, UMT5Tokenizer
from rcm.models.umt5 import OFFICIAL_CHECKPOINT_NAME, UMT5Config, UMT5Encoder
from rcm.train import load_negative_embedding
from tests.helpers import load_tool as load_tool_module

TOOL = Path(__file__).resolve().parents[2] / "tools" / "encode_negative_prompt.py"
TINY = dict(vocab_size=8, dim=16, dim_attn=16, dim_ffn=24, num_heads=2, num_layers=2, num_buckets=8)
TEXT_LEN = 8


def load_tool():
    """The tool's module."""
    return load_tool_module("encode_negative_prompt")


@pytest.fixture
def tiny_release(tmp_path) -> Path:
    """A directory laid out like the Wan2.1 release: the encoder .pth (bf16) and google/umt5-xxl/tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "blurry": 3, "static": 4, "ugly": 5, ",": 6, "low": 7}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    tokenizer.save(str(tmp_path / "google" / "umt5-xxl" / "tokenizer.json"))
    torch.manual_seed(0)
    encoder = UMT5Encoder(UMT5Config(**TINY))
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.5)
    torch.save({k: v.to(torch.bfloat16) for k, v in encoder.state_dict().items()}, tmp_path / OFFICIAL_CHECKPOINT_NAME)
    return tmp_path


def tool_args(release: Path, out: Path, *extra: str) -> list[str]:
    """Arguments that point the tool at the tiny release, on CPU in float32."""
    return ["--t5_path", str(release / OFFICIAL_CHECKPOINT_NAME),
            "--tokenizer_path", str(release / "google" / "umt5-xxl"),
            "--out", str(out), "--device", "cpu", "--dtype", "float32", "--text_len", str(TEXT_LEN),
            "--encoder_config", json.dumps(TINY), *extra]


def test_help_lists_the_options(capsys):
    """--help exits 0 and documents the checkpoint, tokenizer, prompt and output options."""
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--t5_path", "--tokenizer_path", "--prompt", "--out", "--device", "--dtype"):
        assert option in text
    assert "models_t5_umt5" in text  # the official file name (argparse may wrap it at a hyphen)


def test_writes_the_embedding_the_training_loader_reads(tiny_release, tmp_path, capsys):
    """The written file loads through load_negative_embedding as (text_len, dim) float32: the prompt's
    embedding followed by zeros, equal to TextEncoder.encode of the same prompt."""
    out = tmp_path / "data" / "negative_embedding.pt"
    assert load_tool().main(tool_args(tiny_release, out, "--prompt", "blurry,  static &amp; ugly")) == 0
    assert "data.negative_embedding=" in capsys.readouterr().out

    loaded = load_negative_embedding(str(out), torch.device("cpu"))
    assert loaded.shape == (TEXT_LEN, TINY["dim"]) and loaded.dtype == torch.float32

    text_encoder = TextEncoder.from_files(tiny_release / OFFICIAL_CHECKPOINT_NAME, tiny_release / "google" / "umt5-xxl",
                                          dtype=torch.float32, text_len=TEXT_LEN, config=UMT5Config(**TINY))
    expected, lengths = text_encoder.encode(["blurry, static & ugly"])
    assert lengths.tolist() == [5]  # blurry, static & ugly </s>: "&" is <unk>
    torch.testing.assert_close(loaded, expected[0], rtol=0, atol=0)
    assert (loaded[5:] == 0).all() and (loaded[:5].abs().sum(dim=-1) > 0).all()


def test_default_prompt_is_wans_negative_prompt(tiny_release, tmp_path):
    """Without --prompt the tool encodes Wan2.1's sample_neg_prompt."""
    out = tmp_path / "negative_embedding.pt"
    assert load_tool().main(tool_args(tiny_release, out)) == 0
    tokenizer = UMT5Tokenizer(tiny_release / "google" / "umt5-xxl", max_length=TEXT_LEN)
    _, mask = tokenizer.tokenize([load_tool().WAN_NEGATIVE_PROMPT])
    embedding = torch.load(out, weights_only=True)
    assert embedding.shape == (TEXT_LEN, TINY["dim"])
    assert ((embedding.abs().sum(dim=-1) > 0).long() == mask[0]).all()


def test_missing_checkpoint_is_reported_with_the_official_name(tiny_release, tmp_path, capsys):
    """A wrong --t5_path exits 2 and the message names the expected Wan2.1 file; nothing is written."""
    out = tmp_path / "negative_embedding.pt"
    args = tool_args(tiny_release, out)
    args[1] = str(tmp_path / "missing.pth")
    assert load_tool().main(args) == 2
    error = capsys.readouterr().err
    assert "missing.pth" in error and OFFICIAL_CHECKPOINT_NAME in error
    assert not out.exists()


def test_unknown_encoder_config_key_is_rejected(tiny_release, tmp_path, capsys):
    """--encoder_config with a key UMT5Config lacks exits 2 naming the allowed keys."""
    args = tool_args(tiny_release, tmp_path / "x.pt")
    args[args.index("--encoder_config") + 1] = json.dumps({**TINY, "layers": 3})
    assert load_tool().main(args) == 2
    assert "num_layers" in capsys.readouterr().err
