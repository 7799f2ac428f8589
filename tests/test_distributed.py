"""Every method under DDP: two CPU ranks on gloo, each with its own data and its own initial weights,
end training with identical masks and weights.

The ranks run as two subprocesses of this file (``python test_distributed.py RANK PORT OUT``); each
trains every scenario in turn and saves its model's state_dict, and the tests compare the files.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsenets as sn
from sparsenets.integrations import distributed

STEPS = 40
WORLD = 2


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def rank_data(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(8, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator))
            for _ in range(4)]


# ---- scenarios: (build the method, options) ---------------------------------------------------------

def _gradual(criterion: str) -> Callable:
    return lambda model, data: sn.GradualMagnitudePruning(
        model, {"sparsity": 0.8, "criterion": criterion}, data, start=5, end=25, frequency=5)


SCENARIOS: dict[str, Callable] = {
    **{f"gradual_{c}": _gradual(c) for c in ("magnitude", "snip", "taylor", "grasp", "wanda", "random")},
    "oneshot_wanda": lambda model, data: sn.OneShot(model, {"sparsity": 0.5, "criterion": "wanda"}, data, at_step=10),
    "oneshot_snip_block": lambda model, data: sn.OneShot(
        model, {"sparsity": 0.5, "criterion": "snip", "pattern": "block:4x4"}, data, at_step=0),
    "lottery": lambda model, data: sn.LotteryTicket(model, {"sparsity": 0.6}, data, rewind_step=0),
    "lottery_late": lambda model, data: sn.LotteryTicket(model, {"sparsity": 0.6, "criterion": "snip"}, data,
                                                         rewind_step=3),
    "static_magnitude": lambda model, data: sn.StaticSparse(model, {"sparsity": 0.8}),
    "set": lambda model, data: sn.SET(model, {"sparsity": 0.8, "criterion": "random", "allocation": "erk"},
                                      update_every=5),
    "rigl": lambda model, data: sn.RigL(model, {"sparsity": 0.8, "criterion": "random", "allocation": "erk"},
                                        update_every=5, end_step=35),
    "rigl_block": lambda model, data: sn.RigL(model, {"sparsity": 0.75, "pattern": "block:4x4"},
                                              update_every=5, drop_fraction=0.5),
    "srste": lambda model, data: sn.SRSTE(model, {"pattern": "2:4"}, decay=1e-2),
    "pgf": lambda model, data: sn.ProgressiveNM(model, {"pattern": "1:4"}, total_steps=STEPS, structure=[3, 2, 1]),
    "blkrew": lambda model, data: sn.BlockReweighted(model, {"sparsity": 0.5, "pattern": "block:4x1"},
                                                     strength=1e-2, refresh_every=5, prune_at=20),
    "edgepopup": lambda model, data: sn.EdgePopup(model, {"sparsity": 0.5}),
    # the same RigL with the library's collectives switched off: what it did before they existed
    "rigl_unreduced": lambda model, data: sn.RigL(model, {"sparsity": 0.8, "criterion": "random"}, update_every=5),
}
PRUNES = [name for name in SCENARIOS if name != "edgepopup"]
# DDP's buffer broadcast would copy rank 0's masks over each forward; these run without it
NO_BUFFER_SYNC = {"static_magnitude", "set", "srste", "pgf", "rigl_unreduced"}


def train(name: str, rank: int) -> nn.Module:
    torch.manual_seed(100 + rank)  # each rank starts from its own weights: DDP and the method must agree
    model, data = mlp(), rank_data(rank)
    method = SCENARIOS[name](model, data)
    wrapped = DDP(model, broadcast_buffers=name not in NO_BUFFER_SYNC)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    method.on_train_begin(model, optimizer)
    fit(wrapped, method, optimizer, data, range(1, STEPS + 1))
    if isinstance(method, sn.LotteryTicket):
        method.next_level()
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
        fit(wrapped, method, optimizer, data, range(method.rewind_step + 1, method.rewind_step + 11))
    return model


def fit(wrapped: nn.Module, method, optimizer, data: list, steps: range) -> None:
    for step in steps:
        x, y = data[step % len(data)]
        loss = F.cross_entropy(wrapped(x), y)
        optimizer.zero_grad()
        loss.backward()
        method.before_optimizer_step(step)
        optimizer.step()
        method.step(step)


# ---- FSDP: sharded parameters, masks whole on every rank -------------------------------------------------

FSDP_SCENARIOS: dict[str, Callable] = {
    "fsdp_static": lambda model: sn.StaticSparse(model, {"sparsity": 0.8}),
    "fsdp_gradual": lambda model: sn.GradualMagnitudePruning(model, {"sparsity": 0.8}, start=5, end=25, frequency=5),
    "fsdp_rigl": lambda model: sn.RigL(model, {"sparsity": 0.8, "criterion": "random"}, update_every=5),
}


def train_sharded(name: str, rank: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(100 + rank)
    model, data = mlp(), rank_data(rank)
    method = FSDP_SCENARIOS[name](model)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    # no momentum: a pruned weight then stays exactly zero, which shows each shard took its own slice of the mask
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method.on_train_begin(model, optimizer)
    fit(model, method, optimizer, data, range(1, STEPS + 1))
    return {k: distributed.full(v).detach().clone() for k, v in model.state_dict().items()}


def refusal(rank: int) -> str:
    """What sparsify_ says to a data-driven criterion on a sharded model."""
    model = mlp()
    fully_shard(model)
    try:
        sn.sparsify_(model, {"criterion": "snip"}, rank_data(rank))
    except sn.ConfigError as error:
        return str(error)
    return "no error"


def worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    collectives = distributed.all_reduce_sum_, distributed.broadcast_
    for name in SCENARIOS:
        if name == "rigl_unreduced":
            distributed.all_reduce_sum_ = distributed.broadcast_ = lambda *args, **kwargs: None
        model = train(name, rank)
        distributed.all_reduce_sum_, distributed.broadcast_ = collectives
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"{name}.{rank}.pt")
    for name in FSDP_SCENARIOS:
        torch.save(train_sharded(name, rank), out / f"{name}.{rank}.pt")
    (out / f"refusal.{rank}.txt").write_text(refusal(rank))
    dist.destroy_process_group()


# ---- the tests: run both ranks once, compare what they saved --------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def states(tmp_path_factory) -> Callable[[str], list[dict[str, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("ddp")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    logs = [rank.communicate(timeout=240)[0] for rank in ranks]

    def load(name: str) -> list[dict[str, torch.Tensor]]:
        files = [out / f"{name}.{rank}.pt" for rank in range(WORLD)]
        if not all(f.exists() for f in files):
            pytest.fail(f"scenario {name} did not finish:\n" + "\n".join(log[-3000:] for log in logs))
        return [torch.load(f) for f in files]
    load.out = out  # type: ignore[attr-defined]
    return load


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, int]:
    assert a.keys() == b.keys()
    return {k: int((a[k] != b[k]).sum()) for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "rigl_unreduced"])
def test_ranks_end_with_identical_masks_and_weights(states, name):
    rank0, rank1 = states(name)
    assert differing(rank0, rank1) == {}
    masks = [v for k, v in rank0.items() if k.endswith(".mask")]
    if name in PRUNES:  # training really ran sparse
        assert masks and any(not bool(m.all()) for m in masks)
    assert any(k.endswith(".original") for k in rank0)


def test_without_the_collectives_rigl_ranks_drift_apart(states):
    rank0, rank1 = states("rigl_unreduced")
    assert any(k.endswith(".mask") for k in differing(rank0, rank1))


@pytest.mark.parametrize("name", FSDP_SCENARIOS)
def test_sharded_training_keeps_masks_identical_and_pruned_weights_zero(states, name):
    rank0, rank1 = states(name)
    assert differing(rank0, rank1) == {}
    masks = {k.removesuffix(".0.mask"): v for k, v in rank0.items() if k.endswith(".0.mask")}
    assert len(masks) == 3
    for key, mask in masks.items():
        assert mask.float().mean() == pytest.approx(0.2, abs=0.02)
        assert not rank0[f"{key}.original"][~mask].any()


def test_sharded_model_refuses_criteria_that_run_a_copy(states):
    states("fsdp_static")  # the ranks have run
    message = (states.out / "refusal.0.txt").read_text()
    assert "'snip'" in message and "fully_shard" in message


# ---- fast mode: block-sparse layers whose layouts every rank rewires alike --------------------------------

FAST_CONFIG = {"sparsity": 0.75, "pattern": "block:4x4", "allocation": "uniform"}
SCENARIOS["rigl_fast"] = lambda model, data: sn.RigL(model, FAST_CONFIG, update_every=5, drop_fraction=0.5,
                                                     mode="fast")
NO_BUFFER_SYNC.add("rigl_fast")  # the layouts must agree by themselves, not because DDP copies rank 0's buffers


def test_fast_rigl_ranks_end_with_identical_block_layouts_and_values(states):
    rank0, rank1 = states("rigl_fast")
    assert differing(rank0, rank1) == {}  # values, biases, row_ptr and col_idx of every layer
    layers = sorted(k.removesuffix(".col_idx") for k in rank0 if k.endswith(".col_idx"))
    assert layers == ["0", "2", "4"]
    assert not any(k.endswith((".mask", ".original")) for k in rank0)  # trained block-sparse, not masked
    for name in layers:
        assert rank0[f"{name}.values"].shape[0] == rank0[f"{name}.col_idx"].numel() == rank0[f"{name}.row_ptr"][-1]
    # the updates moved blocks: rank 0's starting layout (every rank's) is not the final one
    torch.manual_seed(100)
    start = mlp()
    SCENARIOS["rigl_fast"](start, rank_data(0))
    initial = start.state_dict()
    assert all(initial[f"{name}.col_idx"].numel() == rank0[f"{name}.col_idx"].numel() for name in layers)
    assert any(not torch.equal(initial[f"{name}.col_idx"], rank0[f"{name}.col_idx"]) for name in layers)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
