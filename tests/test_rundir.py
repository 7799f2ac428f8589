"""Run directories: one process at a time, damaged files named, failed writes leave the old file."""

import datetime
import errno
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from sparsenets.cli import main
from sparsenets.errors import RunDirError
from sparsenets.experiments.rundir import RunDir
from sparsenets.utils import atomic

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {
    "name": "locked", "seeds": [0],
    "data": {"name": "teacher", "train_samples": 256, "test_samples": 128, "inputs": 12, "classes": 4},
    "model": {"name": "lenet_300_100", "hidden": [24, 16]},
    "train": {"optimizer": "adam", "lr": 0.01, "epochs": 1, "batch_size": 64},
    "method": {"name": "lottery", "prune_fraction": 0.5, "controls": []},
    "sparsity": {"sparsity": 0.75},
}
# Another process holding a run directory's lock, as a run does (plain Python: it starts in milliseconds).
HOLDER = """
import fcntl, json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "gpu-7", "since": "2026-11-30T09:00:00+00:00",
                         "command": "sparsenets run locked.yaml"}).encode())
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "locked.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


@pytest.fixture(scope="module")
def finished(recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", str(recipe_file), "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run."""
    return shutil.copytree(finished, tmp_path / "run")


def files(directory, but: str = "") -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file() and p.name != but}


def run_again(recipe_file, run) -> int:
    return main(["run", str(recipe_file), "--out", str(run)])


# ---- the lock ------------------------------------------------------------------------------------------------


def test_a_second_run_fails_at_once_naming_the_holder_and_changes_nothing(recipe_file, run, capsys):
    stale = run / "checkpoints" / f"{atomic.TEMP_PREFIX}seed0-imp-02.pt.abc"
    stale.write_bytes(b"the holder's checkpoint, half written")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n", holder.stderr.read().decode()
        before = files(run)
        capsys.readouterr()
        assert run_again(recipe_file, run) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {run} is in use by pid {holder.pid} on gpu-7 since 2026-11-30T09:00:00+00:00 "
                       f"(sparsenets run locked.yaml)\n")
        assert files(run) == before  # the holder's temporary included
    finally:
        holder.kill()
        holder.wait()
    assert run_again(recipe_file, run) == 0  # the OS dropped the dead holder's lock
    assert not stale.exists()


def test_the_lock_file_records_its_holder_and_the_lock_is_per_open_file(tmp_path):
    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run")
    first.lock()
    first.lock()  # already held: a no-op, not a deadlock
    holder = json.loads(first.lock_file.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert datetime.datetime.fromisoformat(holder["since"]).tzinfo is not None
    assert holder["command"]
    with pytest.raises(RunDirError, match=re.escape(f"run is in use by pid {os.getpid()} on {holder['host']} "
                                                    f"since {holder['since']} ({holder['command']})")):
        second.lock()
    first.unlock()
    with second.locked():
        assert first.try_lock() is not None
    assert first.try_lock() is None


def test_report_on_a_directory_in_use_only_reads_it(run, capsys):
    results = run / "results.json"
    original = results.read_text()
    edited = json.loads(original)
    edited["summary"][0]["accuracy_mean"] = 9.99
    results.write_text(json.dumps(edited))
    (run / "report.md").unlink()
    with RunDir(run).locked():
        before = files(run)
        assert main(["report", str(run)]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert f"is in use by pid {os.getpid()}" in out and "nothing rewritten" in out and "999.0" in out
        assert files(run) == before
    assert main(["report", str(run)]) == 0  # free again: rebuilt from the checkpoints
    assert "999.0" not in capsys.readouterr().out
    assert results.read_text() == original and (run / "report.md").exists()


def test_report_leaves_no_lock_in_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- damaged files -----------------------------------------------------------------------------------------


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "a tensor"])
def test_a_damaged_checkpoint_is_named_with_the_way_out(recipe_file, run, damage, capsys):
    checkpoint = run / "checkpoints" / "seed0-imp-01.pt"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes({"garbage": b"not a checkpoint", "truncated": good[:len(good) // 2], "empty": b"",
                            "a tensor": saved(torch.ones(2))}[damage])
    before = files(run, but=".lock")  # which the failed run held
    for command in (["run", str(recipe_file), "--out", str(run)], ["report", str(run)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {checkpoint} is ") and "delete it to retrain job seed0-imp-01" in err
        assert err.count("\n") == 1
        assert files(run, but=".lock") == before
    checkpoint.unlink()  # the way out
    original = (run / "results.json").read_text()
    assert run_again(recipe_file, run) == 0
    assert (run / "results.json").read_text() == original  # retrained to the same numbers
    torch.load(checkpoint, weights_only=True)


def test_a_damaged_results_json_is_rebuilt_or_named(recipe_file, run, capsys):
    results = run / "results.json"
    original = results.read_text()
    results.write_text('{"jobs": [{"key": "seed0-')
    assert run_again(recipe_file, run) == 0
    assert results.read_text() == original
    results.write_text('{"jobs": [{"key": "seed0-')
    (run / "recipe.yaml").unlink()  # nothing to rebuild it from
    assert main(["report", str(run)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {results} is damaged")


def test_a_damaged_recipe_yaml_is_named(recipe_file, run, capsys):
    (run / "recipe.yaml").write_text("seeds: [0\n")
    assert run_again(recipe_file, run) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'recipe.yaml'} is damaged") and err.count("\n") == 1


# ---- the atomic writer -------------------------------------------------------------------------------------


def no_space(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("write", [
    lambda path: atomic.write_json(path, {"a": 2}),
    lambda path: atomic.torch_save(path, {"a": torch.ones(3)}),
    lambda path: atomic.write_with(path, lambda file: (file.write(b'{"a": 2, "ha'), no_space())),
])
def test_a_full_disk_leaves_the_old_file_and_names_the_target(tmp_path, monkeypatch, write):
    path = tmp_path / "results.json"
    atomic.write_json(path, {"a": 1})
    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(OSError) as failure:
        write(path)
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(path)
    assert str(path) in str(failure.value)
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]


@pytest.mark.parametrize("error", [OSError("the writer's own words"),
                                   FileNotFoundError(errno.ENOENT, "No such file or directory", "font.ttf")])
def test_a_writer_error_that_is_not_about_the_target_is_kept_as_is(tmp_path, error):
    def broken(file):
        raise error

    with pytest.raises(OSError) as failure:
        atomic.write_with(tmp_path / "x.png", broken)
    assert failure.value is error
    assert os.listdir(tmp_path) == []
