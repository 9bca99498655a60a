"""Checking a checkpoint without trusting it: every shard file exists, is long enough, holds well-formed
torch.save containers whose CRC-32s match, and holds as many bytes as the metadata promises.

``dcp.load`` and ``torch.load`` check none of this (a flipped bit loads silently, a truncated shard fails
with an unrelated message), so resume and `python -m checkpoints_util verify` run it first.
"""
from __future__ import annotations

import math
import os
import pickle
from collections import defaultdict
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from rcm.checkpoint.layout import COMPLETE_MARKER, METADATA_FILE, CheckpointCorruptError, read_marker, rank_file
from rcm.checkpoint.torch_zip import ZipFormatError, crc32_of_range, read_records
from rcm.torch_files import is_legacy_torch_file, torch_file_problem

__all__ = ["CheckpointCorruptError", "METADATA_FILE", "read_metadata", "verify_checkpoint", "verify_dcp",
           "verify_torch_file", "torch_file_problem"]


def read_metadata(path: str | Path) -> Metadata:
    """The DCP metadata of a checkpoint directory, with an error that names the file when it is unreadable."""
    metadata_file = Path(path) / METADATA_FILE
    if not metadata_file.is_file():
        raise CheckpointCorruptError(f"{metadata_file} does not exist: {path} is not a DCP checkpoint or its save did not finish")
    try:
        with open(metadata_file, "rb") as f:
            metadata = pickle.load(f)
    except Exception as error:  # any unpickling failure means the same thing: the file is damaged
        raise CheckpointCorruptError(f"{metadata_file} is unreadable ({type(error).__name__}: {error}); the checkpoint is damaged") from error
    if not isinstance(metadata, Metadata):
        raise CheckpointCorruptError(f"{metadata_file} does not hold DCP metadata (found {type(metadata).__name__})")
    try:
        problem = _metadata_problem(metadata)
    except Exception as error:  # a damaged pickle can put any object anywhere
        problem = f"its structure is malformed ({type(error).__name__}: {error})"
    if problem:
        raise CheckpointCorruptError(f"{metadata_file} is damaged: {problem}")
    return metadata


def _metadata_problem(metadata: Metadata) -> str | None:
    """What is impossible in unpickled DCP metadata (the file has no checksum: a flipped bit may still unpickle)."""
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return "it lacks the entry and storage tables"
    stored = set()
    for index, info in storage.items():
        fqn = getattr(index, "fqn", None)
        if fqn not in entries:
            return f"a stored item names '{fqn}', which no entry describes"
        if not (isinstance(info.relative_path, str) and Path(info.relative_path).name == info.relative_path
                and _is_count(info.offset) and _is_count(info.length)):
            return f"item '{fqn}' has an impossible place ({info.relative_path!r}, byte {info.offset!r}, {info.length!r} bytes)"
        stored.add((fqn, tuple(index.offset) if index.offset is not None else None))
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            return f"an entry name is a {type(fqn).__name__}"
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not isinstance(entry, TensorStorageMetadata):
            return f"entry '{fqn}' is described by a {type(entry).__name__}"
        if not isinstance(entry.properties.dtype, torch.dtype):
            return f"entry '{fqn}' has no tensor dtype (found {type(entry.properties.dtype).__name__})"
        size = tuple(entry.size)
        if not all(_is_count(n) for n in size):
            return f"entry '{fqn}' has an impossible size {size}"
        covered = 0
        for chunk in entry.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if len(offsets) != len(size) or len(sizes) != len(size) or not all(
                    _is_count(o) and _is_count(n) and o + n <= whole for o, n, whole in zip(offsets, sizes, size)):
                return f"entry '{fqn}' of size {size} has an impossible chunk at {offsets} of {sizes}"
            if (fqn, offsets) not in stored:
                return f"entry '{fqn}' has a chunk at {offsets} that no stored item holds"
            covered += math.prod(sizes)
        if covered != math.prod(size):
            return f"the chunks of entry '{fqn}' cover {covered} of its {math.prod(size)} elements"
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def expected_nbytes(metadata: Metadata, fqn: str, chunk_offsets) -> int | None:
    """Bytes of tensor data the item (fqn, chunk offsets) must hold; None for non-tensor items."""
    entry = metadata.state_dict_metadata.get(fqn)
    if not isinstance(entry, TensorStorageMetadata):
        return None
    for chunk in entry.chunks:
        if tuple(chunk.offsets) == tuple(chunk_offsets):
            return math.prod(chunk.sizes) * entry.properties.dtype.itemsize
    return None


def verify_dcp(path: str | Path, check_crc: bool = True, part: int = 0, num_parts: int = 1) -> list[str]:
    """Problems of a DCP checkpoint, one sentence each naming the file (empty: intact).

    ``part``/``num_parts`` split the items so that several ranks can check one checkpoint together.
    """
    path = Path(path)
    try:
        metadata = read_metadata(path)
    except CheckpointCorruptError as error:
        return [str(error)]
    by_file: dict[str, list] = defaultdict(list)
    for index, info in sorted(metadata.storage_data.items(), key=lambda item: (item[1].relative_path, item[1].offset)):
        by_file[info.relative_path].append((index, info))
    problems: list[str] = []
    item_number = 0
    for relative_path, items in by_file.items():
        file = path / relative_path
        if not file.is_file():
            problems.append(f"{file} is missing ({len(items)} items of the checkpoint are stored in it)")
            item_number += len(items)
            continue
        size = file.stat().st_size
        needed = max(info.offset + info.length for _, info in items)
        if size < needed:
            problems.append(f"{file} is truncated: {size} bytes, but the metadata places data up to byte {needed}")
            item_number += len(items)
            continue
        fd = os.open(file, os.O_RDONLY)
        try:
            for index, info in items:
                mine = item_number % num_parts == part
                item_number += 1
                if not mine:
                    continue
                problem = _check_item(fd, metadata, index, info, check_crc)
                if problem:
                    problems.append(f"{file}: item '{index.fqn}' at byte {info.offset}: {problem}")
        finally:
            os.close(fd)
    return problems


def _check_item(fd: int, metadata: Metadata, index, info, check_crc: bool) -> str | None:
    if getattr(info, "transform_descriptors", None):
        return None  # compressed/encrypted extensions: the storage layer checks them when reading
    try:
        records = read_records(fd, info.offset, info.length)
    except ZipFormatError as error:
        return f"damaged ({error})"
    if check_crc:
        for record in records:
            if crc32_of_range(fd, record.data_offset, record.size) != record.crc:
                return f"CRC-32 mismatch in record '{record.name}': the bytes were changed after saving"
    expected = expected_nbytes(metadata, index.fqn, index.offset)
    if expected is not None:
        stored = sum(record.size for record in records if record.is_storage)
        if stored != expected:
            return f"holds {stored} bytes of tensor data, the metadata expects {expected}"
    elif not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
        return "is not described in the metadata"
    return None


def verify_torch_file(file: str | Path, check_crc: bool = True, part: int = 0, num_parts: int = 1) -> list[str]:
    """Problems of a torch.save file (a `.pth` or a per-rank state file), one sentence each.

    ``part``/``num_parts`` split the CRC checks of the records between several ranks.
    """
    file = Path(file)
    if not file.is_file():
        return [f"{file} is missing"]
    problem = torch_file_problem(file)
    if problem:
        return [problem]
    if is_legacy_torch_file(file):
        return []  # nothing to check against
    fd = os.open(file, os.O_RDONLY)
    try:
        records = read_records(fd)
        if check_crc:
            mine = records[part::num_parts]
            bad = [r.name for r in mine if crc32_of_range(fd, r.data_offset, r.size) != r.crc]
            if bad:
                return [f"{file}: CRC-32 mismatch in {len(bad)} record(s), e.g. '{bad[0]}': the bytes were changed after saving"]
    except ZipFormatError as error:
        return [f"{file} is damaged ({error})"]
    finally:
        os.close(fd)
    return []


def verify_checkpoint(path: str | Path, check_crc: bool = True, part: int = 0, num_parts: int = 1) -> list[str]:
    """Problems of one training checkpoint directory: the DCP shards, the per-rank files and the marker."""
    path = Path(path)
    problems = verify_dcp(path, check_crc, part, num_parts)
    if not (path / COMPLETE_MARKER).is_file():
        return problems
    try:
        world_size = int(read_marker(path)["world_size"])
    except CheckpointCorruptError as error:
        return problems + [str(error)]
    for rank in range(part, world_size, num_parts):
        problems += verify_torch_file(rank_file(path, rank), check_crc)
    return problems
