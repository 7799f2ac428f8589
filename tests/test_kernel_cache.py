"""The compiled-kernel cache: one cache folder rule, private folders, verified libraries, a bad CC named."""

import ctypes
import os
import stat
import subprocess
import warnings

import pytest

from sparsenets.experiments import data
from sparsenets.kernels import cpu
from sparsenets.kernels.cpu import build
from sparsenets.utils import cache

TINY = "int bsp_answer(void) { return 42; }\n"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A one-function source that compiles in a fraction of a second, and a fresh cache."""
    source = tmp_path / "tiny.c"
    source.write_text(TINY)
    monkeypatch.setattr(build, "SOURCE", source)
    monkeypatch.setenv("SPARSENETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("SPARSENETS_CFLAGS", raising=False)
    try:
        build.compiler()
    except build.BuildError:
        pytest.skip("no C compiler")
    return tmp_path


def _plant(tmp_path, target, answer):
    """Compile a library returning ``answer`` straight to ``target``, as another user could."""
    evil = tmp_path / "evil.c"
    evil.write_text(f"int bsp_answer(void) {{ return {answer}; }}\n")
    subprocess.run([*build.compiler(), "-shared", "-fPIC", str(evil), "-o", str(target)], check=True)


def _rebuild_warnings(caught):
    return [str(w.message) for w in caught if "rebuilding the kernels" in str(w.message)]


# ---- where the cache is ---------------------------------------------------------------------------------


def test_cache_root_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SPARSENETS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.root() == tmp_path / "home" / ".cache" / "sparsenets"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.root() == tmp_path / "xdg" / "sparsenets"
    assert data.cache_dir() == cache.root()  # generated data follows the same rule
    monkeypatch.setenv("SPARSENETS_CACHE", str(tmp_path / "mine"))
    assert cache.root() == tmp_path / "mine"
    assert cache.cache_dir("autotune") == tmp_path / "mine" / "autotune"
    assert (tmp_path / "mine" / "autotune").is_dir()


def test_private_folders_and_their_new_parents_are_0700(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSENETS_CACHE", str(tmp_path / "a" / "b"))
    folder = cache.cache_dir("kernels", private=True)
    for path in (tmp_path / "a", tmp_path / "a" / "b", folder):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert cache.unsafe_reason(folder) is None


# ---- folders that others could write ----------------------------------------------------------------------


def test_world_writable_cache_is_refused(tiny):
    shared = tiny / "cache"
    shared.mkdir()
    shared.chmod(0o777)
    assert "writable by others" in cache.unsafe_reason(cache.cache_dir("kernels", private=True))
    with pytest.warns(RuntimeWarning, match=f"not using the kernel cache {shared / 'kernels'}.*writable by others"):
        library = build.build()
    assert shared not in library.parents
    assert not list((shared / "kernels").iterdir())  # nothing was written, nor read, there
    assert ctypes.CDLL(str(library)).bsp_answer() == 42


def test_sticky_shared_parent_is_accepted(tiny):
    shared = tiny / "cache"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: others can't rename or delete our folder in it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert shared / "kernels" in build.build().parents


def test_cache_owned_by_another_user_is_refused(tiny, monkeypatch):
    folder = cache.cache_dir("kernels", private=True)
    monkeypatch.setattr(os, "getuid", lambda: folder.stat().st_uid + 4242)
    assert "owned by uid" in cache.unsafe_reason(folder)
    with pytest.warns(RuntimeWarning, match="owned by uid"):
        assert build.kernel_dir() != folder


def test_folder_with_open_permissions_is_refused(tiny):
    folder = cache.cache_dir("kernels", private=True)
    folder.chmod(0o775)
    assert "writable by others" in cache.unsafe_reason(folder)


# ---- the libraries in it ----------------------------------------------------------------------------------


def test_a_build_records_its_digest_and_is_reused(tiny):
    first = build.build()
    record = build.digest_file(first)
    assert record.read_text().strip() and build.problem(first) is None
    assert stat.S_IMODE(first.stat().st_mode) & 0o022 == 0
    before = first.stat().st_mtime_ns, record.stat().st_mtime_ns
    assert build.build() == first
    assert (first.stat().st_mtime_ns, record.stat().st_mtime_ns) == before  # not rebuilt


def test_planted_library_with_a_wrong_digest_is_rebuilt_not_loaded(tiny):
    target = build.build()
    _plant(tiny, target, 666)
    assert "does not match the sha256" in build.problem(target)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        library = build.load()
    assert library.bsp_answer() == 42
    assert _rebuild_warnings(caught)


def test_planted_library_without_a_digest_is_rebuilt(tiny):
    target = build.build()
    for path in (target, build.digest_file(target)):
        path.unlink()
    _plant(tiny, target, 666)
    assert "is missing" in build.problem(target)
    assert build.load().bsp_answer() == 42


def test_truncated_library_is_rebuilt(tiny):
    target = build.build()
    size = target.stat().st_size
    with open(target, "r+b") as file:
        file.truncate(size // 2)
    with pytest.warns(RuntimeWarning, match="rebuilding the kernels"):
        assert build.build() == target
    assert target.stat().st_size == size and build.problem(target) is None


def test_library_writable_by_others_is_not_loaded(tiny):
    target = build.build()
    target.chmod(0o777)
    assert "writable by others" in build.problem(target)
    with pytest.warns(RuntimeWarning, match="rebuilding the kernels"):
        build.build()
    assert build.problem(target) is None


# ---- the compiler -----------------------------------------------------------------------------------------


def test_a_cc_that_is_not_an_executable_is_named(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent")
    with pytest.raises(build.BuildError, match="CC='/nonexistent' is not an executable"):
        build.compiler()
    cpu.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="CPU kernels unavailable.*CC='/nonexistent'"):
            assert not cpu.available()
    finally:
        cpu.library.cache_clear()


def test_cc_with_arguments_is_split(tiny, monkeypatch):
    name = build.compiler()[0]
    monkeypatch.setenv("CC", f"{name} -O1")
    assert build.compiler() == [name, "-O1"]
    assert ctypes.CDLL(str(build.build())).bsp_answer() == 42
