"""One checkpoint manager: DCP saves of the whole training state (synchronous or with ``dcp.async_save``),
an atomic completion marker, keep-last-k plus keep-every-n, and the "latest loadable checkpoint" lookup
behind automatic resume.

Layout of a run directory::

    checkpoints/iter_000001000/   DCP shards + .metadata (networks, EMA, optimizers)
                               rank_00000.pt ...   per-rank state (RNG, data position, counters, config)
                               COMPLETE            written last, by rank 0, once every rank's data is on disk

Why rank 0 may write the marker as soon as *its* DCP save returns: every rank writes its ``rank_*.pt``
before it enters the save, and DCP's coordinator (rank 0) writes ``.metadata`` only after it gathered
the write results of every rank. So rank 0's save completing means every shard and rank file exists.
A crash or SIGKILL at any earlier point leaves no marker, and the previous checkpoint stays the latest.

A save at an iteration that already has a complete checkpoint (one that resume skipped as damaged, or one of an
earlier trajectory) writes beside it, into ``.iter_NNNNNNNNN.replacing``, and swaps the two directories once the
new one is complete (one atomic ``renameat2`` exchange where the file system has it): there is never a moment
without a complete checkpoint of that iteration.
"""
from __future__ import annotations

import ctypes
import errno
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from rcm.atomic_files import atomic_write_bytes
from rcm.checkpoint.layout import (CHECKPOINT_NAME, COMPLETE_MARKER, CheckpointCorruptError, CheckpointSaveError,
                                   is_complete, rank_file, read_marker)
from rcm.checkpoint.verify import read_metadata, verify_checkpoint, verify_torch_file
from rcm.parallel.distributed import DistributedInfo, barrier

log = logging.getLogger(__name__)
# DCP warns on every single-process save/load; single-process is a supported mode here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
ASYNC_MODES = ("thread", "process")
_CHECKPOINT_NAME = CHECKPOINT_NAME
# Where a save writes when its iteration already has a complete checkpoint (swapped into place once complete).
_REPLACEMENT_NAME = re.compile(r"^\.(iter_(\d{9}))\.replacing$")
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux ≥ 3.15: ext4, xfs, btrfs, tmpfs; not NFS)
__all__ = ["ASYNC_MODES", "COMPLETE_MARKER", "CheckpointCorruptError", "CheckpointManager", "CheckpointSaveError",
           "checkpoint_entries", "is_complete", "iteration_of", "rank_file", "read_marker", "verify_together"]


class CheckpointManager:
    """Saves and finds checkpoints under ``<run_dir>/checkpoints``.

    ``async_save``: ``save`` copies the state to CPU memory (pinned on CUDA, reused between saves) and
    returns; a background thread writes it and rank 0 then writes the marker. At most one save is in
    flight: the next ``save`` (or ``wait``) first waits for the previous one.

    ``async_mode="process"`` writes from a separate process instead (DCP's process executor; the staging
    buffers live in shared memory): the writer's serialization then never holds the training process's
    GIL, which slows launch-bound training steps while a thread writes (docs/benchmarks.md). It needs a
    process group, so a one-process run gets a private one-rank gloo group, and one open file per staged
    tensor (the soft open-file limit is raised to the hard one; below that it falls back to a thread).

    ``restart_if_all_damaged``: when every checkpoint fails verification, ``latest_loadable`` returns None (start
    over, with a warning) instead of raising (the default: a silent restart would throw the run's work away).
    """

    def __init__(
        self,
        directory: str | Path,
        info: DistributedInfo = DistributedInfo(),
        keep_last: int = 3,
        keep_every: int = 0,
        async_save: bool = False,
        async_mode: str = "thread",
        restart_if_all_damaged: bool = False,
    ):
        if async_mode not in ASYNC_MODES:
            raise ValueError(f"async_mode must be one of {ASYNC_MODES}, got {async_mode!r}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (the latest checkpoint is what resume needs), got {keep_last}")
        self.directory = Path(directory)
        self.info = info
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.async_mode = async_mode
        self.restart_if_all_damaged = restart_if_all_damaged
        self._saved_iterations: set[int] = set()  # saved by this manager: a second save of one is a no-op
        self._own_default_group = False
        self._pending: Future | None = None
        self._pending_path: Path | None = None
        self._group = None  # a gloo group of its own: async writes must not interleave with training collectives
        self._stager = None

    # -- finding checkpoints --
    def path_for(self, iteration: int) -> Path:
        """Directory of the checkpoint taken after ``iteration`` iterations."""
        return self.directory / f"iter_{iteration:09d}"

    def complete_checkpoints(self, warn: bool = True) -> list[tuple[int, Path]]:
        """(iteration, path) of every complete checkpoint, oldest first; incomplete ones are skipped with a warning.

        A complete replacement (``.iter_N.replacing``) stands in for ``iter_N`` when that is missing: a crash
        between the two renames of a replacement on a file system without an atomic exchange.
        """
        found = []
        if not self.directory.is_dir():
            return found
        for child in sorted(self.directory.iterdir()):
            match = _CHECKPOINT_NAME.match(child.name)
            if not match or not child.is_dir():
                replacement = _REPLACEMENT_NAME.match(child.name)
                if replacement and is_complete(child) and not (self.directory / replacement.group(1)).exists():
                    found.append((int(replacement.group(2)), child))
                continue
            if is_complete(child):
                found.append((int(match.group(1)), child))
            elif warn and child != self._in_flight_path():
                log.warning("skipping incomplete checkpoint %s (no %s marker: the save did not finish)", child, COMPLETE_MARKER)
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None (no content check; see ``latest_loadable``)."""
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def latest_loadable(self, check_crc: bool = True, remedy: str | None = None) -> Path | None:
        """Collective: the newest complete checkpoint that passes verification; damaged ones are skipped with a
        warning naming the damaged file. None when there is no checkpoint (or only an unfinished save).

        When checkpoints exist but every one is damaged: CheckpointCorruptError naming the damaged files, or with
        ``restart_if_all_damaged`` a warning and None. ``remedy`` ends that error (default: training's own, starting
        over). The ranks split the check, so its cost does not grow with the world size.
        """
        damaged = []
        for _, path in reversed(self.complete_checkpoints()):
            problems = verify_together(path, check_crc, self.info)
            if not problems:
                return path
            damaged.append(problems[0])
            if self.info.is_main:
                log.warning("skipping damaged checkpoint %s: %s", path, "; ".join(problems[:3]))
        damaged += [f"{path} has no {COMPLETE_MARKER} marker although its save finished (a later save started)"
                    for path in self._unmarked_finished_saves()]
        if not damaged:
            return None
        shown = "; ".join(damaged[:3]) + (f"; and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        remedy = remedy or "or, to train from the start, set train.restart_if_all_damaged=true"
        message = (f"every checkpoint in {self.directory} is damaged ({shown}); restore or delete the damaged files "
                   f"(`python -m checkpoints_util verify {self.directory.parent}` lists them), {remedy}")
        if not self.restart_if_all_damaged:
            raise CheckpointCorruptError(message)
        if self.info.is_main:
            log.warning("%s: starting over from iteration 0 (train.restart_if_all_damaged=true)", message.split(";")[0])
        return None

    def _unmarked_finished_saves(self) -> list[Path]:
        """Checkpoint directories without a marker whose DCP save finished (.metadata exists) and that are not the
        newest: a crash can leave only the newest save unfinished, so these lost their marker afterwards."""
        if not self.directory.is_dir():
            return []
        named = sorted(child for child in self.directory.iterdir() if _CHECKPOINT_NAME.match(child.name) and child.is_dir())
        return [child for child in named[:-1] if not is_complete(child) and (child / ".metadata").is_file()]

    # -- saving --
    def save(self, iteration: int, state: dict[str, Any], rank_state: dict[str, Any], wait: bool = False) -> Path:
        """Collective save: DCP for ``state``, one file per rank for ``rank_state``, then the marker.

        With ``async_save`` this returns once ``state`` is copied to CPU memory, unless ``wait``. An existing
        complete checkpoint of ``iteration`` not saved by this manager (resume skipped it as damaged, or it belongs
        to an earlier run of this directory) is replaced atomically once the new one is complete.
        """
        self.wait()
        path = self.path_for(iteration)
        if iteration in self._saved_iterations:
            return path  # saved a moment ago (a stop request right after an interval save)
        target = _replacement_path(path) if is_complete(path) else path
        if self.info.is_main and target.exists():
            shutil.rmtree(target)  # leftovers of a save that crashed
        barrier(self.info)
        started = time.time()
        try:
            target.mkdir(parents=True, exist_ok=True)
            # Before the DCP save: its final gather on rank 0 then proves that every rank file exists.
            atomic_write_bytes(rank_file(target, self.info.rank), _to_bytes(rank_state))
            if self.async_save and self._stager is None and not self._staging_memory_fits(state):
                self.async_save = False  # decided together by every rank (DCP's save and async_save must not mix)
            if self.async_save:
                upload = self._async_save(_plain_containers(state), target)
                self._pending = self._complete_when_done(upload, iteration, target, started, _tensor_bytes(state))
                self._pending_path = target
                log.debug("checkpoint %s staged in %.2f s; writing in the background", path, time.time() - started)
            else:
                dcp.save(state, checkpoint_id=str(target), process_group=self._process_group())
                self._complete(iteration, target, started, asynchronous=False)
        except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
            explained = _explain_save_failure(error, target, _tensor_bytes(state))
            if explained is error:
                raise
            raise explained from error
        self._saved_iterations.add(iteration)
        if self.async_save and wait:
            self.wait()
        elif not self.async_save:
            barrier(self.info)
        return path

    @property
    def in_flight(self) -> bool:
        """Whether an asynchronous save is still being written."""
        return self._pending is not None and not self._pending.done()

    def wait(self) -> None:
        """Collective: block until the save in flight (if any) is written and marked complete."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.result()
        barrier(self.info)  # every rank returns only once rank 0 wrote the marker

    def close(self) -> None:
        """Finish the save in flight and release the staging memory."""
        self.wait()
        self._release_stager()
        if self._own_default_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_default_group = False

    def _staging_memory_fits(self, state: dict[str, Any]) -> bool:
        """Collective, before the first async save: whether this node has host memory (and, for a writer process,
        shared memory) for every local rank's staging buffers. Otherwise warn: saves will be synchronous.

        The buffers hold a full copy of each rank's share of the state for the whole run (40 GB for the 1.3B
        training state on one GPU); too little memory would make the first save swap, hang or be OOM-killed.
        """
        needed = _tensor_bytes(state) * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        free = _host_memory_available()
        where = "host memory"
        if self.async_mode == "process":
            shared = _shared_memory_available()
            if shared is not None and (free is None or shared < free):
                free, where = shared, "shared memory (/dev/shm)"
        short_here = free is not None and needed > 0.9 * free
        if short_here:
            log.warning("async checkpointing needs ~%.1f GiB of %s on this node to stage the state (%.1f GiB "
                        "available): saving synchronously instead (train.async_save=false silences this)",
                        needed / 2**30, where, free / 2**30)
        short = short_here
        if self.info.world_size > 1 and dist.is_initialized():
            flag = torch.tensor([int(short_here)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._process_group())
            short = bool(flag.item())
            if short and not short_here:
                log.warning("another node lacks memory for async checkpoint staging: saving synchronously instead")
        return not short

    def _release_stager(self) -> None:
        """Free the staging buffers (the next async save allocates new ones)."""
        if self._stager is not None:
            (self._stager.release if isinstance(self._stager, _PlainTensorStager) else self._stager.close)()
            self._stager = None

    def _in_flight_path(self) -> Path | None:
        return self._pending_path if self._pending is not None else None

    def _process_group(self):
        if self.info.world_size == 1 or not dist.is_initialized():
            return None
        if self._group is None:  # created lazily at the first save, which every rank reaches together
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _async_save(self, state: dict[str, Any], path: Path) -> Future:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        in_process = self.async_mode == "process" and self._prepare_writer_process(state)
        if self._stager is None:
            # One stager for the whole run, keeping its CPU buffers from save to save (a save waits for the previous
            # one before staging). rcm's own first: DCP's DefaultStager is closed by some torch releases after each
            # save and then fails the next (KeyError: <class 'type'>), and a second set of 40 GB buffers for the
            # 1.3B state then exhausted a 128 GiB host.
            self._stager = _PlainTensorStager(shared_memory=in_process)
        kind = AsyncCheckpointerType.PROCESS if in_process else AsyncCheckpointerType.THREAD

        def start() -> Future:
            return dcp.async_save(state, checkpoint_id=str(path), process_group=self._process_group(),
                                  async_checkpointer_type=kind, async_stager=self._stager)

        try:
            return start()
        except TypeError as error:
            if not isinstance(self._stager, _PlainTensorStager):
                raise
            # A tensor subclass other than DTensor: DCP's stager deep-copies anything.
            log.warning("%s; staging with DCP's DefaultStager from now on", error)
            self._stager.release()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=in_process,
                                                        use_async_staging=False, use_non_blocking_copy=False))
            return start()

    def _prepare_writer_process(self, state: dict[str, Any]) -> bool:
        """Whether this save can go to a writer process: a process group exists (one is made for a single
        process) and the open-file limit covers one descriptor per staged tensor; else warn, use a thread."""
        if not dist.is_initialized():
            if self.info.world_size > 1:
                raise RuntimeError("async_mode='process' with several ranks needs torch.distributed initialized first")
            # DCP's writer process joins the saving ranks' group; a lone process gets a private one-rank group.
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            self._own_default_group = True
        needed = 2 * _count_tensors(state) + 1024
        if not _raise_open_file_limit(needed):
            log.warning("async_mode='process' needs ~%d open files (one per staged tensor) but the hard limit is lower; "
                        "writing from a thread instead (raise `ulimit -n`)", needed)
            self.async_mode = "thread"
            self._release_stager()
            return False
        return True

    def _complete_when_done(self, upload: Future, iteration: int, path: Path, started: float, nbytes: int) -> Future:
        done: Future = Future()

        def finish(upload_future: Future) -> None:
            try:
                upload_future.result()
                self._complete(iteration, path, started, asynchronous=True)
                done.set_result(path)
            except BaseException as error:  # surfaces in wait(): the training loop must hear of a failed save
                failed = isinstance(error, (Exception, CheckpointException))
                explained = _explain_save_failure(error, path, nbytes) if failed else error
                if explained is not error:
                    explained.__cause__ = error
                log.error("asynchronous save of %s failed: %s", path, explained)
                done.set_exception(explained)

        upload.add_done_callback(finish)
        return done

    def _complete(self, iteration: int, written: Path, started: float, asynchronous: bool) -> None:
        """Rank 0: the marker, then (for a replacement) the swap into place, then pruning."""
        if not self.info.is_main:
            return
        seconds = time.time() - started
        marker = {"iteration": iteration, "world_size": self.info.world_size, "saved_at": time.time(),
                  "seconds": round(seconds, 3), "async": asynchronous}
        atomic_write_bytes(written / COMPLETE_MARKER, json.dumps(marker).encode())
        path = self.path_for(iteration)
        if written != path:
            _swap_into_place(written, path)
            log.warning("replaced the earlier checkpoint %s (damaged, or of an earlier run) with this run's", path)
        self._prune(newest=path)
        log.info("saved checkpoint %s in %.1f s%s", path, seconds, " (in the background)" if asynchronous else "")

    def _prune(self, newest: Path) -> None:
        """Keep the last ``keep_last`` checkpoints and every ``keep_every``-th; drop older leftovers of crashed saves."""
        checkpoints = self.complete_checkpoints(warn=False)
        recent = {path for _, path in checkpoints[-self.keep_last:]}
        for iteration, old in checkpoints:
            if old in recent or (self.keep_every > 0 and iteration % self.keep_every == 0):
                continue
            # Remove the marker first: a crash mid-delete must not leave a "complete" half checkpoint.
            (old / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
        newest_iteration = int(_CHECKPOINT_NAME.match(newest.name).group(1))
        for child in self.directory.iterdir():
            match = _CHECKPOINT_NAME.match(child.name) or _REPLACEMENT_NAME.match(child.name)
            if match and int(match.group(match.re.groups)) < newest_iteration and not is_complete(child):
                shutil.rmtree(child, ignore_errors=True)
            elif match and match.re is _REPLACEMENT_NAME and is_complete(self.directory / match.group(1)):
                shutil.rmtree(child, ignore_errors=True)  # superseded: its iteration was saved again since

    # -- loading --
    def load(self, path: str | Path, state: dict[str, Any]) -> dict[str, Any] | None:
        """Fill ``state`` in place (DCP reshards tensors to this world); returns this rank's saved rank state,
        or None when the checkpoint was saved by another world size (see ``rank_states``)."""
        path = Path(path)
        if not is_complete(path):
            raise FileNotFoundError(f"checkpoint {path} is not complete (no {COMPLETE_MARKER} marker); refusing to load it")
        self.load_entries(path, state)
        if self.saved_world_size(path) != self.info.world_size:
            return None
        return _load_rank_file(rank_file(path, self.info.rank))

    def load_entries(self, path: str | Path, state: dict[str, Any]) -> None:
        """DCP-load the entries of ``state`` (a subset of the checkpoint's is fine), naming a damaged file on failure."""
        path = Path(path)
        available = checkpoint_entries(path)
        missing = sorted(set(state) - available)
        if missing:
            raise KeyError(f"checkpoint {path} has no entry {missing} (it holds {sorted(available)})")
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as error:  # DCP wraps reader errors in a BaseException
            problems = verify_checkpoint(path, check_crc=False)
            if problems:
                raise CheckpointCorruptError(f"cannot load checkpoint {path}: " + "; ".join(problems[:3])) from error
            # Intact files that still do not load: another model or optimizer, or metadata changed in a way that
            # stays self-consistent (a renamed key).
            raise CheckpointCorruptError(f"cannot load checkpoint {path} into this run's state ({_short_reason(error)}):"
                                         " it was saved for another model or optimizer, or its .metadata is damaged") from error

    def saved_world_size(self, path: str | Path) -> int:
        """How many ranks wrote the checkpoint."""
        return int(read_marker(Path(path))["world_size"])

    def rank_states(self, path: str | Path) -> list[dict[str, Any]]:
        """Every saved rank's state, in rank order (small: RNG, counters, data position, config)."""
        path = Path(path)
        return [_load_rank_file(rank_file(path, rank)) for rank in range(self.saved_world_size(path))]


def verify_together(path: str | Path, check_crc: bool = True, info: DistributedInfo = DistributedInfo()) -> list[str]:
    """Collective over ``info``'s ranks (each checks its share): the problems of a checkpoint directory or a
    torch.save file, one sentence each naming the file; empty when it is intact."""
    path = Path(path)
    if path.is_file():
        problems = verify_torch_file(path, check_crc, part=info.rank, num_parts=info.world_size)
    else:
        problems = verify_checkpoint(path, check_crc, part=info.rank, num_parts=info.world_size)
    if info.world_size > 1:
        gathered: list[list[str] | None] = [None] * info.world_size
        dist.all_gather_object(gathered, problems)
        problems = list(dict.fromkeys(p for rank_problems in gathered for p in rank_problems or []))
    return problems


def checkpoint_entries(path: str | Path) -> set[str]:
    """The top-level entries of a DCP checkpoint (student, ema, fake_score, optim_student, ...)."""
    return {key.split(".", 1)[0] for key in read_metadata(Path(path)).state_dict_metadata}


def iteration_of(path: str | Path) -> int:
    """The iteration a checkpoint directory was taken at."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    if match:
        return int(match.group(1))
    if is_complete(Path(path)):
        return int(read_marker(Path(path))["iteration"])
    raise ValueError(f"{path} is not a checkpoint directory (expected a name like iter_000001000)")


def _replacement_path(path: Path) -> Path:
    """Where a checkpoint that replaces the complete one at ``path`` is written (hidden: no reader lists it)."""
    return path.with_name(f".{path.name}.replacing")


def _swap_into_place(new: Path, path: Path) -> None:
    """Put the complete checkpoint ``new`` where ``path`` is and delete the old one: one atomic exchange where the
    file system has it, else two renames (in between, ``complete_checkpoints`` lists ``new`` for that iteration)."""
    if _exchange_directories(new, path):
        shutil.rmtree(new, ignore_errors=True)  # it now holds the old checkpoint
        return
    old = path.with_name(f".{path.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange_directories(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _explain_save_failure(error: BaseException, path: Path, nbytes: int) -> BaseException:
    """A full disk as one sentence naming the checkpoint (writers report it as ENOSPC, or, from DCP's writer
    process, only as a torch.save position error); any other failure unchanged."""
    free = _free_bytes(path)
    if not _is_disk_full(error) and (free is None or free >= nbytes):
        return error
    detail = _short_reason(error)
    free_text = "" if free is None else f" with {_human_bytes(free)} free on its file system"
    return CheckpointSaveError(
        f"no space left on device: saving checkpoint {path} failed{free_text} (this rank's share of the state is "
        f"~{_human_bytes(nbytes)}); free some space or move the run directory, then run again to resume from the "
        f"latest complete checkpoint (the writer said: {detail})")


def _short_reason(error: BaseException) -> str:
    """The innermost failure of ``error`` as one short line (DCP's CheckpointException carries whole tracebacks)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, Mapping) and failures:
        first = next(iter(failures.values()))
        return _short_reason(first[0] if isinstance(first, tuple) else first)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:200]


def _is_disk_full(error: BaseException) -> bool:
    """Whether ENOSPC or EDQUOT is anywhere in the chain of ``error`` (DCP wraps each rank's failure)."""
    stack, seen = [error], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current) or "Disk quota exceeded" in str(current):
            return True
        stack += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # CheckpointException: rank → (exception, traceback)
        if isinstance(failures, Mapping):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


def _free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system of ``path`` (or of its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _human_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _staged_tensors(tree: Any):
    """The tensors this rank stages for ``tree``, a DTensor as its local shard."""
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from _staged_tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _staged_tensors(value)
    elif isinstance(tree, DTensor):
        yield tree.to_local()
    elif torch.is_tensor(tree):
        yield tree


def _tensor_bytes(tree: Any) -> int:
    """Bytes this rank stages for ``tree``."""
    return sum(tensor.nbytes for tensor in _staged_tensors(tree))


def _host_memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where there is no such file (not Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _shared_memory_available() -> int | None:
    """Free bytes of /dev/shm (containers often mount a small one); None where it does not exist."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _count_tensors(tree: Any) -> int:
    return sum(1 for _ in _staged_tensors(tree))


def _raise_open_file_limit(needed: int) -> bool:
    """Raise the soft open-file limit towards the hard one; whether ``needed`` descriptors now fit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        return False
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return True


class _PlainTensorStager(AsyncStager):
    """The async-save stager: copies each tensor (a DTensor's local shard) into a CPU buffer kept from one save to
    the next (page-locked for CUDA tensors, or shared memory for a writer process), containers rebuilt as plain
    dicts/lists, everything else shared (it is immutable in a state dict)."""

    _synchronize_after_execute = False

    def __init__(self, shared_memory: bool = False):
        # shared_memory: buffers a writer process can map; page-locked too where CUDA can register them.
        self.shared_memory = shared_memory
        self.buffers: dict[tuple, torch.Tensor] = {}
        self._can_pin_shared = True

    def stage(self, state_dict, **kwargs):
        staged = self._copy(state_dict, ())
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies must land before the write
        return staged

    def _copy(self, tree: Any, path: tuple) -> Any:
        if isinstance(tree, Mapping):
            return {key: self._copy(value, path + (key,)) for key, value in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self._copy(value, path + (i,)) for i, value in enumerate(tree))
        if not torch.is_tensor(tree):
            return tree
        if isinstance(tree, DTensor):  # FSDP2 state: stage this rank's shard, keep the global layout for DCP
            local = self._copy(tree.to_local(), path)
            return DTensor.from_local(local, tree.device_mesh, tree.placements, run_check=False,
                                      shape=tree.shape, stride=tree.stride())
        if type(tree) is not torch.Tensor and not isinstance(tree, torch.nn.Parameter):
            raise TypeError(f"cannot stage a {type(tree).__name__} at {'.'.join(map(str, path))}: set train.async_save=false "
                            "or use a torch whose DCP staging copies it")
        buffer = self.buffers.get(path)
        if buffer is None or buffer.shape != tree.shape or buffer.dtype != tree.dtype:
            buffer = self._new_buffer(tree)
            self.buffers[path] = buffer
        pinned = tree.is_cuda and (not self.shared_memory or getattr(buffer, "_rcm_pinned", False))
        # A copy into pageable memory must not be non-blocking: CUDA would stage it through a bounce buffer anyway.
        buffer.copy_(tree.detach(), non_blocking=pinned)
        return buffer

    def _new_buffer(self, like: torch.Tensor) -> torch.Tensor:
        if not self.shared_memory:
            return torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)
        buffer = torch.empty(like.shape, dtype=like.dtype).share_memory_()
        if like.is_cuda and self._can_pin_shared and buffer.nbytes:
            # Page-lock the shared pages in place (as DCP's own stager does): device-to-host copies then run at
            # full speed, which pageable shared memory does not (22.9 s instead of ~1 s for the 1.3B state).
            try:
                _register_host_memory(buffer)
                buffer._rcm_pinned = True
            except (ImportError, AttributeError, RuntimeError) as error:
                self._can_pin_shared = False
                log.warning("cannot page-lock shared staging memory (%s); the writer process's staging copies will "
                            "be slower", error)
        return buffer

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        # DCP may close a caller's stager after a save; the buffers are meant for the next one (see release).
        pass

    def release(self) -> None:
        """Drop the buffers (the manager's close)."""
        self.buffers.clear()


def _register_host_memory(buffer: torch.Tensor) -> None:
    """cudaHostRegister ``buffer``'s pages (page-locked); unregistered when the buffer (the only tensor on its
    memory) is collected, before the memory goes back."""
    import weakref

    from torch.cuda import _pin_memory_utils

    _pin_memory_utils.pin_memory(buffer.data_ptr(), buffer.nbytes)
    finalizer = weakref.finalize(buffer, _pin_memory_utils.unpin_memory, buffer.data_ptr())
    finalizer.atexit = False  # at exit the CUDA context may be gone already; the process's memory goes with it


def _plain_containers(tree: Any) -> Any:
    """The same tree with every mapping a plain dict (tensors and other leaves are not copied)."""
    if isinstance(tree, Mapping):
        return {key: _plain_containers(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_plain_containers(value) for value in tree)
    return tree


def _load_rank_file(file: Path) -> dict[str, Any]:
    try:
        return torch.load(file, weights_only=False)
    except Exception as error:
        problems = verify_torch_file(file, check_crc=True) or [f"{file} cannot be loaded ({error})"]
        raise CheckpointCorruptError("; ".join(problems)) from error


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
