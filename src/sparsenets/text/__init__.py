"""Text: a pinned corpus that ships with the package, perplexity, and a small built-in causal LM."""

from .calibration import calibration_batches
from .corpus import corpus_info, corpus_text, domain_text
from .lm import LMConfig, builtin_lm, fine_tune, save_builtin_lm, train_lm, untrained_lm
from .perplexity import perplexity
from .tokenizer import byte_tokenizer, encode

__all__ = ["LMConfig", "builtin_lm", "byte_tokenizer", "calibration_batches", "corpus_info", "corpus_text",
           "domain_text", "encode", "fine_tune", "perplexity", "save_builtin_lm", "train_lm", "untrained_lm"]
