"""Loading network weights alone (teacher, evaluation, generation, data building, fine-tuning) from a `.pth` file,
`.safetensors` (one file or a directory of shards, as the official Wan2.1 DiT is published), a DCP checkpoint or a
run directory.

The one load path of every consumer: ``resolve_checkpoint`` verifies what it returns (CRC-32s of every shard, the
per-rank files, the marker), a run directory falling back from a damaged checkpoint to the newest intact one with
a warning naming the damaged file; ``load_model_weights`` then refuses weights that are not finite, and files that
hold no state dict, in one sentence naming the file.
"""
from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

from rcm.checkpoint.layout import METADATA_FILE, CheckpointCorruptError, NotACheckpointError
from rcm.checkpoint.manager import CheckpointManager, is_complete, verify_together
from rcm.checkpoint.verify import read_metadata
from rcm.parallel.distributed import DistributedInfo
from rcm.torch_files import TorchFileError, describe_object, read_torch_file, torch_file_problem

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.", "model.")
EMA_KEYS = ("ema", "ema_state_dict", "model_ema")


def resolve_checkpoint(path: str | Path, verify: bool = True) -> Path:
    """The checkpoint to read for ``path``, verified (unless ``verify`` is False): a run directory resolves to its
    newest intact checkpoint (damaged newer ones are skipped with a warning); a checkpoint directory or `.pth` must
    be intact. Collective when torch.distributed is initialized (the ranks split the CRC work): call it on every
    rank. Raises one sentence naming the file when nothing usable is there."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    info = _current_ranks()
    if path.is_dir() and not is_complete(path) and not (path / METADATA_FILE).exists() and not safetensors_files(path):
        manager = CheckpointManager(path / "checkpoints", info)
        remedy = "or name an intact checkpoint or weights file instead of the run directory"
        latest = manager.latest_loadable(check_crc=True, remedy=remedy) if verify else manager.latest()
        if latest is None:
            raise FileNotFoundError(
                f"{path} holds no weights: no DCP .metadata, no *.safetensors and no complete checkpoint in "
                f"{path / 'checkpoints'}; pass a .pth/.safetensors file, a directory of safetensors shards, a DCP "
                "checkpoint or a training run directory")
        if verify:
            _remember_verified(latest)
        return latest
    if path.is_file() and not is_safetensors(path):
        problem = torch_file_problem(path)
        if problem:
            raise NotACheckpointError(problem)
    if verify and not is_safetensors(path) and not _already_verified(path):  # safetensors files carry no checksums
        problems = verify_together(path, check_crc=True, info=info)
        if problems:
            raise CheckpointCorruptError(f"checkpoint {path} is damaged: " + "; ".join(problems[:3]))
        _remember_verified(path)
    return path


# Checkpoints this process verified, keyed by every file's size and time stamp: loading one again (resolve, then
# load) does not read it twice, and any change to a file makes it count as unverified.
_VERIFIED: set[tuple] = set()


def _verification_key(path: Path) -> tuple:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return (str(path.resolve()), *((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()))


def _already_verified(path: Path) -> bool:
    return _verification_key(path) in _VERIFIED


def _remember_verified(path: Path) -> None:
    _VERIFIED.add(_verification_key(path))


def _current_ranks() -> DistributedInfo:
    """This process's place in the initialized process group (a lone process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistributedInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistributedInfo()


def load_model_weights(model: nn.Module, path: str | Path, prefer: str = "ema", verify: bool = True) -> str:
    """Load weights into ``model`` (strict) from a verified checkpoint (see ``resolve_checkpoint``, collective like
    it unless ``verify`` is False) and check that they are finite; returns what was read: a DCP entry ('ema',
    'student'), 'dcp' (a plain model checkpoint), 'pth' or 'safetensors'."""
    path = resolve_checkpoint(path, verify=verify)
    if is_safetensors(path):
        load_state_dict_strict(model, SafetensorsState(path), source=str(path))
        kind = "safetensors"
    elif path.is_dir():
        kind = _load_from_dcp(model, path, prefer)
    else:
        state = load_torch_file(path)
        if not isinstance(state, dict):
            raise NotACheckpointError(f"{path} holds {describe_object(state)}, not a state dict of network weights")
        state = unwrap_state_dict(state, prefer_ema=prefer == "ema")
        load_state_dict_strict(model, state, source=str(path))
        kind = "pth"
    raise_on_non_finite(model, str(path))
    return kind


def load_torch_file(path: str | Path) -> object:
    """``torch.load`` of a weights-only `.pth` (memory-mapped, on the CPU), one sentence naming the file when it is
    not a torch checkpoint or cannot be read."""
    problem = torch_file_problem(path)
    if problem:
        raise NotACheckpointError(problem)
    try:
        return read_torch_file(path)
    except TorchFileError as error:
        raise CheckpointCorruptError(f"{error}; `python -m checkpoints_util verify {path}` checks it") from error


def raise_on_non_finite(model: nn.Module, source: str) -> None:
    """Raise CheckpointCorruptError naming ``source`` and the first tensor when loaded weights hold NaN or Inf
    (a diverged run's checkpoint, or damage no checksum covers); collective for a sharded model."""
    bad = next((name for name, tensor in model.state_dict().items() if tensor.is_floating_point()
                and not bool(torch.isfinite(tensor.to_local() if isinstance(tensor, DTensor) else tensor).all())), None)
    if any(isinstance(p, DTensor) for p in model.parameters()) and dist.is_initialized():
        flag = torch.tensor([0 if bad is None else 1], device=next(model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and bad is None:
            bad = "a tensor on another rank"
    if bad is not None:
        raise CheckpointCorruptError(f"{source} holds non-finite weights (NaN or Inf in {bad}); use an earlier "
                                     "checkpoint of the run")


def safetensors_files(path: Path) -> list[Path]:
    """The ``*.safetensors`` files of a directory (the Hugging Face layout of the official Wan2.1 DiT: one file
    for 1.3B, six shards with an index for 14B); only those the index names when there is one."""
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [path / name for name in names]
    return sorted(path.glob("*.safetensors"))


# safetensors header dtype names (the ones torch has).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` file, or a directory of them (with or without an index)."""
    return path.suffix == ".safetensors" or (path.is_dir() and bool(safetensors_files(path)))


class SafetensorsState(MutableMapping):
    """The tensors of a ``.safetensors`` file or a directory of shards, each read when it is looked up (shapes
    from the headers), so a sharded model's load holds one full tensor at a time. Assigned keys override the
    files (a layout adaptation)."""

    def __init__(self, path: Path):
        try:
            from safetensors import safe_open
        except ImportError as error:
            raise ImportError(f"reading {path} needs the safetensors package (pip install safetensors)") from error
        files = [path] if path.is_file() else safetensors_files(path)
        self._where = {}
        for file in files:
            handle = safe_open(str(file), framework="pt", device="cpu")
            for name in handle.keys():
                self._where[name] = handle
        self._overrides: dict[str, torch.Tensor] = {}

    def dtype_of(self, name: str) -> torch.dtype:
        if name in self._overrides:
            return self._overrides[name].dtype
        return SAFETENSORS_DTYPES[self._where[name].get_slice(name).get_dtype()]

    def shape_of(self, name: str) -> tuple[int, ...]:
        if name in self._overrides:
            return tuple(self._overrides[name].shape)
        return tuple(self._where[name].get_slice(name).get_shape())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._overrides:
            return self._overrides[name]
        return self._where[name].get_tensor(name)

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._overrides[name] = value

    def __delitem__(self, name: str) -> None:
        raise TypeError("SafetensorsState: keys cannot be deleted")

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _load_from_dcp(model: nn.Module, path: Path, prefer: str) -> str:
    metadata = read_metadata(path)
    saved = {key: tuple(item.size) for key, item in metadata.state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)}
    available = {key.split(".", 1)[0] for key in saved}
    entry = next((e for e in (prefer, "ema", "student") if e in available), None)
    if entry is not None:  # a training checkpoint: one network entry of it
        prefix = entry + "."
        names = [key[len(prefix):] for key in saved if key.startswith(prefix)]
    else:  # a plain model checkpoint (e.g. pth-to-dcp of an official .pth), perhaps behind a wrapper prefix
        names = list(unwrap_state_dict(dict.fromkeys(saved), prefer_ema=False))
        first = next(iter(saved), "")
        prefix = first[: len(first) - len(names[0])] if names else ""
    # The EMA holds parameters only; other entries are full state dicts. Names and shapes are checked against
    # the metadata before anything is read, so a wrong model fails with the list of differences.
    expected = {n: p.detach() for n, p in model.named_parameters()} if entry == "ema" else model.state_dict()
    stored = {name: torch.empty(saved[prefix + name], device="meta") for name in names}
    shapes = model.adapt_state_dict(dict(stored)) if hasattr(model, "adapt_state_dict") else stored
    raise_on_mismatch(expected, shapes, source=f"{path}{f' ({entry})' if entry else ''}")
    targets = {}
    for name in names:
        target = expected[name]
        if tuple(stored[name].shape) != tuple(target.shape):  # another published layout (the release's Linear patch
            if isinstance(target, DTensor):                   # embedding): read into a view of the parameter
                raise ValueError(f"{path}: {name} is stored as {tuple(stored[name].shape)}; a sharded network cannot "
                                 "read it into its own layout; load it before sharding, or convert the checkpoint")
            target = target.view(stored[name].shape)
        targets[prefix + name] = target
    try:
        dcp.load(targets, checkpoint_id=str(path))  # copies cast to the model's dtype
    except BaseException as error:  # DCP wraps reader errors in CheckpointException, a BaseException
        if not isinstance(error, Exception) and type(error).__name__ != "CheckpointException":
            raise
        raise CheckpointCorruptError(f"cannot read the weights of checkpoint {path} ({type(error).__name__}: "
                                     f"{' '.join(str(error).split())[:300]}); `python -m checkpoints_util verify "
                                     f"{path}` checks it") from error
    return entry or "dcp"


def unwrap_state_dict(state: dict, prefer_ema: bool = True, extra_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Undo the usual wrappers: an EMA / state_dict sub-dict and DDP/compile/trainer key prefixes, plus
    ``extra_prefixes`` that exports of one kind of network add (``vae.``, ``encoder.``); order kept."""
    if prefer_ema:
        for key in EMA_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    changed = True
    while changed:
        changed = False
        for prefix in (*WRAPPER_PREFIXES, *extra_prefixes):
            if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def raise_on_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError listing the missing, unexpected and wrongly-shaped keys of ``state`` (if any)."""
    shape_of = getattr(state, "shape_of", lambda k: tuple(state[k].shape))  # a lazy state reads headers only
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != shape_of(k))
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:10]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:10]})")
        if wrong_shape:
            parts.append(
                "wrong shapes: "
                + ", ".join(f"{k} {shape_of(k)} vs {tuple(expected[k].shape)}" for k in wrong_shape[:5])
            )
        raise ValueError(f"{source} does not match the model: " + "; ".join(parts))


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what is missing and unexpected.

    Copies one tensor at a time (cast to the model's dtype), so a memory-mapped or lazily read file is never held
    in full. ``model`` may be sharded (FSDP2, DTensor parameters): each rank then keeps its own slice. A model's
    ``adapt_state_dict`` (if it has one) first turns other published layouts into its own.
    """
    if hasattr(model, "adapt_state_dict"):  # on a copy of the dict; a lazy state keeps its changes aside
        state = model.adapt_state_dict(state if isinstance(state, SafetensorsState) else dict(state))
    expected = model.state_dict()
    raise_on_mismatch(expected, state, source)
    # A bar only when the load is slow (the 14B's 57 GB), and on one rank.
    quiet = dist.is_initialized() and dist.get_rank() != 0
    tensors = tqdm(expected.items(), total=len(expected), desc=f"loading {Path(source).name}", unit="tensor",
                   delay=5.0, disable=quiet)
    with torch.no_grad():
        for name, target in tensors:  # state-dict entries share the parameters' storage (DTensors too)
            value = state[name].to(device=target.device, dtype=target.dtype)
            if isinstance(target, DTensor):  # every rank holds the full tensor: slice it, no communication
                value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
            target.copy_(value)


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy ``source``'s parameters into ``target``'s: the same architecture, sharded alike (or both not at all);
    values are cast to ``target``'s dtypes. Each rank copies only its own shards."""
    pairs = list(zip(source.named_parameters(), target.named_parameters(), strict=True))
    with torch.no_grad():
        for (name, value), (target_name, parameter) in pairs:
            if name != target_name or value.shape != parameter.shape:
                raise ValueError(f"copy_weights: {name} {tuple(value.shape)} does not match {target_name} "
                                 f"{tuple(parameter.shape)}")
            parameter.copy_(value)
