"""One-shot magnitude pruning (Li et al., 2017), generalised to any importance criterion."""
