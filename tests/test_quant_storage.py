"""Quantized layers in checkpoints and reports: codes bit-packed, bytes counted."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsenets as sn
from sparsenets.io import CheckpointError, container, decode, encode
from sparsenets.io.checkpoint import read_checkpoint
from sparsenets.io.encoding import pack_ints, unpack_ints
from sparsenets.quant import QuantizedLinear

INTS = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


def _roundtrip(tensor: torch.Tensor, mask: torch.Tensor | None = None, stored: bool = False):
    info, parts = encode(tensor, mask, pack=True, mask_stored=stored)
    back, _ = decode(json.loads(json.dumps(info)), parts, mask if stored else None)
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert sum(p.numel() * p.element_size() for p in parts.values()) <= tensor.numel() * tensor.element_size()
    return info, back


# ---- encodings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", range(17))
def test_pack_ints_roundtrip_at_every_width(width: int) -> None:
    values = torch.randint(0, 2**width, (1000,))
    values[:2] = torch.tensor([0, 2**width - 1])
    packed = pack_ints(values, width)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1000 * width // 8)
    assert torch.equal(unpack_ints(packed, width, 1000), values)


@given(st.integers(1, 8), st.integers(-200, 100), st.sampled_from(INTS), st.integers(0, 70), st.integers(0, 2**31))
def test_packed_integers_roundtrip(width: int, low: int, dtype: torch.dtype, n: int, seed: int) -> None:
    bounds = torch.iinfo(dtype)
    low = max(bounds.min, min(low, bounds.max - 2**width + 1))
    values = torch.randint(low, low + 2**width, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    values[: min(n, 2)] = torch.tensor([low, low + 2**width - 1])[: min(n, 2)]  # the full span: exactly ``width`` bits
    tensor = values.to(dtype).reshape(n, 1)
    info, back = _roundtrip(tensor)
    assert torch.equal(back, tensor)
    if n >= 16 and info["encoding"].startswith("packed:"):
        assert info["encoding"] == f"packed:{width}" and info["offset"] == low
    if n >= 16 and width < 8 * dtype.itemsize - 1:
        assert info["encoding"] != "dense"


def test_packing_picks_the_smallest_and_keeps_others_dense() -> None:
    codes = torch.randint(-7, 8, (64, 64), dtype=torch.int8)
    assert encode(codes, pack=True)[0]["encoding"] == "packed:4"
    assert encode(codes)[0]["encoding"] == "dense"  # only when asked: other files stay as they were
    assert encode(torch.tensor([5, -120], dtype=torch.int8), pack=True)[0]["encoding"] == "dense"  # nothing to save
    info, _ = _roundtrip(torch.zeros(0, 4, dtype=torch.int8))
    assert info["encoding"] == "dense"
    info, back = _roundtrip(torch.full((3, 3), -5, dtype=torch.int16))
    assert info == {"shape": [3, 3], "dtype": "int16", "encoding": "packed:0", "offset": -5}


@given(st.integers(0, 300), st.integers(0, 2**31))
def test_bool_tensors_pack_to_bits(n: int, seed: int) -> None:
    tensor = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5
    info, back = _roundtrip(tensor)
    assert torch.equal(back, tensor)
    assert info["encoding"] == ("bits" if n > 1 else "dense")


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_masked_codes_keep_only_the_kept_entries(stored: bool, density: float) -> None:
    torch.manual_seed(0)
    mask = torch.rand(32, 48) < density
    codes = torch.randint(-8, 8, (32, 48), dtype=torch.int8)
    info, back = _roundtrip(codes, mask, stored)
    assert torch.equal(back, codes * mask)  # entries outside the mask come back 0
    if density == 0.3:
        assert info["encoding"] == ("masked-packed:4" if stored else "bitmask-packed:4")


def _codes() -> tuple[dict, dict[str, torch.Tensor]]:
    return encode(torch.randint(-8, 8, (8, 8), dtype=torch.int8), pack=True)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda i, p: i.update(encoding="packed:17"), "unknown encoding"),
    (lambda i, p: i.update(encoding="packed:04"), "unknown encoding"),
    (lambda i, p: i.pop("offset"), "offset"),
    (lambda i, p: i.update(offset=1.5), "offset"),
    (lambda i, p: i.update(offset=True), "offset"),
    (lambda i, p: i.update(offset=-129), "offset"),
    (lambda i, p: i.update(offset=121), "beyond torch.int8's range"),  # 121 + 15 > 127
    (lambda i, p: i.update(dtype="float32"), "needs an integer tensor"),
    (lambda i, p: i.update(dtype="bool"), "needs an integer tensor"),
    (lambda i, p: i.update(shape=[8, 9]), "packed values has shape"),
    (lambda i, p: i.update(shape=[10**9, 10**9]), "packed values has shape"),
    (lambda i, p: i.update(encoding="packed:8"), "packed values has shape"),
    (lambda i, p: p.update(packed=p["packed"].to(torch.int8)), "packed values is torch.int8"),
    (lambda i, p: p.pop("packed"), "packed values is missing"),
    (lambda i, p: i.update(encoding="bitmask-packed:4"), "bitmask is missing"),
    (lambda i, p: i.update(encoding="masked-packed:4"), "needs the bool mask"),
    (lambda i, p: i.update(encoding="bits"), "needs a bool tensor"),
])
def test_forged_descriptors_are_rejected(edit, message: str) -> None:
    info, parts = _codes()
    edit(info, parts)
    with pytest.raises(ValueError, match=message):
        decode(info, parts)


def test_forged_masks_are_rejected() -> None:
    mask = torch.rand(8, 8) > 0.5
    info, parts = encode(torch.randint(-8, 8, (8, 8), dtype=torch.int8) * mask, mask, pack=True, mask_stored=True)
    for wrong in (mask.to(torch.int8), mask[:4], mask.reshape(-1)):
        with pytest.raises(ValueError, match="needs the bool mask"):
            decode(info, parts, wrong)
    with pytest.raises(ValueError, match="packed values has shape"):  # a mask keeping more than was stored
        decode(info, parts, torch.ones(8, 8, dtype=torch.bool))
    bits = encode(mask, pack=True)
    bits[0]["shape"] = [8, 9]
    with pytest.raises(ValueError, match="bits has shape"):
        decode(*bits)


# ---- checkpoints ----------------------------------------------------------------------------------------


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])


def _quantized(bits: int, density: float = 1.0) -> nn.Sequential:
    model = _mlp()
    with torch.no_grad():  # quantize_ keeps zeros as pruned entries: a mask
        for layer in model:
            layer.weight.mul_(torch.rand_like(layer.weight) < density) if density < 1 else None
    return sn.quantize_(model, sn.QuantConfig(bits=bits, group_size=None))


def _header_bytes(path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_quantized_checkpoints_take_bits_per_kept_weight(tmp_path, bits: int, density: float) -> None:
    model = _quantized(bits, density)
    dense_path = sn.save(_mlp(), tmp_path / "dense.safetensors")
    path = sn.save(model, tmp_path / "q.safetensors")
    header, stored = read_checkpoint(path)
    assert header["version"] == 4
    n = sum(layer.codes.numel() for layer in model)
    kept = sum(layer.num_parameters() for layer in model)
    extras = sum(layer.scale.numel() * 4 + layer.bias.numel() * 4 for layer in model)
    weights = sum(t.numel() * t.element_size() for k, t in stored.items() if ".codes" in k or ".mask" in k)
    mask_bits = n if density < 1 else 0
    assert weights <= 1.05 * (bits * kept + mask_bits) / 8 + 16
    target = bits / 32 * density * n * 4
    size = path.stat().st_size
    assert size - _header_bytes(path) <= 1.3 * (target + mask_bits / 8) + extras
    dense_size = dense_path.stat().st_size
    print(f"\nint{bits} density {density}: {size:,} B = {size / dense_size:.4f} of the fp32 file "
          f"(target {target / (n * 4):.4f}); weights {8 * weights / n:.2f} bits each")

    loaded = sn.load(path)
    x = torch.randn(5, 256)
    assert torch.equal(loaded(x), model(x))
    for ours, theirs in zip(loaded, model):
        assert isinstance(ours, QuantizedLinear) and torch.equal(ours.codes, theirs.codes)
        assert (ours.mask is None) == (theirs.mask is None)
        assert ours.mask is None or torch.equal(ours.mask, theirs.mask)


def test_sparse_codes_are_stored_under_the_layers_mask(tmp_path) -> None:
    path = sn.save(_quantized(4, 0.5), tmp_path / "q.safetensors")
    header, _ = read_checkpoint(path)
    assert header["tensors"]["0.codes"]["encoding"] == "masked-packed:4"
    assert header["tensors"]["0.codes"]["mask"] == "0.mask" and header["tensors"]["0.mask"]["encoding"] == "bits"


def _resign(path, edit) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    table, payload = json.loads(data[8: 8 + n]), data[8 + n:]
    header = json.loads(table["__metadata__"]["sparsenets"])
    edit(header)
    table["__metadata__"]["sparsenets"] = json.dumps(header)
    table["__metadata__"]["file_sha256"] = container.digest(table, [payload])
    text = json.dumps(table).encode()
    path.write_bytes(struct.pack("<Q", len(text + b" " * (-len(text) % 8))) + text + b" " * (-len(text) % 8) + payload)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t["0.codes"].pop("mask"), "'mask' must name"),
    (lambda t: t["0.codes"].update(mask="0.zero"), "'mask' must name"),
    (lambda t: t["0.codes"].update(mask="0.codes"), "'mask' must name"),
    (lambda t: t["0.codes"].update(mask="nowhere"), "'mask' must name"),
    (lambda t: t["0.codes"].update(mask=["0.mask"]), "'mask' must name"),
    (lambda t: t["0.codes"].update(offset=2**40), "offset"),
    (lambda t: t["0.codes"].update(encoding="masked-packed:9"), "packed values has shape"),
    (lambda t: t["0.mask"].update(shape=[256, 128]), "'mask' must name"),
])
def test_forged_checkpoints_are_checkpoint_errors(tmp_path, edit, message: str) -> None:
    path = sn.save(_quantized(4, 0.5), tmp_path / "q.safetensors")
    _resign(path, lambda header: edit(header["tensors"]))
    with pytest.raises(CheckpointError, match=message):
        sn.load(path)


def test_files_without_quantized_layers_are_not_packed(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    model.register_buffer("steps", torch.arange(100))
    header, _ = read_checkpoint(sn.save(model, tmp_path / "m.safetensors"))
    assert header["version"] == 2
    assert header["tensors"]["steps"]["encoding"] == header["tensors"]["1.num_batches_tracked"]["encoding"] == "dense"


# ---- report ---------------------------------------------------------------------------------------------


def test_report_counts_the_bytes_a_weight_takes() -> None:
    fp32 = sn.report(_mlp())
    assert fp32.rows[0].bytes == 256 * 256 * 4 and fp32.bytes == 4 * 256 * 256 * 4
    quantized = sn.report(_quantized(4))
    assert quantized.rows[0].bytes == 256 * 256 // 2 + 256 * 4  # packed codes and one scale per row
    assert quantized.bytes / fp32.bytes == pytest.approx(1 / 8, rel=0.05)  # 1/8 plus the scales
    half = sn.report(_mlp().half())
    assert half.bytes == fp32.bytes // 2
    masked = sn.sparsify_(_mlp(), {"sparsity": 0.5})
    assert sn.report(masked).bytes == pytest.approx(fp32.bytes / 2, rel=0.01)
    assert sn.report(masked).to_dict()["total"]["bytes"] == sn.report(masked).bytes
    text = str(quantized)
    assert "bytes" in text.splitlines()[0] and "32.00 KiB" in text and "132.00 KiB" in text.splitlines()[-1]
