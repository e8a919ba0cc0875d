"""Check for the exercise of notebook 02: the width rule that gives a stage its number of regular fields.

The student's ``fields(width, order)`` must equal :func:`dpeq_utils.models.fields_for_width` for every
base width from 1 to 256 and every group order dpeq builds (1 to 16); the messages name the usual
mistakes (rounding instead of flooring, no floor at one field, √|G| without the 1.5).
"""

from __future__ import annotations

import math

from . import checker

_ORDERS = {1: "C1", 2: "C2", 4: "C4", 8: "C8", 16: "C16"}


@checker("the width rule")
def check_width_rule(fields) -> None:
    """``fields(width, order) -> int``: ⌊width · √(1.5 · order) / order⌋ regular fields, at least one."""
    from ..models import fields_for_width

    for order, group in _ORDERS.items():
        for width in range(1, 257):
            got, right = fields(width, order), fields_for_width(width, group)
            assert isinstance(got, int) or float(got).is_integer(), \
                f"fields({width}, {order}) = {got!r}: a number of fields is a whole number"
            if got == right:
                continue
            raw = width * math.sqrt(1.5 * order) / order
            if got == 0 and right == 1:
                raise AssertionError(f"fields({width}, {order}) = 0: a stage needs at least one field (max(1, …))")
            if got == round(raw) or got == math.ceil(raw):
                raise AssertionError(f"fields({width}, {order}) = {got}: round down (int() or math.floor), "
                                     f"{raw:.3f} gives {right}")
            if got == max(1, int(width * math.sqrt(order) / order)):
                raise AssertionError(f"fields({width}, {order}) = {got}: the rule scales by √(1.5·|G|), not √|G|")
            raise AssertionError(f"fields({width}, {order}) = {got}, expected {right}")
