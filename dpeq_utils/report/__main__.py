"""``python -m dpeq_utils.report``: an alias of ``python -m dpeq_utils report``."""

import sys

from .readme import main

sys.exit(main())
