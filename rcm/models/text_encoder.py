"""Prompt strings → umT5 embeddings the way Wan2.1 makes them: its prompt cleaning, the google/umt5-xxl
tokenizer (from a local directory only), and the umT5-XXL encoder.

Wan's own pipeline returns each prompt's embedding trimmed to its token count, and its DiT zero-pads the
context back to ``text_len`` (512) before the text projection. `TextEncoder.encode` returns that padded
form directly: positions past a prompt's length hold zeros, so trimming and re-padding changes nothing.
"""
from __future__ import annotations

import html
import html.entities
import logging
import re
import unicodedata
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from rcm.models.umt5 import UMT5Config, UMT5Encoder, load_umt5_encoder

logger = logging.getLogger(__name__)

TEXT_LEN = 512  # Wan2.1's text_len: tokens per prompt after padding/truncation, what the DiT expects
TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"

# Wan2.1's `sample_neg_prompt` (wan/configs/shared_config.py): the negative prompt of all its samplers.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# ----------------------------------------------------------------------------------------------------
# prompt cleaning (Wan's `clean='whitespace'`)

# Unicode White_Space, which is what `\s` means in the `regex` module Wan's tokenizer wrapper uses
# (Python's `re` would also match U+1C–U+1F).
_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy's fix_text, HTML-unescape twice, strip, collapse whitespace runs to one space."""
    text = fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


_warned_without_ftfy = False


def fix_text(text: str) -> str:
    """``ftfy.fix_text`` when ftfy is installed, else `fix_text_without_ftfy` (the same except on mojibake)."""
    global _warned_without_ftfy
    try:
        import ftfy
    except ImportError:
        if not _warned_without_ftfy:
            logger.warning("ftfy is not installed: prompts are cleaned by a built-in equivalent that matches "
                           "it except on mojibake (text decoded with the wrong codec); pip install ftfy to match "
                           "Wan2.1 exactly")
            _warned_without_ftfy = True
        return fix_text_without_ftfy(text)
    return ftfy.fix_text(text)


_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_C1_CONTROL = re.compile("[\x80-\x9f]")
_ANSI_ESCAPE = re.compile(r"\x1b\[(?:\d|;)*[a-zA-Z]")
_CURLY_SINGLE_QUOTE = re.compile("[\u02bc\u2018-\u201b]")
_CURLY_DOUBLE_QUOTE = re.compile("[\u201c-\u201f]")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_ENDING = re.compile("\r\n|[\r\u2028\u2029\x85]")
_LATIN_LIGATURES = str.maketrans({
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
})
# Halfwidth and fullwidth forms (U+FF01–U+FFEF) to their standard forms, and the ideographic space to a
# space: this turns the fullwidth commas of Chinese prompts into ASCII commas, as ftfy does.
_STANDARD_WIDTH = {0x3000: " "}
_STANDARD_WIDTH.update({code: unicodedata.normalize("NFKC", chr(code)) for code in range(0xFF01, 0xFFF0)
                        if unicodedata.normalize("NFKC", chr(code)) != chr(code)})
# Invisible controls nobody means to type: C0 controls but tab, newline, form feed and carriage return,
# DEL, deprecated Arabic shaping controls, the byte order mark, interlinear annotation and U+FFFC.
_INVISIBLE_CONTROLS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                                     0xFEFF, *range(0xFFF9, 0xFFFD)])


def fix_text_without_ftfy(text: str) -> str:
    """ftfy.fix_text's default clean-ups for text without mojibake, which needs ftfy itself to be detected.

    Like ftfy it works line by line, repeats the fixes until nothing changes, and stops decoding HTML
    entities from the first line that contains '<' on (that text looks like real HTML).
    """
    fixed_lines = []
    decode_entities = True
    for line in re.findall(r"[^\n]*\n|[^\n]+", text):
        if "<" in line:
            decode_entities = False
        while True:
            before = line
            if decode_entities:
                line = _HTML_ENTITY.sub(_decode_entity, line)
            line = _C1_CONTROL.sub(_c1_as_windows_1252, line)
            line = line.translate(_LATIN_LIGATURES).translate(_STANDARD_WIDTH)
            line = _CURLY_SINGLE_QUOTE.sub("'", _CURLY_DOUBLE_QUOTE.sub('"', line))
            line = _LINE_ENDING.sub("\n", line)
            line = _SURROGATE.sub("\ufffd", _SURROGATE_PAIR.sub(_join_surrogate_pair, line))
            line = _ANSI_ESCAPE.sub("", line).translate(_INVISIBLE_CONTROLS)
            line = unicodedata.normalize("NFC", line)
            if line == before:
                break
        fixed_lines.append(line)
    return "".join(fixed_lines)


def _decode_entity(match: re.Match) -> str:
    # Only entities ending in ';' are decoded ("this&not that" stays), plus ALL-CAPS spellings of
    # lowercase entity names ("P&EACUTE;REZ" → "PÉREZ") that are not entities of their own.
    entity = match.group(0)
    if entity.startswith("&#"):
        decoded = html.unescape(entity)
        return entity if ";" in decoded else decoded
    name = entity[1:]
    if name in html.entities.html5:
        return html.entities.html5[name]
    if name == name.upper() and name.lower() in html.entities.html5 and html.unescape(entity) == entity:
        return html.entities.html5[name.lower()].upper()
    return entity


def _c1_as_windows_1252(match: re.Match) -> str:
    # Browsers read stray C1 controls as Windows-1252; its five undefined bytes stay as they are.
    try:
        return bytes([ord(match.group(0))]).decode("cp1252")
    except UnicodeDecodeError:
        return match.group(0)


def _join_surrogate_pair(match: re.Match) -> str:
    high, low = (ord(c) for c in match.group(0))
    return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))


# ----------------------------------------------------------------------------------------------------
# tokenizer


def resolve_tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json of a local google/umt5-xxl tokenizer directory (or that file itself)."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"umT5 tokenizer not found: {file} does not exist. Point the tokenizer path at a local copy of the "
            f"google/umt5-xxl tokenizer, a directory holding {TOKENIZER_FILE} (the Wan2.1 model release ships "
            "it as google/umt5-xxl/ next to models_t5_umt5-xxl-enc-bf16.pth). Nothing is downloaded.")
    return file


class UMT5Tokenizer:
    """The google/umt5-xxl tokenizer from a local tokenizer.json, applied like Wan's `HuggingfaceTokenizer`:
    clean each prompt, append </s> (as HF's T5 tokenizers do), truncate to ``max_length`` keeping </s>
    last, pad with <pad> to exactly ``max_length``."""

    def __init__(self, path: str | Path, max_length: int = TEXT_LEN):
        file = resolve_tokenizer_file(path)
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ImportError(f"reading the umT5 tokenizer {file} needs the 'tokenizers' package: "
                              "pip install tokenizers") from error
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for </s>), got {max_length}")
        self.max_length = max_length
        self.backend = Tokenizer.from_file(str(file))
        # The length rules are applied below, so settings saved in the file must not apply twice.
        self.backend.no_truncation()
        self.backend.no_padding()
        self.eos_id = self._token_id(EOS_TOKEN, file)
        self.pad_id = self._token_id(PAD_TOKEN, file)

    def _token_id(self, token: str, file: Path) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{file} has no {token} token: it is not a T5 tokenizer (expected google/umt5-xxl)")
        return token_id

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and the mask (1 at real tokens, 0 at padding), both int64 (B, max_length)."""
        if isinstance(prompts, str):
            raise TypeError("tokenize takes a sequence of prompts; wrap a single prompt in a list")
        cleaned = [clean_prompt(prompt) for prompt in prompts]
        # No special tokens from the file's post-processor: </s> is appended here, after truncation,
        # exactly where HF's T5 tokenizer puts it.
        encodings = self.backend.encode_batch(cleaned, add_special_tokens=False)
        token_ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(prompts), self.max_length), dtype=torch.int64)
        for row, encoding in enumerate(encodings):
            ids = encoding.ids[: self.max_length - 1] + [self.eos_id]
            token_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            mask[row, : len(ids)] = 1
        return token_ids, mask


# ----------------------------------------------------------------------------------------------------
# encoder


def encode_token_ids(encoder: UMT5Encoder, token_ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """The encoder's hidden states (B, L, dim), zero past each prompt's length, computed only over the first
    ``max(lengths)`` positions.

    Padding is masked as keys and the position bias depends only on distances, so a real token's state does
    not depend on how much padding follows; Wan's pipeline then keeps only those states. Its encoder still
    runs all 512 positions; here a 120-token prompt costs a quarter of that.
    """
    longest = max(int(mask_BL.sum(dim=1).max()), 1)
    hidden = encoder(token_ids_BL[:, :longest], mask_BL[:, :longest])
    hidden = hidden.masked_fill(mask_BL[:, :longest, None] == 0, 0.0)
    return F.pad(hidden, (0, 0, 0, token_ids_BL.shape[1] - longest))


class TextEncoder:
    """Prompts → umT5 embeddings as Wan2.1 makes them (its cleaning, tokenizer and encoder)."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: UMT5Tokenizer):
        self.encoder = encoder
        self.tokenizer = tokenizer

    @classmethod
    def from_files(
        cls,
        checkpoint_path: str | Path,
        tokenizer_path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        text_len: int = TEXT_LEN,
        config: UMT5Config | None = None,
    ) -> "TextEncoder":
        """The encoder of ``checkpoint_path`` (umT5-XXL unless ``config`` says otherwise) with the local
        tokenizer of ``tokenizer_path``; the tokenizer is read first, so a wrong path fails before 11 GB load."""
        tokenizer = UMT5Tokenizer(tokenizer_path, max_length=text_len)
        return cls(load_umt5_encoder(checkpoint_path, device=device, dtype=dtype, config=config), tokenizer)

    @property
    def text_len(self) -> int:
        """Tokens per encoded prompt (padding included)."""
        return self.tokenizer.max_length

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, text_len, dim) with zeros past each prompt's length, and the lengths (B,) int64.

        Wan's pipeline trims each embedding to its length (``[u[:v] for u, v in zip(context, lengths)]``) and
        its DiT zero-pads the context back to text_len, so this padded form is what the DiT sees either way;
        ``embeddings[i, :lengths[i]]`` is Wan's trimmed embedding. The length counts </s>. Both tensors are on
        the encoder's device, the embeddings in its dtype.
        """
        device = self.encoder.token_embedding.weight.device
        token_ids, mask = self.tokenizer.tokenize(prompts)
        token_ids, mask = token_ids.to(device), mask.to(device)
        return encode_token_ids(self.encoder, token_ids, mask), mask.sum(dim=1)
