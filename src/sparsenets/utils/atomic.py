"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the new one, never half.

Each write goes to a temporary file in the target's own directory (same file system), is
flushed to disk, then renamed over the target with ``os.replace``, which is atomic on POSIX
and Windows. A crash between the two leaves only a temporary file, which
:func:`remove_stale_temporaries` clears on the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

TEMP_PREFIX = ".partial-"


def _file_mode() -> int:
    """What ``open()`` would give a new file (mkstemp makes temporaries 0600, whatever the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _replacing(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, _file_mode())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with _replacing(path, "w") as file:
        file.write(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    with _replacing(path) as file:
        torch.save(obj, file)


def write_with(path: str | os.PathLike, writer: Callable[[IO], None]) -> None:
    """Let ``writer(file)`` fill a binary file (``numpy.savez``, ``figure.savefig``), atomically."""
    with _replacing(path) as file:
        writer(file)


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Delete temporaries left by a process killed mid-write; returns how many."""
    count = 0
    for temp in Path(directory).rglob(TEMP_PREFIX + "*"):
        temp.unlink(missing_ok=True)
        count += 1
    return count
