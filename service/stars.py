"""Find the stars of a frame once: positions, fluxes, sizes and shapes, plus the sky under them.

The list is measured with ``sep`` (the extractor astroalign itself uses) and then reused by everything that needs
stars: grading (FWHM, elongation, transparency) and alignment (control points for astroalign). It is JSON-able so the
daemon can keep it in the archive and never search a frame for stars twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import sep
from nightshift.service.frame import FrameError

__all__ = ["StarList", "detect_stars"]

#: sep refuses crowded frames with its default pixel stack (300k); a 4k frame of a rich field needs more.
_PIXSTACK = 3_000_000
if sep.get_extract_pixstack() < _PIXSTACK:
    sep.set_extract_pixstack(_PIXSTACK)

#: sep object flags that make a detection useless as a star (truncated, deblending overflow, singular moments).
_BAD_FLAGS = sep.OBJ_TRUNC | sep.OBJ_DOVERFLOW | sep.OBJ_SINGU
#: A "star" smaller than this FWHM (pixels), or than _SHARP_FRACTION of the frame's typical FWHM, is a hot
#: pixel or a cosmic ray, not light through the telescope.
_MIN_FWHM = 1.0
_SHARP_FRACTION = 0.5
#: Brightest plausible stars whose median FWHM is the frame's typical FWHM.
_N_TYPICAL = 200
_FIELDS = ("x", "y", "flux", "fwhm", "elongation")


@dataclass
class StarList:
    """Stars of one frame, sorted by flux, brightest first.

    Pixel coordinates are 0-based with the centre of the first pixel at (0, 0), x along columns, y along rows.
    ``flux`` is background-subtracted ADU, ``fwhm`` in pixels (twice the half-light radius), ``elongation`` is a/b
    of the second moments. ``n_detected`` counts every source found, also those beyond ``max_stars``.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    fwhm: np.ndarray
    elongation: np.ndarray
    background: float
    background_rms: float
    n_detected: int = -1

    def __post_init__(self) -> None:
        for name in _FIELDS:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64).reshape(-1))
        if len({len(getattr(self, name)) for name in _FIELDS}) != 1:
            raise ValueError("StarList columns differ in length")
        if self.n_detected < 0:
            self.n_detected = len(self.x)

    def __len__(self) -> int:
        return len(self.x)

    def xy(self, n: int | None = None) -> np.ndarray:
        """Positions as an (N, 2) array of (x, y), brightest first; the first ``n`` only if given."""
        stop = len(self.x) if n is None else max(0, n)
        return np.column_stack([self.x[:stop], self.y[:stop]])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (NaN as None) that :meth:`from_dict` turns back into the same list."""

        def column(values: np.ndarray, digits: int) -> list[float | None]:
            return [None if not math.isfinite(v) else round(float(v), digits) for v in values]

        return {
            "x": column(self.x, 4),
            "y": column(self.y, 4),
            "flux": [None if not math.isfinite(v) else float(f"{v:.7g}") for v in self.flux],
            "fwhm": column(self.fwhm, 4),
            "elongation": column(self.elongation, 4),
            "background": _json_float(self.background),
            "background_rms": _json_float(self.background_rms),
            "n_detected": int(self.n_detected),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StarList:
        """Rebuild a list written by :meth:`to_dict`."""

        def column(values: list[float | None]) -> np.ndarray:
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

        return cls(
            x=column(d["x"]),
            y=column(d["y"]),
            flux=column(d["flux"]),
            fwhm=column(d["fwhm"]),
            elongation=column(d["elongation"]),
            background=np.nan if d["background"] is None else float(d["background"]),
            background_rms=np.nan if d["background_rms"] is None else float(d["background_rms"]),
            n_detected=int(d.get("n_detected", len(d["x"]))),
        )


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def detect_stars(
    data: np.ndarray, *, mask: np.ndarray | None = None, threshold: float = 5.0, max_stars: int = 500
) -> StarList:
    """Measure the sky and find the stars of a calibrated frame.

    Parameters
    ----------
    data : ndarray
        2-D image (any real dtype; not modified). NaN and infinite pixels are treated as masked.
    mask : ndarray of bool, optional
        True where a pixel is bad; ignored for background and detection.
    threshold : float, default 5.0
        Detection threshold in units of the global background RMS.
    max_stars : int, default 500
        Keep at most this many stars, the brightest; ``n_detected`` still counts all of them.

    Returns
    -------
    StarList
        Stars sorted by flux (descending), with the sky level and its RMS (sep.Background, a sigma-clipped mode
        estimate per 64 px mesh; the global values are the medians over the meshes).

    Raises
    ------
    FrameError
        ``processing_error`` when sep gives up (its buffers overflow on an absurdly crowded or noisy frame).
    """
    if data.ndim != 2:
        raise ValueError(f"detect_stars needs a 2-D image, got shape {data.shape}")
    work = np.array(data, dtype=np.float32, order="C", copy=True)
    bad = ~np.isfinite(work)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    has_bad = bool(bad.any())
    if has_bad:
        work[bad] = 0.0
    sep_mask = bad if has_bad else None

    bkg = sep.Background(work, mask=sep_mask, bw=64, bh=64, fw=3, fh=3)
    background, rms = float(bkg.globalback), float(bkg.globalrms)
    bkg.subfrom(work)
    if has_bad:
        work[bad] = 0.0
    if not (rms > 0 and math.isfinite(rms)):
        return _empty(background, rms)

    try:
        objects, segmap = sep.extract(
            work, threshold, err=rms, mask=sep_mask, minarea=5, segmentation_map=True, deblend_nthresh=16
        )
    except Exception as exc:  # sep raises plain Exception when its internal buffers overflow
        raise FrameError("processing_error", f"star detection failed: {exc}") from exc

    keep = ((objects["flag"] & _BAD_FLAGS) == 0) & (objects["flux"] > 0) & (objects["b"] > 0)
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(-objects["flux"][idx], kind="stable")]
    if len(idx) == 0:
        return _empty(background, rms)
    obj = objects[idx]

    # size: the half-flux diameter, neighbours' pixels left out (exactly the FWHM for a Gaussian star)
    rmax = np.clip(6.0 * obj["a"], 3.0, 50.0)
    r50, _ = sep.flux_radius(
        work, obj["x"], obj["y"], rmax, 0.5, seg_id=(idx + 1).astype(np.int32), segmap=segmap, subpix=5
    )
    fwhm = 2.0 * r50
    # cosmic rays and hot pixels are far sharper than any star the optics deliver
    plausible = np.isfinite(fwhm) & (fwhm >= _MIN_FWHM)
    typical = float(np.median(fwhm[plausible][:_N_TYPICAL])) if plausible.any() else _MIN_FWHM
    real = np.flatnonzero(plausible & (fwhm >= _SHARP_FRACTION * typical))
    if len(real) == 0:
        return _empty(background, rms)
    top = real[:max_stars]
    obj, fwhm = obj[top], fwhm[top]

    sig = np.clip(fwhm / 2.3548, 0.5, None)
    xw, yw, wflag = sep.winpos(work, obj["x"], obj["y"], sig, mask=sep_mask)
    moved = np.hypot(xw - obj["x"], yw - obj["y"])
    use_win = (wflag == 0) & np.isfinite(xw) & np.isfinite(yw) & (moved < 1.0)
    x = np.where(use_win, xw, obj["x"])
    y = np.where(use_win, yw, obj["y"])

    # flux: a circular aperture of twice the typical half-flux diameter holds ~99% of a star's light in any
    # seeing, unlike the isophotal flux, which loses more of a faint or bloated star
    radius = float(np.clip(2.0 * typical, 3.0, 40.0))
    aper, _, aflag = sep.sum_circle(work, x, y, radius, mask=sep_mask, subpix=5)
    whole = ((aflag & (sep.APER_TRUNC | sep.APER_HASMASKED)) == 0) & (aper > 0)
    flux = np.where(whole, aper, obj["flux"])

    order = np.argsort(-flux, kind="stable")
    return StarList(
        x=x[order],
        y=y[order],
        flux=flux[order],
        fwhm=fwhm[order],
        elongation=(obj["a"] / obj["b"])[order],
        background=background,
        background_rms=rms,
        n_detected=len(real),
    )


def _empty(background: float, rms: float) -> StarList:
    empty = np.empty(0)
    return StarList(empty, empty, empty, empty, empty, background, rms, 0)
