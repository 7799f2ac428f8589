"""Compile the C kernels on first use, cache the shared library, and load only what was built here.

The library is built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) for
this machine's CPU (``-march=native``) and OpenMP, into ``kernels/`` of the sparsenets cache
(:mod:`sparsenets.utils.cache`), named by a hash of the source, the compiler, the flags and
the CPU, so an edit, a new compiler or another CPU each get their own build.
``$SPARSENETS_CFLAGS`` replaces the optimisation flags (say ``-O3 -march=x86-64-v3 -fopenmp``
for a library that runs on any AVX2 machine). A ``CC`` that is not an executable is an error
naming it, not silently replaced by another compiler.

Loading a library runs its code, so the cache is trusted only as far as it is private:

- the folder must pass :func:`~sparsenets.utils.cache.unsafe_reason` (owned by you, writable
  by no one else, and so is every folder above it unless it is root's or sticky); otherwise a
  warning names the problem and the library is built in a fresh private temporary folder
  (removed at exit), so nothing another user could have written is ever loaded;
- each build records the library's sha256 in a ``.sha256`` file beside it; before
  ``ctypes.CDLL`` the library and that record must be regular files owned by you, writable by
  no one else, and the digest must match. A library that fails (planted, truncated, damaged)
  is rebuilt, not loaded.

Builds hold a lock on the folder (``fcntl.flock``), so processes racing on a first use build
once; the library is compiled to a temporary file and renamed into place, so a crash never
leaves half a library under the final name.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ...utils import cache

try:
    import fcntl
except ImportError:  # Windows: no flock; builds still rename into place atomically
    fcntl = None  # type: ignore[assignment]

SOURCE = Path(__file__).with_name("block_sparse.c")  # the default; other kernels pass their own file

# Tried in order: the best build this compiler accepts wins.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-mcpu=native", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
COMMON_FLAGS = ("-shared", "-fPIC", "-std=gnu11")
DIGEST_SUFFIX = ".sha256"
_THREAD_LOCK = threading.Lock()


class BuildError(RuntimeError):
    """No usable C compiler, no build it could make, or a library that fails verification."""


def kernel_dir() -> Path:
    """The cache's ``kernels`` folder if it is private, else a fresh private temporary folder."""
    try:
        folder = cache.cache_dir("kernels", private=True)
        reason = cache.unsafe_reason(folder)
    except OSError as err:
        folder, reason = cache.root() / "kernels", f"it can't be created ({err})"
    if reason is None:
        return folder
    warnings.warn(f"sparsenets: not using the kernel cache {folder}: {reason}. Building the kernels in a "
                  f"private temporary folder instead (make the folder private, or set {cache.ENV})",
                  RuntimeWarning, stacklevel=2)
    return _private_temp_dir()


@functools.cache
def _private_temp_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="sparsenets-kernels-"))  # mode 0700, a new name
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def compiler() -> list[str]:
    """The compiler command: ``$CC`` split as a shell would (must be an executable), else the first found."""
    if given := os.environ.get("CC", "").strip():
        words = shlex.split(given)
        if not shutil.which(words[0]):
            raise BuildError(f"CC={given!r} is not an executable C compiler (fix or unset CC)")
        return words
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    raise BuildError("no C compiler found (set CC, or install gcc)")


def _cpu_identity() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = ("model name", "flags", "Features", "CPU part")
        return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build_key(cc: list[str], flags: tuple[str, ...], source: Path) -> str:
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(cc).encode(), version.encode(), " ".join(flags).encode(),
                 _cpu_identity().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digest_file(library: Path) -> Path:
    return library.with_name(library.name + DIGEST_SUFFIX)


def problem(library: Path) -> str | None:
    """Why ``library`` must not be loaded, or None when it is the one built here, unchanged."""
    record = digest_file(library)
    for path in (library, record):
        if not os.path.lexists(path):
            return f"{path} is missing"
        if reason := cache.private_file_reason(path):
            return reason
    if _sha256(library) != record.read_text().strip():
        return f"{library} does not match the sha256 recorded when it was built"
    return None


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with _THREAD_LOCK:
        if fcntl is None:
            yield
            return
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _write_private(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build-")  # mode 0600
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(tmp, path)


def _compile(cc: list[str], flags: tuple[str, ...], source: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run([*cc, *flags, *COMMON_FLAGS, str(source), "-o", tmp],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(result.stderr.strip() or f"{cc[0]} exited with status {result.returncode}")
        os.chmod(tmp, 0o700)  # the linker applies the umask, which may leave it group-writable
        _write_private(digest_file(target), _sha256(tmp) + "\n")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _reusable(target: Path) -> bool:
    """Whether a cached build can be used; one that is there but fails verification is reported."""
    if not os.path.lexists(target) and not os.path.lexists(digest_file(target)):
        return False
    if (reason := problem(target)) is None:
        return True
    if "is missing" not in reason:  # (a build from before digests were recorded: rebuilt quietly)
        warnings.warn(f"sparsenets: rebuilding the kernels: {reason}", RuntimeWarning, stacklevel=3)
    return False


def build(source: Path | None = None) -> Path:
    """Path of the compiled, verified library of ``source`` (a C file beside this module, by default
    the block-sparse kernels), building it if this source/compiler/CPU has none yet."""
    source = SOURCE if source is None else source
    cc = compiler()
    folder = kernel_dir()
    errors = []
    custom = os.environ.get("SPARSENETS_CFLAGS")
    with _locked(folder):
        for flags in (tuple(shlex.split(custom)),) if custom else FLAG_SETS:
            target = folder / f"{source.stem}-{_build_key(cc, flags, source)}.so"
            if _reusable(target):
                return target
            try:
                _compile(cc, flags, source, target)
                return target
            except BuildError as err:
                errors.append(f"{' '.join(flags)}: {str(err).splitlines()[-1] if str(err) else err}")
    raise BuildError(f"{' '.join(cc)} could not build {source.name}:\n  " + "\n  ".join(errors))


def load(source: Path | None = None) -> ctypes.CDLL:
    """Build (if needed), verify and load ``source``'s library; raises :class:`BuildError` or ``OSError``."""
    path = build(source)
    if reason := problem(path):  # checked again right before its code runs
        raise BuildError(f"refusing to load {path}: {reason}")
    return ctypes.CDLL(str(path))


# A C function's (argument types, result type) as ctypes declares them; None: no result.
Signature = tuple[list[Any], Any]


def load_or_warn(name: str, instead: str, signatures: Mapping[str, Signature]) -> ctypes.CDLL | None:
    """The library of the C file ``name`` beside this module with each function of ``signatures``
    declared, or None after one ``RuntimeWarning`` saying why and what runs ``instead``."""
    try:
        lib = load(Path(__file__).with_name(name))
    except (BuildError, OSError) as err:
        warnings.warn(f"sparsenets: {Path(name).stem} CPU kernels unavailable, {instead} ({err})",
                      RuntimeWarning, stacklevel=4)
        return None
    for function, (argtypes, restype) in signatures.items():
        getattr(lib, function).argtypes = argtypes
        getattr(lib, function).restype = restype
    return lib
