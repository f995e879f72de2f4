"""``python -m engine`` is the same as the ``nst`` command."""

import sys

from .cli import main

sys.exit(main())
