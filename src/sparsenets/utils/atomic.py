"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the new one, never half.

Each write goes to a temporary file in the target's own directory (same file system), is
flushed to disk, then renamed over the target with ``os.replace``, which is atomic on POSIX
and Windows. A crash between the two leaves only a temporary file, which
:func:`remove_stale_temporaries` clears on the next run. A write that fails (disk full,
permission denied) removes its temporary, leaves the old file as it was, and raises an
``OSError`` whose ``filename`` is the target, not the temporary.
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
    with _naming(path):
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
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise a failed write against ``path``: the temporary's name would only puzzle the user."""
    try:
        yield
    except OSError as err:
        other_file = err.filename is not None and not Path(err.filename).name.startswith(TEMP_PREFIX)
        if err.errno is None or other_file:  # the writer's own error, or about another file: keep it
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


def write_text(path: str | os.PathLike, text: str) -> None:
    with _replacing(path, "w") as file:
        file.write(text)


def json_text(data: Any) -> str:
    """What :func:`write_json` writes."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def jsonl_text(rows: list[dict]) -> str:
    """What :func:`write_jsonl` writes."""
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json_text(data))


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, jsonl_text(rows))


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
