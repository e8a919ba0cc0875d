"""The first thing to run on a GPU: is dpeq's device path right there, and what does it cost?

    python benchmarks/gpu_check.py                       # the GPU (about five minutes)
    python benchmarks/gpu_check.py --device cpu --tiny   # every check on a CPU, tiny sizes (a dry run)

What each section checks: :mod:`dpeq_utils.benchmark.device_check`.
"""

import sys

from dpeq_utils.benchmark.device_check import main

if __name__ == "__main__":
    sys.exit(main())
