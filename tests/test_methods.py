"""Sparsity methods: schedules, lottery levels and rewinding, controls, every pattern through every method."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenets as sn
from sparsenets.masking import get_mask, masks
from sparsenets.methods import (
    GradualMagnitudePruning,
    LotteryTicket,
    OneShot,
    config_at,
    cubic_sparsity,
    layer_sparsities,
    level_configs,
    level_sparsities,
    random_prune,
    reinitialize,
    snapshot,
)
from sparsenets.patterns import NM

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def train_steps(model: nn.Module, steps: int, method=None, start: int = 0, seed: int = 0) -> None:
    """A plain user loop: the method is called right after optimizer.step()."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(start + 1, start + steps + 1):
        x = torch.randn(32, 16, generator=generator)
        y = (x[:, :4].argmax(1))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if method is not None:
            method.step(step)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in snapshot(model).items() if k.endswith("weight")}


# ---- schedules ------------------------------------------------------------------------------------


def test_cubic_schedule_matches_zhu_and_gupta():
    s_i, s_f, t0, end = 0.1, 0.9, 100, 500
    assert cubic_sparsity(0, s_i, s_f, t0, end) == s_i
    assert cubic_sparsity(t0, s_i, s_f, t0, end) == s_i
    assert cubic_sparsity(end, s_i, s_f, t0, end) == s_f
    assert cubic_sparsity(10_000, s_i, s_f, t0, end) == s_f
    # halfway: s_f + (s_i - s_f) * (1/2)^3
    assert cubic_sparsity(300, s_i, s_f, t0, end) == pytest.approx(0.9 - 0.8 / 8)
    values = [cubic_sparsity(t, s_i, s_f, t0, end) for t in range(t0, end + 1, 50)]
    assert all(a < b for a, b in zip(values, values[1:]))
    gains = [b - a for a, b in zip(values, values[1:])]
    assert all(a > b for a, b in zip(gains, gains[1:]))  # prunes fast first, then slows down


def test_gradual_pruning_prunes_on_schedule_and_reaches_the_target():
    model = mlp()
    method = GradualMagnitudePruning(model, {"sparsity": 0.8}, start=4, end=20, frequency=4)
    densities = {}
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(1, 31):
        x = torch.randn(8, 16, generator=generator)
        F.cross_entropy(model(x), x[:, :4].argmax(1)).backward()
        optimizer.step()
        optimizer.zero_grad()
        method.step(step)
        densities[step] = sn.report(model).density
    assert densities[3] == 1.0
    for step in (8, 12, 16):
        assert densities[step] == pytest.approx(1 - method.sparsity_at(step), abs=2e-3)
        assert densities[step] == densities[step + 3]  # nothing between pruning steps
    assert densities[20] == pytest.approx(0.2, abs=2e-3)
    assert densities[30] == densities[20]


def test_oneshot_prunes_once_at_its_step():
    model = mlp()
    method = OneShot(model, {"sparsity": 0.7}, at_step=5)
    train_steps(model, 4, method)
    assert sn.report(model).density == 1.0
    train_steps(model, 10, method, start=4)
    assert sn.report(model).density == pytest.approx(0.3, abs=2e-3)


# ---- lottery tickets --------------------------------------------------------------------------------


def test_level_sparsities_follow_the_geometric_schedule():
    levels = level_sparsities(0.9, 0.2)
    assert levels[:-1] == pytest.approx([1 - 0.8 ** k for k in range(1, len(levels))])
    assert levels[-1] == 0.9 and levels[-2] < 0.9
    assert len(levels) == math.ceil(math.log(0.1) / math.log(0.8))
    with pytest.raises(ValueError, match="prune_fraction"):
        level_sparsities(0.9, 1.0)


def test_imp_levels_prune_a_fifth_of_what_remains():
    model = mlp()
    ticket = LotteryTicket(model, {"sparsity": 0.6, "allocation": "uniform"}, prune_fraction=0.2)
    train_steps(model, 5, ticket)
    for level in range(1, 5):
        ticket.next_level()
        expected = 0.8 ** level
        for _, _, name, mask in masks(model):
            kept = int(mask.mask.sum())
            assert abs(kept - expected * mask.mask.numel()) <= 1, (level, name)
        train_steps(model, 5, ticket)
    assert not ticket.done  # 1 - 0.8^4 = 0.59 is short of 0.6: one last level, capped at the target
    ticket.next_level()
    assert ticket.done
    assert sn.report(model).density == pytest.approx(0.4, abs=1e-3)


def test_rewinding_restores_the_weights_of_step_k_at_kept_positions():
    model = mlp()
    ticket = LotteryTicket(model, {"sparsity": 0.9}, prune_fraction=0.2, rewind_step=3)
    assert ticket.rewind_point is None
    train_steps(model, 3)
    expected = weights(model)  # the weights after 3 updates: θ_3
    train_steps(model, 7, start=3)
    # replay with the ticket recording during training
    model = mlp()
    ticket = LotteryTicket(model, {"sparsity": 0.9}, prune_fraction=0.2, rewind_step=3)
    train_steps(model, 10, ticket)
    for key, value in expected.items():
        assert torch.equal(ticket.rewind_point[key], value)
    trained = weights(model)
    for _ in range(3):
        ticket.next_level()
        for module_name, module, name, mask in masks(model):
            key = f"{module_name}.{name}"
            original = module.parametrizations[name].original
            assert torch.equal(original[mask.mask], expected[key][mask.mask])
            assert not original[~mask.mask].any()
            assert not getattr(module, name)[~mask.mask].any()
        train_steps(model, 10, start=3)
        # masked weights stay exactly zero while training
        for _, module, name, mask in masks(model):
            assert not getattr(module, name)[~mask.mask].any()
    assert not torch.equal(weights(model)["0.weight"], trained["0.weight"])


def test_rewinding_to_initialisation_uses_theta_0():
    model = mlp()
    theta0 = weights(model)
    ticket = LotteryTicket(model, {"sparsity": 0.5}, prune_fraction=0.5)
    train_steps(model, 5, ticket)
    ticket.next_level()
    for key, value in weights(model).items():
        kept = value != 0
        assert torch.equal(value[kept], theta0[key][kept])
    with pytest.raises(RuntimeError, match="levels are done"):
        ticket.next_level()


def test_controls_have_the_tickets_sparsity_layer_by_layer():
    model = mlp()
    config = {"sparsity": 0.8, "allocation": "global"}
    ticket = LotteryTicket(model, config, prune_fraction=0.5)
    train_steps(model, 5, ticket)
    while not ticket.done:
        ticket.next_level()
    level_config = ticket.levels[-1]
    reinit = reinitialize(model, mlp(seed=1))
    random = random_prune(mlp(), model, level_config, seed=3)
    ticket_masks = {f"{m}.{n}": mask.mask for m, _, n, mask in masks(model)}
    for control in (reinit, random):
        control_masks = {f"{m}.{n}": mask.mask for m, _, n, mask in masks(control)}
        assert control_masks.keys() == ticket_masks.keys()
        for key, mask in ticket_masks.items():
            assert int(control_masks[key].sum()) == int(mask.sum()), key
    assert all(torch.equal(get_mask(reinit[i], "weight").mask, get_mask(model[i], "weight").mask) for i in (0, 2, 4))
    assert not torch.equal(reinit[0].parametrizations.weight.original, model[0].parametrizations.weight.original)
    assert not all(torch.equal(get_mask(random[i], "weight").mask, get_mask(model[i], "weight").mask)
                   for i in (0, 2, 4))
    assert layer_sparsities(random, level_config) == layer_sparsities(model, level_config)


# ---- every pattern through every method -----------------------------------------------------------

PATTERNS = {
    "unstructured": {"pattern": "unstructured", "sparsity": 0.75},
    "block": {"pattern": "block:2x2", "sparsity": 0.75},
    "2:4": {"pattern": "2:4"},
    "channel": {"pattern": "channel", "sparsity": 0.5, "exclude": ["4"]},  # keep all 4 outputs
}


def check_structure(model: nn.Module, pattern: str) -> None:
    for _, module, name, mask in masks(model):
        m = mask.mask
        assert not getattr(module, name)[~m].any()
        if m.dim() == 1:  # a bias that follows its output channels
            continue
        if pattern == "block":
            tiles = m.reshape(m.shape[0] // 2, 2, m.shape[1] // 2, 2).sum((1, 3))
            assert ((tiles == 0) | (tiles == 4)).all()
        elif pattern == "2:4":
            assert (m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all()
        elif pattern == "channel":
            rows = m.sum(1)
            assert ((rows == 0) | (rows == m.shape[1])).all()


def run_method(kind: str, config: dict) -> tuple[nn.Module, float]:
    model = mlp()
    target = sn.SparsityConfig.from_dict(config).sparsity
    if kind == "oneshot":
        train_steps(model, 5)
        OneShot(model, config).apply()
        train_steps(model, 5, start=5)
        return model, target
    if kind == "gradual":
        method = GradualMagnitudePruning(model, config, start=2, end=14, frequency=3)
        train_steps(model, 16, method)
        return model, target
    ticket = LotteryTicket(model, config, prune_fraction=0.3, rewind_step=2)
    train_steps(model, 6, ticket)
    while not ticket.done:
        ticket.next_level()
        train_steps(model, 4, start=2)
    if kind == "imp":
        return model, target
    if kind == "reinit":
        control = reinitialize(model, mlp(seed=7))
    else:
        control = random_prune(mlp(), model, ticket.levels[-1], seed=1)
    train_steps(control, 4)
    return control, target


@pytest.mark.parametrize("kind", ["oneshot", "gradual", "imp", "reinit", "random"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_every_pattern_through_every_method(pattern, kind):
    model, target = run_method(kind, PATTERNS[pattern])
    check_structure(model, pattern)
    pruned = [row for row in sn.report(model).rows if row.pattern != "dense"]
    sparsity = 1 - sum(r.nonzeros for r in pruned) / sum(r.numel for r in pruned)
    tolerance = 0.02 if pattern != "channel" else 1 / 24  # channel: within one output row
    assert sparsity == pytest.approx(target, abs=tolerance)


def test_nm_steps_through_n_of_m_on_the_way():
    config = sn.SparsityConfig(pattern="2:4")
    assert config_at(config, 0.05) is None
    assert config_at(config, 0.2).pattern == NM(3, 4)
    assert config_at(config, 0.5).pattern == NM(2, 4)
    assert [c.pattern for c in level_configs(config, 0.2)] == [NM(3, 4), NM(2, 4)]
    with pytest.raises(ValueError, match="outside"):
        config_at(config, 0.6)


def test_intermediate_overrides_scale_with_the_target():
    config = sn.SparsityConfig(sparsity=0.8, overrides={"4": 0.4, "0": 0.0})
    half = config_at(config, 0.4)
    assert half.sparsity == 0.4
    assert half.overrides["4"]["sparsity"] == pytest.approx(0.2)
    assert half.overrides["0"]["sparsity"] == 0.0


def test_methods_keep_the_users_optimizer_working():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    parameters = {id(p) for p in model.parameters()}
    OneShot(model, {"sparsity": 0.5}).apply()
    assert {id(p) for p in model.parameters()} == parameters  # same objects: the optimizer still owns them
    before = model[0].parametrizations.weight.original.clone()
    x = torch.randn(8, 16)
    F.cross_entropy(model(x), x[:, :4].argmax(1)).backward()
    optimizer.step()
    after = model[0].parametrizations.weight.original
    kept = get_mask(model[0], "weight").mask
    assert not torch.equal(before[kept], after[kept])
    assert torch.equal(after[~kept], before[~kept])  # zero gradient where masked


# ---- one constructor shape for every method ------------------------------------------------------

def _nm_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))


METHODS = [  # (class, config, options): every method as the public API exports it
    (sn.OneShot, {"sparsity": 0.5}, {"at_step": 3}),
    (sn.GradualMagnitudePruning, {"sparsity": 0.5}, {"start": 0, "end": 4, "frequency": 2}),
    (sn.LotteryTicket, {"sparsity": 0.5}, {"prune_fraction": 0.2, "rewind_step": 0}),
    (sn.StaticSparse, {"sparsity": 0.5}, {}),
    (sn.SET, {"sparsity": 0.5}, {"update_every": 2}),
    (sn.RigL, {"sparsity": 0.5}, {"update_every": 2}),
    (sn.BlockReweighted, {"sparsity": 0.5, "pattern": "block:4x1"}, {"strength": 1e-3}),
    (sn.SRSTE, {"pattern": "2:4"}, {"decay": 1e-3}),
    (sn.ProgressiveNM, {"pattern": "2:4"}, {"total_steps": 10}),
    (sn.EdgePopup, {"sparsity": 0.5}, {"init": "kaiming_normal"}),
]


@pytest.mark.parametrize("method, config, options", METHODS, ids=lambda v: getattr(v, "__name__", ""))
def test_every_method_takes_model_config_data_loss_fn(method, config, options):
    data = [(torch.randn(4, 16), torch.randint(0, 8, (4,)))]
    loss_fn = F.cross_entropy
    built = method(_nm_model(), config, data, loss_fn, **options)
    assert built.data is data and built.loss_fn is loss_fn
    assert built.config == sn.SparsityConfig(**config)
    by_keyword = method(_nm_model(), config=sn.SparsityConfig(**config), data=data, loss_fn=loss_fn, **options)
    assert by_keyword.config == built.config


@pytest.mark.parametrize("method, config, options", [m for m in METHODS if m[2]],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_options_are_keyword_only_so_a_stray_positional_is_loud(method, config, options):
    with pytest.raises(TypeError):
        method(_nm_model(), config, None, None, *options.values())


def test_the_public_api_exports_every_method_and_error():
    for name in ("OneShot", "GradualMagnitudePruning", "LotteryTicket", "StaticSparse", "SET", "RigL",
                 "BlockReweighted", "SRSTE", "ProgressiveNM", "EdgePopup", "edge_popup_", "lottery_jackpot_",
                 "sparse_drop_", "activation_density", "SparsenetsError", "ConfigError", "PatternError",
                 "CheckpointError", "RunDirError", "RecipeError"):
        assert name in sn.__all__ and getattr(sn, name) is not None, name
    assert not hasattr(sn.activations, "activation_sparsity")  # renamed: it returns a density
    assert issubclass(sn.PatternError, ValueError)


def test_bad_method_options_are_config_errors():
    with pytest.raises(sn.ConfigError, match="at_step"):
        sn.OneShot(_nm_model(), {"sparsity": 0.5}, at_step=-1)
    with pytest.raises(sn.PatternError, match="block:4x4"):
        sn.SRSTE(_nm_model(), {"pattern": "block:4x4"})
    with pytest.raises(sn.PatternError, match="channel"):
        sn.RigL(_nm_model(), {"pattern": "channel"})

