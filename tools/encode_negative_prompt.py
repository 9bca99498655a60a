"""Encode the negative prompt with umT5-XXL into the file that the training config's
``data.negative_embedding`` points to (CFG's unconditional branch).

Example:
    python tools/encode_negative_prompt.py \\
        --t5_path Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth \\
        --tokenizer_path Wan2.1-T2V-1.3B/google/umt5-xxl \\
        --out runs/wan_data/negative_embedding.pt
    # then: data.negative_embedding=runs/wan_data/negative_embedding.pt

The file holds one float32 tensor (text_len, dim) = (512, 4096): the prompt's embedding, zero past its
tokens, which is what Wan's DiT sees after padding its trimmed context (see rcm.models.text_encoder).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from rcm.config import config_from_json, json_argument
from rcm.models.text_encoder import TEXT_LEN, WAN_NEGATIVE_PROMPT, TextEncoder
from rcm.models.umt5 import OFFICIAL_CHECKPOINT_NAME, UMT5Config

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

__all__ = ["encode_prompt_to_file", "encoder_config_from_json", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the negative-prompt encoder."""
    parser = argparse.ArgumentParser(
        description="Encode a prompt (by default Wan2.1's negative prompt) with umT5-XXL and save the embedding\n"
                    "as a (text_len, dim) float32 tensor, zero past the prompt's tokens, for data.negative_embedding.",
        epilog=("Example:\n  python tools/encode_negative_prompt.py --t5_path Wan2.1-T2V-1.3B/"
                f"{OFFICIAL_CHECKPOINT_NAME} \\\n      --tokenizer_path Wan2.1-T2V-1.3B/google/umt5-xxl "
                "--out runs/wan_data/negative_embedding.pt"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--t5_path", "--t5-path", type=Path, required=True,
                        help=f"the umT5 encoder weights, {OFFICIAL_CHECKPOINT_NAME} from the Wan2.1 release")
    parser.add_argument("--tokenizer_path", "--tokenizer-path", type=Path, required=True,
                        help="local google/umt5-xxl tokenizer directory holding tokenizer.json (in the Wan2.1 release)")
    parser.add_argument("--prompt", default=WAN_NEGATIVE_PROMPT,
                        help="prompt to encode (default: Wan2.1's Chinese sample_neg_prompt)")
    parser.add_argument("--out", type=Path, default=Path("negative_embedding.pt"),
                        help="output .pt file (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run the encoder on (default: %(default)s; CPU works but needs ~12 GB of "
                             "memory and minutes)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="encoder compute dtype (default: %(default)s, as Wan2.1)")
    parser.add_argument("--text_len", "--text-len", type=int, default=TEXT_LEN,
                        help="tokens per prompt after padding (default: %(default)s); must equal the DiT's "
                             "model.text_len")
    parser.add_argument("--encoder_config", "--encoder-config", type=json_argument, default=None, metavar="JSON",
                        help="JSON object of UMT5Config fields for an encoder other than umT5-XXL "
                             "(default: umT5-XXL, what Wan2.1 uses)")
    return parser.parse_args(argv)


def encoder_config_from_json(fields: object) -> UMT5Config | None:
    """The UMT5Config that --encoder_config describes (None: umT5-XXL)."""
    return config_from_json(UMT5Config, fields, "--encoder_config")


def encode_prompt_to_file(text_encoder: TextEncoder, prompt: str, out: Path) -> tuple[torch.Tensor, int]:
    """Encode ``prompt`` and save its (text_len, dim) float32 embedding to ``out``; returns it and its length."""
    embeddings, lengths = text_encoder.encode([prompt])
    # float32 holds bf16 values exactly; the training loader casts to float32 anyway.
    embedding = embeddings[0].float().cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(embedding, out)
    return embedding, int(lengths[0])


def main(argv: list[str] | None = None) -> int:
    """Encode the prompt given on the command line and print a one-line summary."""
    args = parse_args(argv)
    try:
        config = encoder_config_from_json(args.encoder_config)
        started = time.perf_counter()
        text_encoder = TextEncoder.from_files(args.t5_path, args.tokenizer_path, device=args.device,
                                              dtype=DTYPES[args.dtype], text_len=args.text_len, config=config)
        embedding, length = encode_prompt_to_file(text_encoder, args.prompt, args.out)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {tuple(embedding.shape)} float32, the prompt's {length} tokens (</s> included) "
          f"then zeros, in {time.perf_counter() - started:.1f} s; set data.negative_embedding={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
