"""sparsify_ on real model families: MLP, Conv1d/Conv2d + BatchNorm, nn.MultiheadAttention,
nn.Embedding, Hugging Face BERT and GPT-2 (HF ``Conv1D``, weight stored in x out).

Every check here is written from the models' own layouts, not from the library's helpers:
masks are read straight from the ``torch.nn.utils.parametrize`` parametrizations, and heads,
GEMM rows and blocks are located with index arithmetic written out per model.
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import sparsenets as sn  # noqa: E402
from sparsenets.masking import Mask  # noqa: E402

transformers.logging.set_verbosity_error()

E, H = 16, 4  # embedding width and heads of every attention model here
HD = E // H
SPARSITY = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- models ------------------------------------------------------------------------------------


class AttnNet(nn.Module):
    """nn.MultiheadAttention + a Linear head. ``kv_dim`` makes key/value narrower than the query,
    so MHA keeps separate q/k/v_proj_weight instead of one in_proj_weight."""

    def __init__(self, batch_first: bool, kv_dim: int | None = None) -> None:
        super().__init__()
        self.kv_dim = kv_dim
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kv_dim, vdim=kv_dim)
        with torch.no_grad():
            self.attn.in_proj_bias.normal_()  # zero by default: make bias masking observable
            self.attn.out_proj.bias.normal_()
        self.head = nn.Linear(E, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = x if self.kv_dim is None else x[..., : self.kv_dim]
        out, _ = self.attn(x, kv, kv, need_weights=False)
        return self.head(out)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 6))


def _conv1d() -> nn.Module:
    # input (N, 3, 10): conv "0" has 3·3 = 9 inputs per output (not a multiple of 4)
    return nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))


def _conv2d() -> nn.Module:
    # input (N, 3, 8, 8): conv "0" -> 6x6, conv "3" (stride 2, pad 1) -> 3x3
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(72, 5))


def _embedding() -> nn.Module:
    return nn.Sequential(nn.Embedding(50, E), nn.Linear(E, 6))


def _bert() -> nn.Module:
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=E, num_hidden_layers=2, num_attention_heads=H, intermediate_size=32,
        max_position_embeddings=32, pad_token_id=0))


def _gpt2(**kwargs: Any) -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=E, n_layer=2, n_head=H, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, **kwargs))


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


@dataclass
class Family:
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]  # one forward input (tensor or dict of kwargs)
    data: Callable[[], list]  # batches for data-driven criteria
    types: tuple[type, ...]  # the layer types sparsified by default
    loss_fn: Callable | None = None
    base: dict = field(default_factory=dict)  # config kwargs for every pattern
    per_pattern: dict = field(default_factory=dict)  # extra config kwargs per pattern
    attention: bool = False
    positions: dict = field(default_factory=dict)  # conv output positions per sample


def _tuples(x: Callable[[], torch.Tensor], y: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], list]:
    def make() -> list:
        out = []
        for _ in range(2):
            xb = x()
            out.append((xb, y(xb)))
        return out
    return make


def _ids() -> torch.Tensor:
    return torch.randint(1, 50, (2, 8))


FAMILIES: dict[str, Family] = {
    "mlp": Family(_mlp, lambda: torch.randn(4, 12),
                  _tuples(lambda: torch.randn(4, 12), lambda x: torch.randint(0, 6, (4,))), (nn.Linear,)),
    "conv1d": Family(_conv1d, lambda: torch.randn(4, 3, 10),
                     _tuples(lambda: torch.randn(4, 3, 10), lambda x: torch.randint(0, 5, (4,))),
                     (nn.Conv1d, nn.Linear), positions={"0": 10, "3": 8},
                     # conv "0" can't take 2:4: give it another pattern instead
                     per_pattern={"2:4": {"overrides": {"0": {"pattern": "unstructured"}}}}),
    "conv2d": Family(_conv2d, lambda: torch.randn(4, 3, 8, 8),
                     _tuples(lambda: torch.randn(4, 3, 8, 8), lambda x: torch.randint(0, 5, (4,))),
                     (nn.Conv2d, nn.Linear), positions={"0": 36, "3": 9},
                     per_pattern={"2:4": {"exclude": ["0"]}}),  # 3·3·3 = 27 inputs
    "mha_bf": Family(lambda: AttnNet(batch_first=True), lambda: torch.randn(3, 5, E),
                     _tuples(lambda: torch.randn(3, 5, E), lambda x: torch.randn(3, 5, 6)),
                     (nn.MultiheadAttention, nn.Linear), loss_fn=_mse, attention=True),
    "mha_sf": Family(lambda: AttnNet(batch_first=False), lambda: torch.randn(5, 3, E),
                     _tuples(lambda: torch.randn(5, 3, E), lambda x: torch.randn(5, 3, 6)),
                     (nn.MultiheadAttention, nn.Linear), loss_fn=_mse, attention=True),
    "mha_kv": Family(lambda: AttnNet(batch_first=True, kv_dim=8), lambda: torch.randn(3, 5, E),
                     _tuples(lambda: torch.randn(3, 5, E), lambda x: torch.randn(3, 5, 6)),
                     (nn.MultiheadAttention, nn.Linear), loss_fn=_mse, attention=True),
    "embedding": Family(_embedding, lambda: torch.randint(0, 50, (3, 7)),
                        _tuples(lambda: torch.randint(0, 50, (3, 7)), lambda x: torch.randint(0, 6, (3, 7))),
                        (nn.Embedding, nn.Linear), base={"module_types": ["Embedding", "Linear"]}),
    "bert": Family(_bert, lambda: {"input_ids": _ids()},
                   lambda: [{"input_ids": _ids(), "labels": torch.randint(0, 2, (2,))} for _ in range(2)],
                   (nn.Linear,), attention=True,
                   per_pattern={"block:3x5": {"exclude": ["classifier"]}}),  # 2 x 16: smaller than a block
    # lm_head shares its weight with the token embedding; see test_gpt2_tied_lm_head_*
    "gpt2": Family(_gpt2, lambda: {"input_ids": _ids()},
                   lambda: [{"input_ids": (i := _ids()), "labels": i} for _ in range(2)],
                   (Conv1D, nn.Linear), attention=True, base={"exclude": ["lm_head"]}),
}
ATTENTION = [n for n, f in FAMILIES.items() if f.attention]
PATTERNS = ["unstructured", "block:3x5", "2:4", "channel", "head"]
FAMILY_PATTERNS = [(f, p) for f in FAMILIES for p in PATTERNS if p != "head" or FAMILIES[f].attention]


def config_for(family: str, pattern: str, **kwargs: Any) -> sn.SparsityConfig:
    fam = FAMILIES[family]
    args = {"sparsity": SPARSITY, "pattern": pattern, **fam.base}
    for key, value in fam.per_pattern.get(pattern, {}).items():
        args[key] = args.get(key, []) + value if key == "exclude" else value
    args.update(kwargs)
    return sn.SparsityConfig(**args)


def build(family: str, mode: str = "eval") -> nn.Module:
    model = FAMILIES[family].build()
    return model.eval() if mode == "eval" else model.train()


def forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


# ---- reading masks and layouts -------------------------------------------------------------------


def read_masks(model: nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    """{(module name, tensor name): bool mask}, straight from the parametrizations."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                masks = [p for p in plist if isinstance(p, Mask)]
                assert len(masks) == 1
                out[(name, tensor_name)] = masks[0].mask.clone()
    return out


def mask_objects(model: nn.Module) -> dict[tuple[str, str], Mask]:
    return {(n, t): pl[0] for n, m in model.named_modules() if parametrize.is_parametrized(m)
            for t, pl in m.parametrizations.items()}


def masked_reference(ref: nn.Module, masks: dict) -> nn.Module:
    """A dense copy (taken before sparsifying) with its weights multiplied by the masks."""
    with torch.no_grad():
        for (name, tensor_name), mask in masks.items():
            getattr(ref.get_submodule(name), tensor_name).mul_(mask)
    return ref


def gemm(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """out x in view: HF Conv1D stores in x out; conv filters flatten to out x (in·k)."""
    return t.t() if isinstance(module, Conv1D) else t.reshape(t.shape[0], -1)


def weight_names(module: nn.Module) -> list[str]:
    if isinstance(module, nn.MultiheadAttention):
        return ["in_proj_weight"] if module.in_proj_weight is not None else \
            ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return ["weight"]


def bias_name(module: nn.Module) -> str:
    return "in_proj_bias" if isinstance(module, nn.MultiheadAttention) else "bias"


def _excluded(name: str, exclude: list[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


def expected_layers(family: str, model: nn.Module, config: sn.SparsityConfig) -> set[str]:
    return {n for n, m in model.named_modules()
            if n and isinstance(m, FAMILIES[family].types) and not _excluded(n, config.exclude)}


def _one(h: int) -> list[int]:
    return list(range(h * HD, (h + 1) * HD))


def _qkv(h: int) -> list[int]:
    return [s * E + i for s in range(3) for i in _one(h)]


def attention_parts(model: nn.Module) -> list[list[tuple[nn.Module, str, int, Callable]]]:
    """Per attention module: (module, tensor, dim, head -> indices along dim), in storage layout."""
    out = []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            if module.in_proj_weight is not None:
                parts = [(module, "in_proj_weight", 0, _qkv)]
            else:
                parts = [(module, f"{p}_proj_weight", 0, _one) for p in "qkv"]
            out.append(parts + [(module, "in_proj_bias", 0, _qkv), (module.out_proj, "weight", 1, _one)])
        elif type(module).__name__ == "BertAttention":
            parts = []
            for proj in (module.self.query, module.self.key, module.self.value):
                parts += [(proj, "weight", 0, _one), (proj, "bias", 0, _one)]
            out.append(parts + [(module.output.dense, "weight", 1, _one)])  # Linear: out x in
        elif type(module).__name__ == "GPT2Attention":
            # Conv1D weights are in x out: c_attn's q|k|v are column blocks, c_proj's heads are rows
            out.append([(module.c_attn, "weight", 1, _qkv), (module.c_attn, "bias", 0, _qkv),
                        (module.c_proj, "weight", 0, _one)])
    assert out
    return out


# ---- checks ---------------------------------------------------------------------------------------


def outputs(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The forward output under no_grad, with every parameter frozen meanwhile.

    Under no_grad a masked weight (original * mask) doesn't require grad while a plain
    parameter does, and nn.MultiheadAttention picks its attention kernel by that, which moves
    the last bit; freezing makes masked and plain models take the same kernel, so outputs can
    be compared exactly."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.no_grad():
            return forward(model, inputs)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def assert_same_forward(model: nn.Module, ref: nn.Module, inputs: Any) -> None:
    torch.testing.assert_close(outputs(model, inputs), outputs(ref, inputs), rtol=0, atol=0)


def assert_masks_bite(model: nn.Module, masks: dict, inputs: Any) -> None:
    """Masked entries read as exactly zero and get exactly zero gradient on the stored original."""
    model.zero_grad(set_to_none=True)
    out = forward(model, inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    some_grad = False
    for (name, tensor_name), mask in masks.items():
        module = model.get_submodule(name)
        assert 0 < int(mask.sum()) < mask.numel(), (name, tensor_name)  # something pruned, something kept
        assert torch.count_nonzero(getattr(module, tensor_name)[~mask]) == 0, (name, tensor_name)
        grad = module.parametrizations[tensor_name].original.grad
        assert grad is not None, (name, tensor_name)
        assert torch.count_nonzero(grad[~mask]) == 0, (name, tensor_name)
        some_grad |= bool(grad[mask].abs().sum() > 0)
    assert some_grad
    model.zero_grad(set_to_none=True)


def assert_heads(model: nn.Module, masks: dict) -> None:
    names = {m: n for n, m in model.named_modules()}
    parts_all = attention_parts(model)
    assert set(masks) == {(names[m], t) for parts in parts_all for m, t, _, _ in parts}
    for parts in parts_all:
        pruned = 0
        for h in range(H):
            states = set()
            for module, tensor_name, dim, index in parts:
                idx = torch.tensor(index(h))
                mask = masks[(names[module], tensor_name)].index_select(dim, idx)
                value = getattr(module, tensor_name).detach().index_select(dim, idx)
                assert mask.all() or not mask.any(), (names[module], tensor_name, h)
                states.add(bool(mask.any()))
                if not mask.any():
                    assert torch.count_nonzero(value) == 0
            assert len(states) == 1, f"head {h} of {names[parts[0][0]]} is only partly pruned"
            pruned += not states.pop()
        assert abs(pruned - round(SPARSITY * H)) <= 1
        assert 0 < pruned < H


def assert_structure(family: str, model: nn.Module, config: sn.SparsityConfig, pattern: str, masks: dict) -> None:
    if pattern == "head":
        assert_heads(model, masks)
        return
    layers = expected_layers(family, model, config)
    weights = {(n, t) for n in layers for t in weight_names(model.get_submodule(n))}
    # channel units also mask the BatchNorm after a conv (its scale and shift), so that the channel is 0
    norms = {k for k in masks if isinstance(model.get_submodule(k[0]), nn.modules.batchnorm._BatchNorm)}
    assert {k for k in masks if "bias" not in k[1]} - norms == weights
    assert not norms or pattern == "channel"
    overrides = {g: o.get("pattern") for g, o in config.overrides.items()}
    for name in layers:
        module = model.get_submodule(name)
        own = str(overrides.get(name) or pattern)
        ms = [gemm(module, masks[(name, t)]) for t in weight_names(module)]
        for t in weight_names(module):
            assert mask_objects(model)[(name, t)].pattern == own
        total = sum(m.numel() for m in ms)
        pruned = sum(int((~m).sum()) for m in ms)
        if own == "unstructured":
            tolerance = 1
        elif own == "2:4":
            for m in ms:
                kept = m.reshape(m.shape[0], -1, 4).sum(-1)
                assert (kept == 2).all(), name
            tolerance = 0
        elif own.startswith("block:"):
            r, c = 3, 5
            for m in ms:
                for i in range(0, m.shape[0], r):
                    for j in range(0, m.shape[1], c):
                        tile = m[i:i + r, j:j + c]
                        assert tile.all() or not tile.any(), (name, i, j)
            tolerance = r * c
        else:
            assert own == "channel"
            rows = torch.cat([m.all(1) for m in ms])
            assert torch.equal(rows, torch.cat([m.any(1) for m in ms])), f"{name}: partial rows"
            tolerance = max(m.shape[1] for m in ms)
            if (name, bias_name(module)) in masks:
                assert torch.equal(masks[(name, bias_name(module))], rows)
        if own != "channel":
            assert (name, bias_name(module)) not in masks  # only whole-output patterns take biases
        assert abs(pruned - SPARSITY * total) <= tolerance, (name, pruned, total)


def sparsify_and_check(family: str, pattern: str, mode: str = "eval", data=None, **kwargs: Any) -> tuple:
    model = build(family, mode)
    ref = copy.deepcopy(model)
    config = config_for(family, pattern, **kwargs)
    assert sn.sparsify_(model, config, data=data, loss_fn=FAMILIES[family].loss_fn if data else None) is model
    masks = read_masks(model)
    assert_structure(family, model, config, pattern, masks)
    model.eval()
    masked_reference(ref, masks).eval()
    inputs = FAMILIES[family].inputs()
    assert_same_forward(model, ref, inputs)
    assert_masks_bite(model, masks, inputs)
    return model, masks


# ---- 1/2: every family x every pattern ------------------------------------------------------------


@pytest.mark.parametrize("family,pattern", FAMILY_PATTERNS)
def test_pattern_masks_are_exact_and_structured(family, pattern):
    sparsify_and_check(family, pattern)


@pytest.mark.parametrize("family", [
    "mlp", "conv1d", "conv2d", "mha_bf", "embedding", "bert", "gpt2",
    "mha_kv",
])
def test_channel_pruned_outputs_lose_their_bias(family):
    model, masks = sparsify_and_check(family, "channel")
    checked = 0
    for name, module in model.named_modules():
        bias = getattr(module, bias_name(module), None) if name else None
        if (name, weight_names(module)[0]) not in masks or bias is None:
            continue
        rows = torch.cat([gemm(module, masks[(name, t)]).any(1) for t in weight_names(module)])
        assert rows.shape == bias.shape
        assert torch.count_nonzero(bias.detach()[~rows]) == 0, f"{name}: pruned outputs keep their bias"
        checked += 1
    assert checked


def test_block_larger_than_a_layer_needs_excluding():
    with pytest.raises(ValueError, match="classifier"):
        sn.sparsify_(build("bert"), sn.SparsityConfig(sparsity=SPARSITY, pattern="block:3x5"))


def test_head_pattern_on_a_model_without_attention_is_refused():
    model = build("mlp")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="attention"):
        sn.sparsify_(model, sn.SparsityConfig(sparsity=SPARSITY, pattern="head"))
    assert not read_masks(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- 2/5: data-driven criteria, and no side effects on the user's model ---------------------------

CRITERION_CASES = [
    ("bert", "snip", "unstructured", "train"),
    ("bert", "taylor", "channel", "eval"),
    ("bert", "wanda", "unstructured", "train"),
    ("bert", "grasp", "head", "train"),
    ("gpt2", "snip", "head", "train"),
    ("gpt2", "taylor", "2:4", "eval"),
    ("gpt2", "wanda", "block:3x5", "train"),
    ("gpt2", "grasp", "unstructured", "train"),
    ("mha_bf", "snip", "head", "train"),
    ("mha_sf", "taylor", "unstructured", "train"),
    ("mha_kv", "grasp", "head", "eval"),
    ("mha_sf", "grasp", "2:4", "train"),
    ("conv2d", "snip", "channel", "train"),
    ("conv2d", "synflow", "block:3x5", "train"),
    ("conv1d", "wanda", "unstructured", "train"),
    ("conv1d", "taylor", "2:4", "train"),
    ("embedding", "wanda", "unstructured", "train"),
    ("mlp", "grasp", "unstructured", "train"),
]


def _state(model: nn.Module) -> dict:
    return {
        "modes": {n: m.training for n, m in model.named_modules()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "rng": torch.get_rng_state(),
    }


def _after_name(model: nn.Module, name: str) -> str:
    module_name, _, tensor_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    if parametrize.is_parametrized(module, tensor_name):
        return f"{module_name}.parametrizations.{tensor_name}.original"
    return name


@pytest.mark.parametrize("family,criterion,pattern,mode", CRITERION_CASES)
def test_data_driven_criteria_touch_nothing_but_the_masks(family, criterion, pattern, mode):
    fam = FAMILIES[family]
    model = build(family, mode)
    if mode == "train":
        list(model.modules())[2].eval()  # a mixed train/eval state must survive too
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    ref = copy.deepcopy(model)
    data = fam.data()
    before = _state(model)
    config = config_for(family, pattern, criterion=criterion, rounds=3 if criterion == "synflow" else None)
    sn.sparsify_(model, config, data=data, loss_fn=fam.loss_fn)

    assert torch.equal(torch.get_rng_state(), before["rng"])
    after_modes = {n: m.training for n, m in model.named_modules()}
    assert {n: after_modes[n] for n in before["modes"]} == before["modes"]
    buffers = dict(model.named_buffers())
    for name, value in before["buffers"].items():  # BatchNorm running stats, position ids, ...
        assert torch.equal(buffers[name], value), name
    masks = read_masks(model)
    params = dict(model.named_parameters())
    for name, value in before["params"].items():
        new = params[_after_name(model, name)]
        assert torch.equal(new.grad, before["grads"][name]), f"{name}: .grad changed"
        module_name, _, tensor_name = name.rpartition(".")
        mask = masks.get((module_name, tensor_name))
        assert torch.equal(new.detach(), value if mask is None else value * mask), name

    assert_structure(family, model, config, pattern, masks)
    model.eval()
    masked_reference(ref, masks).eval()
    inputs = fam.inputs()
    assert_same_forward(model, ref, inputs)
    assert_masks_bite(model, masks, inputs)


def test_data_driven_scores_follow_the_data():
    """snip on BERT must actually use the batches: other data, other masks; same data, same masks."""
    model = build("bert", "train")
    data = FAMILIES["bert"].data()
    runs = []
    for batches in (data, data, FAMILIES["bert"].data()):
        m = copy.deepcopy(model)
        sn.sparsify_(m, sn.SparsityConfig(sparsity=SPARSITY, criterion="snip"), data=batches)
        runs.append(read_masks(m))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("pattern", ["unstructured", "head"])
def test_wanda_on_multihead_attention(pattern):
    sparsify_and_check("mha_bf", pattern, data=FAMILIES["mha_bf"].data(), criterion="wanda")


# ---- 3: state_dict, deepcopy, pickle, torch.save --------------------------------------------------


@pytest.mark.parametrize("family,pattern", [
    ("mlp", "unstructured"), ("conv2d", "channel"), ("conv1d", "block:3x5"), ("mha_bf", "head"),
    ("mha_kv", "2:4"), ("embedding", "unstructured"), ("bert", "head"), ("gpt2", "unstructured"),
    ("gpt2", "head"),
])
def test_state_dict_round_trip_carries_masks(family, pattern):
    a = build(family)
    sn.sparsify_(a, config_for(family, pattern))
    b = build(family)  # other initial weights
    sn.sparsify_(b, config_for(family, pattern, criterion="random", seed=1))
    masks_a, masks_b = read_masks(a), read_masks(b)
    assert masks_a.keys() == masks_b.keys()
    assert any(not torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    state = a.state_dict()
    assert any(k.endswith("parametrizations.weight.original") for k in state)
    assert any(k.endswith(".0.mask") for k in state)

    b.load_state_dict(state)
    masks_b = read_masks(b)
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    inputs = FAMILIES[family].inputs()
    assert_same_forward(b, a, inputs)
    assert_masks_bite(b, masks_b, inputs)


def _round_trip(method: str, model: nn.Module, path) -> nn.Module:
    if method == "deepcopy":
        return copy.deepcopy(model)
    if method == "pickle":
        return pickle.loads(pickle.dumps(model))
    torch.save(model, path)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("method", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("family,pattern", [("mlp", "block:3x5"), ("mha_bf", "unstructured"),
                                            ("mha_kv", "head"), ("gpt2", "2:4"), ("gpt2", "head")])
def test_copies_keep_outputs_and_masks(method, family, pattern, tmp_path):
    model = build(family)
    sn.sparsify_(model, config_for(family, pattern))
    masks = read_masks(model)
    clone = _round_trip(method, _round_trip(method, model, tmp_path / "a.pt"), tmp_path / "b.pt")

    assert clone is not model
    clone_masks = read_masks(clone)
    assert clone_masks.keys() == masks.keys()
    assert all(torch.equal(clone_masks[k], masks[k]) for k in masks)
    inputs = FAMILIES[family].inputs()
    assert_same_forward(clone, model, inputs)
    assert_masks_bite(clone, clone_masks, inputs)
    if family == "gpt2":
        assert clone.lm_head.weight is clone.transformer.wte.weight  # tying survives
    # the clone is independent, and still masks whatever its originals become
    before = outputs(model, inputs)
    with torch.no_grad():
        for name, tensor_name in masks:
            clone.get_submodule(name).parametrizations[tensor_name].original.add_(1.0)
    for (name, tensor_name), mask in masks.items():
        assert torch.count_nonzero(getattr(clone.get_submodule(name), tensor_name)[~mask]) == 0
    assert torch.equal(outputs(model, inputs), before)
    # finalizing the copy must leave the original's masking machinery alone
    sn.finalize_(clone)
    assert not any(parametrize.is_parametrized(m) for m in clone.modules())
    assert read_masks(model).keys() == masks.keys()
    assert torch.equal(outputs(model, inputs), before)
    assert_masks_bite(model, read_masks(model), inputs)


# ---- 4: finalize_ -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family,pattern", [
    ("mlp", "unstructured"), ("conv2d", "channel"), ("conv1d", "2:4"), ("mha_bf", "head"),
    ("mha_sf", "block:3x5"), ("mha_kv", "2:4"), ("embedding", "block:3x5"), ("bert", "head"),
    ("bert", "unstructured"), ("gpt2", "unstructured"), ("gpt2", "head"),
])
def test_finalize_bakes_masks_into_plain_weights(family, pattern):
    model = build(family)
    dense_keys = set(model.state_dict())
    dense_classes = {n: type(m) for n, m in model.named_modules()}
    sn.sparsify_(model, config_for(family, pattern))
    masks = read_masks(model)
    inputs = FAMILIES[family].inputs()
    before = outputs(model, inputs)

    assert sn.finalize_(model) is model
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert {n: type(m) for n, m in model.named_modules()} == dense_classes
    assert set(model.state_dict()) == dense_keys
    for (name, tensor_name), mask in masks.items():
        value = getattr(model.get_submodule(name), tensor_name)
        assert isinstance(value, nn.Parameter)
        assert f"{name}.{tensor_name}" in model.state_dict()
        assert torch.count_nonzero(value.detach()[~mask]) == 0
        if "bias" not in tensor_name:  # (HF initialises biases to zero)
            assert torch.count_nonzero(value.detach()[mask]) == int(mask.sum())
    assert torch.equal(outputs(model, inputs), before)
    if family == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight


# ---- GPT-2's tied lm_head -------------------------------------------------------------------------


def test_gpt2_tied_lm_head_stays_consistent_through_training():
    """lm_head.weight *is* transformer.wte.weight. Whatever sparsify_ does with it (mask both
    uses or neither), training must not regrow masked entries and finalize_ must not change
    the outputs of the trained model."""
    model = build("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sn.sparsify_(model, sn.SparsityConfig(sparsity=SPARSITY))  # lm_head included by its type
    masks = read_masks(model)
    assert len(masks) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj in both blocks
    batch = FAMILIES["gpt2"].data()[0]
    model(**batch).loss.backward()
    for (name, tensor_name), mask in masks.items():
        grad = model.get_submodule(name).parametrizations[tensor_name].original.grad
        assert torch.count_nonzero(grad[~mask]) == 0, name
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    inputs = FAMILIES["gpt2"].inputs()
    trained = outputs(model, inputs)
    sn.finalize_(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(outputs(model, inputs), trained)


def test_gpt2_untied_lm_head_is_masked_like_any_linear():
    model = _gpt2(tie_word_embeddings=False).eval()
    assert model.lm_head.weight is not model.transformer.wte.weight
    ref = copy.deepcopy(model)
    sn.sparsify_(model, sn.SparsityConfig(sparsity=SPARSITY))
    masks = read_masks(model)
    assert ("lm_head", "weight") in masks
    inputs = FAMILIES["gpt2"].inputs()
    assert_same_forward(model, masked_reference(ref, masks), inputs)
    assert_masks_bite(model, masks, inputs)


# ---- 6: seeds -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,pattern", [("mlp", "unstructured"), ("conv2d", "block:3x5"),
                                            ("mha_kv", "channel"), ("gpt2", "head"), ("bert", "2:4")])
def test_random_criterion_follows_the_seed(family, pattern):
    model = build(family)

    def run(seed: int) -> dict:
        m = copy.deepcopy(model)
        torch.manual_seed(1000 + seed)  # the global RNG must not matter
        sn.sparsify_(m, config_for(family, pattern, criterion="random", seed=seed))
        return read_masks(m)

    first, same, other = run(3), run(3), run(4)
    assert first.keys() == same.keys() == other.keys()
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


# ---- 7: report ------------------------------------------------------------------------------------------


def _report_rows(rep: sn.Report) -> dict:
    return {r.name: r for r in rep.rows}


@pytest.mark.parametrize("family,pattern", [("mlp", "unstructured"), ("conv2d", "2:4"), ("conv1d", "channel"),
                                            ("mha_kv", "unstructured"), ("gpt2", "block:3x5")])
def test_report_counts_masks_and_flops(family, pattern):
    fam = FAMILIES[family]
    model = build(family)
    config = config_for(family, pattern)
    sn.sparsify_(model, config)
    masks = read_masks(model)
    layers = expected_layers(family, model, config)
    batch = fam.data()[0]
    inputs = batch if isinstance(batch, dict) else batch[0]
    per_sample = inputs["input_ids"].shape[1] if isinstance(inputs, dict) else (
        inputs.shape[1] if inputs.dim() == 3 and family.startswith("mha") else 1)

    plain, with_data = sn.report(model), sn.report(model, [batch])
    rows, rows_data = _report_rows(plain), _report_rows(with_data)
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, fam.types):
            continue
        for tensor_name in weight_names(module):
            key = name if tensor_name == "weight" else f"{name}.{tensor_name}"
            row = rows[key]
            weight = getattr(module, tensor_name)
            mask = masks.get((name, tensor_name))
            nonzeros = weight.numel() if mask is None else int(mask.sum())
            assert row.numel == weight.numel()
            assert row.nonzeros == nonzeros
            assert row.density == pytest.approx(nonzeros / weight.numel())
            assert row.shape == (tuple(weight.t().shape) if isinstance(module, Conv1D) else tuple(weight.shape))
            assert row.pattern == ("dense" if mask is None else pattern)
            assert (mask is not None) == (name in layers)
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                assert row.dense_flops is None and row.sparse_flops is None
                uses = fam.positions[name]
            else:
                assert row.dense_flops == 2 * weight.numel()
                assert row.sparse_flops == 2 * nonzeros
                uses = per_sample
            if not name.endswith("out_proj"):  # see test_report_with_data_counts_mha_out_proj
                assert rows_data[key].dense_flops == 2 * weight.numel() * uses, key
                assert rows_data[key].sparse_flops == 2 * nonzeros * uses, key
            checked += 1
    assert checked >= 3
    assert plain.nonzeros == sum(r.nonzeros for r in plain.rows if r.tied_to is None)  # a tied weight counts once
    if family == "gpt2":  # lm_head is the token embedding
        assert rows["lm_head"].tied_to == "transformer.wte"
        assert plain.numel == sum(r.numel for r in plain.rows) - rows["lm_head"].numel
    assert plain.density == pytest.approx(plain.nonzeros / plain.numel)
    assert 0 < plain.sparsity < 1
    for rep in (plain, with_data):
        data = json.loads(json.dumps(rep.to_dict()))
        assert [layer["name"] for layer in data["layers"]] == [r.name for r in rep.rows]
        assert data["total"]["nonzeros"] == rep.nonzeros
    for rep in (plain, with_data):  # totals are None as soon as one layer's FLOPs are unknown
        total = rep.to_dict()["total"]["dense_flops"]
        unknown = any(r.dense_flops is None for r in rep.rows)
        assert total is None if unknown else total == sum(r.dense_flops for r in rep.rows)
    assert (plain.to_dict()["total"]["dense_flops"] is None) == bool(fam.positions) or family == "gpt2"
    if family in ("mlp", "conv2d", "conv1d"):
        assert with_data.to_dict()["total"]["sparse_flops"] == sum(r.sparse_flops for r in with_data.rows)
    for name in layers:
        assert name in str(plain) or f"{name}." in str(plain)


def test_report_with_data_leaves_batchnorm_stats_alone():
    model = build("conv2d", "train")
    sn.sparsify_(model, config_for("conv2d", "unstructured"))
    before = {n: b.clone() for n, b in model.named_buffers()}
    data = FAMILIES["conv2d"].data()
    rng = torch.get_rng_state()
    sn.report(model, data)
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


def test_report_with_data_counts_mha_out_proj():
    model = build("mha_bf")
    sn.sparsify_(model, config_for("mha_bf", "unstructured"))
    row = _report_rows(sn.report(model, FAMILIES["mha_bf"].data()))["attn.out_proj"]
    assert row.dense_flops == 2 * E * E * 5  # 5 tokens per sample
