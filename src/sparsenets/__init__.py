"""sparsenets: find, train and run sparse neural networks on PyTorch."""

from .compression import compress
from .config import SparsityConfig
from .io import load, save
from .masking import finalize_
from .methods import GradualMagnitudePruning, LotteryTicket, OneShot
from .patterns import NM, Block, Channel, Head, Pattern, Unstructured
from .report import Report, report
from .sparsify import sparsify_

__all__ = [
    "NM", "Block", "Channel", "Head", "Pattern", "Report", "SparsityConfig", "Unstructured",
    "compress", "finalize_", "load", "report", "save", "sparsify_",
    "GradualMagnitudePruning", "LotteryTicket", "OneShot",
]
__version__ = "0.1.0"
