"""Where sparsenets caches things, and whether a cache directory is safe to load code from.

The root is ``$SPARSENETS_CACHE``, else ``$XDG_CACHE_HOME/sparsenets``, else
``~/.cache/sparsenets``; each use has its own subfolder (``kernels``, ``autotune``, ``data``).

Compiled kernels are code that runs in this process, so their folder must be private
(:func:`unsafe_reason`): the folder itself owned by the current user and writable by no one
else, and every folder above it owned by the user or by root and either writable by no one
else or sticky (like ``/tmp``: others may add entries but not rename or delete ours). Any other
user who could write along that path could swap in a library of their own. Folders created
for private uses get mode 0700, parents included. Without ``os.getuid`` (Windows) ownership
is not checked.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

ENV = "SPARSENETS_CACHE"


def root() -> Path:
    """``$SPARSENETS_CACHE``, else ``$XDG_CACHE_HOME/sparsenets``, else ``~/.cache/sparsenets``."""
    if path := os.environ.get(ENV):
        return Path(path).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sparsenets"


def cache_dir(use: str, private: bool = False) -> Path:
    """``root()/use``, created; a ``private`` one (and each parent it creates) with mode 0700."""
    path = root() / use
    if private:
        _make_private(path)
    else:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _make_private(path: Path) -> None:
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # another process made it first; unsafe_reason checks it
            pass


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def unsafe_reason(folder: Path) -> str | None:
    """Why code in ``folder`` could have been written by another user, or None when it can't."""
    uid = _uid()
    if uid is None:
        return None
    folder = folder.resolve()
    info = folder.stat()
    if info.st_uid != uid:
        return f"{folder} is owned by uid {info.st_uid}, not by you (uid {uid})"
    if info.st_mode & 0o022:
        return f"{folder} is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
    for parent in folder.parents:
        info = parent.stat()
        if info.st_uid not in (uid, 0):
            return f"{parent}, above it, is owned by uid {info.st_uid} (neither you nor root)"
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            return f"{parent}, above it, is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def private_file_reason(path: Path) -> str | None:
    """Why ``path`` is not a plain file that only the current user could have written, or None."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    uid = _uid()
    if uid is not None and info.st_uid != uid:
        return f"{path} is owned by uid {info.st_uid}, not by you (uid {uid})"
    if info.st_mode & 0o022:
        return f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None
