"""Damaging checkpoint files on purpose, precisely: inside a tensor's bytes, where only a CRC notices."""
from __future__ import annotations

import os
from pathlib import Path

from rcm.checkpoint.torch_zip import read_records
from rcm.checkpoint.verify import read_metadata


def flip_tensor_byte(checkpoint: Path) -> Path:
    """Flip one bit in the middle of the largest tensor of a DCP checkpoint; returns the shard file changed."""
    metadata = read_metadata(checkpoint)
    info = max(metadata.storage_data.values(), key=lambda item: item.length)
    shard = Path(checkpoint) / info.relative_path
    fd = os.open(shard, os.O_RDWR)
    try:
        record = next(r for r in read_records(fd, info.offset, info.length) if r.is_storage)
        position = record.data_offset + record.size // 2
        byte = os.pread(fd, 1, position)
        os.pwrite(fd, bytes([byte[0] ^ 0x10]), position)
    finally:
        os.close(fd)
    return shard
