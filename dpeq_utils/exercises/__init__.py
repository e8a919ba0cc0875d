"""Exercises a student answers by editing code, and the checks that say right or not yet.

Each notebook has at least one exercise cell (tagged ``exercise``) holding a function for the student
to fill in, usually a stub that raises ``NotImplementedError``; the next cell (tagged ``solution``)
gives the answer and is removed from the student edition (``python -m dpeq_utils reproduce
--student``); the cell after it (tagged ``check``) calls a checker from this package on whatever the
student's function is now. A checker never stops the notebook: it prints one line, "right: …" or
"not yet: …" (or "not done yet: …" for the untouched stub), and returns whether it was right, so a
student edition runs from top to bottom before any exercise is done.

The checkers live by topic: :mod:`.equivariance` (01), :mod:`.models` (02), :mod:`.dpsgd` (03),
:mod:`.study` (04–06), :mod:`.audit` (07). Each is written with :func:`checker`, which turns what it
asserts into those lines.
"""

from __future__ import annotations

import functools


def checker(what: str):
    """Wrap ``check(candidate, ...)``, which asserts what a right answer does (its assertion messages
    say what is wrong), into a check that prints one line and returns True when right."""
    def wrap(check):
        @functools.wraps(check)
        def run(*args, **kwargs) -> bool:
            try:
                check(*args, **kwargs)
            except NotImplementedError:
                print(f"not done yet: {what} (fill in the cell above, then run it and this one again)")
                return False
            except AssertionError as err:
                print(f"not yet: {what}: {err}")
                return False
            except Exception as err:  # noqa: BLE001 - a student's code may raise anything: one line, no traceback
                print(f"not yet: {what}: your code raised {type(err).__name__}: {err}")
                return False
            print(f"right: {what}")
            return True
        return run
    return wrap
