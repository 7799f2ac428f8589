"""save / load: sparse checkpoints in one safetensors file, rebuilt without pickle."""

from __future__ import annotations

import copy
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from helpers import convnet, mlp
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import sparsenets as sn
from sparsenets.io import CheckpointError, decode, encode
from sparsenets.layers.csr import CSRLinear
from sparsenets.masking import masks


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def _sparse_mlp(pattern: str = "unstructured", sparsity: float = 0.8) -> nn.Module:
    model = mlp()
    sn.sparsify_(model, {"sparsity": sparsity, "pattern": pattern,
                         **({"exclude": ["4"]} if pattern.startswith("block") else {})})
    return model.eval()


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch):
    """Loading must never unpickle: make every unpickler fail loudly during these tests."""
    def refuse(*args, **kwargs):
        raise AssertionError("load() unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


# ---- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "block:4x4", "2:4", "channel"])
def test_masked_model_roundtrip(tmp_path, pattern: str) -> None:
    model = _sparse_mlp(pattern, 0.5)
    path = sn.save(model, tmp_path / "m.safetensors")
    loaded = sn.load(path).eval()
    x = torch.randn(5, 20)
    _assert_close(loaded(x), model(x))
    saved = {f"{n}.{t}": (m.mask, m.pattern) for n, _, t, m in masks(model)}
    again = {f"{n}.{t}": (m.mask, m.pattern) for n, _, t, m in masks(loaded)}
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[k][0], again[k][0]) and saved[k][1] == again[k][1] for k in saved)


@pytest.mark.parametrize("pattern", ["unstructured", "block:4x4", "channel"])
def test_compress_save_load_gives_the_same_outputs(tmp_path, pattern: str) -> None:
    model = _sparse_mlp(pattern, 0.8)
    compressed = sn.compress(model, torch.randn(4, 20), autotune=False)
    loaded = sn.load(sn.save(compressed, tmp_path / "c.safetensors"))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in compressed.modules()]
    assert not loaded.training
    x = torch.randn(7, 20)
    _assert_close(loaded(x), compressed(x))


def test_kernel_layers_come_back_as_kernel_layers(tmp_path, monkeypatch) -> None:
    from sparsenets.compression import choose

    monkeypatch.setattr(choose, "rule", lambda module, pattern, kinds: "csr" if "csr" in kinds else "dense")
    compressed = sn.compress(_sparse_mlp("unstructured", 0.8), torch.randn(4, 20), autotune=False)
    loaded = sn.load(sn.save(compressed, tmp_path / "c.safetensors"))
    before = [m for m in compressed.modules() if isinstance(m, CSRLinear)]
    after = [m for m in loaded.modules() if isinstance(m, CSRLinear)]
    assert len(after) == len(before) == 3
    for a, b in zip(after, before):
        assert torch.equal(a.crow_indices, b.crow_indices) and torch.equal(a.col_indices, b.col_indices)
        assert torch.equal(a.values, b.values)


def test_channel_pruned_convnet_rebuilds_with_its_new_sizes(tmp_path) -> None:
    model = convnet()
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": "channel"})
    compressed = sn.compress(model.eval(), torch.randn(2, 3, 6, 6), autotune=False)
    loaded = sn.load(sn.save(compressed, tmp_path / "c.safetensors"))
    assert loaded[3].out_channels == compressed[3].out_channels < 16
    assert loaded[4].num_features == compressed[4].num_features
    x = torch.randn(3, 3, 6, 6)
    _assert_close(loaded(x), compressed(x))


def test_builtin_model_rebuilds_by_name(tmp_path) -> None:
    from sparsenets.models import build_model

    spec = {"name": "conv4", "input_shape": [16, 16], "num_classes": 10, "channels": [4, 4, 8, 8], "hidden": [16, 16]}
    model = build_model("conv4", (16, 16), 10, channels=[4, 4, 8, 8], hidden=[16, 16])
    sn.sparsify_(model, {"sparsity": 0.6, "pattern": "channel"})
    compressed = sn.compress(model.eval(), torch.randn(2, 16, 16), autotune=False)
    path = sn.save(compressed, tmp_path / "conv4.safetensors", architecture=spec)
    loaded = sn.load(path)
    x = torch.randn(3, 16, 16)
    _assert_close(loaded(x), compressed(x))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_transformer_with_pruned_heads_loads_into_a_skeleton(tmp_path, family: str) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    if family == "bert":
        def build():
            config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=32, max_position_embeddings=16)
            return transformers.BertModel(config)
        config = {"sparsity": 0.5, "pattern": "head"}
    else:
        def build():
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2,
                                                                        n_head=4, n_positions=16))
        config = {"sparsity": 0.5, "pattern": "head"}
    model = build().eval()
    sn.sparsify_(model, config)
    ids = {"input_ids": torch.randint(0, 50, (2, 7))}
    compressed = sn.compress(model, ids, autotune=False)
    path = sn.save(compressed, tmp_path / f"{family}.safetensors", config=config, metadata={"note": "tiny"})
    with pytest.raises(CheckpointError, match="pass load\\(path, model="):
        sn.load(path)
    loaded = sn.load(path, model=build)
    out = (lambda m: m(**ids)[0])
    _assert_close(out(loaded), out(compressed))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in compressed.parameters())


def test_wrong_skeleton_is_a_clear_error(tmp_path) -> None:
    class Net(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = nn.Linear(8, width)

        def forward(self, x):
            return self.fc(x)

    path = sn.save(Net(4), tmp_path / "net.safetensors")
    assert isinstance(sn.load(path, model=Net(4)), Net)
    with pytest.raises(CheckpointError, match=r"net.safetensors.*'fc.weight' has shape \(6, 8\) in the model"):
        sn.load(path, model=lambda: Net(6))


def test_config_and_metadata_are_kept(tmp_path) -> None:
    from sparsenets.io import read_checkpoint

    config = sn.SparsityConfig(sparsity=0.7, pattern="block:4x4")
    path = sn.save(_sparse_mlp(), tmp_path / "m.safetensors", config=config, metadata={"accuracy": 0.91})
    header, _ = read_checkpoint(path)
    assert sn.SparsityConfig.from_dict(header["config"]).to_dict() == config.to_dict()
    assert header["metadata"] == {"accuracy": 0.91}


# ---- size ---------------------------------------------------------------------------------------------


def _file_bound(tmp_path, model: nn.Module, name: str) -> tuple[int, int]:
    """(file size, size of the dense model in plain safetensors)."""
    dense_path = tmp_path / f"{name}-dense.safetensors"
    dense = sn.finalize_(copy.deepcopy(model))
    for module in list(dense.modules()):
        if hasattr(module, "dense_weight"):  # a compressed layer: count it at its dense size
            dense = _densify(dense)
            break
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(dense_path))
    path = sn.save(model, tmp_path / f"{name}.safetensors")
    return path.stat().st_size, dense_path.stat().st_size


def _densify(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if hasattr(module, "dense_weight"):
            weight = module.dense_weight().detach()
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
            dense.weight.data, dense.bias.data = weight, module.bias.detach()
            model.set_submodule(name, dense)
    return model


@pytest.mark.parametrize("compressed", [False, True])
def test_block_sparse_file_size_bound(tmp_path, compressed: bool) -> None:
    model = nn.Sequential(nn.Linear(2048, 2048))
    sn.sparsify_(model, {"sparsity": 0.9, "pattern": "block:32x32"})
    density = float(next(masks(model))[3].mask.float().mean())
    if compressed:
        model = sn.compress(model.eval(), autotune=False)
    size, dense = _file_bound(tmp_path, model, "big")
    assert size <= 1.15 * density * dense, (size, dense, density)


def test_unstructured_file_is_smaller_than_dense(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    sn.sparsify_(model, {"sparsity": 0.9})
    size, dense = _file_bound(tmp_path, model, "mlp")
    assert size < 0.15 * dense  # 10% of the values, plus a bit per weight or 2-byte column indices


# ---- encodings ----------------------------------------------------------------------------------------


@given(rows=st.integers(1, 12), cols=st.integers(1, 12), density=st.floats(0.0, 1.0),
       block=st.sampled_from([None, (1, 1), (2, 3), (4, 4)]), seed=st.integers(0, 2**16))
def test_encodings_roundtrip_and_pick_the_smallest(rows: int, cols: int, density: float, block, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    if block is not None and block[0] <= rows and block[1] <= cols:
        grid = torch.rand(-(-rows // block[0]), -(-cols // block[1]), generator=generator) < density
        mask = grid.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    else:
        mask = torch.rand(rows, cols, generator=generator) < density
    tensor = torch.randn(rows, cols, generator=generator) * mask
    info, parts = encode(tensor, mask, block)
    restored, restored_mask = decode(info, parts)
    assert torch.equal(restored, tensor)
    if restored_mask is not None:
        assert torch.equal(restored_mask, mask)
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    assert stored <= tensor.numel() * tensor.element_size()  # never bigger than dense
    bits = (rows * cols + 7) // 8
    assert stored <= int(mask.sum()) * 4 + bits  # never bigger than values + bitmask


def test_csr_indices_use_the_narrowest_integers() -> None:
    tensor = torch.zeros(4, 1000)
    tensor[0, 999] = 1.0
    info, parts = encode(tensor)
    assert info["encoding"] == "csr" and parts["col"].dtype == torch.int16 and parts["values"].numel() == 1


# ---- damaged files ------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    return sn.save(_sparse_mlp(), tmp_path / "model.safetensors")


def _header_length(path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_truncated_file(saved) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        sn.load(saved)


def test_flipped_payload_byte(saved) -> None:
    data = bytearray(saved.read_bytes())
    data[8 + _header_length(saved) + 10] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        sn.load(saved)


def test_bad_header_length(saved) -> None:
    data = saved.read_bytes()
    saved.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        sn.load(saved)


def test_tampered_structure(saved) -> None:
    """A header rewritten with consistent JSON but wrong tensor lengths."""
    data = saved.read_bytes()
    n = _header_length(saved)
    header = json.loads(data[8: 8 + n])
    meta = json.loads(header["__metadata__"]["sparsenets"])
    key = next(k for k, v in meta["tensors"].items() if v["encoding"] != "dense")
    meta["tensors"][key]["shape"][0] += 1
    header["__metadata__"]["sparsenets"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    saved.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(CheckpointError, match="model.safetensors: damaged structure"):
        sn.load(saved)


def test_not_a_sparsenets_file(tmp_path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="plain.safetensors: a safetensors file, but not a sparsenets"):
        sn.load(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        sn.load(tmp_path / "missing.safetensors")


def test_failed_save_leaves_nothing(tmp_path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        sn.save(_sparse_mlp(), tmp_path / "m.safetensors", metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_packbits_matches_numpy_order() -> None:
    from sparsenets.io import _pack, _unpack

    mask = torch.tensor([True, False, False, True, True, False, True, False, True])
    assert _pack(mask).tolist() == np.packbits(mask.numpy()).tolist()
    assert torch.equal(_unpack(_pack(mask), mask.numel()), mask)
