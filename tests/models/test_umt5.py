"""The umT5 encoder: official key layout and size, T5's position buckets, masking, and one block
against a naive float64 reference written here from the T5 equations."""
import math

import pytest
import torch

from rcm.models.umt5 import (
    OFFICIAL_CHECKPOINT_NAME,
    UMT5_XXL_PARAMETER_COUNT,
    UMT5Config,
    UMT5Encoder,
    load_umt5_encoder,
    relative_position_bucket,
)

TINY = dict(vocab_size=50, dim=16, dim_attn=24, dim_ffn=40, num_heads=4, num_layers=2, num_buckets=8)


def tiny_encoder(dtype=torch.float64, seed=0, **overrides) -> UMT5Encoder:
    """A tiny umT5 with random (not unit) weights everywhere, so every parameter matters."""
    torch.manual_seed(seed)
    encoder = UMT5Encoder(UMT5Config(**{**TINY, **overrides})).to(dtype)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.5)
    return encoder.eval()


def python_bucket(relative_position: int, num_buckets: int, max_distance: int = 128) -> int:
    """T5's bidirectional bucket from the paper's recipe, one integer at a time."""
    half = num_buckets // 2
    bucket = half if relative_position > 0 else 0
    distance = abs(relative_position)
    exact = half // 2
    if distance < exact:
        return bucket + distance
    log_bucket = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (half - exact))
    return bucket + min(log_bucket, half - 1)


def test_umt5_xxl_has_the_official_parameter_count_and_key_layout():
    """Built on the meta device, umT5-XXL has 5,680,910,336 parameters under the official checkpoint's names."""
    with torch.device("meta"):
        encoder = UMT5Encoder(UMT5Config())
    shapes = {name: tuple(tensor.shape) for name, tensor in encoder.state_dict().items()}
    assert sum(p.numel() for p in encoder.parameters()) == UMT5_XXL_PARAMETER_COUNT == 5_680_910_336

    expected = {"token_embedding.weight": (256384, 4096), "norm.weight": (4096,)}
    for i in range(24):
        expected.update({
            f"blocks.{i}.norm1.weight": (4096,),
            **{f"blocks.{i}.attn.{p}.weight": (4096, 4096) for p in "qkvo"},
            f"blocks.{i}.norm2.weight": (4096,),
            f"blocks.{i}.ffn.gate.0.weight": (10240, 4096),
            f"blocks.{i}.ffn.fc1.weight": (10240, 4096),
            f"blocks.{i}.ffn.fc2.weight": (4096, 10240),
            f"blocks.{i}.pos_embedding.embedding.weight": (32, 64),
        })
    assert shapes == expected


def test_shared_position_bias_lives_on_the_encoder():
    """With shared_pos (T5 1.1) there is one bias table, `pos_embedding.embedding.weight`, and none per block."""
    names = set(tiny_encoder(shared_pos=True).state_dict())
    assert "pos_embedding.embedding.weight" in names
    assert not any(".pos_embedding." in name for name in names)


@pytest.mark.parametrize("num_buckets", [32, 8])
def test_relative_position_bucket_matches_the_t5_formula(num_buckets):
    """Every relative position in ±700 lands in the bucket the plain-Python T5 formula gives."""
    positions = torch.arange(-700, 701)
    buckets = relative_position_bucket(positions, num_buckets)
    assert buckets.dtype == torch.int64
    assert buckets.tolist() == [python_bucket(p, num_buckets) for p in positions.tolist()]


def test_relative_position_bucket_spot_values():
    """Hand-checked umT5 buckets: exact below 8, log-spaced to 128, keys after the query in the upper half."""
    cases = {0: 0, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -16: 10, -127: 15, -128: 15, -5000: 15,
             1: 17, 7: 23, 8: 24, 16: 26, 128: 31, 5000: 31}
    got = relative_position_bucket(torch.tensor(list(cases)), 32).tolist()
    assert dict(zip(cases, got)) == cases


def test_padding_does_not_change_the_outputs_of_real_tokens():
    """Tokens [a, b, c] followed by masked padding give the same outputs at a, b, c as [a, b, c] alone."""
    encoder = tiny_encoder()
    real = torch.tensor([[5, 17, 33]])
    alone = encoder(real, torch.ones_like(real))
    padded_ids = torch.cat([real, torch.tensor([[0, 9, 41, 2, 0, 0, 7]])], dim=1)  # padding of any ids
    padded_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    padded = encoder(padded_ids, padded_mask)
    torch.testing.assert_close(padded[:, :3], alone, rtol=1e-12, atol=1e-12)
    # Without the mask the padding is attended to, so this test can tell a broken mask apart.
    unmasked = encoder(padded_ids, torch.ones_like(padded_mask))
    assert (unmasked[:, :3] - alone).abs().max() > 1e-3


def test_each_row_of_a_batch_is_masked_by_its_own_length():
    """In a batch of different lengths, each prompt's outputs equal those of the prompt encoded alone."""
    encoder = tiny_encoder()
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    length = 12
    ids = torch.zeros(len(prompts), length, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
        mask[row, : len(prompt)] = 1
    batched = encoder(ids, mask)
    for row, prompt in enumerate(prompts):
        alone = encoder(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.int64))
        torch.testing.assert_close(batched[row : row + 1, : len(prompt)], alone, rtol=1e-12, atol=1e-12)


def naive_block(block, x, mask, num_heads, num_buckets):
    """One umT5 block from the equations, with explicit loops over batch, heads, queries and keys (float64)."""
    def rms_norm(v, weight):
        return weight * v / torch.sqrt((v * v).mean(dim=-1, keepdim=True) + 1e-6)

    def gelu_tanh(v):
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    batch, length, _ = x.shape
    table = block.pos_embedding.embedding.weight  # (buckets, heads)
    h = rms_norm(x, block.norm1.weight)
    q, k, v = (h @ getattr(block.attn, name).weight.T for name in "qkv")
    head_dim = q.shape[-1] // num_heads
    out = torch.zeros_like(q)
    for b in range(batch):
        for n in range(num_heads):
            cols = slice(n * head_dim, (n + 1) * head_dim)
            for i in range(length):
                scores = []
                for j in range(length):
                    if mask[b, j] == 0:
                        scores.append(torch.tensor(-math.inf, dtype=x.dtype))
                        continue
                    bias = table[python_bucket(j - i, num_buckets), n]
                    scores.append((q[b, i, cols] * k[b, j, cols]).sum() + bias)  # no 1/sqrt(d) in T5
                weights = torch.softmax(torch.stack(scores), dim=0)
                out[b, i, cols] = (weights[:, None] * v[b, :, cols]).sum(dim=0)
    x = x + out @ block.attn.o.weight.T
    h = rms_norm(x, block.norm2.weight)
    hidden = (h @ block.ffn.fc1.weight.T) * gelu_tanh(h @ block.ffn.gate[0].weight.T)
    return x + hidden @ block.ffn.fc2.weight.T


def test_one_block_matches_the_naive_reference_in_float64():
    """A block (norms, unscaled biased attention, masked keys, gated GELU) equals the naive loops."""
    encoder = tiny_encoder()
    torch.manual_seed(1)
    x = torch.randn(2, 11, TINY["dim"], dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.int64)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = encoder.blocks[0](x, (mask != 0)[:, None, None, :])
        expected = naive_block(encoder.blocks[0], x, mask, TINY["num_heads"], TINY["num_buckets"])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_layer_norm_statistic_is_float32_for_bfloat16():
    """In bfloat16 the RMS statistic is taken in float32 (not bf16), so a bf16 model stays close to float32."""
    encoder = tiny_encoder(dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    full = encoder(ids, mask)
    half = encoder.to(torch.bfloat16)(ids, mask)
    assert half.dtype == torch.bfloat16
    assert torch.isfinite(half).all()
    assert (half.float() - full).abs().max() / full.abs().max() < 0.05


def test_config_rejects_impossible_sizes():
    """A head count that does not divide dim_attn, or an odd bucket count, fails with the field's name."""
    with pytest.raises(ValueError, match="dim_attn"):
        UMT5Config(**{**TINY, "num_heads": 5})
    with pytest.raises(ValueError, match="num_buckets"):
        UMT5Config(**{**TINY, "num_buckets": 7})
    with pytest.raises(ValueError, match="num_layers"):
        UMT5Config(**{**TINY, "num_layers": 0})


@pytest.mark.parametrize("prefix", ["", "model.", "encoder.", "model.encoder."])
def test_load_umt5_encoder_is_strict_and_accepts_wrapper_prefixes(tmp_path, prefix):
    """A checkpoint, bare or behind model./encoder., loads into a frozen eval-mode encoder in the asked dtype."""
    source = tiny_encoder(dtype=torch.float32)
    path = tmp_path / OFFICIAL_CHECKPOINT_NAME
    torch.save({prefix + name: tensor.to(torch.bfloat16) for name, tensor in source.state_dict().items()}, path)
    loaded = load_umt5_encoder(path, device="cpu", dtype=torch.float32, config=UMT5Config(**TINY))
    assert not loaded.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.parameters())
    assert not any(p.is_meta for p in loaded.parameters())
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[name].to(torch.bfloat16).float(), rtol=0, atol=0)
    ids = torch.tensor([[1, 2, 3]])
    assert loaded(ids, torch.ones_like(ids)).shape == (1, 3, TINY["dim"])


def test_load_umt5_encoder_names_the_missing_file(tmp_path):
    """A missing checkpoint raises FileNotFoundError naming the path and the official file name."""
    with pytest.raises(FileNotFoundError, match=OFFICIAL_CHECKPOINT_NAME) as error:
        load_umt5_encoder(tmp_path / "nowhere.pth")
    assert "nowhere.pth" in str(error.value)


def test_load_umt5_encoder_lists_missing_and_unexpected_keys(tmp_path):
    """A checkpoint of another layout fails before any weight is used, listing the differences and the file."""
    state = tiny_encoder(dtype=torch.float32).state_dict()
    state.pop("blocks.1.ffn.fc2.weight")
    state["blocks.1.ffn.fc3.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        load_umt5_encoder(path, config=UMT5Config(**TINY))
    message = str(error.value)
    assert str(path) in message
    assert "blocks.1.ffn.fc2.weight" in message and "blocks.1.ffn.fc3.weight" in message
    assert OFFICIAL_CHECKPOINT_NAME in message


def test_load_umt5_encoder_rejects_a_file_of_other_sizes(tmp_path):
    """The default config is umT5-XXL, so a small checkpoint is reported with its wrong shapes."""
    path = tmp_path / "tiny.pth"
    torch.save(tiny_encoder(dtype=torch.float32).state_dict(), path)
    with pytest.raises(ValueError, match=r"wrong shapes: blocks\.0\.attn\.k\.weight \(24, 16\) vs \(4096, 4096\)"):
        load_umt5_encoder(path)


@pytest.mark.parametrize("kind", ["text", "truncated", "list", "tensor"])
def test_load_umt5_encoder_names_a_file_that_is_no_state_dict(tmp_path, kind):
    """A text file, a truncated file, or a .pth holding a list or a tensor as the encoder: one sentence naming the
    file (and the official file for a wrong type), not torch's own error."""
    from tests.test_torch_files import assert_one_sentence_about, write_bad_torch_file

    path = write_bad_torch_file(tmp_path / "umt5.pth", kind)
    with pytest.raises(ValueError) as error:
        load_umt5_encoder(path, config=UMT5Config(**TINY))
    assert str(error.value).startswith(f"umT5 encoder weights {path} ")
    assert_one_sentence_about(error.value, path, kind,
                              *([OFFICIAL_CHECKPOINT_NAME] if kind in ("list", "tensor") else []))


def test_load_umt5_encoder_keeps_the_file_memory_mapped(tmp_path, monkeypatch):
    """The 11 GB encoder is read through a memory map, never into memory at once."""
    path = tmp_path / "tiny.pth"
    torch.save(tiny_encoder(dtype=torch.float32).state_dict(), path)
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs.get("mmap")) or load(*args, **kwargs))
    load_umt5_encoder(path, device="cpu", dtype=torch.float32, config=UMT5Config(**TINY))
    assert calls == [True]
