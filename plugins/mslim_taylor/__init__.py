"""Iterative first-order Taylor pruning (Molchanov et al., 2019)."""
