"""Channel-importance criteria (L1, L2, BN scale, Taylor, FPGM, random) as an mslim plugin."""
