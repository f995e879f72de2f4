"""``python -m cli`` is the same as the ``nst`` command."""

import sys

from .main import main

sys.exit(main())
