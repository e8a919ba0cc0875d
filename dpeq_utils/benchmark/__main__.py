"""``python -m dpeq_utils.benchmark``: an alias of ``python -m dpeq_utils benchmark``."""

import sys

from .cli import main

sys.exit(main())
