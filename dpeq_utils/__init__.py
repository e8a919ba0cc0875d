"""dpeq_utils: the package behind the dpeq notebooks.

Everything that does work lives here (data, models, privacy accounting, DP-SGD training, run
records); the notebooks only narrate, set parameters and plot. See ``README.md``.
"""

__version__ = "0.1.0"

# the code this process runs, read now, before anything can edit it (dpeq_utils.provenance)
from . import provenance  # noqa: E402,F401
