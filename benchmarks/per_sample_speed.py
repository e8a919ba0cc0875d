"""Speed of DP-SGD steps: non-private vs per-example gradient engines vs the whole DP step.

    python benchmarks/per_sample_speed.py                      # all four models, batches 64 and 256
    python benchmarks/per_sample_speed.py --models eq_resnet9 --batch-sizes 256 --engines hooks
    python benchmarks/per_sample_speed.py --models eq_resnet9 --batch-sizes 256 --engines hooks --phases --layers

Prints one line per figure as it is measured, then the README's markdown table. See
:mod:`dpeq_utils.benchmark` for what is timed and how.
"""

import sys

from dpeq_utils.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
