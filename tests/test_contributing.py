"""The worked examples of docs/contributing.md run as written: one new file or function each."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsenets as sn
from sparsenets import criteria, patterns
from sparsenets.experiments import load_recipe, run_recipe
from sparsenets.experiments.protocols import base as protocols

DOC = (Path(__file__).parent.parent / "docs" / "contributing.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)


def _block(marker: str) -> str:
    return next(b for b in BLOCKS if marker in b)


@pytest.fixture
def registries():
    """Leave every registry as it was: the examples register new names."""
    tables = (criteria.CRITERIA, protocols.PROTOCOLS, protocols.ARMS)
    saved, saved_patterns = [dict(table) for table in tables], list(patterns._REGISTRY)
    yield
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)
    patterns._REGISTRY[:] = saved_patterns


def test_the_criterion_example_registers_and_its_test_passes(registries):
    exec(_block('@criterion("gradient"'), dict(vars(criteria)))  # as if written in criteria.py
    test = _block("def test_gradient_prunes")
    namespace = {"nn": nn, "torch": torch, "sn": sn}
    exec(test, namespace)
    namespace["test_gradient_prunes_the_inputs_the_data_never_uses"]()


def test_the_pattern_example_keeps_whole_columns(registries):
    exec(_block("class Column(Pattern)"), dict(vars(patterns)))  # as if written in patterns.py
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    sn.sparsify_(model, {"pattern": "column", "sparsity": 0.5})
    for layer in (model[0], model[2]):
        kept = (layer.weight != 0).any(dim=0)
        assert (layer.weight[:, kept] != 0).all() and int(kept.sum()) == layer.in_features // 2


def test_the_protocol_example_runs_from_a_recipe(registries, tmp_path, monkeypatch):
    name = "sparsenets.experiments.protocols.pruned_init"  # as if saved as protocols/pruned_init.py
    module = types.ModuleType(name)
    module.__package__ = name.rpartition(".")[0]
    monkeypatch.setitem(sys.modules, name, module)  # pydantic resolves annotations through it
    exec(_block('@register_protocol("pruned_init")'), module.__dict__)
    recipe = load_recipe({
        "name": "pruned_init_test", "seeds": [0], "data": {"name": "mnist1d", "num_samples": 300},
        "model": {"name": "lenet_300_100", "hidden": [16]}, "train": {"epochs": 1, "batch_size": 50},
        "method": {"name": "pruned_init", "sparsities": [0.5, 0.8]}})
    results = run_recipe(recipe, tmp_path / "run")
    pruned = [job for job in results["jobs"] if job["arm"] == "pruned_init"]
    assert results["complete"] and [round(1 - job["remaining"], 2) for job in pruned] == [0.5, 0.8]
    assert "| at init |" in (tmp_path / "run" / "report.md").read_text()  # its Arm names the column
