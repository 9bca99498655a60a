"""rcm.training.state's loaders of user files: data.negative_embedding is read, or refused in one sentence naming
the key and the file."""
import pytest
import torch

from rcm.training.state import load_negative_embedding
from tests.test_torch_files import assert_one_sentence_about, write_bad_torch_file


@pytest.mark.parametrize("kind", ["text", "truncated", "list", "dict"])
def test_a_bad_negative_embedding_is_one_sentence_naming_key_and_file(tmp_path, kind):
    """A text file, a truncated file, or a .pt holding a list or a dict as data.negative_embedding: one sentence
    naming the key, the file and the (tokens, text_dim) tensor expected, not torch's own error."""
    path = write_bad_torch_file(tmp_path / "negative.pt", kind)
    with pytest.raises(ValueError) as error:
        load_negative_embedding(str(path), torch.device("cpu"))
    assert str(error.value).startswith(f"data.negative_embedding {path} ")
    assert_one_sentence_about(error.value, path, kind,
                              *(["a (tokens, text_dim) tensor"] if kind in ("list", "dict") else []))


def test_a_negative_embedding_of_one_prompt_loads_as_tokens_by_dim(tmp_path):
    torch.save(torch.ones(1, 3, 4, dtype=torch.bfloat16), tmp_path / "negative.pt")
    embedding = load_negative_embedding(str(tmp_path / "negative.pt"), torch.device("cpu"))
    assert embedding.shape == (3, 4) and embedding.dtype == torch.float32
