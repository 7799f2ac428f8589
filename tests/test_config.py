"""Config parsing and the errors bad input gets, with the model left untouched."""

import pytest
import torch
from torch.nn.utils import parametrize

import sparsenets as sn
from sparsenets.config import ConfigError

from helpers import mlp, snapshot


@pytest.mark.parametrize("text,expected", [
    ("unstructured", sn.Unstructured()), ("block:32x32", sn.Block(32, 32)), ("block:8", sn.Block(8, 8)),
    ("BLOCK:4x1", sn.Block(4, 1)), ("2:4", sn.NM(2, 4)), ("1:16", sn.NM(1, 16)),
    ("channel", sn.Channel()), ("head", sn.Head()),
])
def test_pattern_strings(text, expected):
    assert sn.SparsityConfig(pattern=text).pattern == expected


def test_nm_sets_its_own_sparsity():
    assert sn.SparsityConfig(pattern="1:4").sparsity == 0.75
    assert sn.SparsityConfig().sparsity == 0.5


def test_from_yaml_string_and_file(tmp_path):
    text = "pattern: block:4x4\nsparsity: 0.9\nallocation: erk\noverrides:\n  fc1: 0.5\n"
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    for source in (text, path):
        config = sn.SparsityConfig.from_yaml(source)
        assert config.pattern == sn.Block(4, 4) and config.sparsity == 0.9
        assert config.overrides == {"fc1": {"sparsity": 0.5}}
    assert sn.SparsityConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kwargs,message", [
    ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, r"got -0.1"),
    ({"sparsity": "0.5"}, r"got '0.5'"),
    ({"pattern": "4:4"}, r"N:M needs 1 <= N < M, got 4:4"),
    ({"pattern": "5:2"}, r"got 5:2"),
    ({"pattern": "blocky"}, r"unknown pattern 'blocky'"),
    ({"pattern": "block:0x4"}, r"block sides must be >= 1"),
    ({"criterion": "l1"}, r"unknown criterion 'l1'; choose from magnitude"),
    ({"allocation": "erdos"}, r"unknown allocation 'erdos'"),
    ({"pattern": "2:4", "sparsity": 0.9}, r"pattern 2:4 fixes sparsity at 0.5"),
    ({"pattern": "2:4", "allocation": "erk"}, r"does not take allocation 'erk'; use 'uniform'"),
    ({"module_types": ["Transformer"]}, r"unknown type 'Transformer'"),
    ({"overrides": {"fc": 1.5}}, r"overrides\['fc'\].sparsity must be"),
    ({"overrides": {"fc": {"density": 0.1}}}, r"unknown key\(s\) \['density'\]"),
    ({"rounds": 0}, r"rounds must be a positive integer, got 0"),
    ({"include": []}, r"include is an empty list"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sn.SparsityConfig(**kwargs)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['sparsty'\]; valid keys: sparsity, pattern"):
        sn.SparsityConfig.from_dict({"sparsty": 0.9})


@pytest.mark.parametrize("config,data,message", [
    ({"sparsity": 1.0}, None, r"got 1.0"),
    ({"pattern": "block:64x64"}, None, r"block 64x64 is larger than the weight of layer '0' \(32x20"),
    ({"pattern": "1:5"}, None, r"layer '2' .* multiple of 5, but it has 32 inputs"),
    ({"overrides": {"4": {"pattern": "block:30x1"}}}, None, r"block 30x1 is larger than the weight of layer '4'"),
    ({"pattern": "head"}, None, r"found no attention module"),
    ({"include": ["encoder.*"]}, None, r"'encoder.\*' matches no module name; module names look like: 0, 1, 2"),
    ({"overrides": {"fc9": 0.5}}, None, r"'fc9' matches no module name"),
    ({"criterion": "snip"}, None, r"criterion 'snip' needs data"),
    ({"criterion": "synflow"}, None, r"synflow' needs the input shape"),
    ({"criterion": "snip"}, [torch.randn(4, 20)], r"can't compute a loss"),
    ({"module_types": ["Conv2d"]}, None, r"no layer to sparsify"),
])
def test_bad_input_names_the_problem_and_leaves_the_model_untouched(config, data, message):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        sn.sparsify_(model, config, data=data)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_config_can_be_a_dict_or_yaml_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sparsity: 0.75\n")
    for config in ({"sparsity": 0.75}, str(path)):
        model = sn.sparsify_(mlp(), config)
        assert sn.report(model).sparsity == pytest.approx(0.75, abs=0.01)
    with pytest.raises(ConfigError, match="expected a SparsityConfig"):
        sn.sparsify_(mlp(), 0.75)


# ---- what patterns answer for the rest of the package -------------------------------------------

def test_patterns_answer_for_their_behaviour():
    nm, block, channel, head, flat = sn.NM(2, 8), sn.Block(4, 2), sn.Channel(), sn.Head(), sn.Unstructured()
    assert [p.block_shape for p in (nm, block, channel)] == [None, (4, 2), None]
    assert [p.n_m for p in (nm, block)] == [(2, 8), None]
    assert [p.selects_locally for p in (nm, block, flat)] == [True, False, False]
    assert [p.scope for p in (block, head)] == ["layer", "attention"]
    assert nm.allowed_allocations == ("uniform",) and block.allowed_allocations is None
    assert [p.supports_rewiring for p in (flat, block, channel, nm, head)] == [True, True, False, False, False]
    assert flat.elementwise and not block.elementwise


def test_at_density_steps_nm_and_keeps_other_patterns():
    nm = sn.NM(1, 8)
    assert [nm.at_density(d) for d in (1.0, 0.95, 0.5, 0.2, 0.05)] == [None, None, sn.NM(4, 8), sn.NM(2, 8), nm]
    assert sn.Block(4, 4).at_density(0.3) == sn.Block(4, 4) and sn.Block(4, 4).at_density(1.0) is None


def test_conforms_tells_a_pattern_mask_from_a_mixed_one():
    block = sn.Block(2, 2)
    whole = torch.zeros(4, 4, dtype=torch.bool)
    whole[:2, :2] = True
    holed = whole.clone()
    holed[0, 0] = False
    assert block.conforms(whole) and not block.conforms(holed)
    assert sn.NM(2, 4).conforms(torch.tensor([[True, False, False, True]]))
    assert not sn.NM(2, 4).conforms(torch.tensor([[True, True, False, True]]))


def test_choices_come_from_the_registries():
    from sparsenets.allocation import ALLOCATIONS
    from sparsenets.criteria import CRITERIA
    with pytest.raises(ConfigError) as info:
        sn.SparsityConfig(criterion="nope")
    assert all(name in str(info.value) for name in CRITERIA)
    with pytest.raises(ConfigError) as info:
        sn.SparsityConfig(allocation="nope")
    assert all(name in str(info.value) for name in ALLOCATIONS)
    assert sn.SparsityConfig(criterion="synflow").rounds == CRITERIA["synflow"].default_rounds == 100
