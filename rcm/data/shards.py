"""Webdataset tar shards of training samples (spec §8): an atomic writer and a deterministic, resumable loader.

Format: uncompressed tar files `shard-000000.tar`, ...; each sample has the key `NNNNNNNNN` (its 9-digit
zero-padded global index) and three members:
  `NNNNNNNNN.latent.pt`   torch.save of a C×T×H×W tensor (VAE latent),
  `NNNNNNNNN.embed.pt`    torch.save of an L×text_dim tensor (text embedding, 1 ≤ L ≤ text_len),
  `NNNNNNNNN.prompt.txt`  the prompt, utf-8.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import random
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander

from rcm.cli_errors import UserError

SHARD_NAME = "shard-{:06d}.tar"
LATENT_MEMBER = "latent.pt"
EMBED_MEMBER = "embed.pt"
PROMPT_MEMBER = "prompt.txt"
SAMPLE_MEMBERS = (LATENT_MEMBER, EMBED_MEMBER, PROMPT_MEMBER)

# A well-formed tar ends with two zero blocks of 512 bytes; a truncated one does not.
_TAR_BLOCK = 512
_END_OF_ARCHIVE = bytes(2 * _TAR_BLOCK)


class ShardError(UserError, ValueError):
    """A shard set, a shard file or a sample in it does not match the training format."""


def sample_key(index: int) -> str:
    """The tar key of the sample with global index `index` (9 digits, zero-padded)."""
    return f"{index:09d}"


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """torch.save bytes of a tensor holding only its own elements."""
    # clone: torch.save of a view writes the whole underlying storage (e.g. the full batch).
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().clone(memory_format=torch.contiguous_format), buffer)
    return buffer.getvalue()


def _encode_sample(sample: dict, index: int) -> dict:
    """Tar members (bytes) of one sample dict {latent, embed, prompt}."""
    missing = [name for name in ("latent", "embed", "prompt") if name not in sample]
    if missing:
        raise ValueError(f"sample {index} to write lacks the field(s) {missing}; give dicts with latent, embed, prompt")
    latent, embed, prompt = sample["latent"], sample["embed"], sample["prompt"]
    if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
        raise ValueError(f"sample {index} to write has a latent that is not a C×T×H×W tensor")
    if not isinstance(embed, torch.Tensor) or embed.ndim != 2 or embed.shape[0] < 1:
        raise ValueError(f"sample {index} to write has an embed that is not an L×text_dim tensor with L ≥ 1")
    return {
        "__key__": sample_key(index),
        LATENT_MEMBER: _tensor_bytes(latent),
        EMBED_MEMBER: _tensor_bytes(embed),
        PROMPT_MEMBER: str(prompt).encode("utf-8"),
    }


def partial_shard_path(final_path: Path) -> Path:
    """The hidden temporary name a shard is written under until it is complete."""
    return final_path.with_name(f".{final_path.name}.partial")


class _PartialShard:
    """One shard being written under a hidden temporary name, renamed to its final name only when complete."""

    def __init__(self, final_path: Path):
        self.final_path = final_path
        self.temporary_path = partial_shard_path(final_path)
        self.file = open(self.temporary_path, "wb")
        # mtime fixed so the same samples give byte-identical shards; an int, since a float mtime makes
        # tarfile add a pax header to every member.
        self.writer = TarWriter(self.file, encoder=False, mtime=0)

    def commit(self) -> Path:
        """Finish the tar, flush it to disk and move it to its final name."""
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temporary_path, self.final_path)
        return self.final_path

    def abandon(self) -> None:
        """Drop the incomplete shard."""
        # Close the tar stream too, or its finalizer later writes into the closed file.
        with contextlib.suppress(OSError, ValueError):
            self.writer.close()
        self.file.close()
        self.temporary_path.unlink(missing_ok=True)


def write_shards(
    samples: Iterable[dict], out_dir: str | os.PathLike, samples_per_shard: int, start_index: int = 0
) -> list[Path]:
    """Write sample dicts {latent, embed, prompt} as tar shards into `out_dir`; returns the shard paths.

    Sample i gets the key of global index `start_index + i` and lands in shard number
    `(start_index + i) // samples_per_shard`, so consecutive calls with matching start indices produce
    distinct shard names. An existing shard of the same name is replaced. Each shard is written to a
    hidden `.shard-NNNNNN.tar.partial` file and renamed when complete, so readers never see a partial shard.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if start_index < 0 or start_index % samples_per_shard != 0:
        raise ValueError(
            f"start_index must be a non-negative multiple of samples_per_shard ({samples_per_shard}), got {start_index}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = len(samples) if isinstance(samples, Sequence) else None
    progress = tqdm(samples, total=total, desc=f"writing shards to {out_dir}", unit="sample", disable=None, leave=False)
    written: list[Path] = []
    shard: _PartialShard | None = None
    try:
        for offset, sample in enumerate(progress):
            index = start_index + offset
            if shard is None:
                shard = _PartialShard(out_dir / SHARD_NAME.format(index // samples_per_shard))
            shard.writer.write(_encode_sample(sample, index))
            if (index + 1) % samples_per_shard == 0:
                written.append(shard.commit())
                shard = None
        if shard is not None:
            written.append(shard.commit())
            shard = None
    finally:
        progress.close()
        if shard is not None:
            shard.abandon()
    return written


def resolve_shards(shards: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Shard paths from a directory (its `*.tar`, sorted), a glob pattern (sorted matches) or a list of paths."""
    if isinstance(shards, (str, os.PathLike)):
        text = os.fspath(shards)
        path = Path(text)
        if any(char in text for char in "*?["):
            found = sorted(Path(match) for match in glob.glob(text))
            if not found:
                raise ShardError(f"no shard file matched the pattern {text}")
            return found
        if path.is_dir():
            found = sorted(path.glob("*.tar"))
            if not found:
                raise ShardError(f"shard directory {path} contains no .tar files; build the data set first")
            return found
        if path.is_file():
            return [path]
        raise ShardError(f"shard directory or file {path} does not exist")
    found = [Path(item) for item in shards]
    if not found:
        raise ShardError("the list of shards is empty")
    for path in found:
        if not path.is_file():
            raise ShardError(f"shard file {path} does not exist")
    return found


def _derived_seed(*parts: int) -> int:
    """A 64-bit seed that depends on every part (so (seed, epoch) and (seed, epoch, rank) streams differ)."""
    digest = hashlib.sha256(":".join(str(int(part)) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _check_end_of_archive(path: Path) -> None:
    """Raise ShardError unless the file ends with the tar end-of-archive marker."""
    # Streaming tar readers stop silently when a file is cut at a member boundary; this catches that case.
    size = path.stat().st_size
    ok = size >= len(_END_OF_ARCHIVE) and size % _TAR_BLOCK == 0
    if ok:
        with open(path, "rb") as file:
            file.seek(size - len(_END_OF_ARCHIVE))
            ok = file.read() == _END_OF_ARCHIVE
    if not ok:
        raise ShardError(
            f"shard {path} does not end with a tar end-of-archive marker: it is truncated or not an uncompressed tar"
        )


def _read_shard(path: Path) -> Iterator[tuple[Path, str, dict]]:
    """Raw samples (shard path, key, {member suffix: bytes}) of one shard, in file order."""
    _check_end_of_archive(path)
    with open(path, "rb") as stream:
        samples = group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                return
            except (tarfile.TarError, OSError, EOFError, ValueError) as error:
                raise ShardError(f"shard {path} is corrupt or truncated ({error.args[0] if error.args else error})") from error
            members = {name: value for name, value in sample.items() if not name.startswith("__")}
            yield path, sample["__key__"], members


def _load_tensor(data: bytes, path: Path, key: str, member: str) -> torch.Tensor:
    """Decode a `.pt` member with torch.load(weights_only=True)."""
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ShardError(f"member {key}.{member} in shard {path} cannot be loaded ({error})") from error
    if not isinstance(value, torch.Tensor):
        raise ShardError(f"member {key}.{member} in shard {path} holds a {type(value).__name__}, not a tensor")
    return value


def nonfinite_samples(batch: dict) -> list[tuple[str, str, str]]:
    """(shard, key, field) of each sample of a loader batch whose latent or embed holds a NaN or an infinity."""
    found = []
    for field in ("latent", "embed"):
        finite = torch.isfinite(batch[field]).flatten(1).all(1)
        for row in (~finite).nonzero().flatten().tolist():
            found.append((batch["shard"][row], batch["key"][row], field))
    return found


class ShardLoader:
    """Infinite, deterministic, resumable iterator over batches from tar shards.

    Each batch is a dict: latent float32 (B,C,T,H,W), embed float32 (B,text_len,text_dim) zero-padded,
    embed_length int64 (B,), prompt list[str], and where each sample came from: shard list[str] (its file)
    and key list[str] (its tar key), so a bad value can be traced to its sample.

    Epoch e: the shard list is shuffled with a generator seeded by (seed, e); rank r reads
    shards[r::world_size]; samples are shuffled in a buffer of `shuffle_buffer` samples seeded by
    (seed, e, r). Batches run across epoch boundaries. `state_dict()` records the epoch and the samples
    yielded so far in it; `load_state_dict` makes the next batch the one an uninterrupted loader would
    give (the consumed samples of that epoch are re-read and skipped without decoding).
    The buffer holds up to `shuffle_buffer` encoded samples in memory: size it to the latent size.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Iterable[str | os.PathLike],
        batch_size: int,
        latent_shape: Sequence[int],
        text_len: int,
        text_dim: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 512,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size ≥ 1, got rank {rank}, world_size {world_size}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1 (1 means no shuffling), got {shuffle_buffer}")
        self.shards = resolve_shards(shards)
        if len(self.shards) < world_size:
            raise ShardError(
                f"there are {len(self.shards)} shard(s) for {world_size} ranks; every rank needs at least one shard, "
                "so write the data with fewer samples per shard"
            )
        self.batch_size = batch_size
        self.latent_shape = tuple(int(size) for size in latent_shape)
        self.text_len = text_len
        self.text_dim = text_dim
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.samples_seen = 0  # samples yielded by this loader object (not restored by load_state_dict)
        self._epoch = 0
        self._samples_in_epoch = 0
        self._stream: Iterator[tuple[Path, str, dict]] | None = None

    def shards_for_epoch(self, epoch: int) -> list[Path]:
        """The shards this rank reads in `epoch`, in reading order."""
        generator = torch.Generator().manual_seed(_derived_seed(self.seed, epoch))
        order = torch.randperm(len(self.shards), generator=generator).tolist()
        return [self.shards[i] for i in order[self.rank :: self.world_size]]

    def state_dict(self) -> dict:
        """Position after the last yielded batch: {"epoch", "samples_in_epoch"}."""
        return {"epoch": self._epoch, "samples_in_epoch": self._samples_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position recorded by `state_dict` (same shards, seed, rank and world size)."""
        self._epoch = int(state["epoch"])
        self._samples_in_epoch = int(state["samples_in_epoch"])
        self._stream = None

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> dict:
        if self._stream is None:
            self._stream = self._raw_samples(self._epoch, self._samples_in_epoch)
        origins, batch = [], []
        for _ in range(self.batch_size):
            path, key, members = next(self._stream)
            origins.append((str(path), key))
            batch.append(self._decode(path, key, members))
        self.samples_seen += self.batch_size
        return {**self._collate(batch), "shard": [shard for shard, _ in origins], "key": [key for _, key in origins]}

    def _epoch_samples(self, epoch: int) -> Iterator[tuple[Path, str, dict]]:
        """Raw samples of this rank in `epoch`, shuffled within the buffer."""
        rng = random.Random(_derived_seed(self.seed, epoch, self.rank))
        buffer: list[tuple[Path, str, dict]] = []
        for path in self.shards_for_epoch(epoch):
            for sample in _read_shard(path):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                slot = rng.randrange(len(buffer))
                yield buffer[slot]
                buffer[slot] = sample
        rng.shuffle(buffer)
        yield from buffer

    def _raw_samples(self, epoch: int, skip: int) -> Iterator[tuple[Path, str, dict]]:
        """Raw samples forever from `epoch` on, skipping the first `skip` of that epoch; keeps the position."""
        while True:
            count = 0
            for sample in self._epoch_samples(epoch):
                count += 1
                if count <= skip:
                    continue
                self._epoch, self._samples_in_epoch = epoch, count
                yield sample
            if count == 0:
                raise ShardError(f"rank {self.rank} found no samples in its shards {self.shards_for_epoch(epoch)}")
            if count < skip:
                raise ShardError(
                    f"the loader state says {skip} samples were read in epoch {epoch} but this rank's shards hold "
                    f"only {count}; the shards, seed or world size changed since the state was saved"
                )
            epoch, skip = epoch + 1, 0

    def _decode(self, path: Path, key: str, members: dict) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Decode and check one raw sample: (latent float32, embed float32 L×text_dim, prompt)."""
        missing = [member for member in SAMPLE_MEMBERS if member not in members]
        if missing:
            raise ShardError(f"sample {key} in shard {path} lacks the member(s) {', '.join(missing)}")
        latent = _load_tensor(members[LATENT_MEMBER], path, key, LATENT_MEMBER)
        if latent.ndim == 4 and latent.shape[1] > self.latent_shape[1] and tuple(latent.shape[2:]) == self.latent_shape[2:]:
            # Longer clips train on their first frames, as the reference recipe's state_t does (1.3B: 20 of 21).
            latent = latent[:, : self.latent_shape[1]]
        if tuple(latent.shape) != self.latent_shape:
            raise ShardError(
                f"latent of sample {key} in shard {path} has shape {tuple(latent.shape)}, expected {self.latent_shape}"
            )
        embed = _load_tensor(members[EMBED_MEMBER], path, key, EMBED_MEMBER)
        if embed.ndim != 2 or embed.shape[1] != self.text_dim or not 1 <= embed.shape[0] <= self.text_len:
            raise ShardError(
                f"embedding of sample {key} in shard {path} has shape {tuple(embed.shape)}, expected (L, {self.text_dim}) "
                f"with 1 ≤ L ≤ text_len={self.text_len}"
            )
        try:
            prompt = members[PROMPT_MEMBER].decode("utf-8")
        except UnicodeDecodeError as error:
            raise ShardError(f"prompt of sample {key} in shard {path} is not valid utf-8") from error
        return latent.float(), embed.float(), prompt

    def _collate(self, batch: list[tuple[torch.Tensor, torch.Tensor, str]]) -> dict:
        """Stack decoded samples into a batch dict with zero-padded embeddings."""
        embed = torch.zeros(len(batch), self.text_len, self.text_dim)
        lengths = torch.empty(len(batch), dtype=torch.int64)
        for row, (_, sample_embed, _) in enumerate(batch):
            embed[row, : sample_embed.shape[0]] = sample_embed
            lengths[row] = sample_embed.shape[0]
        return {
            "latent": torch.stack([latent for latent, _, _ in batch]),
            "embed": embed,
            "embed_length": lengths,
            "prompt": [prompt for _, _, prompt in batch],
        }
