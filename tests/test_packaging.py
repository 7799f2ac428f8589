"""Packaging: the core runs without the experiment extra, the version is defined once, and the
wheel carries the license, ``py.typed`` and the C kernel sources."""

import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import sparsenets
from sparsenets import _version

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())

# The experiment stack: what `pip install 'sparsenets[experiments]'` adds (top-level module names).
EXPERIMENT_STACK = ("matplotlib", "sklearn", "mnist1d", "rich", "pydantic")
EXTRA_MESSAGE = "error: this command needs the experiment extra: pip install 'sparsenets[experiments]'"

# Run first in each subprocess: any import of the experiment stack fails as if it were not installed.
BLOCKER = textwrap.dedent(f"""
    import sys

    BLOCKED = {EXPERIMENT_STACK!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
""")

CORE_USE = textwrap.dedent("""
    import os
    import sys
    import tempfile

    import torch

    import sparsenets as sn
    from sparsenets.models import build_model

    torch.manual_seed(0)
    architecture = {"name": "lenet_300_100", "input_shape": [40], "num_classes": 10, "hidden": [32, 16]}
    spec = {k: v for k, v in architecture.items() if k != "name"}
    model = build_model(architecture["name"], **spec).eval()
    sn.sparsify_(model, sn.SparsityConfig(pattern="unstructured", sparsity=0.8))
    print(sn.report(model))
    x = torch.randn(8, 40)
    small = sn.compress(model, x, autotune=False)
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        path = sn.save(model, os.path.join(tmp, "model.safetensors"), architecture=architecture)
        torch.testing.assert_close(sn.load(path).eval()(x), model(x))
    leaked = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("core ok")
""")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_core_runs_without_the_experiment_extra():
    done = _python(BLOCKER + CORE_USE)
    assert done.returncode == 0, done.stderr
    assert "core ok" in done.stdout


# Import name of each distribution, where they differ.
IMPORT_NAMES = {"pyyaml": "yaml", "scikit-learn": "sklearn"}
# Imported by the core only inside functions, for inputs that need them: a checkpoint with Hugging Face
# layers needs transformers, the GPU kernels triton (the kernels check that it is installed).
OPTIONAL_IN_CORE = {"transformers", "triton"}
NOT_CORE = ("experiments", "cli", "bench")
# Bridges to other training stacks: each imports the library it bridges, which its user has.
BRIDGES = ("integrations/huggingface.py", "integrations/lightning.py")


def _requirement_names(requirements: list[str]) -> set[str]:
    names = {re.split(r"[<>=!~; \[]", r)[0].lower() for r in requirements}
    return {IMPORT_NAMES.get(name, name) for name in names}


def _third_party_imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level third-party modules ``path`` imports: (at import time, inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    nested = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(function)}
    at_import, in_functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "sparsenets":
                (in_functions if id(node) in nested else at_import).add(top)
    return at_import, in_functions


def test_core_dependencies_are_what_the_core_imports():
    project = pyproject()["project"]
    core = _requirement_names(project["dependencies"])
    experiments = _requirement_names(project["optional-dependencies"]["experiments"])
    assert set(EXPERIMENT_STACK) <= experiments
    package = ROOT / "src" / "sparsenets"
    used = set()
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] in NOT_CORE or path.relative_to(package).as_posix() in BRIDGES:
            continue
        at_import, in_functions = _third_party_imports(path)
        triton_kernels = path.relative_to(package).parts[:2] == ("kernels", "triton")
        assert at_import <= core | ({"triton"} if triton_kernels else set()), (path, at_import - core)
        assert in_functions <= core | OPTIONAL_IN_CORE, (path, in_functions - core)
        used |= at_import | in_functions
    assert core <= used, f"declared but not imported by the core: {sorted(core - used)}"


# Runs each argv through an entry point in one process, printing [exit status, stdout, stderr] per argv.
RUN_EACH = textwrap.dedent("""
    import contextlib
    import io
    import json

    def run_each(entry, argvs):
        results = []
        for argv in argvs:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status = entry(argv)
                except SystemExit as exit:
                    status = exit.code
            results.append([status or 0, out.getvalue(), err.getvalue()])
        print(json.dumps(results))
""")

EXPERIMENT_ARGVS = (("demo",), ("demo", "--out", "/nonexistent"), ("run", "recipes/x.yaml"), ("report", "runs/demo"))
CORE_ARGVS = (("--help",), ("--version",), ("compress", "--help"))


@pytest.fixture(scope="module")
def cli_without_extra() -> dict[tuple[str, ...], tuple[int, str, str]]:
    argvs = [list(argv) for argv in EXPERIMENT_ARGVS + CORE_ARGVS]
    done = _python(BLOCKER + RUN_EACH + f"from sparsenets.cli import main\nrun_each(main, {argvs!r})")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    return {tuple(argv): tuple(result) for argv, result in zip(argvs, results)}


@pytest.mark.parametrize("argv", EXPERIMENT_ARGVS, ids=" ".join)
def test_experiment_commands_name_the_extra_when_it_is_missing(cli_without_extra, argv):
    status, _, err = cli_without_extra[argv]
    assert (status, err.strip().splitlines()[-1:]) == (2, [EXTRA_MESSAGE]), err


def test_cli_help_version_and_compress_work_without_the_experiment_extra(cli_without_extra):
    for argv in CORE_ARGVS:
        status, out, err = cli_without_extra[argv]
        assert status == 0, (argv, err)
    assert "usage: sparsenets" in cli_without_extra[("--help",)][1]
    assert cli_without_extra[("--version",)][1].strip() == f"sparsenets {_version.__version__}"
    assert "usage: sparsenets compress" in cli_without_extra[("compress", "--help")][1]


def test_extras_helper_stands_in_for_a_command_module_that_needs_the_extra(tmp_path):
    (tmp_path / "needs_rich.py").write_text("import rich\n\ndef add_commands(subparsers):\n    raise AssertionError\n")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    argvs = [["fit"], ["fit", "--out", "x", "more"], ["fit", "--help"]]
    code = BLOCKER + RUN_EACH + textwrap.dedent(f"""
        import argparse

        sys.path.insert(0, {str(tmp_path)!r})
        from sparsenets.cli import _extras

        _extras.EXPERIMENT_COMMANDS.update(needs_rich=("fit",), broken=("other",))

        def parser(module):
            parser = argparse.ArgumentParser(prog="sparsenets")
            _extras.add_commands(parser.add_subparsers(dest="command", required=True), module)
            return parser

        def main(argv):
            args = parser("needs_rich").parse_args(argv)
            return args.func(args)

        try:
            parser("broken")  # not the extra: the error stays
        except ImportError as err:
            assert err.name == "not_a_module_anywhere"
        else:
            raise AssertionError("broken imported")
        run_each(main, {argvs!r})
    """)
    done = _python(code)
    assert done.returncode == 0, done.stderr
    for argv, (status, _, err) in zip(argvs, json.loads(done.stdout.splitlines()[-1])):
        assert (status, err.strip()) == (2, EXTRA_MESSAGE), argv


def test_version_is_defined_once():
    config = pyproject()
    assert "version" not in config["project"]
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sparsenets._version.__version__"}
    assert sparsenets.__version__ == _version.__version__
    # The installed metadata comes from the same place (reinstall with `pip install -e .` if this fails).
    assert metadata.version("sparsenets") == _version.__version__


# SHA-256 of https://www.apache.org/licenses/LICENSE-2.0.txt, the standard text unmodified.
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_is_the_full_apache_text():
    assert pyproject()["project"]["license"] == "Apache-2.0"
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_0_SHA256


def test_wheel_ships_license_py_typed_and_kernel_sources(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--wheel-dir", str(tmp_path / "dist"), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("sparsenets-*.whl")
    assert wheel.name.startswith(f"sparsenets-{_version.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparsenets/py.typed" in names
    assert "sparsenets/kernels/cpu/block_sparse.c" in names
    assert any(re.fullmatch(r"sparsenets-[^/]+\.dist-info/licenses/LICENSE", name) for name in names), names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Requires-Dist: matplotlib>=3.7; extra == \"experiments\"" in meta
