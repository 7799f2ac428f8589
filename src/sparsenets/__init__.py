"""sparsenets: find, train and run sparse neural networks on PyTorch."""

from ._version import __version__
from .activations import activation_density
from .compression import compress
from .compression.experts import prune_experts_
from .config import SparsityConfig
from .errors import CheckpointError, ConfigError, PatternError, RecipeError, RunDirError, SparsenetsError
from .formats.factorize import FactorizeConfig, factorize_
from .formats.more import MoReConfig, add_more_, merge_more_
from .io import load, save
from .layers.sparse_drop import sparse_drop_
from .masking import finalize_
from .methods import (
                      SET,
                      SRSTE,
                      BlockReweighted,
                      EdgePopup,
                      GradualMagnitudePruning,
                      LotteryTicket,
                      Method,
                      OneShot,
                      ProgressiveNM,
                      RigL,
                      StaticSparse,
                      edge_popup_,
                      finalize_edge_popup_,
                      lottery_jackpot_,
)
from .patterns import NM, Block, Channel, Head, Pattern, Unstructured, register_pattern
from .quant import QuantConfig, quantize_
from .report import Report, report
from .sparsify import sparsify_

__all__ = [
    "__version__",
    # core
    "SparsityConfig", "sparsify_", "finalize_", "report", "Report", "compress", "save", "load",
    "activation_density", "sparse_drop_", "prune_experts_",
    # structured matrices
    "FactorizeConfig", "factorize_", "MoReConfig", "add_more_", "merge_more_",
    # quantization
    "QuantConfig", "quantize_",
    # patterns
    "Pattern", "Unstructured", "Block", "NM", "Channel", "Head", "register_pattern",
    # methods
    "Method", "OneShot", "GradualMagnitudePruning", "LotteryTicket", "StaticSparse", "SET", "RigL",
    "BlockReweighted", "SRSTE", "ProgressiveNM", "EdgePopup", "edge_popup_", "finalize_edge_popup_",
    "lottery_jackpot_",
    # errors
    "SparsenetsError", "ConfigError", "PatternError", "CheckpointError", "RunDirError", "RecipeError",
]
