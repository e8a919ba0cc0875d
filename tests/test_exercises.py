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


def _says(check, wrong, says, capsys):
    assert check(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("not yet:") and says in out, out


def test_lifting_conv_checker(capsys):
    import torch
    import torch.nn.functional as F

    from dpeq_utils.exercises.equivariance import check_lifting_conv

    def right(images, kernel):  # written out again, not the package's function
        maps = [F.conv2d(images, torch.rot90(kernel, r, dims=(-2, -1)), padding=kernel.shape[-1] // 2) for r in range(4)]
        return torch.stack(maps, dim=2)

    assert check_lifting_conv(right) is True
    assert capsys.readouterr().out.startswith("right:")
    assert check_lifting_conv(_stub) is False
    assert capsys.readouterr().out.startswith("not done yet:")

    def clockwise(x, k):
        return torch.stack([F.conv2d(x, torch.rot90(k, -r, dims=(-2, -1)), padding=1) for r in range(4)], 2)

    _says(check_lifting_conv, clockwise, "clockwise", capsys)
    _says(check_lifting_conv, lambda x, k: right(x, k).transpose(1, 2), "rotation axis", capsys)
    _says(check_lifting_conv, lambda x, k: torch.stack([F.conv2d(x, torch.rot90(k, r, dims=(-2, -1))) for r in range(4)], 2),
          "pad", capsys)
    _says(check_lifting_conv, lambda x, k: torch.stack([F.conv2d(x, k, padding=1)] * 4, 2), "turning the input", capsys)


def test_width_rule_checker(capsys):
    from dpeq_utils.exercises.models import check_width_rule

    assert check_width_rule(lambda w, order: max(1, int(w * math.sqrt(1.5 * order) / order))) is True
    assert capsys.readouterr().out.startswith("right:")
    assert check_width_rule(_stub) is False
    assert capsys.readouterr().out.startswith("not done yet:")
    _says(check_width_rule, lambda w, order: int(w * math.sqrt(1.5 * order) / order), "at least one field", capsys)
    _says(check_width_rule, lambda w, order: max(1, round(w * math.sqrt(1.5 * order) / order)), "round down", capsys)
    _says(check_width_rule, lambda w, order: max(1, int(w * math.sqrt(order) / order)), "√(1.5·|G|)", capsys)


def test_clip_and_sum_checker(capsys):
    import torch

    from dpeq_utils.exercises.dpsgd import check_clip_and_sum

    def right(grads, clip_norm):
        norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
        factors = (clip_norm / norms).clamp(max=1.0)
        return {n: torch.einsum("i,i...->...", factors, g) for n, g in grads.items()}

    def per_tensor(grads, clip_norm):
        return {n: torch.einsum("i,i...->...", (clip_norm / g.flatten(1).norm(dim=1)).clamp(max=1.0), g)
                for n, g in grads.items()}

    def mean(grads, clip_norm):
        n = len(next(iter(grads.values())))
        return {k: v / n for k, v in right(grads, clip_norm).items()}

    def scale_up(grads, clip_norm):
        norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
        return {n: torch.einsum("i,i...->...", clip_norm / norms, g) for n, g in grads.items()}

    assert check_clip_and_sum(right) is True
    assert capsys.readouterr().out.startswith("right:")
    assert check_clip_and_sum(_stub) is False
    assert capsys.readouterr().out.startswith("not done yet:")
    _says(check_clip_and_sum, per_tensor, "each parameter tensor", capsys)
    _says(check_clip_and_sum, mean, "that is the mean", capsys)
    _says(check_clip_and_sum, scale_up, "scaled up", capsys)
    _says(check_clip_and_sum, lambda grads, c: {n: g.sum(0) for n, g in grads.items()}, "differ", capsys)


def test_audit_guess_rule_checker(capsys):
    from dpeq_utils.exercises.audit import check_count_right

    def right(scores, included, k):
        order = np.random.default_rng(1).permutation(len(scores))
        order = order[np.argsort(-np.asarray(scores)[order], kind="stable")]
        return int(included[order[:k]].sum() + (~included[order[-k:]]).sum())

    def by_index(scores, included, k):  # ties follow the listing order
        order = np.argsort(-np.asarray(scores), kind="stable")
        return int(included[order[:k]].sum() + (~included[order[-k:]]).sum())

    def members_only(scores, included, k):
        return int(included[np.argsort(-np.asarray(scores))[:k]].sum())

    assert check_count_right(right) is True
    assert capsys.readouterr().out.startswith("right:")
    assert check_count_right(_stub) is False
    assert capsys.readouterr().out.startswith("not done yet:")
    _says(check_count_right, by_index, "break ties at random", capsys)
    _says(check_count_right, lambda s, i, k: right(-np.asarray(s), i, k), "reversed", capsys)
    _says(check_count_right, members_only, "only the 'member' guesses", capsys)
