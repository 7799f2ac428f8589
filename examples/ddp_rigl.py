"""RigL under DistributedDataParallel on two CPU processes (gloo), each rank with its own data.

    python examples/ddp_rigl.py

The method is built before wrapping, the optimizer after; nothing else is distributed-specific.
Each rank prints its density and a checksum of its masks: they agree.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparsenets as sn
from sparsenets.masking import masks


def train(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights everywhere; DDP would broadcast rank 0's anyway
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    method = sn.RigL(model, {"sparsity": 0.9, "criterion": "random", "allocation": "erk"},
                     update_every=10, end_step=30)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    method.on_train_begin(model, optimizer)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    for step in range(1, 41):
        x, y = torch.randn(64, 32, generator=data), torch.randint(0, 10, (64,), generator=data)
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        method.before_optimizer_step(step)
        optimizer.step()
        method.step(step)
    checksum = sum(int(m.mask.nonzero().sum()) for *_, m in masks(model))
    print(f"rank {rank}: density {sn.report(model).density:.3f}, mask checksum {checksum}, "
          f"rewired {sum(sum(u['moved'].values()) for u in method.updates)} weights")
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    mp.spawn(train, args=(2, free_port), nprocs=2)
