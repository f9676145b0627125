"""mslim-linf: ranks channels by the largest absolute weight of each filter."""
