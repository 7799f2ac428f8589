"""The command line: help with examples, and one ``error:`` line with a consistent exit status."""

import errno
import os
import shutil

import pytest
import yaml

from sparsenets import cli
from sparsenets.cli import build_parser, main
from sparsenets.cli import report as report_command
from sparsenets.errors import CheckpointError, RecipeError, RunDirError
from sparsenets.utils import atomic

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {
    "name": "cli", "seeds": [0],
    "data": {"name": "teacher", "train_samples": 128, "test_samples": 64, "inputs": 8, "classes": 2},
    "model": {"name": "lenet_300_100", "hidden": [8]},
    "train": {"optimizer": "adam", "lr": 0.01, "epochs": 1, "batch_size": 64},
    "method": {"name": "dense"},
}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "cli.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


@pytest.fixture(scope="module")
def finished(recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", str(recipe_file), "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of a finished run whose results.json is stale, so a rerun must rewrite it."""
    out = shutil.copytree(finished, tmp_path / "run")
    results = out / "results.json"
    results.write_text(results.read_text().replace('"complete": true', '"complete": false'))
    return out


def rerun(recipe_file, run) -> int:
    return main(["run", str(recipe_file), "--out", str(run)])


# ---- help ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["report"]])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert " ".join(["sparsenets", *command]) in text and "examples:" in text
    assert "exit status" in text or command  # the top level documents them


def test_every_command_module_registers_its_commands():
    names = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"demo", "run", "report"} <= names
    assert all(name.startswith("sparsenets.") for name in cli.COMMAND_MODULES)


# ---- exit status ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raised, code, message", [
    (RecipeError("recipe.yaml: train.lr must be positive"), 2, "error: recipe.yaml: train.lr must be positive\n"),
    (RunDirError("runs/x is in use by pid 7"), 2, "error: runs/x is in use by pid 7\n"),
    (CheckpointError("runs/x/checkpoints/a.pt is damaged"), 2, "error: runs/x/checkpoints/a.pt is damaged\n"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/results.json"), 1,
     "error: runs/x/results.json: No space left on device\n"),
    (PermissionError(errno.EACCES, "Permission denied", "runs/x/.lock"), 1, "error: runs/x/.lock: Permission denied\n"),
    (KeyboardInterrupt(), 130, "interrupted\n"),
])
def test_errors_are_one_line_with_the_exit_status_of_their_kind(monkeypatch, capsys, raised, code, message):
    def fails(args):
        raise raised

    monkeypatch.setattr(report_command, "_report", fails)
    assert main(["report", "anywhere"]) == code
    captured = capsys.readouterr()
    assert captured.err == message and captured.out == ""


def test_a_bug_keeps_its_traceback(monkeypatch):
    def buggy(args):
        raise KeyError("a bug")

    monkeypatch.setattr(report_command, "_report", buggy)
    with pytest.raises(KeyError, match="a bug"):
        main(["report", "anywhere"])


# ---- what a run meets on disk --------------------------------------------------------------------------------


def test_out_naming_a_file_is_refused(recipe_file, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["run", str(recipe_file), "--out", str(notes)]) == 2
    assert capsys.readouterr().err == f"error: {notes} is a file, not a run directory; choose another output " \
                                      f"directory (--out)\n"
    assert notes.read_text() == "mine" and os.listdir(tmp_path) == ["notes.txt"]


def no_space(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_an_error_naming_the_file_and_leaves_the_old_one(recipe_file, run, monkeypatch, capsys):
    stale = (run / "results.json").read_text()
    monkeypatch.setattr(atomic.os, "fsync", no_space)
    assert rerun(recipe_file, run) == 1
    assert capsys.readouterr().err == f"error: {run / 'results.json'}: No space left on device\n"
    assert (run / "results.json").read_text() == stale
    assert not list(run.rglob(f"{atomic.TEMP_PREFIX}*"))
    monkeypatch.undo()
    assert rerun(recipe_file, run) == 0


def test_a_full_disk_on_the_first_write_leaves_a_directory_the_rerun_accepts(recipe_file, tmp_path, monkeypatch,
                                                                             capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(atomic.os, "fsync", no_space)
    assert main(["run", str(recipe_file), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: {out / 'recipe.yaml'}: No space left on device\n"
    monkeypatch.undo()
    assert main(["run", str(recipe_file), "--out", str(out)]) == 0  # its .lock alone is no stranger's file


def test_an_unwritable_run_directory_is_an_error_naming_the_file(recipe_file, run, monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(run / f"{atomic.TEMP_PREFIX}results.json.x"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    assert rerun(recipe_file, run) == 1
    assert capsys.readouterr().err == f"error: {run / 'results.json'}: Permission denied\n"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_directory_is_an_error_and_report_still_reads_it(recipe_file, run, capsys):
    run.chmod(0o555)
    try:
        assert rerun(recipe_file, run) == 1
        assert capsys.readouterr().err.startswith(f"error: {run / 'results.json'}: Permission denied")
        assert main(["report", str(run)]) == 0
        assert "not writable" in capsys.readouterr().out
    finally:
        run.chmod(0o755)
