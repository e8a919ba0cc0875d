"""The exercises' checkers (dpeq_utils.exercises): a right answer passes, the untouched stub says "not
done yet", a wrong answer says "not yet" with what is wrong; none raises."""

import math

import numpy as np
from scipy import stats


def _stub(*args, **kwargs):
    raise NotImplementedError("write this function")


def test_study_paired_interval_checker(capsys):
    from dpeq_utils.exercises.study import check_paired_interval
    from dpeq_utils.report.stats import paired_interval

    assert check_paired_interval(paired_interval) is True
    assert capsys.readouterr().out.startswith("right:")

    def by_hand(values, others):
        d = np.subtract(values, others)
        return d.mean(), stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))

    assert check_paired_interval(by_hand) is True
    assert check_paired_interval(_stub) is False
    assert capsys.readouterr().out.splitlines()[-1].startswith("not done yet:")

    def normal(values, others):  # 1.96 instead of Student's t
        d = np.subtract(values, others)
        return d.mean(), 1.96 * d.std(ddof=1) / math.sqrt(len(d))

    def unpaired(values, others):
        low, high = stats.ttest_ind(values, others, equal_var=False).confidence_interval(0.95)
        return np.mean(values) - np.mean(others), (high - low) / 2

    for wrong, says in ((normal, "not 1.96"), (unpaired, "unpaired (Welch)"), (lambda v, o: 0.0, "pair (mean")):
        assert check_paired_interval(wrong) is False
        out = capsys.readouterr().out
        assert out.startswith("not yet:") and says in out, out


def test_study_privacy_cost_checker(capsys):
    from dpeq_utils.exercises.study import check_privacy_cost
    from dpeq_utils.report.noise_limited import welch_interval

    assert check_privacy_cost(welch_interval) is True
    assert capsys.readouterr().out.startswith("right:")
    assert check_privacy_cost(_stub) is False
    assert capsys.readouterr().out.startswith("not done yet:")

    def pooled(non_private, private):  # Student's equal-variance test
        result = stats.ttest_ind(non_private, private)
        low, high = result.confidence_interval(0.95)
        return {"mean": np.mean(non_private) - np.mean(private), "ci95": (high - low) / 2, "df": result.df}

    def reversed_sign(non_private, private):
        return {**welch_interval(non_private, private), "mean": np.mean(private) - np.mean(non_private)}

    for wrong, says in ((pooled, "pooled"), (reversed_sign, "the cost (non-private minus private)")):
        assert check_privacy_cost(wrong) is False
        out = capsys.readouterr().out
        assert out.startswith("not yet:") and says in out, out


def test_study_noise_over_clip_checker(capsys):
    from dpeq_utils.exercises.study import check_noise_over_clip

    def right(sigma, batch_size, parameters, prune_rate=0.0, drop_rate=0.0):
        return sigma * math.sqrt(parameters * (1 - prune_rate) * (1 - drop_rate)) / batch_size

    assert check_noise_over_clip(right) is True
    assert capsys.readouterr().out.startswith("right:")
    assert check_noise_over_clip(_stub) is False
    assert capsys.readouterr().out.startswith("not done yet:")

    def every_coordinate(sigma, batch_size, parameters, prune_rate=0.0, drop_rate=0.0):
        return sigma * math.sqrt(parameters) / batch_size

    def no_root(sigma, batch_size, parameters, prune_rate=0.0, drop_rate=0.0):
        return sigma * parameters * (1 - prune_rate) * (1 - drop_rate) / batch_size

    for wrong, says in ((every_coordinate, "only the updated coordinates"), (no_root, "√d")):
        assert check_noise_over_clip(wrong) is False
        out = capsys.readouterr().out
        assert out.startswith("not yet:") and says in out, out
