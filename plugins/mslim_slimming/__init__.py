"""Network slimming (Liu et al., 2017): L1 on BN scales while training, prune by |gamma|."""
