"""Sparse training in fast mode (block-sparse layers) against masked mode, and its building blocks:
in-place relayout of a block-sparse layer, the optimizer state it carries along, the block norms of
RigL's dense gradient, the errors and fallbacks of fast mode, and its state (checkpoints, copies)."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from sparsenets.config import ConfigError
from sparsenets.kernels import BlockLayout, block_norms
from sparsenets.kernels.block_norms import block_gradient_norms, matrix_block_norms
from sparsenets.layers import BlockSparseLinear
from sparsenets.methods import SET, RigL, StaticSparse
from sparsenets.methods.groups import BlockGroups, MaskedGroups

pytestmark = pytest.mark.usefixtures("one_thread")

# 21, 30, 19 and 5 divide by neither side of a 4x8 block: every layer has edge blocks
CONFIG = {"sparsity": 0.7, "pattern": "block:4x8", "allocation": "uniform"}
BLOCK = (4, 8)
DERIVED = ("row_ptr", "col_idx", "row_idx", "t_ptr", "t_row", "t_block")


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(21, 30), nn.ReLU(), nn.Dropout(dropout), nn.Linear(30, 19), nn.ReLU(),
                         nn.Linear(19, 5))


def make_optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(params, lr=0.01)


def batch(generator: torch.Generator | None = None, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(size, 21, generator=generator)
    return x, x[:, :5].argmax(1)


def run(model, method, optimizer, steps, start: int = 1, on_update=None) -> list[float]:
    """A user loop; the data come from the global RNG (as do dropout masks), which both modes must leave alone."""
    losses = []
    for step in range(start, start + steps):
        x, y = batch()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        method.before_optimizer_step(step)
        optimizer.step()
        before = on_update and method.is_update_step(step) and on_update.before(step)
        method.step(step)
        if before:
            on_update.after(step, before)
        losses.append(loss.item())
    return losses


def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: (m.dense_weight() if isinstance(m, BlockSparseLinear) else m.weight).detach().clone()
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, BlockSparseLinear))}


def block_map(layer: BlockSparseLinear, tensor: torch.Tensor | None = None) -> dict[tuple[int, int], torch.Tensor]:
    """(block row, block column) -> that block of ``tensor`` (default: the values), for every stored block."""
    tensor = layer.values if tensor is None else tensor
    return {(int(i), int(j)): tensor[k].detach().clone()
            for k, (i, j) in enumerate(zip(layer.row_idx.tolist(), layer.col_idx.tolist()))}


# ---- 1. the same seed gives the same training in both modes ------------------------------------------

@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("algorithm", [StaticSparse, SET, RigL])
def test_masked_and_fast_modes_train_alike(algorithm, optimizer_name):
    results = {}
    for mode in ("masked", "fast"):
        model = mlp(dropout=0.1)  # dropout draws from the global RNG: fast mode must not move it
        kwargs = {} if algorithm is StaticSparse else {"update_every": 3, "drop_fraction": 0.5}
        method = algorithm(model, CONFIG, mode=mode, **kwargs)
        optimizer = make_optimizer(model, optimizer_name)
        method.on_train_begin(model, optimizer)
        losses = run(model, method, optimizer, 13)
        results[mode] = (model, method, losses)
    (masked, masked_method, masked_losses), (fast, fast_method, fast_losses) = results["masked"], results["fast"]
    assert [type(g) for g in masked_method.groups] == [MaskedGroups] * 3
    assert [type(g) for g in fast_method.groups] == [BlockGroups] * 3
    assert sum(isinstance(m, BlockSparseLinear) for m in fast.modules()) == 3
    assert not any(isinstance(m, nn.Linear) for m in fast.modules())
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(masked_losses), rtol=1e-4, atol=1e-6)
    if algorithm is not StaticSparse:
        assert len(fast_method.updates) == len(masked_method.updates) == 4
        assert fast_method.updates == masked_method.updates
        assert sum(sum(u["moved"].values()) for u in fast_method.updates) > 0  # blocks really moved
    for (name, want), (fast_name, got) in zip(dense_weights(masked).items(), dense_weights(fast).items()):
        assert name == fast_name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    for masked_groups, fast_groups in zip(masked_method.groups, fast_method.groups):
        assert torch.equal(masked_groups.active(), fast_groups.active())


def test_fast_mode_conversion_leaves_the_global_rng_alone():
    states = []
    for mode in ("masked", "fast"):
        model = mlp()
        SET(model, CONFIG, mode=mode)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


# ---- 2. relayout_ and the optimizer state it carries ---------------------------------------------------

def _layer_with_keep(seed: int = 0) -> tuple[BlockSparseLinear, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(8, 3, generator=generator) < 0.5  # 30 x 21 in 4x8 blocks: an 8 x 3 grid
    layer = BlockSparseLinear(21, 30, BLOCK, keep=keep)
    with torch.no_grad():
        layer.values.normal_(generator=generator)
        layer.values.copy_(layer.values * _padding_mask(layer))  # padding of edge blocks is zero
    return layer, keep


def _padding_mask(layer: BlockSparseLinear) -> torch.Tensor:
    real = torch.zeros(32, 24)
    real[:30, :21] = 1
    blocks = real.view(8, 4, 3, 8).permute(0, 2, 1, 3)
    return blocks[layer.row_idx, layer.col_idx]


def test_relayout_keeps_kept_blocks_zeroes_new_ones_and_keeps_every_tensor_object():
    layer, keep = _layer_with_keep()
    on, off = torch.nonzero(keep.flatten()).flatten(), torch.nonzero(~keep.flatten()).flatten()
    new_keep = keep.flatten().clone()
    new_keep[on[:3]], new_keep[off[:3]] = False, True  # edge blocks among them: rows 7, column 2
    new_keep = new_keep.view(8, 3)
    old = block_map(layer)
    objects = {name: getattr(layer, name) for name in ("values", *DERIVED)}
    pointers = {name: t.data_ptr() for name, t in objects.items()}

    source = layer.relayout_(new_keep)

    for name, tensor in objects.items():
        assert getattr(layer, name) is tensor, name
        assert getattr(layer, name).data_ptr() == pointers[name], name
    assert dict(layer.named_parameters())["values"] is objects["values"]
    want = BlockLayout.from_keep(new_keep, (30, 21), BLOCK)
    for name in DERIVED:
        assert torch.equal(getattr(layer, name), getattr(want, name)), name
    new = block_map(layer)
    assert set(new) == {(int(i), int(j)) for i, j in torch.nonzero(new_keep)}
    grown = set(new) - set(old)
    assert len(grown) == 3
    old_index = {key: k for k, key in enumerate(old)}
    for k, (key, value) in enumerate(new.items()):
        if key in grown:
            assert not value.any(), key
            assert source[k] == -1
        else:
            assert torch.equal(value, old[key]), key
            assert source[k] == old_index[key]
    # the output is that of the dense weight holding exactly the surviving blocks
    dense = torch.zeros(32, 24)
    for (i, j), value in old.items():
        if bool(new_keep[i, j]):
            dense[i * 4:(i + 1) * 4, j * 8:(j + 1) * 8] = value
    dense = dense[:30, :21]
    torch.testing.assert_close(layer.dense_weight(), dense)
    x = torch.randn(5, 21)
    torch.testing.assert_close(layer(x), x @ dense.T + layer.bias, rtol=1e-5, atol=1e-5)
    # and it trains: the gradient of the values is that of the dense product, block by block
    x.requires_grad_(False)
    layer(x).square().sum().backward()
    w = dense.clone().requires_grad_()
    (x @ w.T + layer.bias.detach()).square().sum().backward()
    for key, value in block_map(layer, layer.values.grad).items():
        i, j = key
        want_grad = F.pad(w.grad, (0, 3, 0, 2))[i * 4:(i + 1) * 4, j * 8:(j + 1) * 8]
        torch.testing.assert_close(value, want_grad, rtol=1e-4, atol=1e-4)


def test_relayout_to_another_block_count_raises_and_changes_nothing():
    layer, keep = _layer_with_keep()
    before = {name: getattr(layer, name).clone() for name in ("values", *DERIVED)}
    more = keep.clone()
    more[~keep] = True
    with pytest.raises(ValueError, match="as many blocks"):
        layer.relayout_(more)
    for name, tensor in before.items():
        assert torch.equal(getattr(layer, name), tensor), name


class _Snapshot:
    """Before and after an update: each block's values and optimizer state, by block position."""

    def __init__(self, model, optimizer, keys):
        self.model, self.optimizer, self.keys, self.checked = model, optimizer, keys, 0

    def layers(self):
        return [m for m in self.model.modules() if isinstance(m, BlockSparseLinear)]

    def before(self, step):
        return [{key: (block_map(layer), block_map(layer, self.optimizer.state[layer.values][key]))
                 for key in self.keys} for layer in self.layers()]

    def after(self, step, before):
        grown_total = 0
        for layer, old in zip(self.layers(), before):
            for key in self.keys:
                state = self.optimizer.state[layer.values][key]
                assert state.shape == layer.values.shape
                old_values, old_state = old[key]
                new_values, new_state = block_map(layer), block_map(layer, state)
                grown = set(new_values) - set(old_values)
                grown_total += len(grown)
                for block, value in new_values.items():
                    if block in grown:
                        assert not value.any() and not new_state[block].any(), (key, block)
                    else:
                        assert torch.equal(value, old_values[block])
                        assert torch.equal(new_state[block], old_state[block]), (key, block)
        assert grown_total > 0
        self.checked += 1


@pytest.mark.parametrize("algorithm, optimizer_name, keys", [
    (SET, "sgd", ["momentum_buffer"]),
    (RigL, "adam", ["exp_avg", "exp_avg_sq"]),
])
def test_an_update_carries_the_optimizer_state_of_surviving_blocks_and_zeroes_that_of_new_ones(
        algorithm, optimizer_name, keys):
    model = mlp()
    method = algorithm(model, CONFIG, mode="fast", update_every=3, drop_fraction=0.5)
    optimizer = make_optimizer(model, optimizer_name)
    method.on_train_begin(model, optimizer)
    values = [m.values for m in model.modules() if isinstance(m, BlockSparseLinear)]
    snapshot = _Snapshot(model, optimizer, keys)
    run(model, method, optimizer, 7, on_update=snapshot)
    assert snapshot.checked == 2
    # the optimizer still trains the very same tensors
    assert [m.values for m in model.modules() if isinstance(m, BlockSparseLinear)] == values
    assert all(any(p is v for p in optimizer.param_groups[0]["params"]) for v in values)


# ---- 3. block norms of the dense gradient ----------------------------------------------------------------

def reference_norms(dy: torch.Tensor, x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    r, c = block
    grad = dy.double().T @ x.double()
    rows, cols = -(-grad.shape[0] // r), -(-grad.shape[1] // c)
    padded = torch.zeros(rows * r, cols * c, dtype=torch.float64)
    padded[:grad.shape[0], :grad.shape[1]] = grad
    return padded.view(rows, r, cols, c).square().sum((1, 3))


def bound(dy: torch.Tensor, x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """‖dYᵢ‖²·‖Xⱼ‖² per block: the size of the terms the float32 computations add up."""
    return torch.outer(matrix_block_norms(dy.T, (block[0], dy.shape[0])).flatten(),
                       matrix_block_norms(x.T, (block[1], x.shape[0])).flatten())


def check_norms(got, dy, x, block):
    want = reference_norms(dy, x, block)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert (got >= 0).all()
    assert ((got - want).abs() <= 1e-5 * bound(dy, x, block) + 1e-10).all(), (got - want).abs().max()


@given(rows=st.integers(1, 40), out_features=st.integers(1, 40), in_features=st.integers(1, 40),
       block=st.sampled_from([(1, 1), (4, 4), (8, 8), (3, 5), (8, 1), (1, 8), (16, 4)]),
       method=st.sampled_from(["gram", "panels", "auto"]), seed=st.integers(0, 2**16))
@example(rows=1, out_features=30, in_features=21, block=(4, 8), method="gram", seed=0)
@example(rows=1, out_features=30, in_features=21, block=(4, 8), method="panels", seed=0)
def test_block_gradient_norms_match_a_float64_reference(rows, out_features, in_features, block, method, seed):
    generator = torch.Generator().manual_seed(seed)
    dy, x = torch.randn(rows, out_features, generator=generator), torch.randn(rows, in_features, generator=generator)
    check_norms(block_gradient_norms(dy, x, block, method), dy, x, block)


@pytest.mark.parametrize("method", ["gram", "panels", "auto"])
def test_block_gradient_norms_with_tiny_memory_budgets(monkeypatch, method):
    monkeypatch.setattr(block_norms, "PANEL_BYTES", 1)  # one row block per panel
    monkeypatch.setattr(block_norms, "GRAM_BYTES", 0)  # auto must take panels
    dy, x = torch.randn(6, 37), torch.randn(6, 29)
    check_norms(block_gradient_norms(dy, x, (4, 8), method), dy, x, (4, 8))


def test_matrix_block_norms_match_the_reference():
    matrix = torch.randn(30, 21)
    torch.testing.assert_close(matrix_block_norms(matrix, BLOCK),
                               reference_norms(matrix.T, torch.eye(21), BLOCK))  # (matrixᵀ)ᵀ·I = the matrix
    dy, x = torch.randn(3, 30), torch.randn(3, 21)
    torch.testing.assert_close(matrix_block_norms(dy.T @ x, BLOCK), reference_norms(dy, x, BLOCK),
                               rtol=1e-5, atol=1e-6)


def test_block_gradient_norms_refuse_bad_arguments():
    with pytest.raises(ValueError, match="unknown method 'fastest'"):
        block_gradient_norms(torch.randn(4, 8), torch.randn(4, 8), (4, 4), "fastest")
    with pytest.raises(ValueError, match="rows"):
        block_gradient_norms(torch.randn(4, 8), torch.randn(5, 8), (4, 4))


# ---- 4. fast mode's errors and fallbacks -------------------------------------------------------------------

def test_fast_mode_needs_a_block_pattern_and_refuses_before_masking():
    model = mlp()
    with pytest.raises(ConfigError, match="'unstructured'"):
        StaticSparse(model, {"sparsity": 0.5}, mode="fast")
    with pytest.raises(ConfigError, match="'quick'"):
        SET(model, CONFIG, mode="quick")
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # nothing half-done


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))
        h, _ = self.attn(h, h, h)
        return self.head(h.mean(1))


def test_attention_stays_masked_in_fast_mode_and_trains_alongside_block_sparse_layers():
    config = {"sparsity": 0.5, "pattern": "block:4x4"}
    results = {}
    for mode in ("masked", "fast"):
        torch.manual_seed(0)
        model = Attention()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            method = RigL(model, config, mode=mode, update_every=2, drop_fraction=0.5)
        stay = [str(w.message) for w in caught if "stay masked" in str(w.message)]
        optimizer = make_optimizer(model, "sgd")
        method.on_train_begin(model, optimizer)
        losses = []
        for step in range(1, 7):
            x = torch.randn(4, 3, 12)
            loss = F.cross_entropy(model(x), x[:, 0, :5].argmax(1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.step(step)
            losses.append(loss.item())
        results[mode] = model, method, losses, stay
    model, method, losses, stay = results["fast"]
    assert len(stay) == 1 and "attn.out_proj" in stay[0] and "attn," in stay[0]
    assert not results["masked"][3]
    kinds = {g.name: type(g) for g in method.groups}
    assert kinds == {"embed": BlockGroups, "attn": MaskedGroups, "attn.out_proj": MaskedGroups, "head": BlockGroups}
    assert isinstance(model.embed, BlockSparseLinear) and isinstance(model.head, BlockSparseLinear)
    assert isinstance(model.attn.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)  # MHA reads its weight
    # one update rewires both kinds
    assert len(method.updates) == 3
    assert all(u["moved"]["embed"] > 0 and u["moved"]["attn"] > 0 and u["moved"]["attn.out_proj"] > 0
               for u in method.updates)
    assert method.updates == results["masked"][1].updates
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(results["masked"][2]), rtol=1e-4, atol=1e-6)
    for fast_groups, masked_groups in zip(method.groups, results["masked"][1].groups):
        assert torch.equal(fast_groups.active(), masked_groups.active())


# ---- 5. state: checkpoints, copies, pickles ----------------------------------------------------------------

def _trained_fast(steps: int):
    model = mlp()
    method = RigL(model, CONFIG, mode="fast", update_every=3, drop_fraction=0.5)
    optimizer = make_optimizer(model, "sgd")
    method.on_train_begin(model, optimizer)
    run(model, method, optimizer, steps)
    return model, method, optimizer


def test_a_checkpoint_loads_into_a_fresh_fast_model_whose_optimizer_is_built():
    model, method, optimizer = _trained_fast(7)
    fresh = mlp()
    fresh_method = RigL(fresh, CONFIG, mode="fast", update_every=3, drop_fraction=0.5)
    fresh_optimizer = make_optimizer(fresh, "sgd")
    fresh_method.on_train_begin(fresh, fresh_optimizer)
    layers = [m for m in fresh.modules() if isinstance(m, BlockSparseLinear)]
    values = [layer.values for layer in layers]
    layouts = [layer.col_idx.clone() for layer in layers]

    fresh.load_state_dict(model.state_dict())
    fresh_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as if from a file: no shared buffers
    fresh_method.last_step = method.last_step

    assert any(not torch.equal(layer.col_idx, before) for layer, before in zip(layers, layouts))  # rewired
    assert [layer.values for layer in layers] == values
    params = fresh_optimizer.param_groups[0]["params"]
    assert all(any(p is v for p in params) for v in values)
    trained = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    for layer, want in zip(layers, trained):
        for name in DERIVED:  # the derived buffers are rebuilt too, not only the saved ones
            assert torch.equal(getattr(layer, name), getattr(want, name)), name
    x, _ = batch()
    torch.testing.assert_close(fresh(x), model(x))
    # and both go on alike, through updates: the optimizer state landed on the right blocks
    state = torch.get_rng_state()
    losses = run(model, method, optimizer, 5, start=8)
    torch.set_rng_state(state)
    assert run(fresh, fresh_method, fresh_optimizer, 5, start=8) == pytest.approx(losses, rel=1e-5)
    assert fresh_method.updates == method.updates[2:]


@pytest.mark.parametrize("steps", [7, 8])  # after step 8 RigL's hooks wait for the next update step
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_fast_model_copies_and_pickles_mid_training(how, steps):
    model, _, _ = _trained_fast(steps)
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    x, _ = batch()
    torch.testing.assert_close(clone(x), model(x))
    for a, b in zip(model.modules(), clone.modules()):
        if isinstance(a, BlockSparseLinear):
            assert a.values.data_ptr() != b.values.data_ptr()
            assert torch.equal(a.col_idx, b.col_idx) and torch.equal(a.t_block, b.t_block)


# ---- 7. a GPT-2 model: its Conv1D layers train block-sparse ----------------------------------------------

def test_gpt2_conv1d_layers_train_block_sparse_like_the_masked_model():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    sparsity = {"sparsity": 0.5, "pattern": "block:8x8"}
    results = {}
    for mode in ("masked", "fast"):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        model.train()  # dropout on: both modes must draw the same masks
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            method = RigL(model, sparsity, mode=mode, update_every=2, drop_fraction=0.5)
        assert not [w for w in caught if "stay masked" in str(w.message)]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        method.on_train_begin(model, optimizer)
        generator = torch.Generator().manual_seed(1)
        losses = []
        for step in range(1, 6):
            ids = torch.randint(0, 64, (2, 12), generator=generator)
            loss = model(ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.step(step)
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            logits = model(torch.randint(0, 64, (2, 12), generator=generator)).logits
        results[mode] = model, method, losses, logits
    fast, fast_method, fast_losses, fast_logits = results["fast"]
    _, masked_method, masked_losses, masked_logits = results["masked"]
    layers = [m for m in fast.modules() if isinstance(m, BlockSparseLinear)]
    assert len(layers) == 4 * config.n_layer
    assert not any(isinstance(m, Conv1D) for m in fast.modules())
    assert all(isinstance(g, BlockGroups) for g in fast_method.groups) and len(fast_method.groups) == len(layers)
    assert len(fast_method.updates) == 2 and fast_method.updates == masked_method.updates
    assert all(moved > 0 for u in fast_method.updates for moved in u["moved"].values())
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(masked_losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_logits, masked_logits, rtol=1e-4, atol=1e-4)


def test_report_counts_a_fast_model_like_its_masked_twin():
    from sparsenets import report

    masked, fast = mlp(), mlp()
    SET(masked, CONFIG)
    method = SET(fast, CONFIG, mode="fast")
    rows = {name: report(model).to_dict() for name, model in (("masked", masked), ("fast", fast))}
    keys = ("name", "shape", "pattern", "nonzeros", "numel", "dense_flops", "sparse_flops")
    assert [{k: r[k] for k in keys} for r in rows["fast"]["layers"]] == \
        [{k: r[k] for k in keys} for r in rows["masked"]["layers"]]
    assert rows["fast"]["total"]["density"] < 0.5
    assert method.density() == pytest.approx(rows["masked"]["total"]["density"])
    assert not any("values" in u["name"] for u in rows["fast"]["uncovered"])  # kept blocks are covered


def test_set_in_fast_mode_trains_the_same_under_torch_compile():
    """The block layouts change under the compiled graph (its index buffers are rewritten in place)."""
    losses = {}
    for compiled in (False, True):
        model = mlp()
        method = SET(model, CONFIG, mode="fast", update_every=3, drop_fraction=0.5)
        optimizer = make_optimizer(model, "sgd")
        method.on_train_begin(model, optimizer)
        runner = torch.compile(model, backend="aot_eager") if compiled else model
        torch.manual_seed(5)
        losses[compiled] = run(runner, method, optimizer, 8)
        assert len(method.updates) == 2
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


def test_rigl_under_torch_compile_says_why_it_has_no_gradient():
    model = mlp()
    method = RigL(model, CONFIG, mode="fast", update_every=2)
    optimizer = make_optimizer(model, "sgd")
    method.on_train_begin(model, optimizer)
    with pytest.raises(RuntimeError, match="torch.compile"):
        run(torch.compile(model, backend="aot_eager"), method, optimizer, 2)


class Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def test_layers_the_user_watches_or_parametrizes_stay_masked():
    """Replacing them would silently drop the user's hook or the other parametrization."""
    model = mlp()
    seen = []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    parametrize.register_parametrization(model[3], "weight", Doubled())
    with pytest.warns(UserWarning, match="stay masked"):
        SET(model, CONFIG, mode="fast")
    assert not isinstance(model[0], BlockSparseLinear) and not isinstance(model[3], BlockSparseLinear)
    assert isinstance(model[5], BlockSparseLinear)
    model(batch()[0])
    assert seen  # the hook still runs


class SmallCNN(nn.Module):
    """2-d convolutions (padded, strided, dilated) and a 1-d one, none dividing 4x8 blocks evenly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 14, 3, padding=1)
        self.conv2 = nn.Conv2d(14, 18, 3, stride=2, dilation=1)
        self.conv3 = nn.Conv1d(18, 12, 3, padding="same", padding_mode="reflect")
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.relu(self.conv3(x.flatten(2)))
        return self.head(x.mean(2))


@pytest.mark.parametrize("algorithm", [SET, RigL])
def test_convolutions_train_alike_in_both_modes(algorithm):
    results = {}
    for mode in ("masked", "fast"):
        model = SmallCNN()
        method = algorithm(model, {**CONFIG, "exclude": ["head"]}, mode=mode, update_every=2, drop_fraction=0.5)
        optimizer = make_optimizer(model, "sgd")
        method.on_train_begin(model, optimizer)
        generator, losses = torch.Generator().manual_seed(0), []
        for step in range(1, 8):
            x = torch.randn(6, 3, 9, 9, generator=generator)
            loss = F.cross_entropy(model(x), x[:, 0, 0, :4].argmax(1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.step(step)
            losses.append(loss.item())
        results[mode] = (model, method, losses)
    (masked, masked_method, masked_losses), (fast, fast_method, fast_losses) = results["masked"], results["fast"]
    assert [type(m).__name__ for m in (fast.conv1, fast.conv2, fast.conv3)] == \
        ["BlockSparseConv2d", "BlockSparseConv2d", "BlockSparseConv1d"]
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(masked_losses), rtol=1e-4, atol=1e-6)
    assert fast_method.updates == masked_method.updates and len(fast_method.updates) == 3
    assert sum(sum(u["moved"].values()) for u in fast_method.updates) > 0
    for name in ("conv1", "conv2", "conv3"):
        torch.testing.assert_close(getattr(fast, name).dense_weight(), getattr(masked, name).weight,
                                   rtol=1e-4, atol=1e-5, msg=name)
    from sparsenets import report

    keys = ("name", "shape", "pattern", "nonzeros")
    rows = [[{k: r[k] for k in keys} for r in report(m).to_dict()["layers"]] for m in (masked, fast)]
    assert rows[0] == rows[1]
