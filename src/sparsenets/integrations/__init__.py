"""Bridges to other training stacks, one module each; importing sparsenets imports none of their libraries.

- :mod:`.distributed`: collectives that keep sparsity decisions identical on every rank;
- :mod:`.huggingface`: ``SparsityCallback`` for ``transformers.Trainer``, and ``save_pretrained`` /
  ``restore_masks`` for checkpoints that plain ``from_pretrained`` loads;
- :mod:`.lightning`: ``SparsityCallback`` for ``lightning.pytorch.Trainer``.
"""
