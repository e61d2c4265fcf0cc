"""Find the stars of a frame once: positions, fluxes, sizes, shapes and what each is good for, plus the sky.

Detection is DAOFIND's method (Stetson 1987) on OpenCV primitives, fast enough for a 2k frame in a few hundredths
of a second: the sky is measured by ``sep.Background`` on a sixteenth of the pixels, the frame is smoothed with a
Gaussian (the matched filter of a star), and every local maximum above the threshold whose peak is not far sharper
than light through the telescope (a cosmic ray, a hot pixel) is a star. The brightest are measured with windowed
centroids (SExtractor's XWIN), window-corrected second moments (elongation) and sep (half-flux diameter,
aperture flux).

Each star carries flags saying what it is good for. Saturated stars (touching a pixel flagged saturated, or
peaking in the non-linear top of the range), stars with a masked pixel in their aperture, blended stars, stars
cut by the frame's edge and faint stars are kept out of shape measurement (FWHM, elongation) and of flux
comparisons; all of them, saturated ones included, still serve as alignment points: their centroids are good.

The list is JSON-able so the daemon keeps it in the archive and never searches a frame for stars twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import sep
from nightshift.service.saturation import NONLINEAR_FRACTION
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = [
    "BLENDED",
    "EDGE",
    "FAINT",
    "MASKED",
    "SATURATED",
    "SHAPE_FLAGS",
    "StarList",
    "detect_stars",
]

#: Star flags (bits): reached saturation or the non-linear top of the range; a masked pixel in its aperture;
#: another star close enough to disturb its shape; its aperture cut by the frame's edge; signal-to-noise below
#: :data:`SNR_FLOOR`.
SATURATED, MASKED, BLENDED, EDGE, FAINT = 1, 2, 4, 8, 16
#: Any of these keeps a star out of shape measurement and flux comparisons.
SHAPE_FLAGS = SATURATED | MASKED | BLENDED | EDGE | FAINT
#: Signal-to-noise (aperture flux over the sky noise in the aperture) a star needs for its shape to be measured.
SNR_FLOOR = 30.0

#: Gaussian sigma (pixels) of the detection filter: matched to stars of 2-4 px FWHM, still fine outside that.
_FILTER_SIGMA = 1.0
#: A peak whose raw height exceeds this multiple of its filtered height is sharper than any star (a star of
#: FWHM 1.5 px gives 3.4, a single hot pixel or cosmic-ray hit 6.3).
_SHARPNESS = 4.0
#: A "star" smaller than this FWHM (pixels), or than _SHARP_FRACTION of the frame's typical FWHM, is not light
#: through the telescope.
_MIN_FWHM = 1.0
_SHARP_FRACTION = 0.5
#: At most this many steps of the windowed centroid (it stops earlier once a step is below 2e-4 px).
_CENTROID_ITERATIONS = 12
#: Unsaturated bright stars used to learn the frame's typical size before measuring all.
_N_TYPICAL = 50
#: The sky is measured on every n-th pixel of every n-th row (n = 4 from 1024 px frames up, 2 below, 1 for tiny
#: frames), in meshes of _MESH frame pixels: 256 samples a mesh or more.
_MESH = 64
_FIELDS = ("x", "y", "flux", "fwhm", "elongation")


@dataclass
class StarList:
    """Stars of one frame, sorted by flux, brightest first.

    Pixel coordinates are 0-based with the centre of the first pixel at (0, 0), x along columns, y along rows.
    ``flux`` is background-subtracted ADU in an aperture of twice the typical half-flux diameter, ``fwhm`` in
    pixels (twice the half-flux radius), ``elongation`` a/b from second moments, ``flags`` the bits
    :data:`SATURATED`, :data:`MASKED`, :data:`BLENDED`, :data:`EDGE`, :data:`FAINT` (0: good for everything).
    ``n_detected`` counts every star found, also those beyond ``max_stars``.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    fwhm: np.ndarray
    elongation: np.ndarray
    background: float
    background_rms: float
    n_detected: int = -1
    flags: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        for name in _FIELDS:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64).reshape(-1))
        if len({len(getattr(self, name)) for name in _FIELDS}) != 1:
            raise ValueError("StarList columns differ in length")
        if self.flags is None:
            self.flags = np.zeros(len(self.x), dtype=np.int32)
        self.flags = np.asarray(self.flags, dtype=np.int32).reshape(-1)
        if len(self.flags) != len(self.x):
            raise ValueError("StarList flags differ in length from its columns")
        if self.n_detected < 0:
            self.n_detected = len(self.x)

    def __len__(self) -> int:
        return len(self.x)

    def xy(self, n: int | None = None) -> np.ndarray:
        """Positions as an (N, 2) array of (x, y), brightest first; the first ``n`` only if given."""
        stop = len(self.x) if n is None else max(0, n)
        return np.column_stack([self.x[:stop], self.y[:stop]])

    @property
    def measurable(self) -> np.ndarray:
        """True for the stars whose shape and flux can be trusted (no flag of :data:`SHAPE_FLAGS`)."""
        return (self.flags & SHAPE_FLAGS) == 0

    def select(self, keep: np.ndarray) -> StarList:
        """The stars where ``keep`` (bool mask or indices) holds, in this list's order; ``n_detected`` kept."""
        return StarList(
            self.x[keep],
            self.y[keep],
            self.flux[keep],
            self.fwhm[keep],
            self.elongation[keep],
            self.background,
            self.background_rms,
            self.n_detected,
            self.flags[keep],
        )

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
            "flags": [int(v) for v in self.flags],
            "background": _json_float(self.background),
            "background_rms": _json_float(self.background_rms),
            "n_detected": int(self.n_detected),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StarList:
        """Rebuild a list written by :meth:`to_dict` (lists written before flags existed read as unflagged)."""

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
            flags=np.array(d["flags"], dtype=np.int32) if "flags" in d else None,
        )


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def detect_stars(
    data: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    saturated: np.ndarray | None = None,
    saturation: float | None = None,
    threshold: float = 5.0,
    max_stars: int = 500,
) -> StarList:
    """Measure the sky and find the stars of a calibrated frame.

    Parameters
    ----------
    data : ndarray
        2-D image (any real dtype; not modified). NaN and infinite pixels are treated as masked.
    mask : ndarray of bool, optional
        True where a pixel is bad; ignored for sky and detection. Pixels also in ``saturated`` are not ignored.
    saturated : ndarray of bool, optional
        True where the raw pixel reached saturation: kept (a saturated star is found whole, with a good centroid)
        but every star touching one is flagged :data:`SATURATED`.
    saturation : float, optional
        The frame's saturation level (a calibrated frame's SATURATE): stars peaking above
        :data:`~nightshift.service.saturation.NONLINEAR_FRACTION` of it are flagged :data:`SATURATED` too.
    threshold : float, default 5.0
        Detection threshold, in units of the noise of the smoothed (matched-filtered) frame.
    max_stars : int, default 500
        Keep at most this many stars, the brightest; ``n_detected`` still counts all of them.

    Returns
    -------
    StarList
        Stars sorted by flux (descending), with the sky level and its RMS (the median of sep's 64 px meshes and
        the robust spread of the pixels about the sky).
    """
    if data.ndim != 2:
        raise ValueError(f"detect_stars needs a 2-D image, got shape {data.shape}")
    work = np.array(data, dtype=np.float32, order="C", copy=True)
    bad = ~np.isfinite(work)
    if mask is not None:
        given = np.asarray(mask, dtype=bool)
        bad |= given & ~np.asarray(saturated, dtype=bool) if saturated is not None else given
    has_bad = bool(bad.any())
    sat = np.asarray(saturated, dtype=bool) if saturated is not None and saturated.any() else None
    if has_bad:
        work[bad] = 0.0

    back, background, rms = _sky(work, bad if has_bad else None)
    if not (rms > 0 and math.isfinite(rms)):
        return _empty(background, rms)
    work -= back
    if has_bad:
        work[bad] = 0.0

    # the matched filter and its local maxima
    size = 2 * math.ceil(3 * _FILTER_SIGMA) + 1
    smooth = cv2.GaussianBlur(work, (size, size), _FILTER_SIGMA, borderType=cv2.BORDER_REFLECT)
    kernel = cv2.getGaussianKernel(size, _FILTER_SIGMA)
    smooth_rms = rms * float(np.sum(kernel**2))  # separable: the 2-D kernel's sum of squares is the 1-D one's, squared
    iy, ix = _local_maxima(smooth, threshold * smooth_rms)
    if has_bad:
        ok = ~bad[iy, ix]
        iy, ix = iy[ok], ix[ok]
    height = smooth[iy, ix]
    real = work[iy, ix] <= _SHARPNESS * height  # a cosmic ray or hot pixel is far sharper than a star
    iy, ix, height = iy[real], ix[real], height[real]
    order = np.argsort(-height, kind="stable")
    iy, ix, height = iy[order], ix[order], height[order]
    if len(ix) == 0:
        return _empty(background, rms)

    in_saturation = np.zeros(len(ix), dtype=bool)
    if sat is not None:
        keep, in_saturation, ix, iy = _one_peak_per_saturated_star(sat, ix, iy)
        iy, ix, height, in_saturation = iy[keep], ix[keep], height[keep], in_saturation[keep]
    if saturation is not None and math.isfinite(saturation):
        in_saturation |= data[iy, ix] >= NONLINEAR_FRACTION * saturation

    # the frame's typical size, from bright unsaturated peaks, sets the apertures and merges split peaks
    typical = _typical_fwhm(work, ix, iy, in_saturation)
    keep = _suppress_neighbours(ix, iy, radius=max(2.5, 1.2 * typical))
    iy, ix, height, in_saturation = iy[keep], ix[keep], height[keep], in_saturation[keep]
    n_found = len(ix)

    top = slice(0, min(n_found, max_stars + max_stars // 4 + 20))
    sep_mask = bad if has_bad else None
    x, y, elongation = _measure(work, ix[top], iy[top], typical)
    rmax = np.full(len(x), float(np.clip(2.0 * typical, 3.0, 50.0)))
    r50, _ = sep.flux_radius(work, x, y, rmax, 0.5, mask=sep_mask, subpix=1)
    fwhm = 2.0 * r50
    radius = float(np.clip(2.0 * typical, 3.0, 40.0))
    flux, _, aflag = sep.sum_circle(work, x, y, radius, mask=sep_mask, subpix=5)

    flags = np.where(in_saturation[top], SATURATED, 0)
    flags |= np.where((aflag & sep.APER_HASMASKED) != 0, MASKED, 0)
    flags |= np.where((aflag & sep.APER_TRUNC) != 0, EDGE, 0)
    flags |= np.where(_crowded(ix, iy, height, top, 2.0 * radius), BLENDED, 0)
    snr = flux / (rms * math.sqrt(math.pi) * radius)
    flags |= np.where(~(snr >= SNR_FLOOR), FAINT, 0)

    # a source smaller than the optics deliver is a cosmic ray or a hot pixel that passed the sharpness test
    plausible = (flux > 0) & (~np.isfinite(fwhm) | (fwhm >= max(_MIN_FWHM, _SHARP_FRACTION * typical)))
    n_detected = n_found - int(np.count_nonzero(~plausible))
    good = np.flatnonzero(plausible)
    good = good[np.argsort(-flux[good], kind="stable")][:max_stars]
    return StarList(
        x=x[good],
        y=y[good],
        flux=flux[good],
        fwhm=fwhm[good],
        elongation=elongation[good],
        background=background,
        background_rms=rms,
        n_detected=n_detected,
        flags=flags[good],
    )


def _local_maxima(smooth: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels above ``level`` that are at least as high as their 8 neighbours (not on
    the frame's outermost rows and columns)."""
    h, w = smooth.shape
    flat = smooth.reshape(-1)
    above = np.flatnonzero(flat > level)  # a few percent of the pixels: test only those
    row, col = np.divmod(above, w)
    above = above[(row > 0) & (row < h - 1) & (col > 0) & (col < w - 1)]
    value = flat[above]
    for step in (-w - 1, -w, -w + 1, -1, 1, w - 1, w, w + 1):
        keep = value >= flat[above + step]
        above, value = above[keep], value[keep]
    return np.divmod(above, w)


def _sky(work: np.ndarray, bad: np.ndarray | None) -> tuple[np.ndarray, float, float]:
    """The sky (full-size map), its global level and the noise of the frame's pixels about it.

    sep.Background measures both on every fourth pixel of every fourth row of a big frame (every other of a small
    one: its meshes are 64 frame pixels), each with the frame's own noise; the map is interpolated back.
    """
    h, w = work.shape
    step = 4 if min(h, w) >= 1024 else 2 if min(h, w) >= 64 else 1
    sample = np.ascontiguousarray(work[::step, ::step])
    smask = np.ascontiguousarray(bad[::step, ::step]) if bad is not None else None
    mesh = max(8, min(_MESH // step, sample.shape[0], sample.shape[1]))
    bkg = sep.Background(sample, mask=smask, bw=mesh, bh=mesh, fw=3, fh=3)
    small = bkg.back(dtype=np.float32)
    back = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) if step > 1 else small
    return back, float(bkg.globalback), float(bkg.globalrms)


def _one_peak_per_saturated_star(
    sat: np.ndarray, ix: np.ndarray, iy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One peak per saturated blob, moved to the blob's centre; which peaks touch one.

    A saturated core is a plateau of nearly equal values on which the smoothed frame can have several maxima, any
    of them pixels away from the star's centre: the first (highest) is kept and placed at the plateau's centroid,
    from where the windowed centroid starts. Saturated pixels are few, so the blobs are found among them alone
    (touching pixels, 8-connected), not by labelling the whole frame. Returns (keep, in_saturation, ix, iy).
    """
    rows, cols = np.divmod(np.flatnonzero(sat), sat.shape[1])
    points = np.column_stack([cols, rows]).astype(np.float64)
    tree = cKDTree(points)
    pairs = tree.query_pairs(1.5, output_type="ndarray")
    n = len(points)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    count = np.bincount(labels)
    cx, cy = np.bincount(labels, weights=cols) / count, np.bincount(labels, weights=rows) / count
    dist, nearest = tree.query(np.column_stack([ix, iy]).astype(np.float64), distance_upper_bound=2.9)
    touching = np.isfinite(dist)
    blob = np.where(touching, labels[np.minimum(nearest, n - 1)], -1)
    keep = np.ones(len(ix), dtype=bool)
    ix, iy = ix.copy(), iy.copy()
    seen: set[int] = set()
    for i in np.flatnonzero(touching):
        b = int(blob[i])
        if b in seen:
            keep[i] = False
            continue
        seen.add(b)
        ix[i], iy[i] = round(cx[b]), round(cy[b])
    return keep, touching, ix, iy


def _typical_fwhm(work: np.ndarray, ix: np.ndarray, iy: np.ndarray, in_saturation: np.ndarray) -> float:
    """Median half-flux diameter of the brightest unsaturated peaks (3 px when there are none); measured again
    in a wider aperture when the stars are wide (trailed or defocused frames)."""
    pick = np.flatnonzero(~in_saturation)[:_N_TYPICAL]
    if len(pick) == 0:
        return 3.0
    x, y = ix[pick].astype(np.float64), iy[pick].astype(np.float64)
    typical, rmax = 3.0, 8.0
    for _ in range(2):
        r50, flag = sep.flux_radius(work, x, y, np.full(len(x), rmax), 0.5, subpix=1)
        ok = np.isfinite(r50) & (r50 > 0) & ((flag & sep.APER_TRUNC) == 0)
        if not ok.any():
            break
        typical = float(np.clip(2.0 * np.median(r50[ok]), 1.0, 60.0))
        if rmax >= 2.5 * typical:
            break
        rmax = 3.0 * typical
    return typical


def _suppress_neighbours(ix: np.ndarray, iy: np.ndarray, radius: float) -> np.ndarray:
    """Drop every peak closer than ``radius`` to a brighter one (peaks are sorted brightest first)."""
    keep = np.ones(len(ix), dtype=bool)
    if len(ix) < 2:
        return keep
    pairs = cKDTree(np.column_stack([ix, iy])).query_pairs(radius, output_type="ndarray")
    if len(pairs) == 0:
        return keep
    pairs.sort(axis=1)  # (brighter, fainter): lower index is brighter
    for a, b in pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]:
        if keep[a]:
            keep[b] = False
    return keep


def _crowded(ix: np.ndarray, iy: np.ndarray, height: np.ndarray, top: slice, radius: float) -> np.ndarray:
    """For the stars of ``top``: is another star, at least a tenth as high, within ``radius``?"""
    tree = cKDTree(np.column_stack([ix, iy]))
    mine = np.arange(len(ix))[top]
    out = np.zeros(len(mine), dtype=bool)
    for k, neighbours in enumerate(tree.query_ball_point(np.column_stack([ix[mine], iy[mine]]), radius)):
        i = mine[k]
        out[k] = any(j != i and height[j] >= 0.1 * height[i] for j in neighbours)
    return out


def _measure(
    work: np.ndarray, ix: np.ndarray, iy: np.ndarray, typical: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid and elongation of stars around integer peaks, from Gaussian-windowed moments.

    The centroid is the windowed one (SExtractor's XWIN, a window of the stars' own width, iterated). The
    shape comes from second moments through a window 1.5 times wider, corrected for it: for a Gaussian star of
    covariance C seen through a Gaussian window of variance s^2 the windowed moments M obey
    inv(M) = inv(C) + I/s^2, so C is exact for Gaussian stars and close for real ones; the elongation is the
    square root of the ratio of C's eigenvalues.

    Returns
    -------
    x, y, elongation : ndarray
        NaN elongation where the moments are not those of a star (noise, a hole).
    """
    h, w = work.shape
    sigma = max(typical, 1.0) / 2.3548  # the half-flux diameter of a Gaussian star is its FWHM
    s2 = (1.5 * sigma) ** 2
    r = int(np.clip(math.ceil(3.0 * 1.5 * sigma), 3, 40))
    d = np.arange(-r, r + 1)
    px = ix[:, None, None] + d[None, None, :]
    py = iy[:, None, None] + d[None, :, None]
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    values = work[np.clip(py, 0, h - 1), np.clip(px, 0, w - 1)].astype(np.float64)
    values[~np.broadcast_to(inside, values.shape)] = 0.0
    x, y = ix.astype(np.float64), iy.astype(np.float64)
    c2 = sigma * sigma
    active = np.ones(len(x), dtype=bool)
    for _ in range(_CENTROID_ITERATIONS):
        dx, dy = px[active] - x[active, None, None], py[active] - y[active, None, None]
        weight = np.exp(-(dx * dx + dy * dy) / (2.0 * c2)) * values[active]
        total = weight.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            # SExtractor's XWIN step, doubled: a window as wide as the star halves the offset at each plain step
            shift_x = 2.0 * (weight * dx).sum(axis=(1, 2)) / total
            shift_y = 2.0 * (weight * dy).sum(axis=(1, 2)) / total
        ok = (total > 0) & np.isfinite(shift_x) & np.isfinite(shift_y)
        idx = np.flatnonzero(active)
        x[idx] = np.clip(np.where(ok, x[idx] + np.where(ok, shift_x, 0.0), x[idx]), ix[idx] - 1.5, ix[idx] + 1.5)
        y[idx] = np.clip(np.where(ok, y[idx] + np.where(ok, shift_y, 0.0), y[idx]), iy[idx] - 1.5, iy[idx] + 1.5)
        active[idx] = ok & (np.hypot(shift_x, shift_y) > 2e-4)
        if not active.any():
            break
    dx, dy = px - x[:, None, None], py - y[:, None, None]
    weight = np.exp(-(dx * dx + dy * dy) / (2.0 * s2)) * values
    total = weight.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mxx = (weight * dx * dx).sum(axis=(1, 2)) / total
        myy = (weight * dy * dy).sum(axis=(1, 2)) / total
        mxy = (weight * dx * dy).sum(axis=(1, 2)) / total
        det = mxx * myy - mxy * mxy
        ixx, iyy, ixy = myy / det - 1.0 / s2, mxx / det - 1.0 / s2, -mxy / det  # inv(C) = inv(M) - I/s^2
        idet = ixx * iyy - ixy * ixy
        cxx, cyy, cxy = iyy / idet, ixx / idet, -ixy / idet
        good = (total > 0) & (det > 0) & (idet > 0) & (ixx > 0) & (cxx > 0) & (cyy > 0)
        half_trace = 0.5 * (cxx + cyy)
        spread = np.sqrt(0.25 * (cxx - cyy) ** 2 + cxy * cxy)
        major, minor = half_trace + spread, half_trace - spread
        good &= minor > 0
        elongation = np.where(good, np.sqrt(np.abs(major / minor)), np.nan)
    return x, y, elongation


def _empty(background: float, rms: float) -> StarList:
    empty = np.empty(0)
    return StarList(empty, empty, empty, empty, empty, background, rms, 0)
