"""rcm.torch_files: a torch file that a user named is read, or refused in one sentence naming the file, its role
and what it should hold (never torch's own zip, mmap or pickle message); the helpers here make the bad files
that the loaders' tests (models, data, eval, training) feed them."""
from pathlib import Path

import pytest
import torch

from rcm.torch_files import TorchFileError, describe_object, read_torch_file

# What a bad file holds → the words of the sentence about it (besides the file's name).
BAD_FILE_MESSAGES = {
    "text": "is not a torch checkpoint (torch.save files are zip archives starting with 'PK'; this one starts with 'hell')",
    "truncated": "cannot be read as a torch checkpoint: it is truncated or damaged",
    "list": "holds a list of 3 items, not",
    "tensor": "holds a single tensor of shape (4,), not",
    "dict": "holds a dict of 1 item, not",
}


def write_bad_torch_file(path: Path, kind: str) -> Path:
    """Write a bad file of ``kind`` (a key of BAD_FILE_MESSAGES) at ``path``: a text file, the first half of a
    torch.save of a dict, or a torch.save of a list, a tensor or a one-key dict."""
    if kind == "text":
        path.write_text("hello, not weights\n")
    elif kind == "truncated":
        torch.save({"weight": torch.zeros(256)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        torch.save({"list": [1, 2, 3], "tensor": torch.zeros(4), "dict": {"weight": torch.zeros(2)}}[kind], path)
    return path


def assert_one_sentence_about(error: BaseException, path: Path, kind: str, *expected: str) -> None:
    """The error is one line naming ``path`` with the words for ``kind`` and every ``expected`` fragment."""
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    for fragment in (BAD_FILE_MESSAGES[kind], *expected):
        assert fragment in message, message


@pytest.mark.parametrize("kind", ["text", "truncated", "list", "tensor"])
def test_a_bad_file_is_one_sentence_naming_its_role_and_what_it_should_hold(tmp_path, kind):
    path = write_bad_torch_file(tmp_path / "weights.pth", kind)
    with pytest.raises(TorchFileError) as error:
        read_torch_file(path, "--thing", dict, "a state dict")
    assert str(error.value).startswith(f"--thing {path} ")
    assert_one_sentence_about(error.value, path, kind, *(["not a state dict"] if kind in ("list", "tensor") else []))


def test_a_truncated_file_names_the_first_sentence_of_torchs_reason_only(tmp_path):
    """torch's zip error carries a paragraph of advice: only its first sentence is kept."""
    path = write_bad_torch_file(tmp_path / "cut.pt", "truncated")
    with pytest.raises(TorchFileError, match=r"\(RuntimeError: PytorchStreamReader failed .*\)$") as error:
        read_torch_file(path)
    assert "If you are seeing this error" not in str(error.value)


def test_a_good_file_loads_memory_mapped_unless_asked_otherwise(tmp_path, monkeypatch):
    """The default maps the file (the 11 GB umT5 encoder is never read into memory at once); mmap=False reads it."""
    torch.save({"weight": torch.arange(3.0)}, tmp_path / "good.pth")
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs["mmap"]) or load(*args, **kwargs))
    assert torch.equal(read_torch_file(tmp_path / "good.pth", expect=dict)["weight"], torch.arange(3.0))
    read_torch_file(tmp_path / "good.pth", mmap=False)
    assert calls == [True, False]


def test_describe_object_counts_in_words():
    assert describe_object([1]) == "a list of 1 item" and describe_object({}) == "a dict of 0 items"
    assert describe_object(torch.zeros(2, 3)) == "a single tensor of shape (2, 3)" and describe_object(3) == "an int"
