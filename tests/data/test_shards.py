"""Tests of the tar shard writer and the deterministic, resumable, rank-aware ShardLoader."""
import io
import os
import tarfile

import pytest
import torch
from webdataset import TarWriter

from rcm.data.shards import ShardError, ShardLoader, write_shards

LATENT_SHAPE = (2, 1, 2, 2)
TEXT_LEN, TEXT_DIM = 5, 3


def _samples(count, start=0):
    """Samples whose latent is filled with their index and whose embedding length cycles 1..TEXT_LEN."""
    return [
        {
            "latent": torch.full(LATENT_SHAPE, float(index)),
            "embed": torch.full((1 + index % TEXT_LEN, TEXT_DIM), float(index) + 0.5),
            "prompt": f"prompt {index} é",
        }
        for index in range(start, start + count)
    ]


def _loader(shards, batch_size, **kwargs):
    return ShardLoader(shards, batch_size, LATENT_SHAPE, TEXT_LEN, TEXT_DIM, shuffle_buffer=kwargs.pop("shuffle_buffer", 8), **kwargs)


def _indices(batch):
    """Global sample indices of a batch (read back from the latent values)."""
    return batch["latent"][:, 0, 0, 0, 0].long().tolist()


@pytest.fixture
def shard_dir(tmp_path):
    write_shards(_samples(23), tmp_path, samples_per_shard=5)
    return tmp_path


def test_write_names_shards_and_leaves_no_temporary_files(tmp_path):
    """Shards are named shard-NNNNNN.tar with 9-digit keys; nothing temporary remains after writing."""
    paths = write_shards(_samples(12), tmp_path, samples_per_shard=5)
    assert [path.name for path in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(os.listdir(tmp_path)) == [path.name for path in paths]
    with tarfile.open(paths[1]) as archive:
        assert archive.getnames()[:3] == ["000000005.embed.pt", "000000005.latent.pt", "000000005.prompt.txt"]
    later = write_shards(_samples(5, start=15), tmp_path, samples_per_shard=5, start_index=15)
    assert [path.name for path in later] == ["shard-000003.tar"]


def test_interrupted_write_keeps_complete_shards_only(tmp_path):
    """A failure mid-write leaves the completed shards and no partial shard under any name."""

    def failing():
        yield from _samples(7)
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError):
        write_shards(failing(), tmp_path, samples_per_shard=5)
    assert os.listdir(tmp_path) == ["shard-000000.tar"]


def test_round_trip_returns_what_was_written(shard_dir):
    """One epoch yields every written sample once; embeddings are zero-padded with the right lengths; prompts are utf-8."""
    loader = _loader(shard_dir, batch_size=23)
    batch = next(loader)
    assert sorted(_indices(batch)) == list(range(23))
    assert batch["latent"].dtype == torch.float32 and batch["latent"].shape == (23, *LATENT_SHAPE)
    assert batch["embed"].shape == (23, TEXT_LEN, TEXT_DIM) and batch["embed_length"].dtype == torch.int64
    for index, embed, length, prompt in zip(_indices(batch), batch["embed"], batch["embed_length"], batch["prompt"]):
        assert length == 1 + index % TEXT_LEN
        assert torch.all(embed[:length] == index + 0.5) and torch.all(embed[length:] == 0)
        assert prompt == f"prompt {index} é"
    assert loader.state_dict() == {"epoch": 0, "samples_in_epoch": 23}
    assert loader.samples_seen == 23
    assert sorted(_indices(next(loader))) == list(range(23))  # epochs repeat


def test_shard_inputs_as_glob_and_list(shard_dir):
    """A glob pattern and an explicit list select the same shards as the directory."""
    assert _loader(str(shard_dir / "shard-*.tar"), 1).shards == _loader(shard_dir, 1).shards
    chosen = [shard_dir / "shard-000001.tar"]
    assert sorted(_indices(next(_loader(chosen, 5)))) == [5, 6, 7, 8, 9]


def test_loader_is_deterministic_and_reshuffles_per_epoch(shard_dir):
    """The same seed gives the same stream; another epoch or another seed gives another order."""
    loader_a, loader_b = _loader(shard_dir, 23, seed=7), _loader(shard_dir, 23, seed=7)
    epochs_a = [_indices(next(loader_a)) for _ in range(3)]
    epochs_b = [_indices(next(loader_b)) for _ in range(3)]
    assert epochs_a == epochs_b
    assert epochs_a[0] != epochs_a[1] and epochs_a[1] != epochs_a[2]
    assert _indices(next(_loader(shard_dir, 23, seed=8))) != epochs_a[0]


@pytest.mark.parametrize("num_samples,batch_size,batches_before", [(23, 4, 0), (23, 4, 3), (23, 4, 7), (20, 5, 4), (20, 5, 9)])
def test_resume_continues_the_uninterrupted_stream(tmp_path, num_samples, batch_size, batches_before):
    """After load_state_dict a fresh loader yields exactly the batches the uninterrupted loader yields next."""
    write_shards(_samples(num_samples), tmp_path, samples_per_shard=5)
    uninterrupted = _loader(tmp_path, batch_size, seed=3, shuffle_buffer=6)
    for _ in range(batches_before):
        next(uninterrupted)
    state = uninterrupted.state_dict()
    resumed = _loader(tmp_path, batch_size, seed=3, shuffle_buffer=6)
    resumed.load_state_dict(state)
    for _ in range(8):
        expected, got = next(uninterrupted), next(resumed)
        assert torch.equal(expected["latent"], got["latent"]) and expected["prompt"] == got["prompt"]


def test_two_ranks_read_disjoint_shards_covering_all(shard_dir):
    """Per epoch the two ranks' shard lists are disjoint and together hold every shard; their samples likewise."""
    rank0 = _loader(shard_dir, 1, seed=1, rank=0, world_size=2)
    rank1 = _loader(shard_dir, 1, seed=1, rank=1, world_size=2)
    for epoch in range(4):
        shards0, shards1 = set(rank0.shards_for_epoch(epoch)), set(rank1.shards_for_epoch(epoch))
        assert not shards0 & shards1 and shards0 | shards1 == set(rank0.shards)
    sizes = {path: (3 if path.name == "shard-000004.tar" else 5) for path in rank0.shards}
    seen = []
    for rank in (0, 1):
        count = sum(sizes[path] for path in (rank0, rank1)[rank].shards_for_epoch(0))
        loader = _loader(shard_dir, count, seed=1, rank=rank, world_size=2)
        seen.append(set(_indices(next(loader))))
        assert loader.state_dict() == {"epoch": 0, "samples_in_epoch": count}
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(23))


def test_fewer_shards_than_ranks_is_an_error(tmp_path):
    """A world larger than the shard count fails at construction with a ShardError."""
    write_shards(_samples(4), tmp_path, samples_per_shard=5)
    with pytest.raises(ShardError, match="1 shard"):
        _loader(tmp_path, 1, rank=0, world_size=2)


def test_missing_or_empty_shard_sources_are_errors(tmp_path):
    """A missing directory, a directory without tars, an unmatched glob and a missing listed file raise ShardError."""
    with pytest.raises(ShardError, match="does not exist"):
        _loader(tmp_path / "nowhere", 1)
    with pytest.raises(ShardError, match="contains no .tar"):
        _loader(tmp_path, 1)
    with pytest.raises(ShardError, match="matched"):
        _loader(str(tmp_path / "*.tar"), 1)
    with pytest.raises(ShardError, match="missing.tar"):
        _loader([tmp_path / "missing.tar"], 1)


def _member_end_offsets(path):
    """Byte offsets where each member's (padded) data ends."""
    with tarfile.open(path) as archive:
        return [member.offset_data + -(-member.size // 512) * 512 for member in archive.getmembers()]


@pytest.mark.parametrize("cut", ["middle", "member_boundary"])
def test_truncated_shard_names_the_file(shard_dir, cut):
    """A shard cut mid-member or exactly at a member boundary raises ShardError naming the shard."""
    path = shard_dir / "shard-000002.tar"
    size = path.stat().st_size if cut == "middle" else _member_end_offsets(path)[7]
    with open(path, "r+b") as file:
        file.truncate(size // 2 if cut == "middle" else size)
    loader = _loader(shard_dir, 23)
    with pytest.raises(ShardError, match="shard-000002.tar"):
        next(loader)


def _write_raw_shard(path, members_per_key):
    """A shard written with arbitrary members: {key: {suffix: bytes}}."""
    with TarWriter(str(path), encoder=False) as writer:
        for key, members in members_per_key.items():
            writer.write({"__key__": key, **members})


def _tensor_bytes(tensor):
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def _good_members(index):
    return {
        "latent.pt": _tensor_bytes(torch.zeros(LATENT_SHAPE)),
        "embed.pt": _tensor_bytes(torch.zeros(2, TEXT_DIM)),
        "prompt.txt": f"p{index}".encode(),
    }


def test_wrong_latent_shape_names_the_key(tmp_path):
    """A latent of another shape raises ShardError naming shard, key, the shape found and the one expected."""
    bad = {**_good_members(3), "latent.pt": _tensor_bytes(torch.zeros(2, 1, 2, 3))}
    _write_raw_shard(tmp_path / "shard-000000.tar", {"000000002": _good_members(2), "000000003": bad})
    with pytest.raises(ShardError, match=r"000000003.*shard-000000.tar.*\(2, 1, 2, 3\).*\(2, 1, 2, 2\)"):
        next(_loader(tmp_path, 2))


def test_missing_member_names_shard_and_key(tmp_path):
    """A sample without its prompt raises ShardError naming shard and key."""
    members = _good_members(4)
    del members["prompt.txt"]
    _write_raw_shard(tmp_path / "shard-000000.tar", {"000000004": members})
    with pytest.raises(ShardError, match=r"000000004.*shard-000000.tar.*prompt.txt"):
        next(_loader(tmp_path, 1))


@pytest.mark.parametrize("embed_shape", [(TEXT_LEN + 1, TEXT_DIM), (2, TEXT_DIM + 1)])
def test_bad_embedding_is_rejected(tmp_path, embed_shape):
    """An embedding longer than text_len or of the wrong width raises ShardError naming the key."""
    members = {**_good_members(0), "embed.pt": _tensor_bytes(torch.zeros(embed_shape))}
    _write_raw_shard(tmp_path / "shard-000000.tar", {"000000000": members})
    with pytest.raises(ShardError, match=r"embedding of sample 000000000"):
        next(_loader(tmp_path, 1))


def test_longer_latents_keep_their_first_frames(tmp_path):
    """A latent with more frames than data.latent_shape trains on its first ones (the 1.3B recipe's 20 of 21)."""
    long_latent = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    members = {**_good_members(0), "latent.pt": _tensor_bytes(long_latent)}
    _write_raw_shard(tmp_path / "shard-000000.tar", {"000000000": members})
    batch = next(_loader(tmp_path, 1))
    assert torch.equal(batch["latent"][0], long_latent[:, :1])
