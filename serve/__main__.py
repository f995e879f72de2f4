"""``python -m serve``: ``nst serve`` without the ``nst`` entry point (the tests start servers this way)."""

import sys

from .command import main

sys.exit(main())
