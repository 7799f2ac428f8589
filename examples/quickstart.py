"""Sparsify an MLP to 90% with 4×4 blocks and ERK allocation, then print its report."""

import torch
from torch import nn

import sparsenets as sn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
config = sn.SparsityConfig(pattern="block:4x4", sparsity=0.9, criterion="magnitude", allocation="erk")
sn.sparsify_(model, config)
print(sn.report(model))
