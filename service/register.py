"""Align a frame onto its reference by its stars, and resample it onto the reference's pixel grid.

Finding the transform works on star lists measured once by :mod:`nightshift.service.stars` (never by searching the
pixels again), and holds where frames differ in depth (a 30 s and a 300 s frame, a faint filter and a bright one),
in orientation (a meridian flip is a 180 degree turn, alt-az fields rotate), in pointing (offsets up to a third
of the frame) and in star count (a dozen stars is enough):

1. Hypotheses. Frames of one camera share their pixel scale, so the distance between two stars is the same in
   both frames whatever the rotation, flip and offset. Pairs of bright stars of the frame are matched to pairs of
   the reference of the same length; each match proposes a rotation and a shift, and the proposals of true
   matches pile up in one cell of (rotation, shift) while chance matches scatter. The reference's list is cut
   at the frame's depth (flux rank scaled by the ratio of the two frames' star counts), so the frame's stars are
   in it whether the reference is deeper or shallower. A guess from the frames' celestial WCS (capture programs
   that plate-solve write one) is tried first, and astroalign's triangle matching last, as a fallback.
2. Verification and refinement. Each hypothesis maps every star of the frame onto the reference; stars that
   land on a reference star are matched, and a least-squares similarity (rotation, scale, shift) weighted by each
   star's centroid precision is fitted to all of them, rejecting outliers, until the matches stop changing. The
   hypothesis matching most stars wins.

Resampling (:func:`apply_transform`) is OpenCV's windowed-sinc (Lanczos, 8x8 support) on float32, clamped where
it would ring below the local minimum next to a bright star; bad pixels are filled from their neighbours first,
and the mask follows only where a bad pixel carries at least half the weight of an output pixel, so a masked
pixel does not spread to its 2x2 neighbourhood.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from astropy.io import fits
from nightshift.service.frame import Image
from nightshift.service.stars import BLENDED, EDGE, MASKED, SATURATED, StarList
from scipy.spatial import cKDTree

__all__ = ["AlignError", "Transform", "apply_transform", "compose", "find_transform", "wcs_transform"]

#: Stars of the shallower list used to build pairs, and the most stars of the deeper list they are looked for
#: in: a quick first round, then a wider one when the first finds nothing convincing.
_PAIR_ROUNDS = ((20, 120), (40, 250))
#: Cells of (rotation, shift) in which pair proposals are counted: degrees and pixels.
_ANGLE_CELL = 2.0
_SHIFT_CELL = 12.0
#: Candidate cells verified, best first.
_N_CANDIDATES = 4
#: Floor of a star's centroid error (pixels) in the weighted fit: pixelation and sensor flat-field residuals;
#: larger for a saturated star (a clipped top), much larger for a blended one or one touching a bad pixel or the
#: edge (a neighbour's light or a missing pixel pulls its centroid).
_CENTROID_FLOOR = 0.01
_SATURATED_FLOOR = 0.02
#: Tukey's biweight tuning constant (in units of the expected error): 95% efficient for normal errors.
_TUKEY = 4.685
_DISTURBED_FLOOR = 0.05
#: Frames of one camera and telescope share their pixel scale to about this (refraction, focus): the fitted scale
#: is drawn towards 1 with this uncertainty, so a few stars over a small field cannot bend it.
_SCALE_PRIOR = 2e-4
#: A match with this few stars must fit them within this RMS (pixels): chance coincidences within the matching
#: radius scatter wider. With MANY times min_matches stars, chance is out of the question whatever the RMS.
_MAX_RMS = 0.6
_MANY = 3
#: Resampling kernels of :func:`apply_transform`.
_KERNELS = {"lanczos": cv2.INTER_LANCZOS4, "cubic": cv2.INTER_CUBIC}
#: WCS keywords dropped from an aligned frame's header: its own WCS no longer describes the warped pixels.
_WCS_KEY = re.compile(
    r"^(WCSAXES|WCSNAME|RADESYS|EQUINOX|EPOCH|LONPOLE|LATPOLE|CTYPE\d|CRVAL\d|CRPIX\d|CDELT\d|CUNIT\d|CROTA\d|"
    r"CD\d_\d|PC\d_\d|PV\d_\d+|A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_\d+_\d+|B_\d+_\d+|AP_\d+_\d+|BP_\d+_\d+|"
    r"A_DMAX|B_DMAX)$"
)


class AlignError(Exception):
    """A frame cannot be aligned; ``reason`` says why in a short sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Transform:
    """A similarity transform from a frame's pixel (x, y) to its reference's.

    ``matrix`` is 3x3 homogeneous: ``[x_ref, y_ref, 1] = matrix @ [x, y, 1]``. ``rms`` is the RMS distance (pixels)
    between matched stars after the fit, ``n_matches`` how many stars were matched, ``rotation_deg`` the rotation
    in degrees in (-180, 180] (about +-180 after a meridian flip), ``method`` how the match was found
    (``"pairs"``, ``"wcs"``, ``"astroalign"``, ``"identity"`` or ``"composed"``).
    """

    matrix: np.ndarray
    rms: float
    n_matches: int
    rotation_deg: float
    method: str = field(default="pairs")

    @property
    def scale(self) -> float:
        """Scale factor of the transform (1.0 for the same camera and optics)."""
        return float(math.sqrt(abs(np.linalg.det(self.matrix[:2, :2]))))

    def apply(self, xy: np.ndarray) -> np.ndarray:
        """Map (N, 2) source positions into reference pixel coordinates."""
        return _apply(self.matrix, np.asarray(xy, dtype=np.float64))

    @classmethod
    def identity(cls) -> Transform:
        """The reference's own transform."""
        return cls(np.eye(3), 0.0, 0, 0.0, "identity")

    def inverse(self) -> Transform:
        """The transform the other way (reference -> frame), as good as this one."""
        matrix = np.linalg.inv(self.matrix)
        return Transform(matrix, self.rms, self.n_matches, _rotation(matrix), self.method)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for the archive); :meth:`from_dict` reads it back."""
        return {
            "matrix": [[float(v) for v in row] for row in self.matrix],
            "rms": float(self.rms),
            "n_matches": int(self.n_matches),
            "rotation_deg": float(self.rotation_deg),
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Transform:
        """Rebuild a transform written by :meth:`to_dict`."""
        return cls(
            np.array(d["matrix"], dtype=np.float64),
            float(d["rms"]),
            int(d["n_matches"]),
            float(d["rotation_deg"]),
            str(d.get("method", "pairs")),
        )


def compose(outer: Transform, inner: Transform) -> Transform:
    """The transform applying ``inner`` then ``outer`` (frame -> old reference -> new reference).

    Its ``rms`` adds the two in quadrature and ``n_matches`` is the smaller (an identity does not count): a composed
    transform is as good as its weaker half.
    """
    matrix = outer.matrix @ inner.matrix
    return Transform(
        matrix=matrix,
        rms=float(math.hypot(outer.rms, inner.rms)),
        n_matches=min([t.n_matches for t in (outer, inner) if t.method != "identity"] or [0]),
        rotation_deg=_rotation(matrix),
        method="composed",
    )


def _rotation(matrix: np.ndarray) -> float:
    rotation = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
    return rotation + 360.0 if rotation <= -180.0 else rotation


def _apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def find_transform(
    source: StarList,
    reference: StarList,
    *,
    guess: np.ndarray | None = None,
    min_matches: int = 5,
    match_radius: float = 2.0,
    max_scale_error: float = 0.05,
) -> Transform:
    """Find the transform mapping a frame's stars onto its reference's.

    Parameters
    ----------
    source, reference : StarList
        Star lists of the frame and of the reference (as kept from grading), brightest first.
    guess : ndarray, optional
        A 3x3 first guess (frame -> reference pixels), for instance :func:`wcs_transform` of the two headers: tried
        first, and kept when the stars confirm it.
    min_matches : int, default 5
        Fewer matched stars than this is not trusted.
    match_radius : float, default 2.0
        Pixels: a star mapped by a hypothesis within this distance of a reference star is a match (the
        refinement then tightens the radius to the residuals).
    max_scale_error : float, default 0.05
        Frames of the same camera have scale 1; a scale further from 1 than this is a false match.

    Returns
    -------
    Transform
        Refined by least squares on every matched star.

    Raises
    ------
    AlignError
        Too few stars, or no hypothesis that enough stars confirm (clouds, a wrong target, a foreign field).
    """
    if len(source) < 3 or len(reference) < 3:
        raise AlignError(f"too few stars to align: {len(source)} in frame, {len(reference)} in reference (need 3)")
    src = _Stars(source)
    ref = _Stars(reference)
    ref_tree = cKDTree(ref.xy)
    best: Transform | None = None
    tried = 0

    def consider(matrix: np.ndarray, method: str) -> bool:
        """Verify a hypothesis; True when it is good enough to stop looking."""
        nonlocal best, tried
        tried += 1
        found = _refine(src, ref, ref_tree, matrix, match_radius, method)
        if found is None or abs(found.scale - 1.0) > max_scale_error or not _trusted(found, min_matches):
            return False
        if best is None or (found.n_matches, -found.rms) > (best.n_matches, -best.rms):
            best = found
        return _convincing(best, src, ref, min_matches)

    if guess is not None and consider(np.asarray(guess, dtype=np.float64), "wcs"):
        return best  # type: ignore[return-value]
    for n_pair, most in _PAIR_ROUNDS:
        for matrix in _pair_hypotheses(src, ref, n_pair, most):
            if consider(matrix, "pairs"):
                return best  # type: ignore[return-value]
    if best is None:
        for matrix in _astroalign_hypotheses(src, ref):
            if consider(matrix, "astroalign"):
                return best  # type: ignore[return-value]
    if best is not None:
        return best
    raise AlignError(
        f"no star pattern of the frame matches the reference's (need {min_matches} stars fitting within "
        f"{_MAX_RMS:g} px; {len(source)} stars in frame, {len(reference)} in reference): clouds, or another field"
    )


class _Stars:
    """A star list as the matcher uses it: positions, centroid errors, and the depth of the list."""

    def __init__(self, stars: StarList) -> None:
        self.xy = stars.xy()
        self.n_detected = max(int(stars.n_detected), len(stars))
        rms = stars.background_rms if math.isfinite(stars.background_rms) and stars.background_rms > 0 else 1.0
        fwhm = np.where(np.isfinite(stars.fwhm) & (stars.fwhm > 0), stars.fwhm, 3.0)
        flux = np.where(np.isfinite(stars.flux) & (stars.flux > 0), stars.flux, rms)
        snr = flux / (rms * math.sqrt(math.pi) * 2.0 * fwhm)
        # per axis: the sky's noise over the star's width, the star's own photon noise, and a floor (calibrated on
        # the simulator, whose stars' true positions are known)
        sky = 0.3 * fwhm / np.maximum(snr, 1.0)
        photons = 0.5 * fwhm / np.sqrt(flux)
        floor = np.where((stars.flags & SATURATED) != 0, _SATURATED_FLOOR, _CENTROID_FLOOR)
        floor = np.where((stars.flags & (BLENDED | MASKED | EDGE)) != 0, _DISTURBED_FLOOR, floor)
        self.sigma2 = sky**2 + photons**2 + floor**2


def _trusted(t: Transform, min_matches: int) -> bool:
    """Enough stars, fitted tightly enough (or so many that chance is out of the question)."""
    return t.n_matches >= min_matches and (t.rms <= _MAX_RMS or t.n_matches >= _MANY * min_matches)


def _convincing(t: Transform, src: _Stars, ref: _Stars, min_matches: int) -> bool:
    """Trusted, with enough matches that looking further cannot do better: half the smaller list, or 30 stars."""
    return _trusted(t, min_matches) and t.n_matches >= min(30, len(src.xy) // 2, len(ref.xy) // 2)


def _refine(
    src: _Stars, ref: _Stars, ref_tree: cKDTree, matrix: np.ndarray, radius: float, method: str
) -> Transform | None:
    """Match every star under ``matrix`` and fit a weighted similarity to the matches, rejecting outliers."""
    s_idx = r_idx = np.empty(0, dtype=np.intp)
    resid = np.empty(0)
    for _ in range(6):
        new_s, new_r = _match(src.xy, ref_tree, matrix, radius)
        if len(new_s) < 3:
            return None
        converged = np.array_equal(new_s, s_idx) and np.array_equal(new_r, r_idx)
        s_idx, r_idx = new_s, new_r
        matrix, keep, resid = _robust_fit(src.xy[s_idx], ref.xy[r_idx], src.sigma2[s_idx] + ref.sigma2[r_idx], matrix)
        if keep.sum() < 3:
            return None
        s_idx, r_idx, resid = s_idx[keep], r_idx[keep], resid[keep]
        if converged:
            break
        radius = float(np.clip(5.0 * _rms(resid), 0.5, radius))
    return Transform(
        matrix=matrix, rms=_rms(resid), n_matches=len(s_idx), rotation_deg=_rotation(matrix), method=method
    )


def _robust_fit(
    src: np.ndarray, dst: np.ndarray, sigma2: np.ndarray, matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A similarity fitted by iteratively reweighted least squares (Tukey's biweight on the residuals in units of
    each pair's expected centroid error): a blend or a star pulled by a faint neighbour loses its weight instead
    of dragging the fit. Returns the matrix, which pairs are inliers, and all residuals (pixels)."""
    sigma = np.sqrt(sigma2)
    weight = 1.0 / sigma2
    for _ in range(8):
        resid = np.hypot(*(_apply(matrix, src) - dst).T)
        z = resid / sigma
        scale = max(float(np.median(z)) / 1.1774, 1.0)  # the median of a 2-D normal's radius is 1.1774 sigma
        u = z / (_TUKEY * scale)
        robust = np.where(u < 1.0, (1.0 - u * u) ** 2, 0.0)
        if np.count_nonzero(robust) < 3:
            break
        new = _fit_similarity(src, dst, weight * robust)
        moved = float(np.max(np.abs(_apply(new, src) - _apply(matrix, src))))
        matrix = new
        if moved < 1e-4:
            break
    resid = np.hypot(*(_apply(matrix, src) - dst).T)
    z = resid / sigma
    scale = max(float(np.median(z)) / 1.1774, 1.0)
    return matrix, z < _TUKEY * scale, resid


def _fit_similarity(src: np.ndarray, dst: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares rotation, scale and shift taking ``src`` onto ``dst`` (both (N, 2), N >= 2).

    With ``weight`` (inverse variances, 1/px^2) the scale is drawn towards 1 by its prior (:data:`_SCALE_PRIOR`);
    without, it is the plain least-squares scale (a first guess from a few pairs).
    """
    n = len(src)
    w = np.ones(n) if weight is None else np.asarray(weight, dtype=np.float64)
    # centred on the weighted means, the four unknowns separate: (a, b) from the cross terms, then the shift
    ws = w / w.sum()
    ms, md = ws @ src, ws @ dst
    s, d = src - ms, dst - md
    norm = float(ws @ np.sum(s * s, axis=1))
    a = float(ws @ (s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1])) / norm
    b = float(ws @ (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0])) / norm
    if weight is not None:
        # the scale's own variance is 1 / sum(w |s|^2) (w in 1/px^2): combine it with the prior of scale 1
        scale = math.hypot(a, b)
        info = float(w @ np.sum(s * s, axis=1))
        prior = 1.0 / _SCALE_PRIOR**2
        posterior = (scale * info + prior) / (info + prior)
        a, b = a * posterior / scale, b * posterior / scale
    rot = np.array([[a, -b], [b, a]])
    shift = md - rot @ ms
    return np.array([[a, -b, shift[0]], [b, a, shift[1]], [0.0, 0.0, 1.0]])


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values)))) if len(values) else math.nan


def _match(src_xy: np.ndarray, ref_tree: cKDTree, matrix: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest-neighbour pairs within ``radius`` after mapping the source with ``matrix``."""
    dist, idx = ref_tree.query(_apply(matrix, src_xy), distance_upper_bound=radius)
    found = np.flatnonzero(np.isfinite(dist))
    if len(found) == 0:
        return found, found
    order = found[np.argsort(dist[found], kind="stable")]
    _, first = np.unique(idx[order], return_index=True)  # the closest source star of each reference star
    s_idx = np.sort(order[first])
    return s_idx, idx[s_idx].astype(np.intp)


def _depths(src: _Stars, ref: _Stars, n_pair: int, most: int) -> tuple[int, int]:
    """How many of the brightest stars of each list to pair: ``n_pair`` of the shallower list, and of the deeper
    list its brightest down to the same depth (flux rank scaled by the ratio of the star counts) with room to
    spare, at most ``most``."""
    n_src, n_ref = len(src.xy), len(ref.xy)
    ratio = ref.n_detected / max(src.n_detected, 1)
    if ratio >= 1:
        k_src = min(n_src, n_pair)
        k_ref = min(n_ref, max(k_src, min(most, math.ceil(1.5 * k_src * ratio) + 10)))
    else:
        k_ref = min(n_ref, n_pair)
        k_src = min(n_src, max(k_ref, min(most, math.ceil(1.5 * k_ref / ratio) + 10)))
    return k_src, k_ref


def _pairs(xy: np.ndarray, min_length: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < k) of ``xy`` at least ``min_length`` apart: indices and lengths, sorted by length."""
    i, k = np.triu_indices(len(xy), 1)
    length = np.hypot(*(xy[k] - xy[i]).T)
    keep = np.flatnonzero(length >= min_length)
    keep = keep[np.argsort(length[keep], kind="stable")]
    return i[keep], k[keep], length[keep]


def _pair_hypotheses(src: _Stars, ref: _Stars, n_pair: int, most: int) -> list[np.ndarray]:
    """Transforms proposed by star pairs of equal length in both lists, best supported first."""
    k_src, k_ref = _depths(src, ref, n_pair, most)
    s_xy, r_xy = src.xy[:k_src], ref.xy[:k_ref]
    extent = max(float(np.ptp(r_xy, axis=0).max()), float(np.ptp(s_xy, axis=0).max()), 1.0)
    min_length = min(25.0, 0.1 * extent)
    si, sk, s_len = _pairs(s_xy, min_length)
    ri, rk, r_len = _pairs(r_xy, min_length)
    if len(s_len) == 0 or len(r_len) == 0:
        return []
    tolerance = 0.8 + 0.0005 * s_len  # centroid errors, and a scale within 5e-4 of the reference's
    lo = np.searchsorted(r_len, s_len - tolerance, side="left")
    hi = np.searchsorted(r_len, s_len + tolerance, side="right")
    counts = hi - lo
    if counts.sum() == 0:
        return []
    sp = np.repeat(np.arange(len(s_len)), counts)  # source pair of each proposal
    rp = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)
    # both ways round: (i -> i', k -> k') and (i -> k', k -> i'), the second turned by 180 degrees
    s_vec = s_xy[sk[sp]] - s_xy[si[sp]]
    r_vec = r_xy[rk[rp]] - r_xy[ri[rp]]
    angle = np.arctan2(r_vec[:, 1], r_vec[:, 0]) - np.arctan2(s_vec[:, 1], s_vec[:, 0])
    angle = np.concatenate([angle, angle + math.pi])
    angle = (angle + math.pi) % (2 * math.pi) - math.pi
    s_mid = 0.5 * (s_xy[sk[sp]] + s_xy[si[sp]])
    r_mid = 0.5 * (r_xy[rk[rp]] + r_xy[ri[rp]])
    s_mid, r_mid = np.concatenate([s_mid, s_mid]), np.concatenate([r_mid, r_mid])
    cos, sin = np.cos(angle), np.sin(angle)
    centre = s_xy.mean(axis=0)
    # shift of the frame's star centroid: less sensitive to a small angle error than the shift of its origin
    cx, cy = s_mid[:, 0] - centre[0], s_mid[:, 1] - centre[1]
    shift = r_mid - np.column_stack([cos * cx - sin * cy, sin * cx + cos * cy])
    cells = _best_cells(np.column_stack([np.degrees(angle), shift]))
    hypotheses = []
    for members in cells:
        # the star correspondences the cell's proposals agree on, fitted together
        p = members % len(sp)
        flipped = members >= len(sp)
        a_src = np.where(flipped, si[sp[p]], si[sp[p]])
        a_ref = np.where(flipped, rk[rp[p]], ri[rp[p]])
        b_src = sk[sp[p]]
        b_ref = np.where(flipped, ri[rp[p]], rk[rp[p]])
        pairs = np.unique(np.column_stack([np.concatenate([a_src, b_src]), np.concatenate([a_ref, b_ref])]), axis=0)
        if len(pairs) < 2:
            continue
        hypotheses.append(_fit_similarity(s_xy[pairs[:, 0]], r_xy[pairs[:, 1]]))
    return hypotheses


def _best_cells(proposals: np.ndarray) -> list[np.ndarray]:
    """Indices of the proposals in the most populated cells of (angle, x shift, y shift), best first.

    Counted on two grids offset by half a cell, so a cluster on a cell border is not split; angles wrap.
    """
    size = np.array([_ANGLE_CELL, _SHIFT_CELL, _SHIFT_CELL])
    n_angle = round(360.0 / _ANGLE_CELL)
    found: list[tuple[int, np.ndarray]] = []
    for offset in (0.0, 0.5):
        cell = np.floor(proposals / size + offset).astype(np.int64)
        cell[:, 0] %= n_angle
        cell[:, 1:] -= cell[:, 1:].min(axis=0)
        span = int(cell[:, 1:].max()) + 1
        key = (cell[:, 0] * span + cell[:, 1]) * span + cell[:, 2]
        order = np.argsort(key, kind="stable")
        ordered = key[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        counts = np.diff(np.r_[starts, len(ordered)])
        for c in np.argsort(-counts, kind="stable")[:_N_CANDIDATES]:
            if counts[c] >= 2:
                found.append((int(counts[c]), np.sort(order[starts[c] : starts[c] + counts[c]])))
    found.sort(key=lambda item: -item[0])
    cells: list[np.ndarray] = []
    for _, members in found:
        if not any(len(np.intersect1d(members, c, assume_unique=True)) > 0.5 * len(members) for c in cells):
            cells.append(members)
    return cells[:_N_CANDIDATES]


def _astroalign_hypotheses(src: _Stars, ref: _Stars) -> list[np.ndarray]:
    """astroalign's triangle matching on depth-matched lists (a fallback: it also handles a different scale)."""
    import astroalign

    k_src, k_ref = _depths(src, ref, *_PAIR_ROUNDS[-1])
    out = []
    for n_src, n_ref in dict.fromkeys([(min(k_src, 50), min(k_ref, 50)), (k_src, k_ref)]):
        if n_src < 3 or n_ref < 3:
            continue
        try:
            found, _ = astroalign.find_transform(src.xy[:n_src], ref.xy[:n_ref], max_control_points=max(n_src, n_ref))
        except Exception:  # astroalign fails in many ways on degenerate lists; none may stop the night
            continue
        out.append(np.asarray(found.params, dtype=np.float64))
    return out


def wcs_transform(
    frame_header: fits.Header, reference_header: fits.Header, shape: tuple[int, int]
) -> np.ndarray | None:
    """The transform (frame -> reference pixels) that the two frames' celestial WCS imply, or None.

    Parameters
    ----------
    frame_header, reference_header : astropy.io.fits.Header
        Headers that may carry a celestial WCS (plate-solving capture programs write one).
    shape : (int, int)
        (rows, columns) of the frame: the transform is fitted on a grid of points over it.

    Returns
    -------
    ndarray or None
        A 3x3 similarity, a first guess to be confirmed by the stars (:func:`find_transform`'s ``guess``); None
        when either header has no usable celestial WCS.
    """
    import warnings

    from astropy.wcs import WCS, FITSFixedWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            frame_wcs, ref_wcs = WCS(frame_header, naxis=2), WCS(reference_header, naxis=2)
            if not (frame_wcs.has_celestial and ref_wcs.has_celestial):
                return None
            h, w = shape
            gx, gy = np.meshgrid(np.linspace(0, w - 1, 5), np.linspace(0, h - 1, 5))
            xy = np.column_stack([gx.ravel(), gy.ravel()])
            world = frame_wcs.pixel_to_world_values(xy[:, 0], xy[:, 1])
            rx, ry = ref_wcs.world_to_pixel_values(*world)
    except Exception:  # a malformed WCS is no WCS: the stars decide
        return None
    target = np.column_stack([rx, ry])
    if not np.isfinite(target).all():
        return None
    return _fit_similarity(xy, target)


def apply_transform(
    image: Image, transform: Transform, shape: tuple[int, int], *, interpolation: str = "lanczos"
) -> Image:
    """Warp a frame onto its reference's pixel grid with a windowed-sinc kernel.

    Parameters
    ----------
    image : Image
        The frame (not modified); ``mask`` and ``saturated`` are carried. A colour frame's three planes are
        warped with the same transform (one mask for the three).
    transform : Transform
        From :func:`find_transform` (frame pixels -> reference pixels).
    shape : (int, int)
        (rows, columns) of the reference.
    interpolation : {"lanczos", "cubic"}
        OpenCV's Lanczos kernel (8x8 support; keeps stars' width and most of the pixel noise) or its bicubic
        (4x4, a = -0.75: several times faster, stars as sharp, the noise a little smoother).

    Returns
    -------
    Image
        float32 pixels, clamped so that no output falls below the lowest of its 2x2 nearest input pixels (the
        dark ring a sinc kernel draws around a bright or saturated star). Bad input pixels are filled from their
        neighbours before resampling; ``mask`` is True (and the pixel NaN) where the output falls outside the
        frame or where bad input pixels carry at least half its weight; ``saturated`` likewise for saturated
        input pixels (which are bad too). The header is the frame's, without its own WCS, plus ALIGNRMS,
        ALIGNROT and ALIGNN.
    """
    if interpolation not in _KERNELS:
        raise ValueError(f"unknown interpolation {interpolation!r}; one of {sorted(_KERNELS)}")
    h, w = int(shape[0]), int(shape[1])
    data = np.asarray(image.data, dtype=np.float32)
    planes = data if image.is_colour else data[None]  # a colour frame: the same warp for its three planes
    nonfinite = ~np.isfinite(planes[0])
    for plane in planes[1:]:
        nonfinite |= ~np.isfinite(plane)
    bad = nonfinite | _one_plane(image.mask) if image.mask is not None else nonfinite
    saturated = _one_plane(image.saturated) if image.saturated is not None else None
    if saturated is not None and not saturated.any():
        saturated = None
    fill = bad & ~saturated if saturated is not None else bad  # a saturated pixel's value stays: the star's top
    if image.header.get("BADFILL") is True:  # a developed colour frame: its bad pixels hold their colour's estimate
        fill = nonfinite

    # OpenCV maps each output pixel back into the frame: the inverse of frame -> reference
    inverse = np.linalg.inv(transform.matrix)[:2].astype(np.float64)
    back = cv2.WARP_INVERSE_MAP
    # nearest sampling of the 2x2 minimum at (x - 0.5, y - 0.5) picks the block of the 4 nearest input pixels
    half = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5]]) @ np.vstack([inverse, [0.0, 0.0, 1.0]])
    out = np.empty((len(planes), h, w), dtype=np.float32)
    low = np.empty((h, w), dtype=np.float32)
    filling = bool(fill.any())
    for i, plane in enumerate(planes):
        source = _filled(plane, fill) if filling else np.ascontiguousarray(plane)
        # straight into the output plane (dst=): no copy of a whole frame per plane
        cv2.warpAffine(
            source, inverse, (w, h), dst=out[i], flags=_KERNELS[interpolation] | back, borderMode=cv2.BORDER_REFLECT
        )
        floor = cv2.erode(source, np.ones((2, 2), np.uint8), anchor=(0, 0), borderType=cv2.BORDER_REFLECT)
        cv2.warpAffine(floor, half, (w, h), dst=low, flags=cv2.INTER_NEAREST | back, borderMode=cv2.BORDER_REFLECT)
        np.maximum(out[i], low, out=out[i])

    outside = _uncovered(inverse, (h, w), data.shape[-2:])
    mask = outside.copy()
    if bad.any():
        mask |= _carried(bad, transform.matrix, inverse, (h, w))
    out_saturated = None
    if saturated is not None:
        out_saturated = _carried(saturated, transform.matrix, inverse, (h, w)) & ~outside
        mask |= out_saturated
    np.copyto(out, np.float32(np.nan), where=mask[None])
    out = out if image.is_colour else out[0]

    header = image.header.copy()
    for key in [k for k in header if _WCS_KEY.match(k)]:
        del header[key]
    header["ALIGNRMS"] = (round(float(transform.rms), 4), "[px] RMS of matched star residuals")
    header["ALIGNROT"] = (round(float(transform.rotation_deg), 4), "[deg] rotation onto the reference")
    header["ALIGNN"] = (int(transform.n_matches), "stars matched to the reference")
    header["ALIGNINT"] = (interpolation, "resampling kernel")
    return Image(data=out, header=header, mask=mask, saturated=out_saturated)


def _one_plane(flags: np.ndarray) -> np.ndarray:
    """Flags as one (rows, columns) array: set where any plane of a colour frame has them."""
    flags = np.asarray(flags, dtype=bool)
    return flags.any(axis=0) if flags.ndim == 3 else flags


def _uncovered(inverse: np.ndarray, shape: tuple[int, int], source_shape: tuple[int, int]) -> np.ndarray:
    """True where an output pixel's nearest input pixel lies outside the frame (row by row: an interval each)."""
    h, w = shape
    sh, sw = source_shape
    (a, b, c), (d, e, f) = inverse
    rows = np.arange(h, dtype=np.float64)
    lo, hi = np.full(h, -np.inf), np.full(h, np.inf)
    # columns x with -0.5 <= a x + (b r + c) < sw - 0.5, and the same for y, intersected
    for slope, offset, limit in ((a, b * rows + c, sw), (d, e * rows + f, sh)):
        if abs(slope) < 1e-12:
            inside = (offset >= -0.5) & (offset < limit - 0.5)
            lo = np.where(inside, lo, np.inf)
            continue
        first, last = (-0.5 - offset) / slope, (limit - 0.5 - offset) / slope
        lo = np.maximum(lo, np.minimum(first, last))
        hi = np.minimum(hi, np.maximum(first, last))
    cols = np.arange(w, dtype=np.float64)
    return (cols[None, :] < lo[:, None]) | (cols[None, :] >= hi[:, None])


def _carried(flags: np.ndarray, matrix: np.ndarray, inverse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Output pixels on which flagged input pixels carry at least half the bilinear weight.

    Flagged pixels are few, so the output pixels near each one are visited (a 3x3 block around where it lands)
    rather than resampling a whole mask.
    """
    h, w = shape
    fh, fw = flags.shape
    out = np.zeros(shape, dtype=bool)
    rows, cols = np.divmod(np.flatnonzero(flags), flags.shape[1])
    if len(rows) == 0:
        return out
    landed = np.rint(_apply(matrix, np.column_stack([cols, rows]).astype(np.float64))).astype(np.int64)
    d = np.arange(-1, 2)
    px = (landed[:, 0][:, None, None] + d[None, None, :]).ravel()
    py = (landed[:, 1][:, None, None] + d[None, :, None]).ravel()
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    key = np.unique(py[inside] * w + px[inside])
    py, px = np.divmod(key, w)
    src = _apply(np.vstack([inverse, [0.0, 0.0, 1.0]]), np.column_stack([px, py]).astype(np.float64))
    x0, y0 = np.floor(src[:, 0]).astype(np.int64), np.floor(src[:, 1]).astype(np.int64)
    fx, fy = src[:, 0] - x0, src[:, 1] - y0
    weight = np.zeros(len(px))
    for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xx, yy = x0 + dx, y0 + dy
        ok = (xx >= 0) & (xx < fw) & (yy >= 0) & (yy < fh)
        hit = np.zeros(len(px), dtype=bool)
        hit[ok] = flags[yy[ok], xx[ok]]
        weight += np.where(hit, wt, 0.0)
    sel = weight >= 0.5
    out[py[sel], px[sel]] = True
    return out


def _filled(data: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """A copy of ``data`` whose bad pixels hold the mean of the good pixels around them (5x5, growing)."""
    out = np.array(data, dtype=np.float32, copy=True)
    h, w = data.shape
    good = ~bad
    rows, cols = np.divmod(np.flatnonzero(bad), w)
    for radius in (2, 4, 8, 16):
        if len(rows) == 0:
            return out
        d = np.arange(-radius, radius + 1)
        yy = np.clip(rows[:, None, None] + d[None, :, None], 0, h - 1)
        xx = np.clip(cols[:, None, None] + d[None, None, :], 0, w - 1)
        ok = good[yy, xx]
        total = np.where(ok, out[yy, xx], 0.0).sum(axis=(1, 2))
        count = ok.sum(axis=(1, 2))
        done = count > 0
        out[rows[done], cols[done]] = total[done] / count[done]
        rows, cols = rows[~done], cols[~done]
    if len(rows):
        out[rows, cols] = float(np.median(out[good])) if good.any() else 0.0
    return out
