"""Pruning algorithms under the seed toolkit's names: ``Resrep_pruner`` (ResRep's seed API)."""
