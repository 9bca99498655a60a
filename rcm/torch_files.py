"""Reading a torch.save file that a user named (weights, an embedding, a ground truth): a file that is not one, is
truncated or damaged, or holds the wrong kind of object ends in one sentence naming the file and what it should
hold, never in torch's own mmap, zip or pickle message.

A low layer (torch and rcm.cli_errors only), so data, models, checkpointing and evaluation share it.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from rcm.cli_errors import UserError

# The zip archives of torch.save (every format since torch 1.6) start with a local file header.
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02"  # torch.save before 1.6: a pickle stream (protocol 2)


class TorchFileError(UserError, ValueError):
    """A file named as a torch.save file is not one, cannot be read, or holds the wrong kind of object; the message
    names the file."""


def torch_file_problem(file: str | Path) -> str | None:
    """Why ``file`` cannot be a torch.save file at all (missing, empty, a text file...), in one sentence; else None.

    Reads four bytes: the cheap check before any ``torch.load``, whose own errors (an mmap or pickle message)
    name neither the file nor the cause.
    """
    file = Path(file)
    if not file.exists():
        return f"{file} does not exist"
    if not file.is_file():
        return f"{file} is a directory, not a torch checkpoint file"
    with open(file, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not head:
        return f"{file} is empty, not a torch checkpoint"
    if head != ZIP_MAGIC and not is_legacy_torch_file(file):
        shown = head.decode("ascii", "replace") if head.isascii() and head.decode("ascii").isprintable() else head.hex()
        return (f"{file} is not a torch checkpoint (torch.save files are zip archives starting with 'PK'; this one "
                f"starts with {shown!r})")
    return None


def is_legacy_torch_file(file: str | Path) -> bool:
    """Whether ``file`` is in torch's pre-1.6 format (a bare pickle stream): loadable, but it carries no checksums."""
    with open(file, "rb") as f:
        return f.read(2) == LEGACY_MAGIC


def read_torch_file(path: str | Path, what: str = "", expect: type | tuple[type, ...] = object, expected: str = "",
                    mmap: bool = True) -> object:
    """``torch.load`` of a weights-only file on the CPU (memory-mapped when ``mmap`` and the format allows), or a
    TorchFileError: one sentence that starts with ``what`` (the option or role, e.g. 'data.negative_embedding')
    and the file, when it is not a torch file, cannot be read, or holds no ``expect`` (then naming ``expected``,
    e.g. 'a (tokens, text_dim) tensor')."""
    path = Path(path)
    label = f"{what} " if what else ""
    problem = torch_file_problem(path)
    if problem:
        raise TorchFileError(label + problem)
    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and not is_legacy_torch_file(path))
    except Exception as error:  # torch's reader fails in many ways (zip, mmap, pickle): all mean the same here
        refused = isinstance(error, pickle.UnpicklingError) and "Weights only" in str(error)
        reason = "it holds objects that a weights-only load refuses" if refused else "it is truncated or damaged"
        first_sentence = " ".join(str(error).split()).split(". ")[0][:200]  # torch's advice after it is long
        raise TorchFileError(f"{label}{path} cannot be read as a torch checkpoint: {reason} ({type(error).__name__}: "
                             f"{first_sentence})") from error
    if not isinstance(value, expect):
        raise TorchFileError(f"{label}{path} holds {describe_object(value)}, not {expected or expect}")
    return value


def describe_object(value: object) -> str:
    """A few words on what a loaded object is: 'a list of 3 items', 'a tensor of shape (4, 8)', 'an int'."""
    if torch.is_tensor(value):
        return f"a single tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)} item{'' if len(value) == 1 else 's'}"
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


__all__ = ["LEGACY_MAGIC", "ZIP_MAGIC", "TorchFileError", "describe_object", "is_legacy_torch_file",
           "read_torch_file", "torch_file_problem"]
