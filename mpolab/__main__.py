"""``python -m mpolab``: the same command as the ``mpolab`` console script."""

import sys

from .cli import main

sys.exit(main())
