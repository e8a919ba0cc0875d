"""Tables and figures of the evidence study (:mod:`dpeq_utils.study`), shared by the notebooks and
the README's *Results* section, so both show the same numbers from the same records.

Uncertainty: runs that differ only in their seed (training subset, initialisation, batches,
noise) are summarised as mean ± sample standard deviation with a 95 % Student-t interval for the
mean; a single run gets the binomial standard error of its test accuracy instead (the test subset's
sampling error, not the seed-to-seed spread; :func:`.tables.seed_spread` pools that spread over part
A's seeds, and the one-seed tables print it beside the binomial interval).

Rooms: :mod:`.stats` (intervals, with scipy), :mod:`.cost` (seconds per step, the published
recipes' compute), :mod:`.tables` (each part's table), :mod:`.figures`, :mod:`.readme` (the README's
generated block, the verdicts, and the ``report`` command), :mod:`.noise_limited` (parts F and G: the
pre-registered analyses, their tables and sentences), :mod:`.along_training` (signal and noise along
part D's runs, notebook 03).
"""

from ..plotting import MODEL_LABELS as MODEL_NAMES  # noqa: F401
from ..plotting import display_name  # noqa: F401
from .along_training import along_training, along_training_findings, plot_along_training  # noqa: F401
from .cost import recipe_compute, step_seconds, typical_step_seconds  # noqa: F401
from .figures import figure_overview, plot_a, plot_b, plot_c, plot_d, plot_f, shipped_reference, side_by_side, stamp  # noqa: F401
from .noise_limited import (  # noqa: F401
    augmentation_lines,
    augmentation_verdicts,
    contrast_interval,
    noise_limited_lines,
    noise_limited_verdicts,
    part_f,
    part_g,
    welch_interval,
)
from .readme import (  # noqa: F401
    PARTS_WITH_TABLES,
    RESULTS_BEGIN,
    RESULTS_END,
    main,
    results_markdown,
    update_readme,
    verdicts,
)
from .stats import STAMP, binomial_ci95, mean_interval, paired_interval, percent, summarise  # noqa: F401
from .tables import grid_edge_sentence, paired_gap, part_a, part_b, part_c, part_d, seed_spread, seed_spread_sentence  # noqa: F401
