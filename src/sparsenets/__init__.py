"""sparsenets: find, train and run sparse neural networks on PyTorch."""

from .config import SparsityConfig
from .masking import finalize_
from .patterns import NM, Block, Channel, Head, Pattern, Unstructured
from .report import Report, report
from .sparsify import sparsify_

__all__ = [
    "NM", "Block", "Channel", "Head", "Pattern", "Report", "SparsityConfig", "Unstructured",
    "finalize_", "report", "sparsify_",
]
__version__ = "0.1.0"
