"""``python -m mslim``: the same as the ``mslim`` command."""

import sys

from mslim.cli import main

sys.exit(main())
