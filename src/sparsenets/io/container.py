"""The file itself: a safetensors file whose metadata holds a sha256 of everything else in it.

The digest covers the safetensors header (every tensor's dtype, shape and offsets, and all
metadata but the digest itself, as canonical JSON: sorted keys, no spaces) followed by the
whole tensor payload. Any edit that changes what a reader sees (a dtype, a shape, an attribute
in the sparsenets header, a removed mask, a payload byte) changes the digest; only padding and
JSON whitespace, which mean nothing, are outside it.

Reading parses the safetensors framing here, not in the safetensors library, so that the
header checked is the header used, and so every size is checked against the file's length
before anything is allocated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import torch
from torch import Tensor

from ..errors import CheckpointError

DIGEST_KEY = "file_sha256"
OLD_DIGEST_KEY = "sha256"  # format 1: a digest of the tensor payload only
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
DTYPES = {name: dtype for name, dtype in (
    ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
    ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8), ("U8", torch.uint8),
    ("BOOL", torch.bool), ("C64", getattr(torch, "complex64", None)),
    ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)), ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
) if dtype is not None}


def digest(table: dict, payload: Iterable[bytes | bytearray | memoryview]) -> str:
    """sha256 of the canonical safetensors header (without the digest) and then the payload."""
    table = dict(table)
    table["__metadata__"] = {k: v for k, v in (table.get("__metadata__") or {}).items() if k != DIGEST_KEY}
    hasher = hashlib.sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode())
    for chunk in payload:
        hasher.update(chunk)
    return hasher.hexdigest()


def frame(table: dict) -> bytes:
    """The 8-byte length and the header JSON, padded with spaces to a multiple of 8 as safetensors does."""
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def serialize(tensors: dict[str, Tensor], metadata: dict[str, str]) -> list[bytes | memoryview]:
    """The file's bytes (in pieces, to write one after the other), with the digest in its metadata."""
    from safetensors.torch import save

    data = memoryview(save(tensors, metadata=metadata))
    length = struct.unpack("<Q", data[:8])[0]
    table = json.loads(bytes(data[8: 8 + length]))
    payload = data[8 + length:]
    table.setdefault("__metadata__", {})[DIGEST_KEY] = digest(table, [payload])
    return [frame(table), payload]


def write_pieces(pieces: list[bytes | memoryview]) -> Callable[[IO], None]:
    def write(file: IO) -> None:
        for piece in pieces:
            file.write(piece)
    return write


# ---- reading ----------------------------------------------------------------------------------------------


def read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The metadata and tensors of a checkpoint, after checking its framing and its digest."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            table, payload = _read_table(file, size, path)
            metadata, entries = _check_table(table, payload, path)
            _check_sparsenets(metadata, path)
            tensors, chunks = {}, []
            for name, dtype, shape, count in entries:  # in file order: together they are the payload
                chunk = bytearray(count)
                if file.readinto(chunk) != count:
                    raise CheckpointError(f"{path}: truncated: the tensor data ends early")
                chunks.append(chunk)
                tensors[name] = _tensor(chunk, dtype, shape)
    except OSError as err:
        raise CheckpointError(f"{path}: can't read it: {err.strerror or err}") from None
    if digest(table, chunks) != metadata[DIGEST_KEY]:
        raise CheckpointError(f"{path}: checksum mismatch: the file was changed or damaged after saving")
    return metadata, tensors


def _check_sparsenets(metadata: dict[str, str], path: Path) -> None:
    if "sparsenets" not in metadata:
        raise CheckpointError(f"{path}: a safetensors file, but not a sparsenets checkpoint (no sparsenets metadata)")
    if DIGEST_KEY not in metadata and OLD_DIGEST_KEY in metadata:
        raise CheckpointError(f"{path}: written by sparsenets 0.1 (checkpoint format 1, whose checksum does not "
                              f"cover the header): load it with that version and save it again")
    if DIGEST_KEY not in metadata:
        raise CheckpointError(f"{path}: no checksum in its metadata ({DIGEST_KEY!r})")


def _read_table(file: IO, size: int, path: Path) -> tuple[dict, int]:
    """The safetensors header, and how many bytes follow it."""
    def unreadable(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged header?): {why}")

    head = file.read(8)
    if len(head) < 8:
        raise unreadable(f"{size} bytes, shorter than the 8-byte header length")
    length = struct.unpack("<Q", head)[0]
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise unreadable(f"a header of {length} bytes in a file of {size}")
    try:
        table = json.loads(file.read(length))
    except (ValueError, UnicodeDecodeError) as err:
        raise unreadable(f"the header is not JSON ({err})") from None
    if not isinstance(table, dict):
        raise unreadable("the header is not a JSON object")
    return table, size - 8 - length


def _check_table(table: dict, payload: int, path: Path) -> tuple[dict[str, str], list]:
    """Metadata, and ``(name, dtype, shape, bytes)`` per tensor in file order; every size checked
    against the file's length: the tensors must exactly fill what follows the header."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged header?): {why}")

    metadata = table.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its metadata is not a map of strings")
    entries = []
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"tensor {name!r} is described by {entry!r}")
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry.get("dtype"), str) else None
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if dtype is None:
            raise bad(f"tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has data offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name!r} of shape {shape} {entry['dtype']} has {offsets[1] - offsets[0]} bytes")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    entries.sort()
    end = 0
    for begin, stop, name, _, _ in entries:
        if begin != end:
            raise bad(f"tensor {name!r} starts at byte {begin}, not where the one before ends ({end})")
        end = stop
    if end != payload:
        raise bad(f"the tensors take {end} bytes but {payload} follow the header")
    return metadata, [(name, dtype, tuple(shape), stop - begin) for begin, stop, name, dtype, shape in entries]


def _tensor(chunk: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    if not chunk:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(chunk, dtype=dtype).reshape(shape)
