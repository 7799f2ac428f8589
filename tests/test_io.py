"""save / load: sparse checkpoints in one safetensors file, rebuilt without pickle."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import resource
import stat
import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import sparsenets as sn
from sparsenets.io import CheckpointError, container, decode, encode
from sparsenets.io.encoding import pack_bits, unpack_bits
from sparsenets.layers.csr import CSRLinear
from sparsenets.masking import masks

from helpers import convnet, mlp


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


def test_n_m_layers_come_back_as_n_m_layers(tmp_path, monkeypatch) -> None:
    from sparsenets.compression import choose
    from sparsenets.layers import NMSparseLinear

    monkeypatch.setattr(choose, "rule", lambda module, pattern, kinds: "nm" if "nm" in kinds else "dense")
    compressed = sn.compress(_sparse_mlp("2:4", 0.5), torch.randn(4, 20), autotune=False)
    path = sn.save(compressed, tmp_path / "c.safetensors")
    loaded = sn.load(path)
    before = [m for m in compressed.modules() if isinstance(m, NMSparseLinear)]
    after = [m for m in loaded.modules() if isinstance(m, NMSparseLinear)]
    assert len(after) == len(before) > 0
    for a, b in zip(after, before):
        assert (a.n, a.m) == (b.n, b.m) == (2, 4)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    x = torch.randn(7, 20)
    _assert_close(loaded(x), compressed(x))


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
    def out(m):
        return m(**ids)[0]
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


def _open_file(path) -> tuple[dict, bytes]:
    """The safetensors table (dtypes, shapes, offsets, metadata) and the payload after it."""
    data = path.read_bytes()
    n = _header_length(path)
    return json.loads(data[8: 8 + n]), data[8 + n:]


def _rewrite(path, table: dict, payload: bytes, resign: bool) -> None:
    """Write the file back; ``resign`` recomputes the digest, as a forger would."""
    if resign:
        table["__metadata__"]["file_sha256"] = container.digest(table, [payload])
    text = json.dumps(table).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def _edit_header(path, edit, resign: bool = False) -> None:
    """Apply ``edit`` to the sparsenets header inside the file."""
    table, payload = _open_file(path)
    header = json.loads(table["__metadata__"]["sparsenets"])
    edit(header)
    table["__metadata__"]["sparsenets"] = json.dumps(header)
    _rewrite(path, table, payload, resign)


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


def _model_with_norm() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    sn.sparsify_(model, {"sparsity": 0.5})
    return model.eval()


def _change_class(header: dict) -> None:
    header["architecture"]["layers"]["children"]["2"]["class"] = "torch.nn.Hardtanh"


def _change_eps(header: dict) -> None:
    header["attributes"]["1"]["eps"] = 0.5


def _remove_mask(header: dict) -> None:
    del header["masks"]["0.weight"]


@pytest.mark.parametrize("edit", [_change_class, _change_eps, _remove_mask])
def test_any_header_edit_is_caught(tmp_path, edit) -> None:
    model = _model_with_norm()
    path = sn.save(model, tmp_path / "model.safetensors")
    _edit_header(path, edit)
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        sn.load(path)
    _edit_header(path, lambda header: None, resign=True)  # the same file, re-signed: a different model
    x = torch.randn(3, 8) * 10
    loaded = sn.load(path).eval()
    assert not torch.allclose(loaded(x), model(x)) or len(list(masks(loaded))) < len(list(masks(model)))


def test_dtype_edit_in_the_tensor_table_is_caught(saved) -> None:
    """F32 -> I32 keeps every size: only the digest over the table can tell."""
    table, payload = _open_file(saved)
    name = next(k for k, v in table.items() if k != "__metadata__" and v["dtype"] == "F32")
    table[name]["dtype"] = "I32"
    _rewrite(saved, table, payload, resign=False)
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        sn.load(saved)


def test_tampered_structure(saved) -> None:
    """A consistent, re-signed header whose tensor lengths don't match the stored parts."""
    def grow(header: dict) -> None:
        key = next(k for k, v in header["tensors"].items() if v["encoding"] != "dense")
        header["tensors"][key]["shape"][0] += 1
        header["tensors"][key]["encoding"] = "bitmask"

    _edit_header(saved, grow, resign=True)
    with pytest.raises(CheckpointError, match="model.safetensors: .*(damaged structure|has shape)"):
        sn.load(saved)


def _set_descriptor(field: str, value):
    def edit(header: dict) -> None:
        header["tensors"]["0.weight"][field] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set_descriptor("shape", [-32, 20]), "shape"),
    (_set_descriptor("shape", "32x20"), "shape"),
    (_set_descriptor("shape", [True, 20]), "shape"),
    (_set_descriptor("dtype", "load"), "unknown dtype 'load'"),
    (_set_descriptor("dtype", "float99"), "unknown dtype"),
    (_set_descriptor("encoding", "zip"), "unknown encoding 'zip'"),
    (_set_descriptor("encoding", "blocks:0x4"), "unknown encoding"),
    (lambda header: header["tensors"].__setitem__("0.weight", "dense"), "descriptor"),
    (lambda header: header.__setitem__("tensors", []), "damaged header: .tensors. must be an object"),
])
def test_hostile_header_is_a_checkpoint_error(saved, edit, message) -> None:
    _edit_header(saved, edit, resign=True)
    with pytest.raises(CheckpointError, match=f"model.safetensors: .*{message}"):
        sn.load(saved)


@pytest.mark.parametrize("entry, value", [("dtype", "X99"), ("shape", [-1]), ("shape", [2**62, 2**62]),
                                          ("data_offsets", [0, 2**40]), ("data_offsets", [8, 4])])
def test_hostile_tensor_table_is_a_checkpoint_error(saved, entry, value) -> None:
    table, payload = _open_file(saved)
    name = next(k for k in table if k != "__metadata__")
    table[name][entry] = value
    _rewrite(saved, table, payload, resign=True)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        sn.load(saved)


@contextlib.contextmanager
def _address_space_limit(extra: int):
    """Let the process map at most ``extra`` more bytes: a large allocation then fails."""
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _claim_wide_weight(header: dict) -> None:
    header["tensors"]["0.weight"]["shape"] = [4, 10**9]


def _claim_wide_layer(header: dict) -> None:
    _claim_wide_weight(header)
    header["architecture"]["layers"]["children"]["0"]["init"]["in_features"] = 10**9


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_AS") or not os.path.exists("/proc/self/statm"),
                    reason="needs Linux address-space limits")
@pytest.mark.parametrize("edit, message", [
    (_claim_wide_weight, r"'0.weight' has shape \(4, 1000\) in the model but shape \(4, 1000000000\) in the file"),
    (_claim_wide_layer, r"describes a model of 16.00 GB in a file of"),
])
def test_small_file_claiming_a_huge_tensor_fails_before_allocating(tmp_path, edit, message) -> None:
    """A re-signed header claiming 16 GB from a file of a few hundred bytes: the claim is checked
    against the model (and the model against the file size) before anything that size exists."""
    weight = torch.zeros(4, 1000)
    weight[0, 999] = 1.0
    model = nn.Sequential(nn.Linear(1000, 4, bias=False))
    model[0].weight.data = weight
    path = sn.save(model, tmp_path / "small.safetensors")
    assert json.loads(_open_file(path)[0]["__metadata__"]["sparsenets"])["tensors"]["0.weight"]["encoding"] == "csr"
    _edit_header(path, edit, resign=True)
    assert path.stat().st_size < 2000
    with _address_space_limit(512 << 20), pytest.raises(CheckpointError, match=f"small.safetensors: .*{message}"):
        sn.load(path)


def test_older_format_is_named(saved) -> None:
    table, payload = _open_file(saved)
    table["__metadata__"]["sha256"] = table["__metadata__"].pop("file_sha256")
    _rewrite(saved, table, payload, resign=False)
    with pytest.raises(CheckpointError, match="model.safetensors: written by sparsenets 0.1"):
        sn.load(saved)


def test_not_a_sparsenets_file(tmp_path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="plain.safetensors: a safetensors file, but not a sparsenets"):
        sn.load(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        sn.load(tmp_path / "missing.safetensors")


def test_file_is_plain_safetensors(saved) -> None:
    """Other safetensors readers still open the file."""
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as handle:
        assert "sparsenets" in handle.metadata() and len(list(handle.keys())) > 0


def test_failed_save_leaves_nothing(tmp_path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        sn.save(_sparse_mlp(), tmp_path / "m.safetensors", metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_saved_file_gets_the_umask_permissions(tmp_path) -> None:
    umask = os.umask(0o022)
    try:
        path = sn.save(_sparse_mlp(), tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~0o022


def test_packbits_matches_numpy_order() -> None:
    mask = torch.tensor([True, False, False, True, True, False, True, False, True])
    assert pack_bits(mask).tolist() == np.packbits(mask.numpy()).tolist()
    assert torch.equal(unpack_bits(pack_bits(mask), mask.numel()), mask)


# ---- dtypes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compressed", [False, True])
def test_half_precision_comes_back_in_half_precision(tmp_path, dtype, compressed: bool) -> None:
    model = _sparse_mlp("unstructured", 0.8).to(dtype)
    if compressed:
        model = sn.compress(model, autotune=False)
    path = sn.save(model, tmp_path / "half.safetensors")
    for loaded in (sn.load(path), sn.load(path, model=mlp())):  # the saved dtype wins over the model's
        want = sn.finalize_(copy.deepcopy(model)).state_dict()
        got = sn.finalize_(copy.deepcopy(loaded)).state_dict()
        assert want.keys() == got.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            assert torch.equal(got[key], want[key]), key


# ---- train/eval mode ----------------------------------------------------------------------------


def _bn_model(masked: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    with torch.no_grad():  # running statistics far from a batch's own, so the two modes differ
        for _ in range(3):
            model(torch.randn(32, 6) * 3 + 2)
    if masked:
        sn.sparsify_(model, {"sparsity": 0.5})
    return model


def test_load_into_a_given_model_keeps_its_mode(tmp_path):
    saved = _bn_model()  # saved in train mode
    path = sn.save(saved, tmp_path / "bn.safetensors")
    target = _bn_model(masked=False).eval()
    loaded = sn.load(path, model=target)
    assert not any(m.training for m in loaded.modules())
    x = torch.randn(16, 6)
    with torch.no_grad():
        _assert_close(loaded(x), saved.eval()(x))


def test_load_keeps_per_module_flags_of_a_given_model(tmp_path):
    path = sn.save(_bn_model().eval(), tmp_path / "bn.safetensors")
    target = _bn_model(masked=False).eval()
    target[3].train()  # a mixed model: only the head in train mode
    loaded = sn.load(path, model=target)
    assert [m.training for m in loaded] == [False, False, False, True]
    assert loaded[3].parametrizations.weight.training  # added modules follow their layer


@pytest.mark.parametrize("train", [True, False])
def test_a_model_load_builds_comes_back_in_its_saved_mode(tmp_path, train):
    path = sn.save(_bn_model().train(train), tmp_path / "bn.safetensors")
    assert all(m.training == train for m in sn.load(path).modules())
    built = sn.load(path, model=lambda: _bn_model(masked=False).train(not train))
    assert all(m.training == train for m in built.modules())
