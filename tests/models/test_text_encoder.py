"""Prompt → embedding as Wan2.1 does it: prompt cleaning, the local tokenizer (EOS, truncation, padding),
and `TextEncoder.encode`'s zero padding past each prompt's length; on a tiny tokenizer and encoder."""
import sys

import pytest
import torch

from rcm.models import text_encoder as text_encoder_module
from rcm.models.text_encoder import (
    WAN_NEGATIVE_PROMPT,
    TextEncoder,
    UMT5Tokenizer,
    clean_prompt,
    fix_text_without_ftfy,
)
from rcm.models.umt5 import UMT5Config, UMT5Encoder
from tests.helpers import write_tiny_tokenizer as write_tiny_tokenizer_with_words

WORDS = ["a", "cat", "dog", "runs", "on", "the", "grass", "<b>", ",", "big"]
TINY = dict(vocab_size=3 + len(WORDS), dim=16, dim_attn=16, dim_ffn=24, num_heads=2, num_layers=2, num_buckets=8)
TEXT_LEN = 8


def write_tiny_tokenizer(directory) -> dict[str, int]:
    """The shared tiny T5-like tokenizer over this file's words."""
    return write_tiny_tokenizer_with_words(directory, WORDS)


def tiny_text_encoder(tmp_path) -> tuple[TextEncoder, dict[str, int]]:
    """A float64 tiny encoder with random weights and the tiny tokenizer, text_len 8."""
    vocab = write_tiny_tokenizer(tmp_path / "umt5-xxl")
    torch.manual_seed(0)
    encoder = UMT5Encoder(UMT5Config(**TINY)).double().eval()
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.5)
    return TextEncoder(encoder, UMT5Tokenizer(tmp_path / "umt5-xxl", max_length=TEXT_LEN)), vocab


# -- cleaning --

def test_clean_prompt_unescapes_html_twice_and_collapses_whitespace():
    """Entities escaped twice are decoded, whitespace runs (tabs, newlines, NBSP) become one space, ends stripped."""
    assert clean_prompt("  a &amp;lt;b&amp;gt;\t\n cat &amp;amp; dog \u00a0 ") == "a <b> cat & dog"
    assert clean_prompt("one\u3000two  three\r\n") == "one two three"
    assert clean_prompt("") == ""


def test_clean_prompt_normalises_width_and_quotes_like_ftfy():
    """Fullwidth punctuation and curly quotes become ASCII: Wan's Chinese negative prompt is encoded with commas."""
    assert clean_prompt("中文，测试“引号”") == '中文,测试"引号"'
    cleaned = clean_prompt(WAN_NEGATIVE_PROMPT)
    assert "，" not in cleaned and cleaned.count(",") == WAN_NEGATIVE_PROMPT.count("，")
    assert cleaned.startswith("色调艳丽,过曝,静态") and cleaned.endswith("背景人很多,倒着走")


FTFY_CASES = [
    WAN_NEGATIVE_PROMPT,
    "a &amp;amp; b",
    "P&EACUTE;REZ &NTILDE; &nTILDE; &LTRI; &SZLIG;",
    "this&not that &#39; &#x27; &#0;",
    "line &amp; one\nline <b> &amp; two\n &amp; three",
    "\u201chello\u201d \u2018x\u2019 \u02bcy",
    "\ufb01ne \ufb02ow \u0132ssel",
    "ＡＢＣ１２３，。！\u3000ｶﾀｶﾅ",
    "cafe\u0301",
    "x\x00y\x07z\x7f\ufeff\u206a\ufffc \x1c\x1f",
    "\x1b[31mred\x1b[0m",
    "a\r\nb\rc\u2028d\u2029e",
    "\x80\x81\x9d\x9f \x85",
    "emoji \U0001F600 \ud83d\ude00 \ud800 lone",
    "tab\tand\x0bvt\x0cff",
    "   plain ascii   ",
]


@pytest.mark.parametrize("text", FTFY_CASES)
def test_fallback_matches_ftfy_on_text_without_mojibake(text):
    """Without ftfy installed, the built-in fixer gives what ftfy.fix_text gives on text without mojibake."""
    ftfy = pytest.importorskip("ftfy")
    assert fix_text_without_ftfy(text) == ftfy.fix_text(text)


def test_clean_prompt_without_ftfy_equals_clean_prompt_with_it(monkeypatch):
    """Cleaning falls back to the built-in fixer when ftfy cannot be imported, with the same result."""
    with_ftfy = [clean_prompt(text) for text in FTFY_CASES]
    monkeypatch.setitem(sys.modules, "ftfy", None)  # makes `import ftfy` raise ImportError
    monkeypatch.setattr(text_encoder_module, "_warned_without_ftfy", False)
    assert [clean_prompt(text) for text in FTFY_CASES] == with_ftfy


# -- tokenizer --

def test_tokenizer_appends_eos_and_pads_to_max_length(tmp_path):
    """Each prompt is cleaned, gets </s>, and is padded with <pad> to max_length; the mask marks real tokens."""
    vocab = write_tiny_tokenizer(tmp_path / "tok")
    tokenizer = UMT5Tokenizer(tmp_path / "tok", max_length=TEXT_LEN)
    ids, mask = tokenizer.tokenize(["a  cat\nruns", "", "a &lt;b&gt; zebra"])
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (3, TEXT_LEN)
    v = vocab
    assert ids[0].tolist() == [v["a"], v["cat"], v["runs"], v["</s>"]] + [v["<pad>"]] * 4
    assert ids[1].tolist() == [v["</s>"]] + [v["<pad>"]] * 7
    assert ids[2].tolist()[:5] == [v["a"], v["<b>"], v["<unk>"], v["</s>"], v["<pad>"]]
    assert mask.sum(dim=1).tolist() == [4, 1, 4]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_tokenizer_truncation_keeps_eos_last(tmp_path):
    """A prompt longer than max_length keeps its first max_length−1 tokens and ends with </s>, like HF's T5."""
    vocab = write_tiny_tokenizer(tmp_path / "tok")
    tokenizer = UMT5Tokenizer(tmp_path / "tok" / "tokenizer.json", max_length=TEXT_LEN)
    words = "a big dog runs on the big grass , a cat runs".split()
    ids, mask = tokenizer.tokenize([" ".join(words)])
    assert ids[0].tolist() == [vocab[w] for w in words[: TEXT_LEN - 1]] + [vocab["</s>"]]
    assert mask[0].tolist() == [1] * TEXT_LEN


def test_missing_tokenizer_says_where_to_get_it(tmp_path):
    """A tokenizer directory without tokenizer.json raises FileNotFoundError naming the file and google/umt5-xxl."""
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl") as error:
        UMT5Tokenizer(tmp_path / "no_such_dir")
    assert "tokenizer.json" in str(error.value) and "no_such_dir" in str(error.value)


def test_tokenizer_without_t5_special_tokens_is_rejected(tmp_path):
    """A tokenizer.json without </s> is not a T5 tokenizer; the error names the file."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]"))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json has no </s>"):
        UMT5Tokenizer(tmp_path)


# -- encoder --

def test_encode_returns_zero_padded_embeddings_and_lengths(tmp_path):
    """encode gives (B, text_len, dim) with zeros past each length, and each prompt's trimmed embedding equals
    the encoder's output for that prompt's tokens alone (what Wan's pipeline keeps)."""
    text_encoder, vocab = tiny_text_encoder(tmp_path)
    prompts = ["a cat runs on the grass", "dog", "the  big\tdog"]
    embeddings, lengths = text_encoder.encode(prompts)
    assert embeddings.shape == (3, TEXT_LEN, TINY["dim"]) and embeddings.dtype == torch.float64
    assert lengths.tolist() == [7, 2, 4]
    for row, (prompt, length) in enumerate(zip(prompts, lengths.tolist())):
        assert (embeddings[row, length:] == 0).all()
        assert (embeddings[row, :length].abs().sum(dim=-1) > 0).all()
        ids = torch.tensor([[vocab[w] for w in prompt.split()] + [vocab["</s>"]]])
        alone = text_encoder.encoder(ids, torch.ones_like(ids))
        torch.testing.assert_close(embeddings[row : row + 1, :length], alone, rtol=1e-12, atol=1e-12)
    assert not embeddings.requires_grad


def test_from_files_loads_a_saved_encoder_and_tokenizer(tmp_path):
    """TextEncoder.from_files reads the tokenizer directory and the checkpoint and encodes like the source model."""
    source, _ = tiny_text_encoder(tmp_path)
    torch.save(source.encoder.state_dict(), tmp_path / "encoder.pth")
    loaded = TextEncoder.from_files(tmp_path / "encoder.pth", tmp_path / "umt5-xxl", dtype=torch.float64,
                                    text_len=TEXT_LEN, config=UMT5Config(**TINY))
    assert loaded.text_len == TEXT_LEN
    expected, expected_lengths = source.encode(["a big cat"])
    got, lengths = loaded.encode(["a big cat"])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert lengths.tolist() == expected_lengths.tolist() == [4]


def test_from_files_checks_the_tokenizer_before_loading_weights(tmp_path):
    """A wrong tokenizer path fails at once, before the (11 GB in real life) checkpoint is touched."""
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        TextEncoder.from_files(tmp_path / "does_not_exist.pth", tmp_path / "no_tokenizer")


def test_encoding_skips_the_padding_columns_and_equals_the_full_length_encoding(tmp_path):
    """encode runs the encoder only over the longest prompt's tokens; the result equals encoding all text_len
    positions (Wan's way) and zeroing the padding, to float64 rounding."""
    text_encoder, _ = tiny_text_encoder(tmp_path)
    prompts = ["a cat runs", "dog"]
    token_ids, mask = text_encoder.tokenizer.tokenize(prompts)
    full = text_encoder.encoder(token_ids, mask).masked_fill(mask[:, :, None] == 0, 0.0)
    lengths_seen = []
    hook = text_encoder.encoder.register_forward_pre_hook(lambda module, args: lengths_seen.append(args[0].shape[1]))
    embeddings, lengths = text_encoder.encode(prompts)
    hook.remove()
    assert lengths.tolist() == [4, 2] and lengths_seen == [4]  # 4 of TEXT_LEN = 8 positions
    assert embeddings.shape == full.shape == (2, TEXT_LEN, TINY["dim"])
    torch.testing.assert_close(embeddings, full, rtol=1e-12, atol=1e-12)
    assert (embeddings[0] - full[0]).abs().max() < 1e-12 and (embeddings[:, 4:] == 0).all()
