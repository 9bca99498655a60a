"""Build the toy data set: class-conditional Gaussian-mixture latents as training shards, with their ground truth.

Example:
    python tools/build_toy_dataset.py --out runs/toy_data --num-samples 20000 --samples-per-shard 1000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rcm.data.toy import GROUND_TRUTH_FILE, NEGATIVE_EMBEDDING_FILE, ToyMixtureConfig, build_toy_dataset

__all__ = ["build_toy_dataset", "main"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the toy data set builder."""
    defaults = ToyMixtureConfig()
    parser = argparse.ArgumentParser(
        description=(
            f"Write toy training shards (shard-NNNNNN.tar) plus {GROUND_TRUTH_FILE} (the mixture, for evaluation) "
            f"and {NEGATIVE_EMBEDDING_FILE} (the unconditional embedding for CFG) into --out. Shards of an "
            "earlier build in that directory are replaced."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--num-samples", type=int, default=10000, help="number of samples to write")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled data (classes and noise)")
    mixture = parser.add_argument_group("mixture (the ground truth)")
    mixture.add_argument("--num-classes", type=int, default=defaults.num_classes, help="number of classes (prompts)")
    mixture.add_argument("--modes-per-class", type=int, default=defaults.modes_per_class, help="Gaussian modes per class")
    mixture.add_argument(
        "--latent-shape", type=int, nargs=4, metavar=("C", "T", "H", "W"), default=list(defaults.latent_shape),
        help="shape of one latent",
    )
    mixture.add_argument("--text-len", type=int, default=defaults.text_len, help="maximum text embedding length")
    mixture.add_argument("--text-dim", type=int, default=defaults.text_dim, help="text embedding width")
    mixture.add_argument("--mode-std", type=float, default=defaults.mode_std, help="per-element std within a mode")
    mixture.add_argument("--min-mode-weight", type=float, default=defaults.min_mode_weight, help="smallest mode weight")
    mixture.add_argument("--mixture-seed", type=int, default=defaults.seed, help="seed of the mixture itself")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the data set from command-line options and print a one-line summary."""
    args = parse_args(argv)
    try:
        config = ToyMixtureConfig(
            num_classes=args.num_classes,
            modes_per_class=args.modes_per_class,
            latent_shape=tuple(args.latent_shape),
            text_len=args.text_len,
            text_dim=args.text_dim,
            mode_std=args.mode_std,
            seed=args.mixture_seed,
            min_mode_weight=args.min_mode_weight,
        )
        started = time.perf_counter()
        shards = build_toy_dataset(args.out, args.num_samples, args.samples_per_shard, config, args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.num_samples} samples in {len(shards)} shards, {GROUND_TRUTH_FILE} and {NEGATIVE_EMBEDDING_FILE} "
        f"to {args.out} ({config.num_classes} classes × {config.modes_per_class} modes, latent {config.latent_shape}) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
