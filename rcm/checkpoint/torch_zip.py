"""The zip container that ``torch.save`` writes (a `.pth` file, and every item inside a DCP `.distcp` file):
where each record's bytes are, and their CRC-32.

``torch.load`` never checks these CRCs, so a flipped bit loads silently; `verify` and the converters use
this module to check them (zlib's CRC-32, several times faster than the one inside ``torch.save``).
Records are stored uncompressed; ``torch.save`` writes each record's CRC in a data descriptor after the
bytes and in the central directory, and leaves the local header's CRC at zero.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass

_LOCAL_HEADER = 0x04034B50
_CENTRAL_HEADER = 0x02014B50
_DATA_DESCRIPTOR = 0x08074B50
_HAS_DATA_DESCRIPTOR = 0x08
_ENCRYPTION_FLAGS = 0x1 | 0x40 | 0x2000  # encrypted, strong encryption, masked local headers
_CRC_CHUNK = 64 << 20  # bytes hashed per read: bounds memory on multi-GB records


class ZipFormatError(ValueError):
    """A torch.save container whose zip structure is damaged (truncated, overwritten, not a zip)."""


class FileSlice(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes of a file starting at ``start`` (one DCP item)."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self.fd, self.start, self.length, self.position = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.length - self.position))
        if count == 0:
            return 0
        data = os.pread(self.fd, count, self.start + self.position)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


@dataclass(frozen=True)
class ZipRecord:
    """One record of a torch.save container; offsets are absolute positions in the file."""

    name: str  # e.g. "archive/data/0"
    data_offset: int
    size: int
    crc: int  # as the central directory states it
    central_header_offset: int
    data_descriptor_offset: int | None

    @property
    def is_storage(self) -> bool:
        """Tensor bytes (``<archive>/data/<key>``) rather than the pickle or version records."""
        parts = self.name.split("/")
        return len(parts) == 3 and parts[1] == "data"


def read_records(fd: int, start: int = 0, length: int | None = None) -> list[ZipRecord]:
    """The records of the torch.save container at ``[start, start + length)`` of an open file."""
    if length is None:
        length = os.fstat(fd).st_size - start
    view = FileSlice(fd, start, length)
    try:
        archive = zipfile.ZipFile(io.BufferedReader(view, buffer_size=1 << 16))
    except (zipfile.BadZipFile, OSError, ValueError, struct.error, NotImplementedError) as error:
        raise ZipFormatError(f"not a readable torch.save container ({error})") from error
    try:
        records = []
        central = start + archive.start_dir
        for info in archive.infolist():
            header = os.pread(fd, 46, central)
            if len(header) < 46 or struct.unpack_from("<I", header)[0] != _CENTRAL_HEADER:
                raise ZipFormatError(f"central directory entry of {info.filename!r} is damaged")
            name_len, extra_len, comment_len, disk_start = struct.unpack_from("<HHHH", header, 28)
            if disk_start not in (0, 0xFFFF):  # 0xFFFF: in the zip64 extra field
                raise ZipFormatError(f"central directory entry of {info.filename!r} is damaged (disk {disk_start})")
            local = os.pread(fd, 30, start + info.header_offset)
            if len(local) < 30 or struct.unpack_from("<I", local)[0] != _LOCAL_HEADER:
                raise ZipFormatError(f"local header of record {info.filename!r} is damaged")
            if info.flag_bits & _ENCRYPTION_FLAGS:
                raise ZipFormatError(f"record {info.filename!r} is marked encrypted; torch.save never encrypts")
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise ZipFormatError(f"record {info.filename!r} is compressed, or its sizes disagree; torch.save "
                                     "stores records uncompressed")
            local_name_len, local_extra_len = struct.unpack_from("<HH", local, 26)
            # torch's reader finds records by the names in the headers, which no CRC covers.
            stored_name = os.pread(fd, local_name_len, start + info.header_offset + 30)
            if stored_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
                raise ZipFormatError(f"the local header of record {info.filename!r} names it {stored_name!r}")
            data_offset = start + info.header_offset + 30 + local_name_len + local_extra_len
            descriptor = data_offset + info.file_size if info.flag_bits & _HAS_DATA_DESCRIPTOR else None
            if info.header_offset < 0 or data_offset + info.file_size > start + length:
                raise ZipFormatError(f"record {info.filename!r} runs past the end of the data (truncated)")
            records.append(ZipRecord(info.filename, data_offset, info.file_size, info.CRC, central, descriptor))
            central += 46 + name_len + extra_len + comment_len
        if central != start + _check_end_records(fd, start, length):
            raise ZipFormatError("the central directory's entries do not end where the end-of-archive record starts")
    except (OSError, struct.error, OverflowError) as error:  # e.g. a damaged offset pointing before the file
        raise ZipFormatError(f"a record's position is damaged ({error})") from error
    _check_names([record.name for record in records])
    return records


_END_OF_CENTRAL_DIRECTORY = 0x06054B50
_ZIP64_END_LOCATOR = 0x07064B50
_ZIP64_END_OF_CENTRAL_DIRECTORY = 0x06064B50


def _check_end_records(fd: int, start: int, length: int) -> int:
    """The end-of-archive records name one disk and fit together (Python's zipfile ignores fields torch's reader
    refuses); returns where the central directory must end, relative to ``start``."""
    end = os.pread(fd, 22, start + length - 22)
    if len(end) < 22 or struct.unpack_from("<I", end)[0] != _END_OF_CENTRAL_DIRECTORY:
        raise ZipFormatError("it does not end with an end-of-archive record (torch.save writes it last, without a "
                             "comment): the item's length or its last bytes are damaged")
    disk, directory_disk, on_disk, total = struct.unpack_from("<HHHH", end, 4)
    if disk or directory_disk or on_disk != total:
        raise ZipFormatError("the end-of-archive record is damaged (it describes a multi-disk archive)")
    locator = os.pread(fd, 20, start + length - 42)
    if len(locator) < 20 or struct.unpack_from("<I", locator)[0] != _ZIP64_END_LOCATOR:
        return length - 22
    disk, record_offset, total_disks = struct.unpack_from("<IQI", locator, 4)
    if disk or total_disks != 1:
        raise ZipFormatError("the zip64 end-of-archive locator is damaged (it describes a multi-disk archive)")
    record = os.pread(fd, 56, start + record_offset) if record_offset < length else b""
    if len(record) < 56 or struct.unpack_from("<I", record)[0] != _ZIP64_END_OF_CENTRAL_DIRECTORY:
        raise ZipFormatError("the zip64 end-of-archive locator points to no zip64 end record")
    disk, directory_disk, on_disk, total = struct.unpack_from("<IIQQ", record, 16)
    if disk or directory_disk or on_disk != total:
        raise ZipFormatError("the zip64 end-of-archive record is damaged (it describes a multi-disk archive)")
    if record_offset + 12 + struct.unpack_from("<Q", record, 4)[0] != length - 42:
        raise ZipFormatError("the zip64 end-of-archive record's size is damaged")
    return record_offset


def _check_names(names: list[str]) -> None:
    """Every record in one top-level folder, which holds the pickle and the version record torch.load needs."""
    prefixes = {name.split("/", 1)[0] for name in names}
    if len(prefixes) != 1:
        raise ZipFormatError(f"its records are not in one folder (record names start with {sorted(prefixes)[:4]})")
    prefix = prefixes.pop()
    for needed in ("data.pkl", "version"):
        if f"{prefix}/{needed}" not in names and f"{prefix}/.data/{needed}" not in names:
            raise ZipFormatError(f"it has no record '{prefix}/{needed}' (names: {names[:8]})")


def crc32_of_range(fd: int, offset: int, size: int) -> int:
    """zlib CRC-32 of ``size`` bytes at ``offset``, read in bounded chunks."""
    crc, done = 0, 0
    while done < size:
        chunk = os.pread(fd, min(_CRC_CHUNK, size - done), offset + done)
        if not chunk:
            raise ZipFormatError(f"file ends {size - done} bytes early while reading a record at offset {offset}")
        crc = zlib.crc32(chunk, crc)
        done += len(chunk)
    return crc


def damaged_records(fd: int, start: int = 0, length: int | None = None) -> list[str]:
    """Names of the records whose bytes do not match their stored CRC-32 (empty: the container is intact)."""
    return [r.name for r in read_records(fd, start, length) if crc32_of_range(fd, r.data_offset, r.size) != r.crc]


def write_crc(fd: int, record: ZipRecord, crc: int) -> None:
    """Store a record's CRC-32 where readers look for it: the data descriptor and the central directory."""
    packed = struct.pack("<I", crc)
    if record.data_descriptor_offset is not None:
        signature = os.pread(fd, 4, record.data_descriptor_offset)
        if struct.unpack("<I", signature)[0] != _DATA_DESCRIPTOR:
            raise ZipFormatError(f"no data descriptor after record {record.name!r}")
        os.pwrite(fd, packed, record.data_descriptor_offset + 4)
    os.pwrite(fd, packed, record.central_header_offset + 16)


_SERIALIZATION_ID = "/.data/serialization_id"
_UINT64 = (1 << 64) - 1


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t, which torch.save folds every record's CRC-32 into."""
    return (seed ^ (value + 0x9E3779B9 + (seed << 6) + (seed >> 2))) & _UINT64


def finish_container(fd: int, start: int = 0, length: int | None = None, known_crcs: dict[str, int] | None = None) -> None:
    """Write the CRC-32s of a torch.save container saved without them (CRC computation off, or ``skip_data``
    with the bytes filled in afterwards), and the serialization id derived from them: afterwards the bytes
    equal what a plain ``torch.save`` writes. ``known_crcs``: record name → CRC already computed by the caller."""
    known_crcs = known_crcs or {}
    combined, id_record = 0, None
    for record in read_records(fd, start, length):
        if record.name.endswith(_SERIALIZATION_ID):
            id_record = record
            continue
        crc = known_crcs.get(record.name)
        if crc is None:
            crc = crc32_of_range(fd, record.data_offset, record.size)
        if crc != record.crc:
            write_crc(fd, record, crc)
        combined = _hash_combine(combined, crc)
    if id_record is not None and id_record.size == 40:
        # 20 digits of a hash of the record names (unchanged), then 20 digits of the combined CRCs.
        identifier = os.pread(fd, 20, id_record.data_offset) + f"{combined:020d}".encode()
        os.pwrite(fd, identifier, id_record.data_offset)
        write_crc(fd, id_record, zlib.crc32(identifier))
