"""Provenance written into FITS headers: what was done to a frame, with which arguments, by which version.

One decorator, :func:`logged` (after ccdproc's ``@log_to_metadata``), records each call of a science verb as
``{function: "arg=value, ..."}`` in HISTORY cards of the result's header, and the software version in NSVERS.
Functions add their own step lines (what they did, in words) with :func:`add_history`. Every card written
here starts with a tag word (``NSHIST`` for calls, ``NSSTEP`` for steps, ``NSINPUT`` for inputs, ``NSMASTER``
for masters used) so nightshift's lines can be told from a capture program's; :func:`read_history` reads them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any, ParamSpec, TypeVar

import numpy as np
from astropy.io import fits
from nightshift.service.frame import Image

__all__ = [
    "TAGS",
    "VERSION_KEY",
    "add_history",
    "describe",
    "logged",
    "read_history",
    "software_version",
]

#: Words that start nightshift's HISTORY lines. A line too long for one card continues on cards tagged "+".
TAGS = ("NSHIST", "NSSTEP", "NSINPUT", "NSMASTER")
VERSION_KEY = "NSVERS"
_CONTINUED = "+"
_CARD_TEXT = 72  # characters of text a HISTORY card holds

P = ParamSpec("P")
R = TypeVar("R")


def software_version() -> str:
    """nightshift's version: ``nightshift.service.__version__`` when the package defines it, else ``"0.1.0"``."""
    try:
        from nightshift.service import __version__
    except ImportError:
        return "0.1.0"
    return str(__version__)


def describe(value: Any) -> str:
    """A short, one-line text for an argument value: arrays and frames by shape, long lists by count.

    Parameters
    ----------
    value : any
        The argument value.

    Returns
    -------
    str
        ``repr`` for scalars and short lists of scalars; ``<Image 256x256 MASTER BIAS>``,
        ``<ndarray 256x256 float32>``, ``<5 items>`` for the rest.
    """
    if isinstance(value, Image):
        kind = value.header.get("IMAGETYP", "")
        shape = "x".join(str(n) for n in value.data.shape)
        return f"<Image {shape} {kind}>".replace(" >", ">")
    if isinstance(value, np.ndarray):
        if value.size == 1:
            return repr(value.item())
        return f"<ndarray {'x'.join(str(n) for n in value.shape)} {value.dtype}>"
    if isinstance(value, PurePath):
        return repr(value.name)
    if isinstance(value, np.generic):
        return repr(value.item())
    if isinstance(value, (list, tuple)):
        if len(value) <= 4 and all(isinstance(v, (int, float, bool, str, type(None))) for v in value):
            return repr(value if len(value) > 0 else ())
        return f"<{len(value)} items>"
    if isinstance(value, Mapping):
        return f"<{len(value)} entries>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def add_history(header: fits.Header, tag: str, text: str) -> None:
    """Append one nightshift line to ``header`` as HISTORY cards, wrapping long text onto "+" cards.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header to append to (modified in place).
    tag : str
        One of :data:`TAGS`.
    text : str
        The line; newlines become spaces, non-ASCII characters become "?".
    """
    if tag not in TAGS:
        raise ValueError(f"unknown history tag {tag!r}")
    text = " ".join(text.split()).encode("ascii", "replace").decode("ascii")
    width = _CARD_TEXT - len(tag) - 1
    prefix = tag
    while True:
        # Card text loses trailing blanks, so a blank at a cut moves to the start of the next card.
        chunk = text[:width].rstrip(" ") or text[:width]
        header.add_history(f"{prefix} {chunk}")
        text = text[len(chunk) :]
        if not text:
            return
        prefix = _CONTINUED
        width = _CARD_TEXT - len(_CONTINUED) - 1


def read_history(header: fits.Header, tag: str | None = None) -> list[tuple[str, str]]:
    """nightshift's HISTORY lines in ``header``, continuation cards joined, as ``(tag, text)`` pairs.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header to read.
    tag : str, optional
        Only lines with this tag.
    """
    lines: list[list[str]] = []
    cards = header.get("HISTORY", [])
    for card in cards:
        card = str(card)
        word, _, text = card.partition(" ")
        if word in TAGS:
            lines.append([word, text])
        elif word == _CONTINUED and lines:
            lines[-1][1] += text
        else:
            lines.append(["", ""])  # a foreign card ends any line being continued
    return [(w, t) for w, t in lines if w and (tag is None or w == tag)]


def logged(func: Callable[P, R]) -> Callable[P, R]:
    """Decorator: record each call of ``func`` in the header of the Image it returns.

    Writes a HISTORY line ``NSHIST <function>: arg=value, ...`` (all parameters, defaults included, values
    through :func:`describe`) and sets NSVERS to :func:`software_version`. The result must be an
    :class:`~nightshift.service.frame.Image`; its header is changed in place, the inputs never are.
    """
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        result = func(*args, **kwargs)
        if not isinstance(result, Image):
            raise TypeError(f"@logged {func.__name__} must return an Image, got {type(result).__name__}")
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = ", ".join(f"{name}={describe(value)}" for name, value in bound.arguments.items())
        add_history(result.header, "NSHIST", f"{func.__name__}: {arguments}")
        result.header[VERSION_KEY] = (software_version(), "nightshift software version")
        return result

    return wrapper
