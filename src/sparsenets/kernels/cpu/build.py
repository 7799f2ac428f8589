"""Compile the C kernels on first use and cache the shared library.

The library is built with the system C compiler (``$CC``, else ``cc``/``gcc``) for this
machine's CPU (``-march=native``) and OpenMP, into a cache directory keyed by a hash of the
source, the compiler, the flags and the CPU, so an edit, a new compiler or another CPU
each get their own build. Compiling into a temporary file and renaming it into place makes
concurrent first uses from several processes safe. ``$SPARSENETS_CFLAGS`` replaces the
optimisation flags (say ``-O3 -march=x86-64-v3 -fopenmp`` for a library that runs on any
AVX2 machine).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("block_sparse.c")

# Tried in order: the best build this compiler accepts wins.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-mcpu=native", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
COMMON_FLAGS = ("-shared", "-fPIC", "-std=gnu11")


class BuildError(RuntimeError):
    """No C compiler, or none that could build the kernels."""


def cache_dir() -> Path:
    """``$SPARSENETS_CACHE``, else ``$XDG_CACHE_HOME/sparsenets``, else ``~/.cache/sparsenets``."""
    if root := os.environ.get("SPARSENETS_CACHE"):
        return Path(root) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsenets" / "kernels"


def compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise BuildError("no C compiler found (set CC, or install gcc)")


def _cpu_identity() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = ("model name", "flags", "Features", "CPU part")
        return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build_key(cc: str, flags: tuple[str, ...]) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(flags).encode(), _cpu_identity().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _compile(cc: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, *COMMON_FLAGS, str(SOURCE), "-o", tmp],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(result.stderr.strip() or f"{cc} exited with status {result.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build() -> Path:
    """Path of the compiled library, building it if this source/compiler/CPU has none yet."""
    cc = compiler()
    errors = []
    custom = os.environ.get("SPARSENETS_CFLAGS")
    for flags in (tuple(shlex.split(custom)),) if custom else FLAG_SETS:
        target = cache_dir() / f"block_sparse-{_build_key(cc, flags)}.so"
        if target.exists():
            return target
        try:
            _compile(cc, flags, target)
            return target
        except BuildError as err:
            errors.append(f"{' '.join(flags)}: {str(err).splitlines()[-1] if str(err) else err}")
    raise BuildError(f"{cc} could not build {SOURCE.name}:\n  " + "\n  ".join(errors))


def load() -> ctypes.CDLL:
    """Build (if needed) and load the library; raises :class:`BuildError` or ``OSError``."""
    return ctypes.CDLL(str(build()))
