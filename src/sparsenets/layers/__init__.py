"""Layers that run sparse weights fast: block-sparse on CPU (and CUDA via Triton), CSR, 2:4 on GPU."""

from .block_sparse import BlockSparseConv1d, BlockSparseConv2d, BlockSparseLinear
from .csr import CSRLinear
from .nm import NMSparseLinear
from .semi_structured import SemiStructuredLinear, semi_structured_supported
from .sparse_drop import SparseDrop, sparse_drop_
from .topk import TopK

__all__ = ["BlockSparseConv1d", "BlockSparseConv2d", "BlockSparseLinear", "CSRLinear", "NMSparseLinear",
           "SemiStructuredLinear", "SparseDrop", "TopK", "semi_structured_supported", "sparse_drop_"]
