"""Killing a run at any point and rerunning it gives the same results as an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from sparsenets.cli import main
from sparsenets.experiments import load_recipe, run_recipe
from sparsenets.experiments import protocols as protocols_module
from sparsenets.utils import atomic

RECIPE = {
    "name": "resume", "seeds": [0],
    "data": {"name": "teacher", "train_samples": 1200, "test_samples": 200, "inputs": 16, "classes": 4},
    "model": {"name": "lenet_300_100", "hidden": [64, 32]},
    "train": {"optimizer": "sgd", "lr": 0.05, "epochs": 3, "batch_size": 32},
    "method": {"name": "lottery", "prune_fraction": 0.5, "rewind_step": 5},
    "sparsity": {"sparsity": 0.875, "allocation": "global"},
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_recipe(load_recipe(RECIPE), out)
    return out


def _metrics(run) -> list[dict]:
    """The metrics rows without their wall-clock seconds, the one thing a rerun may change."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def same_files(a, b) -> None:
    for name in ("results.json", "recipe.yaml"):
        assert (a / name).read_text() == (b / name).read_text(), name
    assert _metrics(a) == _metrics(b)
    names = [sorted(p.name for p in (run / "checkpoints").iterdir()) for run in (a, b)]
    assert names[0] == names[1]


def no_partial_files(run) -> None:
    """Everything there parses; a killed writer may only have left a temporary behind."""
    json.loads((run / "results.json").read_text())
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    keys = [(row["job"], row["step"]) for row in map(json.loads, lines)]
    assert len(keys) == len(set(keys))  # no duplicated lines
    for checkpoint in (run / "checkpoints").glob("*.pt"):
        torch.load(checkpoint, weights_only=True)


def test_killed_process_resumes_to_identical_results(reference, tmp_path, capsys):
    recipe = tmp_path / "resume.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "sparsenets.cli", "run", str(recipe), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while len(list((out / "checkpoints").glob("*.pt"))) < 3:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    total = len(json.loads((reference / "results.json").read_text())["jobs"])
    finished = len(list((out / "checkpoints").glob("*.pt")))
    assert 3 <= finished < total, "the kill should land mid-run"
    no_partial_files(out)
    assert not json.loads((out / "results.json").read_text())["complete"]

    assert main(command[3:]) == 0  # the same command again (in this process, to save a start-up)
    assert f"{finished} of {total} networks already trained" in " ".join(capsys.readouterr().out.split())
    same_files(reference, out)
    assert not list(out.rglob(f"{atomic.TEMP_PREFIX}*"))


def test_interrupted_in_the_middle_of_a_job_resumes_identically(reference, tmp_path, monkeypatch):
    run_job = protocols_module.LotteryProtocol.run
    calls = []

    def interrupted(self, job, ctx):
        calls.append(job.key)
        if len(calls) == 6:
            ctx.train = lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt)
        return run_job(self, job, ctx)

    monkeypatch.setattr(protocols_module.LotteryProtocol, "run", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(RECIPE), out)
    assert len(list((out / "checkpoints").glob("*.pt"))) == 5
    monkeypatch.setattr(protocols_module.LotteryProtocol, "run", run_job)
    run_recipe(load_recipe(RECIPE), out)
    same_files(reference, out)


def test_killed_while_writing_a_checkpoint_leaves_no_partial_file(reference, tmp_path, monkeypatch):
    save = atomic.torch_save
    count = []

    def dies_while_writing(path, obj):
        count.append(path)
        if len(count) == 4:
            with atomic._replacing(path) as file:
                file.write(b"half a checkpoint")
                raise SystemExit("killed")  # the temporary is cleaned; a real kill would leave it
        save(path, obj)

    monkeypatch.setattr(atomic, "torch_save", dies_while_writing)
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        run_recipe(load_recipe(RECIPE), out)
    assert len(list((out / "checkpoints").glob("*.pt"))) == 3
    stale = out / "checkpoints" / f"{atomic.TEMP_PREFIX}seed0-imp-02.pt.left-by-a-kill"
    stale.write_bytes(b"half a checkpoint")  # what SIGKILL would leave
    no_partial_files(out)
    monkeypatch.setattr(atomic, "torch_save", save)
    run_recipe(load_recipe(RECIPE), out)
    same_files(reference, out)
    assert not stale.exists()


# ---- results.json and metrics.jsonl are rebuilt from the checkpoints on every rerun ---------------------------


def resume_command(tmp_path, out) -> list[str]:
    recipe = tmp_path / "resume.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    return ["run", str(recipe), "--out", str(out)]


def test_killed_after_the_last_checkpoint_is_complete_on_rerun_without_training(reference, tmp_path, monkeypatch,
                                                                                 capsys):
    out = shutil.copytree(reference, tmp_path / "run")
    results = json.loads((out / "results.json").read_text())  # as the write before the last job left it
    results["jobs"], results["complete"] = results["jobs"][:-1], False
    (out / "results.json").write_text(json.dumps(results))
    (out / "report.md").unlink()
    shutil.rmtree(out / "plots")

    def no_training(self, job, ctx):
        raise AssertionError(f"{job.key} trained again")

    monkeypatch.setattr(protocols_module.LotteryProtocol, "run", no_training)
    assert main(resume_command(tmp_path, out)) == 0
    assert "is complete (results rebuilt from its checkpoints)" in " ".join(capsys.readouterr().out.split())
    same_files(reference, out)
    assert "incomplete" not in (out / "report.md").read_text()


def test_edited_results_are_replaced_by_the_checkpoints_numbers(reference, tmp_path, capsys):
    out = shutil.copytree(reference, tmp_path / "run")
    true_report = (out / "report.md").read_text().replace(str(reference), str(out))  # it names its directory

    def edit_results():
        results = json.loads((out / "results.json").read_text())
        for entry in results["summary"]:
            entry["accuracy_mean"] = 9.99  # printed as 999.0
        (out / "results.json").write_text(json.dumps(results))

    for command in (resume_command(tmp_path, out), ["report", str(out)]):
        edit_results()
        capsys.readouterr()
        assert main(command) == 0
        printed = capsys.readouterr().out
        assert "999.0" not in printed and "IMP" in printed, command[0]
        same_files(reference, out)
        assert (out / "report.md").read_text() == true_report
