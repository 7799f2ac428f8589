"""Compression: a masked model made smaller (shrinking) and faster (sparse kernels); see :mod:`.pipeline`."""

from .choose import LayerChoice
from .pipeline import CompressReport, compress

__all__ = ["CompressReport", "LayerChoice", "compress"]
