"""``python -m neumann_repro``: the ``neumann-repro`` command."""

import sys

from .cli import main

sys.exit(main())
