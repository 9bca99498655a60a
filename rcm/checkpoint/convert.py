"""Conversions between a torch.save `.pth` file and a DCP checkpoint directory, tensor by tensor.

Memory stays bounded by a few tensors whatever the checkpoint size (the 14B model is 28 GB in bf16):
the source is opened with ``mmap`` only to learn its layout, each tensor is then read with ``pread``
into a fresh buffer, checked against its CRC-32 (``torch.load`` never checks it), cast if asked, and
written out. The output has exactly the format of `torch.distributed.checkpoint.format_utils`:

- `.pth → DCP` runs ``dcp.save`` with a planner that fetches each tensor only when it is written and a
  writer that drops it right after (same file layout and bytes as DCP's own writer, which keeps them all);
- `DCP → .pth` writes the `.pth` skeleton with ``torch.serialization.skip_data`` (the zip layout of
  ``torch.save`` with space reserved for every tensor), then fills each tensor in place and writes its
  CRC-32. The file appears under its final name only when complete.
"""
from __future__ import annotations

import os
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from rcm.checkpoint.torch_zip import FileSlice, ZipRecord, finish_container, read_records
from rcm.checkpoint.layout import NotACheckpointError
from rcm.checkpoint.verify import CheckpointCorruptError, read_metadata, torch_file_problem
from rcm.checkpoint.weights import WRAPPER_PREFIXES, describe_object

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRAINING_ENTRIES = ("student", "ema", "fake_score")  # the network entries of a training checkpoint
_MAX_READ = 1 << 30  # bytes per pread/pwrite call (Linux moves at most ~2 GiB per call)
_STORAGE_RECORD = "archive/data/0"  # the one storage of a tensor saved alone into a stream


@dataclass
class ConversionReport:
    """What a conversion did: tensors and bytes written, seconds taken."""

    tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the CLI."""
        rate = self.bytes_written / max(self.seconds, 1e-9) / 2**20
        return f"{self.tensors} tensors, {self.bytes_written / 2**30:.2f} GiB in {self.seconds:.1f} s ({rate:.0f} MiB/s)"


# -- keys --
def rename_keys(keys: list[str], strip_prefix: str | None, add_prefix: str) -> dict[str, str]:
    """Old key → new key. ``strip_prefix``: None keeps keys, "auto" strips the usual wrapper prefixes
    (module., _orig_mod., net., model.) while every key carries one, anything else must prefix every key."""
    renamed = {key: key for key in keys}
    if strip_prefix == "auto":
        changed = True
        while changed and renamed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if all(new.startswith(prefix) for new in renamed.values()):
                    renamed = {old: new[len(prefix):] for old, new in renamed.items()}
                    changed = True
    elif strip_prefix:
        lacking = [key for key in keys if not key.startswith(strip_prefix)]
        if lacking:
            raise ValueError(f"--strip-prefix '{strip_prefix}': {len(lacking)} keys do not start with it, e.g. '{lacking[0]}'")
        renamed = {old: new[len(strip_prefix):] for old, new in renamed.items()}
    return {old: add_prefix + new for old, new in renamed.items()}


def flatten_tree(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) pairs of nested dicts, lists and tuples (list positions are int path elements)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flatten_tree(value, prefix + (key,))
    elif isinstance(tree, (list, tuple)):
        for position, value in enumerate(tree):
            yield from flatten_tree(value, prefix + (position,))
    else:
        yield prefix, tree


def _map_tree(tree: Any, function: Callable[[tuple, Any], Any], prefix: tuple = ()) -> Any:
    """The same nesting with every leaf replaced by ``function(path, leaf)`` (empty containers kept)."""
    if isinstance(tree, dict):
        return {key: _map_tree(value, function, prefix + (key,)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tree(value, function, prefix + (i,)) for i, value in enumerate(tree))
    return function(prefix, tree)


def _set_path(tree: dict, path: tuple, value: Any) -> None:
    """Set a leaf by path as DCP unflattens: an int element is a list position."""
    node: Any = tree
    for key, following in zip(path[:-1], path[1:]):
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = [] if isinstance(following, int) else {}
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(following, int) else {})
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


# -- reading tensors from torch.save containers --
def _pread_into(fd: int, buffer: torch.Tensor, offset: int, file: Path) -> None:
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done: done + _MAX_READ]], offset + done)
        if count <= 0:
            raise CheckpointCorruptError(f"{file} ends early: {len(view) - done} bytes missing at byte {offset + done} (truncated)")
        done += count


def _pwrite_from(fd: int, buffer: torch.Tensor, offset: int) -> None:
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done: done + _MAX_READ], offset + done)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (no copy)."""
    return tensor.reshape(-1).view(torch.uint8)


def _read_record(fd: int, file: Path, record: ZipRecord, what: str) -> torch.Tensor:
    """A storage record's bytes, checked against its CRC-32."""
    buffer = torch.empty(record.size, dtype=torch.uint8)
    if record.size:
        _pread_into(fd, buffer, record.data_offset, file)
    if zlib.crc32(buffer.numpy()) != record.crc:
        raise CheckpointCorruptError(f"{file}: {what} fails its CRC-32 check (record '{record.name}'): the file is damaged")
    return buffer


def _storage_records(file: Path, tensors: list[torch.Tensor]) -> dict[int, ZipRecord]:
    """Storage data pointer → zip record, for tensors that ``torch.load(file, mmap=True)`` returned.

    Every storage of an mmap-loaded file is a window of one mapping, so pointers and record offsets differ
    by the same constant; matching them in order needs no knowledge of torch.save's key numbering.
    """
    fd = os.open(file, os.O_RDONLY)
    try:
        records = sorted((r for r in read_records(fd) if r.is_storage), key=lambda r: r.data_offset)
    finally:
        os.close(fd)
    pointers = sorted({t.untyped_storage().data_ptr() for t in tensors if t.untyped_storage().nbytes()})
    records = [r for r in records if r.size]
    if len(pointers) != len(records) or len({p - r.data_offset for p, r in zip(pointers, records)}) > 1:
        raise RuntimeError(f"cannot match the storages of {file} to its zip records; please report this torch version")
    return dict(zip(pointers, records))


def _tensor_from_storage_bytes(storage_bytes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``like``'s view (size, stride, offset, dtype) onto freshly read storage bytes."""
    if like.numel() == 0:
        return torch.empty(like.shape, dtype=like.dtype)
    return storage_bytes.view(like.dtype).as_strided(like.size(), like.stride(), like.storage_offset())


# -- .pth → DCP --
class _FetchingSavePlanner(DefaultSavePlanner):
    """Plans with placeholder tensors (meta, target dtype) and fetches each real tensor only when the writer asks."""

    def __init__(self, fetchers: dict[str, Callable[[], torch.Tensor]]):
        super().__init__()
        self.fetchers = fetchers

    def resolve_data(self, write_item):
        fetch = self.fetchers.get(write_item.index.fqn)
        return fetch() if fetch is not None else super().resolve_data(write_item)


class _StreamingWriter(dcp.FileSystemWriter):
    """DCP's file writer, same file layout and bytes (one file; byte items first, then tensors in plan order),
    but it drops each tensor once written (DCP's own writer keeps every tensor of a file until the file is
    done: the whole checkpoint in memory) and computes CRC-32s with zlib, several times faster than the
    implementation inside ``torch.save``."""

    def __init__(self, path: str, known_crcs: dict[int, int]):
        super().__init__(path)
        self.known_crcs = known_crcs  # storage data pointer → CRC-32 of its bytes, when the planner knows it

    def write_data(self, plan, planner):
        storage_key = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        ordered = [i for i in plan.items if i.type == WriteItemType.BYTE_IO] + [i for i in plan.items if i.type != WriteItemType.BYTE_IO]
        results = []
        with open(Path(self.path) / storage_key, "w+b") as stream:  # readable: the CRCs are fixed up in place
            for item in ordered:
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                else:
                    tensor = data.detach().cpu()
                    if tensor.untyped_storage().nbytes() != tensor.nbytes:  # torch.save writes whole storages
                        tensor = tensor.clone()
                    crc = self.known_crcs.pop(tensor.untyped_storage().data_ptr(), None)
                    if crc is None:
                        crc = zlib.crc32(_storage_bytes(tensor).numpy())
                    with _crc32_computation(False):
                        torch.save(tensor, stream)
                    stream.flush()
                    finish_container(stream.fileno(), offset, stream.tell() - offset, {_STORAGE_RECORD: crc})
                length = stream.tell() - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(storage_key, offset, length)))
            stream.flush()
            os.fsync(stream.fileno())
        future: Future = Future()
        future.set_result(results)
        return future


class _crc32_computation:
    """Switch torch.save's own CRC-32 computation off while a ``finish_container`` call supplies the values."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(self.enabled)

    def __exit__(self, *exc):
        torch.serialization.set_crc32_options(self.previous)


def _storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor's whole storage, as a flat uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())


def pth_to_dcp(
    source: str | Path, destination: str | Path, select: str | None = None, dtype: torch.dtype | None = None,
    strip_prefix: str | None = None, add_prefix: str = "", overwrite: bool = False,
) -> ConversionReport:
    """Convert a torch.save file into a DCP checkpoint directory (by default exactly what format_utils writes)."""
    started = time.time()
    source, destination = Path(source), Path(destination)
    tree = _mmap_load(source)
    if select:
        if not isinstance(tree, dict) or not isinstance(tree.get(select), dict):
            found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
            raise KeyError(f"{source} has no sub-dict '{select}' to select (top-level keys: {found})")
        tree = tree[select]
    if not isinstance(tree, dict):
        raise NotACheckpointError(f"{source} holds {describe_object(tree)}, not a state dict")
    if strip_prefix or add_prefix:
        if not all(torch.is_tensor(value) for value in tree.values()):
            raise ValueError(f"{source} is nested (top-level keys {sorted(tree)[:5]}); --select a flat sub-dict before renaming keys")
        names = rename_keys(list(tree), strip_prefix, add_prefix)
        tree = {names[key]: value for key, value in tree.items()}
    leaves = list(flatten_tree(tree))
    tensors = [leaf for _, leaf in leaves if torch.is_tensor(leaf)]
    records = _storage_records(source, tensors)
    report = ConversionReport()
    staging = _staging_dir(destination, overwrite)
    fd = os.open(source, os.O_RDONLY)

    known_crcs: dict[int, int] = {}

    def fetcher(fqn: str, like: torch.Tensor) -> Callable[[], torch.Tensor]:
        def fetch() -> torch.Tensor:
            record = records.get(like.untyped_storage().data_ptr())
            storage_bytes = _read_record(fd, source, record, f"tensor '{fqn}'") if record else torch.empty(0, dtype=torch.uint8)
            tensor = _tensor_from_storage_bytes(storage_bytes, like)
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            elif record is not None:  # written as read: the CRC just checked is the output's too
                known_crcs[storage_bytes.untyped_storage().data_ptr()] = record.crc
            report.tensors += 1
            report.bytes_written += tensor.nbytes
            return tensor
        return fetch

    fetchers: dict[str, Callable[[], torch.Tensor]] = {}

    def placeholder(path: tuple, leaf: Any) -> Any:
        if not torch.is_tensor(leaf) or not all(isinstance(key, str) for key in path):
            return leaf  # non-tensors, and tensors inside lists, go through DCP's own lookup
        fqn = ".".join(path)  # DCP's name for a tensor reached through dict keys
        fetchers[fqn] = fetcher(fqn, leaf)
        target = dtype if dtype is not None and leaf.is_floating_point() else leaf.dtype
        return torch.empty(leaf.shape, dtype=target, device="meta")

    placeholders = _map_tree(tree, placeholder)
    try:
        dcp.save(placeholders, storage_writer=_StreamingWriter(str(staging), known_crcs), planner=_FetchingSavePlanner(fetchers), no_dist=True)
        _replace(staging, destination)
    finally:
        os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.time() - started
    return report


def safetensors_to_dcp(
    source: str | Path, destination: str | Path, dtype: torch.dtype | None = None, strip_prefix: str | None = None,
    add_prefix: str = "", overwrite: bool = False,
) -> ConversionReport:
    """Convert a ``.safetensors`` file or a directory of shards (the official Wan2.1 DiT's layout) into a DCP
    checkpoint directory, one tensor in memory at a time; a sharded training run then reads only its slices."""
    from rcm.checkpoint.weights import SafetensorsState

    started = time.time()
    source, destination = Path(source), Path(destination)
    state = SafetensorsState(source)
    if not len(state):
        raise ValueError(f"{source} holds no tensors")
    names = rename_keys(list(state), strip_prefix, add_prefix)
    report = ConversionReport()

    def fetcher(name: str) -> Callable[[], torch.Tensor]:
        def fetch() -> torch.Tensor:
            tensor = state[name]
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            report.tensors += 1
            report.bytes_written += tensor.nbytes
            return tensor
        return fetch

    placeholders, fetchers = {}, {}
    for name, target in names.items():
        stored = state.dtype_of(name)
        placeholders[target] = torch.empty(state.shape_of(name), device="meta",
                                           dtype=dtype if dtype is not None and stored.is_floating_point else stored)
        fetchers[target] = fetcher(name)
    staging = _staging_dir(destination, overwrite)
    try:
        dcp.save(placeholders, storage_writer=_StreamingWriter(str(staging), {}), planner=_FetchingSavePlanner(fetchers), no_dist=True)
        _replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.time() - started
    return report


# -- DCP → .pth --
def training_entries(metadata) -> list[str]:
    """The network entries (student / ema / fake_score) a DCP checkpoint holds; empty for a plain model checkpoint."""
    tops = {key.split(".", 1)[0] for key in metadata.state_dict_metadata}
    return [entry for entry in TRAINING_ENTRIES if entry in tops]


def dcp_to_pth(
    source: str | Path, destination: str | Path, weights: str = "all", dtype: torch.dtype | None = None,
    strip_prefix: str | None = None, add_prefix: str = "", overwrite: bool = False, workers: int = 2,
) -> ConversionReport:
    """Convert a DCP checkpoint into a torch.save file; ``weights``: "all" (everything, like format_utils) or one
    network entry of a training checkpoint ("student", "ema", "fake_score") as a plain model state dict."""
    started = time.time()
    source, destination = Path(source), Path(destination)
    metadata = read_metadata(source)
    planner_data = metadata.planner_data or {}
    paths = {fqn: tuple(planner_data.get(fqn, (fqn,))) for fqn in metadata.state_dict_metadata}
    if weights != "all":
        available = training_entries(metadata)
        if weights not in available:
            raise KeyError(f"{source} holds no '{weights}' weights (network entries: {available or 'none, it is a plain model checkpoint; use --weights all'})")
        paths = {fqn: path[1:] for fqn, path in paths.items() if path[0] == weights and len(path) > 1}
    if strip_prefix or add_prefix:
        if any(len(path) != 1 for path in paths.values()):
            raise ValueError(f"{source} is nested; choose one network with --weights before renaming keys")
        names = rename_keys([path[0] for path in paths.values()], strip_prefix, add_prefix)
        paths = {fqn: (names[path[0]],) for fqn, path in paths.items()}

    items_by_fqn: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        if index.fqn in paths:
            items_by_fqn.setdefault(index.fqn, []).append((index, info))
    skeleton: dict = {}
    targets: dict[tuple, str] = {}
    for fqn, path in paths.items():
        entry = metadata.state_dict_metadata[fqn]
        if isinstance(entry, TensorStorageMetadata):
            target = dtype if dtype is not None and entry.properties.dtype.is_floating_point else entry.properties.dtype
            _set_path(skeleton, path, torch.empty(tuple(entry.size), dtype=target))  # never touched: no memory used
            targets[path] = fqn
        elif isinstance(entry, BytesStorageMetadata):
            _set_path(skeleton, path, _read_object(source, *items_by_fqn[fqn][0]))

    staging_dir = _staging_dir(destination, overwrite)
    staging_dir.mkdir(parents=True)
    staging = staging_dir / destination.name  # same base name: the zip records get the archive name torch.save gives
    report = ConversionReport()
    readers = _Readers(source, [info.relative_path for items in items_by_fqn.values() for _, info in items])
    try:
        with torch.serialization.skip_data():
            torch.save(skeleton, staging)
        del skeleton
        layout = torch.load(staging, mmap=True, weights_only=True, map_location="cpu")  # maps the file, reads no data
        outputs = {path: leaf for path, leaf in flatten_tree(layout) if path in targets}
        records = _storage_records(staging, list(outputs.values()))
        out_fd = os.open(staging, os.O_RDWR)
        crcs: dict[str, int] = {}

        def convert(path: tuple) -> int:
            like = outputs[path]
            fqn = targets[path]
            tensor = _assemble(readers, metadata, fqn, items_by_fqn.get(fqn, []), like.dtype)
            if tensor.numel():
                record = records[like.untyped_storage().data_ptr()]
                data = _as_bytes(tensor)
                _pwrite_from(out_fd, data, record.data_offset)
                crcs[record.name] = zlib.crc32(data.numpy())
            return tensor.nbytes

        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:  # pread, CRC and pwrite release the GIL
                for nbytes in pool.map(convert, list(outputs)):
                    report.tensors += 1
                    report.bytes_written += nbytes
            finish_container(out_fd, known_crcs=crcs)
        finally:
            os.close(out_fd)
        _replace(staging, destination)
    finally:
        readers.close()
        shutil.rmtree(staging_dir, ignore_errors=True)
    report.seconds = time.time() - started
    return report


class _Readers:
    """One read-only descriptor per shard file, shared by the worker threads (pread needs no seek)."""

    def __init__(self, directory: Path, relative_paths: list[str]):
        self.directory, self.fds = directory, {}
        for relative_path in sorted(set(relative_paths)):  # all opened up front: the threads only read the dict
            file = directory / relative_path
            if not file.is_file():
                self.close()
                raise CheckpointCorruptError(f"{file} is missing: the checkpoint metadata refers to it")
            self.fds[relative_path] = os.open(file, os.O_RDONLY)

    def fd(self, relative_path: str) -> int:
        return self.fds[relative_path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _assemble(readers: _Readers, metadata, fqn: str, items: list, dtype: torch.dtype) -> torch.Tensor:
    """A whole tensor from its DCP chunks (one chunk unless it was saved sharded), cast to ``dtype``."""
    entry = metadata.state_dict_metadata[fqn]
    chunks = []
    for index, info in items:
        file = readers.directory / info.relative_path
        fd = readers.fd(info.relative_path)
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{file}: item '{fqn}' uses storage transforms {info.transform_descriptors}; use format_utils for it")
        try:
            storage = [r for r in read_records(fd, info.offset, info.length) if r.is_storage]
            with torch.serialization.skip_data():  # only the layout: the bytes are read below, with their CRC checked
                like = torch.load(FileSlice(fd, info.offset, info.length), weights_only=True, map_location="cpu")
        except Exception as error:
            raise CheckpointCorruptError(f"{file}: item '{fqn}' at byte {info.offset} is damaged ({error})") from error
        if len(storage) != 1 and like.numel():
            raise CheckpointCorruptError(f"{file}: item '{fqn}' holds {len(storage)} storages, expected one")
        storage_bytes = _read_record(fd, file, storage[0], f"tensor '{fqn}'") if like.numel() else None
        chunks.append((tuple(index.offset), _tensor_from_storage_bytes(storage_bytes, like) if like.numel() else like))
    if len(chunks) == 1 and tuple(chunks[0][1].shape) == tuple(entry.size):
        whole = chunks[0][1]
        return whole.to(dtype).contiguous() if whole.dtype != dtype else whole.contiguous()
    whole = torch.empty(tuple(entry.size), dtype=dtype)
    covered = 0
    for offsets, chunk in chunks:
        view = whole
        for dim, (start, length) in enumerate(zip(offsets, chunk.shape)):
            view = view.narrow(dim, start, length)
        view.copy_(chunk)
        covered += chunk.numel()
    if covered != whole.numel():
        raise CheckpointCorruptError(f"{readers.directory}: the chunks of '{fqn}' cover {covered} of {whole.numel()} elements")
    return whole


def _read_object(directory: Path, index, info) -> Any:
    """A non-tensor entry (DCP stores it as torch.save bytes)."""
    import io

    file = directory / info.relative_path
    fd = os.open(file, os.O_RDONLY)
    try:
        data = os.pread(fd, info.length, info.offset)
    finally:
        os.close(fd)
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as error:
        raise CheckpointCorruptError(f"{file}: entry '{index.fqn}' cannot be read ({error})") from error


# -- shared --
def _mmap_load(file: Path) -> Any:
    if file.is_dir():
        raise NotACheckpointError(f"{file} is a directory, not a torch.save file: pth-to-dcp converts a .pth file or "
                                  "*.safetensors (dcp-to-pth converts a DCP checkpoint the other way)")
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    if torch_file_problem(file):
        raise NotACheckpointError(torch_file_problem(file))
    try:
        return torch.load(file, mmap=True, weights_only=True, map_location="cpu")
    except Exception as error:
        if "zip" in str(error).lower() and "legacy" in str(error).lower():
            raise ValueError(f"{file} is in torch's pre-1.6 format, which memory-bounded conversion cannot map: "
                             "re-save it with a current torch.save") from error
        raise CheckpointCorruptError(f"{file} cannot be opened as a torch.save file ({type(error).__name__}: {error}); "
                                     f"it may be truncated or damaged: `python -m checkpoints_util verify {file}`") from error


def _staging_dir(destination: Path, overwrite: bool) -> Path:
    if destination.exists() and not overwrite:
        what = "a DCP checkpoint directory" if (destination / ".metadata").is_file() else (
            "a directory" if destination.is_dir() else "a file")
        raise FileExistsError(f"{destination} exists ({what}); pass --overwrite to replace it, or choose another "
                              "destination")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.partial{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _replace(staging: Path, destination: Path) -> None:
    if destination.is_dir():
        shutil.rmtree(destination)
    elif destination.exists():
        destination.unlink()
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, destination)
