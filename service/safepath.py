"""File and folder names made from header values, which are written by whoever wrote the file.

An OBJECT of ``'../../etc'`` or a FILTER with a slash must not choose where nightshift writes:
:func:`safe_component` turns any value into one harmless name, :func:`safe_join` builds a path from such
names and proves it stays under its root.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

__all__ = ["JOIN_MAX_LEN", "safe_component", "safe_join"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_REMOVED = str.maketrans("", "", "\x00/\\")
_HASH_LEN = 8
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,8}$")
#: Longest component :func:`safe_join` keeps: under the usual 255-byte name limit with room for a temp-file
#: prefix and suffix (``.<name>.<random>.tmp``).
JOIN_MAX_LEN = 200


def _clean(value: str) -> str:
    text = _UNSAFE.sub("_", value.translate(_REMOVED).strip())
    return text.lstrip(".")


def safe_component(value: str | None, *, default: str = "unknown", max_len: int = 64) -> str:
    """One safe path component from an untrusted value (OBJECT, FILTER, INSTRUME, ...).

    NUL, slashes and backslashes are removed; every other character outside ``[A-Za-z0-9._+-]`` becomes
    ``_``; leading dots are dropped (no hidden names, no ``.`` or ``..``). An empty result gives ``default``.
    A result longer than ``max_len`` is cut and ends with ``-`` and 8 hex digits of the value's SHA-256 (then
    its extension, such as ``.fits``, when ``max_len`` is 32 or more), so two long names that differ only
    after the cut stay distinct.

    Parameters
    ----------
    value : str or None
        The untrusted value; None gives ``default``.
    default : str, default "unknown"
        Used when nothing safe is left (itself cleaned the same way).
    max_len : int, default 64
        Longest result; at least 16.
    """
    if max_len < 16:
        raise ValueError(f"max_len must be at least 16, got {max_len}")
    text = _clean(str(value)) if value is not None else ""
    if not text:
        text = _clean(default) or "unknown"
        value = default
    if len(text) > max_len:
        digest = hashlib.sha256(str(value).encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]
        found = _EXTENSION.search(text)
        extension = found.group(0) if found and max_len >= 32 else ""
        keep = max_len - len(extension) - _HASH_LEN - 1
        text = f"{text[:keep]}-{digest}{extension}"
    return text


def safe_join(root: Path, *parts: str) -> Path:
    """``root`` joined with each part made safe by :func:`safe_component`, proven to stay under ``root``.

    Parts are cut at :data:`JOIN_MAX_LEN` characters (not 64), so file names already built from safe
    components keep their full length.

    Parameters
    ----------
    root : Path
        The folder the result must stay in (resolved, symbolic links followed).
    *parts : str
        Untrusted path components, one folder or file name each.

    Returns
    -------
    Path
        The resolved path.

    Raises
    ------
    ValueError
        When the result resolves outside ``root`` (a symbolic link inside ``root`` pointing out of it).
    """
    base = Path(root).resolve()
    path = base.joinpath(*(safe_component(part, max_len=JOIN_MAX_LEN) for part in parts)).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"{path} is outside {base}")
    return path
