"""How big a value read from a file really is, before anything copies, prints or serialises it.

A few bytes of pickle or YAML can repeat one list inside itself (a memo slot, a YAML alias ``*a``):
cheap to load, since every repetition is the same object, but a JSON record, an error message or an
array built from it expands every repetition, to gigabytes ("billion laughs"). :func:`expansion_problem`
measures the expanded size once per distinct list or dict (sizes of shared ones are remembered), so
checking a crafted value costs no more than checking an honest one of its length; it also finds
nesting deeper than any dpeq file has and a list inside itself. :func:`shown` is the ``repr`` a
message may quote: a few elements and characters, whatever the value.
"""

from __future__ import annotations

import reprlib

_CONTAINERS = (dict, list, tuple)


def _items(value) -> list:
    return list(value.values()) if isinstance(value, dict) else list(value)


def expansion_problem(value, max_values: int, max_depth: int) -> str | None:
    """None if ``value`` expands (every repetition of a shared list or dict counted again) to at most
    ``max_values`` values and nests at most ``max_depth`` deep; else what is wrong, as a phrase
    ("more than 1,000 values ...")."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[object, bool]] = [(value, False)]
    if not isinstance(value, _CONTAINERS):
        return None
    while stack:
        current, children_done = stack.pop()
        key = id(current)
        if children_done:
            on_path.discard(key)
            sizes[key] = sum(1 + sizes.get(id(item), 0) for item in _items(current))
            if sizes[key] > max_values:
                return f"more than {max_values:,} values (counting each repetition of a repeated list)"
            continue
        if key in sizes:
            continue
        if key in on_path:
            return "a list or mapping inside itself"
        on_path.add(key)
        if len(on_path) > max_depth:
            return f"lists or mappings nested more than {max_depth} deep"
        stack.append((current, True))
        stack.extend((item, False) for item in _items(current) if isinstance(item, _CONTAINERS) and id(item) not in sizes)
    return None


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 5, 5, 5
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def shown(value) -> str:
    """``repr(value)`` cut to a few elements and characters (its cost is bounded too)."""
    return _SHORT.repr(value)
