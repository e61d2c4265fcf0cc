"""The few master frames in use, kept in memory by the process that calibrates with them.

A night uses a handful of masters and each is read once. Masters are written once under a versioned name, so
the absolute path is the key; a worker process (a thread pool or a Dask worker) keeps its own cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from nightshift.service.fitsio import read_image, read_mask
from nightshift.service.frame import Image

__all__ = ["MASTERS", "MasterCache", "combined_mask"]


class MasterCache:
    """Least-recently-used masters by absolute path, safe to share between threads."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._cache: OrderedDict[str, Image] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | Path) -> Image:
        key = str(path)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            img = read_image(Path(key))
            mask = read_mask(Path(key))
            if mask is not None:
                img.mask = mask
            self._cache[key] = img
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
            return img

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


#: This process's cache.
MASTERS = MasterCache()


def combined_mask(*images: Image | None) -> np.ndarray | None:
    """The union of the bad-pixel masks the images carry, or None when none has one."""
    masks = [im.mask for im in images if im is not None and im.mask is not None]
    if not masks:
        return None
    out = masks[0].copy()
    for m in masks[1:]:
        out |= m
    return out
