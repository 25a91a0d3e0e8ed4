"""``python -m frod_kernels``: the same as the ``frod-kernels`` command."""

import sys

from .cli import main

sys.exit(main())
