"""The ``mslim`` command line: one module per verb, assembled in ``main``."""

from mslim.cli.main import main

__all__ = ["main"]
