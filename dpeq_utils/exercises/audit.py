"""Check for the exercise of notebook 07: the one-run audit's guess rule.

The student's ``count_right(scores, included, k)`` guesses "member" for the ``k`` highest scores and
"non-member" for the ``k`` lowest and returns how many of those 2k guesses are right. The check
compares it with the audit's own count (:func:`dpeq_utils.audit.one_run_audit`) on scores without
ties, and then feeds it scores that are all equal with the members listed first: a rule that breaks
ties by the canaries' order would then get every guess right and "prove" a large ε from scores that
carry no information. Ties must be broken by a coin (a random order), which any DP bound allows.
"""

from __future__ import annotations

import numpy as np

from . import checker


@checker("the audit's guess rule")
def check_count_right(count_right) -> None:
    """``count_right(scores, included, k) -> int``: right guesses among k "member" guesses on the highest
    scores and k "non-member" guesses on the lowest, ties in a random order."""
    from ..audit import one_run_audit

    rng = np.random.default_rng(0)
    for m, k, signal in ((64, 8, 1.0), (200, 50, 0.3), (1000, 100, 0.0)):
        included = rng.random(m) < 0.5
        scores = rng.normal(size=m) + signal * included
        got = count_right(scores.copy(), included.copy(), k)
        assert got is not None and float(got).is_integer(), f"return a whole number of right guesses, not {got!r}"
        right = one_run_audit(scores, included, k, k).correct
        if got != right and got == one_run_audit(-scores, included, k, k).correct:
            raise AssertionError("the guesses are reversed: a high score (a low loss) means 'member'")
        if got != right and got == int(included[np.argsort(-scores)[:k]].sum()):
            raise AssertionError("only the 'member' guesses are counted: the k lowest scores are guessed "
                                 "'non-member', and those are right when the canary was left out")
        assert got == right, f"{m} canaries, k = {k}: {got} right, expected {right}"
    m, k = 400, 100
    included = np.arange(m) < m // 2  # members first, then non-members: the listing order knows membership
    got = int(count_right(np.zeros(m), included.copy(), k))
    assert got < 2 * k, (f"with equal scores, members listed first, all {2 * k} guesses are right: ties follow the "
                         "listing order, which knows who is a member; break ties at random (shuffle the canaries, "
                         "then sort stably by score)")
