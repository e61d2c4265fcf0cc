"""Align a frame onto its reference by its stars.

The transform is found by astroalign's triangle matching on star lists measured once by :mod:`nightshift.service.stars`
(never by searching the pixels again), then refined by a least-squares similarity fit on every star that matches,
so a meridian flip (180 degrees) or a small field rotation comes out with sub-pixel residuals. The pixels are
warped with a bilinear float32 resampling; pixels that fall outside the frame or touch a masked pixel come out
masked (and NaN).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import astroalign
import numpy as np
from nightshift.service.frame import Image
from nightshift.service.stars import StarList
from scipy.spatial import cKDTree
from skimage.transform import AffineTransform, warp

__all__ = ["AlignError", "Transform", "apply_transform", "find_transform"]

#: Stars (brightest first) used to refine the transform after astroalign's match.
_REFINE_STARS = 300
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
    in degrees in (-180, 180] (about +-180 after a meridian flip).
    """

    matrix: np.ndarray
    rms: float
    n_matches: int
    rotation_deg: float

    @property
    def scale(self) -> float:
        """Scale factor of the transform (1.0 for the same camera and optics)."""
        return float(math.sqrt(abs(np.linalg.det(self.matrix[:2, :2]))))

    def apply(self, xy: np.ndarray) -> np.ndarray:
        """Map (N, 2) source positions into reference pixel coordinates."""
        xy = np.asarray(xy, dtype=np.float64)
        return xy @ self.matrix[:2, :2].T + self.matrix[:2, 2]

    @classmethod
    def identity(cls) -> Transform:
        """The reference's own transform."""
        return cls(np.eye(3), 0.0, 0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for the archive); :meth:`from_dict` reads it back."""
        return {
            "matrix": [[float(v) for v in row] for row in self.matrix],
            "rms": float(self.rms),
            "n_matches": int(self.n_matches),
            "rotation_deg": float(self.rotation_deg),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Transform:
        """Rebuild a transform written by :meth:`to_dict`."""
        return cls(
            np.array(d["matrix"], dtype=np.float64), float(d["rms"]), int(d["n_matches"]), float(d["rotation_deg"])
        )


def find_transform(
    source: StarList,
    reference: StarList,
    *,
    max_stars: int = 50,
    min_matches: int = 5,
    match_radius: float = 2.0,
    max_scale_error: float = 0.05,
) -> Transform:
    """Find the transform mapping a frame's stars onto its reference's.

    Parameters
    ----------
    source, reference : StarList
        Star lists of the frame and of the reference (as kept from grading).
    max_stars : int, default 50
        At most this many of the brightest stars of each list go to astroalign's triangle matching.
    min_matches : int, default 5
        Fewer matched stars than this is not trusted.
    match_radius : float, default 2.0
        Pixels: a star mapped by the first estimate within this distance of a reference star is a match.
    max_scale_error : float, default 0.05
        Frames of the same camera have scale 1; a scale further from 1 than this is a false match.

    Returns
    -------
    Transform

    Raises
    ------
    AlignError
        Too few stars, no matching star pattern, an implausible scale, or too few matches.
    """
    if len(source) < 3 or len(reference) < 3:
        raise AlignError(f"too few stars to align: {len(source)} in frame, {len(reference)} in reference (need 3)")
    # astroalign builds its triangles from each star's nearest neighbours, so the two lists must hold about the
    # same stars: a frame of 17 stars never matches the 50 brightest of a deep reference. Try balanced lists
    # first, then other cuts, before giving up.
    k = min(max_stars, len(source), len(reference))
    cuts = [(k, k), (max_stars, max_stars), (max(3, 2 * k // 3),) * 2, (k, min(max_stars, 2 * k))]
    failure: AlignError | None = None
    for n_src, n_ref in dict.fromkeys(cuts):
        try:
            return _attempt(source, reference, n_src, n_ref, min_matches, match_radius, max_scale_error)
        except AlignError as exc:
            if failure is None or failure.reason.startswith("no matching"):  # keep the most telling reason
                failure = exc
    assert failure is not None
    raise failure


def _attempt(
    source: StarList,
    reference: StarList,
    n_src: int,
    n_ref: int,
    min_matches: int,
    match_radius: float,
    max_scale_error: float,
) -> Transform:
    """astroalign on the brightest ``n_src`` and ``n_ref`` stars, refined on all matching stars."""
    try:
        first, _ = astroalign.find_transform(
            source.xy(n_src), reference.xy(n_ref), max_control_points=max(n_src, n_ref)
        )
    except astroalign.MaxIterError:
        raise AlignError("no matching star pattern between frame and reference") from None
    except Exception as exc:  # astroalign fails in many ways on degenerate star lists; none may stop the night
        raise AlignError(f"star matching failed ({type(exc).__name__}: {exc})") from None

    matrix = np.asarray(first.params, dtype=np.float64)
    src_xy, ref_xy = source.xy(_REFINE_STARS), reference.xy(_REFINE_STARS)
    ref_tree = cKDTree(ref_xy)
    s_idx = r_idx = np.empty(0, dtype=np.intp)
    radius = match_radius
    for _ in range(3):
        s_idx, r_idx = _match(src_xy, ref_tree, matrix, radius)
        if len(s_idx) < max(min_matches, 2):
            break
        matrix = _fit_similarity(src_xy[s_idx], ref_xy[r_idx])
        resid = np.hypot(*(_apply(matrix, src_xy[s_idx]) - ref_xy[r_idx]).T)
        # tighten the radius to the residuals' spread so confused pairs drop out of the final fit
        radius = float(min(match_radius, max(0.5, 5.0 * _rms(resid))))

    if len(s_idx) < min_matches:
        raise AlignError(f"only {len(s_idx)} stars matched the reference (need {min_matches})")
    scale = math.sqrt(abs(np.linalg.det(matrix[:2, :2])))
    if abs(scale - 1.0) > max_scale_error:
        raise AlignError(f"implausible scale {scale:.3f} (frame and reference differ in pixel scale?)")
    resid = np.hypot(*(_apply(matrix, src_xy[s_idx]) - ref_xy[r_idx]).T)
    rotation = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
    if rotation <= -180.0:
        rotation += 360.0
    return Transform(matrix=matrix, rms=_rms(resid), n_matches=len(s_idx), rotation_deg=rotation)


def _apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def _fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation, scale and shift taking ``src`` onto ``dst`` (both (N, 2), N >= 2)."""
    n = len(src)
    design = np.zeros((2 * n, 4))
    design[0::2] = np.column_stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)])
    design[1::2] = np.column_stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, dst.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty], [0.0, 0.0, 1.0]])


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values)))) if len(values) else math.nan


def _match(src_xy: np.ndarray, ref_tree: cKDTree, matrix: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest-neighbour pairs within ``radius`` after mapping the source with ``matrix``."""
    dist, idx = ref_tree.query(_apply(matrix, src_xy), distance_upper_bound=radius)
    found = np.flatnonzero(np.isfinite(dist))
    best: dict[int, tuple[float, int]] = {}
    for s in found:
        r = int(idx[s])
        if r not in best or dist[s] < best[r][0]:
            best[r] = (float(dist[s]), int(s))
    r_idx = np.fromiter(best.keys(), dtype=np.intp, count=len(best))
    s_idx = np.fromiter((s for _, s in best.values()), dtype=np.intp, count=len(best))
    return s_idx, r_idx


def apply_transform(image: Image, transform: Transform, shape: tuple[int, int]) -> Image:
    """Warp a frame onto its reference's pixel grid.

    Parameters
    ----------
    image : Image
        The frame (not modified).
    transform : Transform
        From :func:`find_transform` (frame pixels -> reference pixels).
    shape : (int, int)
        (rows, columns) of the reference.

    Returns
    -------
    Image
        float32 pixels resampled bilinearly; ``mask`` is True (and the pixel NaN) where the output falls outside
        the frame or draws on a masked or non-finite input pixel. The header is the frame's, without its own WCS,
        plus ALIGNRMS, ALIGNROT and ALIGNN.
    """
    data = image.data
    needs_copy = data.dtype != np.float32 or (image.mask is not None and bool(image.mask.any()))
    if needs_copy:
        data = np.array(data, dtype=np.float32, copy=True)
        if image.mask is not None:
            data[np.asarray(image.mask, dtype=bool)] = np.nan
    # output pixel -> input pixel, in (x, y): the inverse of the frame -> reference transform
    inverse = AffineTransform(matrix=np.linalg.inv(transform.matrix))
    out = warp(
        data,
        inverse,
        output_shape=tuple(shape),
        order=1,
        mode="constant",
        cval=np.nan,
        clip=False,
        preserve_range=True,
    )
    out = out.astype(np.float32, copy=False)
    mask = ~np.isfinite(out)
    out[mask] = np.nan

    header = image.header.copy()
    for key in [k for k in header if _WCS_KEY.match(k)]:
        del header[key]
    header["ALIGNRMS"] = (round(float(transform.rms), 4), "[px] RMS of matched star residuals")
    header["ALIGNROT"] = (round(float(transform.rotation_deg), 4), "[deg] rotation onto the reference")
    header["ALIGNN"] = (int(transform.n_matches), "stars matched to the reference")
    return Image(data=out, header=header, mask=mask)
