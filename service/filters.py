"""Filter names as filter wheels write them: one name per frame, compared the way a person compares them.

Capture programs write the filter in ``FILTER``; observatories with two wheels in ``FILTER1``/``FILTER2`` (one
of them usually ``open``), others in ``FILTNAME`` or ``FILTERS``. :func:`header_filter` gives the one name a
frame was taken through; :func:`filter_key` is what two names are compared by: ``V``, ``v`` and `` V `` are
one filter (a site with both ``r`` and ``R`` keeps case with ``keep_case``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

__all__ = ["EMPTY_POSITIONS", "WHEEL_KEYS", "filter_key", "header_filter", "most_used_spelling", "tidy"]

#: Filter-wheel keywords combined into one name, in order.
WHEEL_KEYS = ("FILTER1", "FILTER2", "FILTER3")
#: Positions of a wheel that hold no filter; dropped when wheels are combined.
EMPTY_POSITIONS = frozenset({"open", "clear", "empty", "none", "blank", "air", "free", "nofilter", "-", ""})
_SPLIT = re.compile(r"\s*[,+]\s*")


def tidy(name: Any) -> str:
    """A filter name with surrounding spaces dropped and inner runs of spaces made one."""
    return " ".join(str(name).split())


def filter_key(name: str | None, *, keep_case: bool = False) -> str | None:
    """What filter names are compared by: no spaces at all, and case folded unless ``keep_case``."""
    if name is None:
        return None
    key = "".join(str(name).split())
    return key if keep_case else key.casefold()


def _value(header, key: str) -> str | None:
    try:
        value = header.get(key)
    except Exception:
        return None
    if value is None or isinstance(value, bool):
        return None
    text = tidy(value)
    return text or None


def header_filter(header) -> tuple[str | None, str | None]:
    """The filter a frame was taken through, and the keywords it came from.

    Two or more wheels (``FILTER1``, ``FILTER2``, ``FILTER3``; ``FILTER`` counts as the first wheel beside a
    ``FILTER2`` without ``FILTER1``) are joined with ``+``, positions without a filter (``open``, ``clear``,
    ``empty``...) dropped: ``FILTER1 = 'V'``, ``FILTER2 = 'Open'`` is ``V``. Otherwise ``FILTER``, ``FILTNAME``
    or ``FILTERS`` (a list like ``'V,open'`` is read as wheels) as written.

    Returns
    -------
    (name, source)
        ``name`` tidied (see :func:`tidy`), None when no filter is named; ``source`` the keyword(s) read.
    """
    wheels = [k for k in WHEEL_KEYS if _value(header, k) is not None]
    if wheels and "FILTER1" not in wheels and _value(header, "FILTER") is not None:
        wheels.insert(0, "FILTER")
    if len(wheels) > 1 or (wheels and wheels[0] != "FILTER"):
        names = [_value(header, k) for k in wheels]
        kept = [n for n in names if n is not None and filter_key(n) not in EMPTY_POSITIONS]
        return ("+".join(kept) or None), "+".join(wheels)
    for key in ("FILTER", "FILTNAME", "FILTERS"):
        text = _value(header, key)
        if text is None:
            continue
        if key == "FILTERS" and _SPLIT.search(text):
            kept = [n for n in _SPLIT.split(text) if filter_key(n) not in EMPTY_POSITIONS]
            return ("+".join(kept) or None), key
        return text, key
    return None, None


def most_used_spelling(spellings: Iterable[str]) -> str | None:
    """The spelling written most often (ties: the first seen), for showing one name per filter."""
    counts = Counter(spellings)
    if not counts:
        return None
    best = max(counts.values())
    return next(s for s in counts if counts[s] == best)
