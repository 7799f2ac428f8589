"""The run directory: one experiment's files, guarded against mixing experiments and runs.

::

    .lock                who holds (or last held) the directory: pid, host, start time, command
    recipe.yaml          the resolved recipe (every default written out)
    checkpoints/*.pt     one per completed job: weights, masks, history, result
    metrics.jsonl        one line per evaluation of every completed job
    results.json         per-job results and the per-level summary ("complete": true at the end)
    plots/*.png, report.md

The checkpoints are the truth; the other files are rebuilt from them. One process at a time
works in a directory: :meth:`RunDir.start` takes an exclusive ``flock`` on ``.lock``, which
the OS drops when the process ends, however it ends, so a crash never leaves it locked.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from ..errors import CheckpointError, RunDirError
from ..utils import atomic
from . import summary

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .protocols import Job
    from .recipe import Recipe

LOCK_NAME = ".lock"
# What a damaged checkpoint raises from torch.load: bad pickle, truncated zip, empty file, missing keys.
_DAMAGED = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, TypeError)


class RunDir:
    """The files of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock_file = self.path / LOCK_NAME
        self.recipe_file = self.path / "recipe.yaml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.results_file = self.path / "results.json"
        self.report_file = self.path / "report.md"
        self.checkpoints = self.path / "checkpoints"
        self.plots = self.path / "plots"
        self._lock_fd: int | None = None

    def checkpoint(self, key: str) -> Path:
        return self.checkpoints / f"{key}.pt"

    # ---- one process at a time --------------------------------------------------------------

    def try_lock(self) -> str | None:
        """Take the directory for this process; if another holds it, return who (and take nothing)."""
        if self._lock_fd is not None or fcntl is None:
            return None
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._holder()
        except OSError as err:  # a file system without locks (some network mounts)
            os.close(fd)
            raise OSError(err.errno, f"can't lock it: {err.strerror}", str(self.lock_file)) from err
        try:  # the lock is on the open file, so the file is rewritten in place, never replaced
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(_me()) + "\n").encode())
        except OSError as err:
            os.close(fd)
            raise OSError(err.errno, err.strerror, str(self.lock_file)) from err
        self._lock_fd = fd
        return None

    def lock(self) -> None:
        """Take the directory for this process, or fail at once naming who holds it."""
        holder = self.try_lock()
        if holder is not None:
            raise RunDirError(f"{self.path} is in use by {holder}")

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the file releases the flock
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDir]:
        self.lock()
        try:
            yield self
        finally:
            self.unlock()

    def _holder(self) -> str:
        try:
            who = json.loads(self.lock_file.read_text())
            return f"pid {who['pid']} on {who['host']} since {who['since']} ({who['command']})"
        except (OSError, ValueError, KeyError, TypeError):  # the holder is between truncate and write
            return "another process"

    # ---- the recipe -------------------------------------------------------------------------

    def check_recipe(self, recipe: Recipe) -> None:
        """Refuse a path that is not a directory, or a directory that holds a different experiment."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a run directory; choose another output directory (--out)")
        if not self.recipe_file.exists():
            if self.path.exists() and any(not _ours(p) for p in self.path.iterdir()):
                raise RunDirError(f"{self.path} is not empty and holds no recipe.yaml; "
                                  f"choose another output directory (--out)")
            return
        differences = _differences(self.saved_recipe(), recipe.to_dict())
        if differences:
            shown = "; ".join(differences[:6]) + (" ..." if len(differences) > 6 else "")
            raise RunDirError(f"{self.path} holds a run of a different recipe ({shown}); use another "
                              f"--out directory, or delete {self.path} to start over")

    def saved_recipe(self) -> dict[str, Any]:
        try:
            saved = yaml.safe_load(self.recipe_file.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise RunDirError(f"{self.recipe_file} is damaged ({' '.join(str(err).split())}); restore it, "
                              f"or delete {self.path} to start over") from None
        if not isinstance(saved, dict):
            raise RunDirError(f"{self.recipe_file} is damaged (not a mapping); restore it, or delete "
                              f"{self.path} to start over")
        return saved

    def start(self, recipe: Recipe) -> None:
        """Lock the directory (until :meth:`unlock` or exit), clear a killed writer's temporaries, save the recipe."""
        self.lock()
        self.check_recipe(recipe)  # again, under the lock: another run may have started it meanwhile
        atomic.remove_stale_temporaries(self.path)
        if not self.recipe_file.exists():
            atomic.write_text(self.recipe_file, recipe.to_yaml())

    # ---- checkpoints and the files rebuilt from them ----------------------------------------

    def load_checkpoint(self, key: str) -> dict[str, Any]:
        path = self.checkpoint(key)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except _DAMAGED as err:
            raise CheckpointError(f"{path} is damaged and can't be read ({_first_line(err)}); delete it "
                                  f"to retrain job {key}, then rerun") from None

    def completed(self, jobs: list[Job]) -> dict[str, dict[str, Any]]:
        """Records (history and result) of the jobs that have a checkpoint."""
        done = {}
        for job in jobs:
            if self.checkpoint(job.key).exists():
                checkpoint = self.load_checkpoint(job.key)
                if not isinstance(checkpoint, dict) or not {"history", "result"} <= checkpoint.keys():
                    raise CheckpointError(f"{self.checkpoint(job.key)} is not a job checkpoint (no history or "
                                          f"result); delete it to retrain job {job.key}, then rerun")
                done[job.key] = {"history": checkpoint["history"], "result": checkpoint["result"]}
        return done

    def write_logs(self, recipe: Recipe, jobs: list[Job], done: dict[str, dict[str, Any]]) -> bool:
        """Rebuild metrics.jsonl and results.json from the completed jobs, in job order.

        A file already holding the right text is left alone, so rerunning a finished run
        rewrites nothing; returns whether either file changed (was stale, edited or damaged).
        """
        finished = [job for job in jobs if job.key in done]
        metrics = atomic.jsonl_text([{"job": job.key, "seed": job.seed, "arm": job.arm, "level": job.level, **row}
                                     for job in finished for row in done[job.key]["history"]])
        rows = [done[job.key]["result"] for job in finished]
        results = {"name": recipe.name, "method": recipe.method["name"], "complete": len(finished) == len(jobs),
                   "jobs": rows, "summary": summary.aggregate(rows)}
        changed = _write_if_changed(self.metrics_file, metrics)
        return _write_if_changed(self.results_file, atomic.json_text(results)) or changed

    def read_results(self) -> dict[str, Any]:
        """results.json as it is (not rebuilt), failing with the file's name if it is damaged."""
        try:
            return json.loads(self.results_file.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise RunDirError(f"{self.results_file} is damaged ({err}); rerun the recipe to rebuild it from "
                              f"the checkpoints") from None


def _ours(path: Path) -> bool:
    """Files a run leaves before it has written recipe.yaml."""
    return path.name == LOCK_NAME or path.name.startswith(atomic.TEMP_PREFIX)


def _me() -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": now, "command": _command_line()}


def _command_line() -> str:
    """This process's command, as typed: ``sparsenets run x.yaml``, ``python -m sparsenets.cli run x.yaml``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:  # python -m: argv[0] is the path of __main__.py
        program = f"python -m {spec.name.removesuffix('.__main__')}"
    else:
        program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return " ".join([program, *sys.argv[1:]])


def _write_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_bytes() == text.encode():
            return False
    except FileNotFoundError:
        pass
    atomic.write_text(path, text)
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if old == new else [f"{where}: {old!r} in the directory, {new!r} now"]
