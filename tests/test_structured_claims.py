"""The structured methods' published claims, on the shipped recipes.

The default run checks a one-seed cut of each claim that takes seconds; ``pytest -m slow``
runs the shipped recipes as the README reports them (a few minutes each).
"""

from pathlib import Path

import pytest
import yaml

from sparsenets.experiments import load_recipe, run_recipe

RECIPES = Path(__file__).parents[1] / "recipes"


def run(name: str, tmp_path: Path, **changes) -> dict:
    recipe = yaml.safe_load((RECIPES / name).read_text())
    for key, value in changes.items():
        section, _, option = key.partition("__")
        if option:
            recipe[section][option] = value
        else:
            recipe[section] = value
    results = run_recipe(load_recipe(recipe), tmp_path / "run")
    return {(e["arm"], e["level"]): e["accuracy_mean"] for e in results["summary"]}


def test_blkrew_beats_one_shot_block_pruning_at_90_percent_quick(tmp_path):
    means = run("blkrew_mnist1d_mlp.yaml", tmp_path, seeds=[0], method__sparsities=[0.9])
    assert means[("blkrew", 1)] > means[("oneshot", 1)] + 0.03


@pytest.mark.slow
def test_blkrew_beats_one_shot_at_high_block_sparsity_on_mlp_conv_and_lstm(tmp_path):
    for recipe, levels in (("blkrew_mnist1d_mlp.yaml", (1, 2)), ("blkrew_mnist1d_conv.yaml", (2, 3)),
                           ("blkrew_mnist1d_lstm.yaml", (2,))):
        means = run(recipe, tmp_path / recipe)
        assert all(means[("blkrew", level)] > means[("oneshot", level)] for level in levels), recipe


@pytest.mark.slow
def test_progressive_gradient_flow_at_least_matches_sr_ste_at_1_8_and_1_16(tmp_path):
    means = run("nm_training_transformer.yaml", tmp_path)
    assert means[("pgf", 1)] >= means[("srste", 1)] and means[("pgf", 2)] >= means[("srste", 2)]


@pytest.mark.slow
def test_sparse_drop_regularises_like_dropout(tmp_path):
    means = run("sparse_drop_mnist1d.yaml", tmp_path)
    assert means[("sparsedrop", 0)] > means[("dense", 0)]  # helps over no dropout
    assert abs(means[("sparsedrop", 0)] - means[("dropout", 0)]) < 0.015
