"""PyTorch algorithms under the seed toolkit's names (see ``mslim.algorithms.pytorch.prune``)."""
