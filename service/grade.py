"""Grade a calibrated light and decide whether it is worth stacking.

A grade is what a person reads off a frame before keeping it: the sky level and its noise, how many stars show,
how sharp and how round they are, and how bright they are compared with the best frame of the same target and
filter (transparency). :func:`judge` applies the rejection rules to a grade against its group and says why a frame
is rejected, in a short human sentence, or ``None`` when it is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from nightshift.service.colour import luminance
from nightshift.service.frame import Image
from nightshift.service.register import AlignError, find_transform
from nightshift.service.saturation import header_level
from nightshift.service.stars import (
    BLENDED,
    EDGE,
    FAINT,
    MASKED,
    SATURATED,
    SHAPE_FLAGS,
    SNR_FLOOR,
    StarList,
    detect_stars,
)
from scipy.spatial import cKDTree

__all__ = ["Grade", "RejectRules", "grade_frame", "grade_from_stars", "judge", "quality_score", "transparency"]

#: Grade.flux sums the fluxes of this many of the brightest measurable stars.
N_FLUX_STARS = 20
#: Measurable stars (unsaturated, unmasked, isolated, above the SNR floor) used for the median FWHM and
#: elongation: the brightest of them.
_N_SHAPE_STARS = 200
#: With fewer measurable stars than this the shape is taken from what there is (at most _N_FALLBACK_STARS of the
#: brightest), and the grade says so.
MIN_SHAPE_STARS = 5
_N_FALLBACK_STARS = 20
#: Flags that make a star's flux useless for comparing frames (it is clipped, or some of it is missing).
_FLUX_FLAGS = SATURATED | MASKED | EDGE
#: Matching radius (pixels) between a frame's stars, mapped into the reference, and the reference's stars.
_MATCH_RADIUS = 3.0


@dataclass
class Grade:
    """What a frame looks like: sky, star count, sharpness, roundness, and brightness of its stars.

    ``fwhm`` (pixels, half-flux diameter) and ``elongation`` are medians over the brightest measurable stars
    (unsaturated, unmasked, isolated, above the signal-to-noise floor; NaN without stars); ``n_measured`` says
    how many, and ``note`` says when there were too few and the shape comes from whatever stars there are.
    ``flux`` is the summed flux of the brightest :data:`N_FLUX_STARS` unsaturated stars; ``exptime`` (seconds,
    from EXPTIME/EXPOSURE, or None) lets :func:`transparency` compare frames of different exposure.
    """

    background: float
    background_rms: float
    n_stars: int
    fwhm: float
    elongation: float
    flux: float
    stars: StarList
    exptime: float | None = None
    n_measured: int = 0
    note: str | None = None

    def row(self) -> dict[str, Any]:
        """Scalar columns for the archive (NaN becomes None)."""
        return {
            "background": _finite_or_none(self.background),
            "background_rms": _finite_or_none(self.background_rms),
            "n_stars": int(self.n_stars),
            "fwhm": _finite_or_none(self.fwhm),
            "elongation": _finite_or_none(self.elongation),
        }


def _finite_or_none(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _exptime(header: Any) -> float | None:
    for key in ("EXPTIME", "EXPOSURE"):
        try:
            value = float(header[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None


def grade_frame(image: Image, *, threshold: float = 5.0, max_stars: int = 500) -> Grade:
    """Grade one calibrated light.

    Parameters
    ----------
    image : Image
        Calibrated frame; masked and NaN pixels are left out, saturated pixels (``image.saturated``) and the
        header's SATURATE mark saturated stars. Not modified.
    threshold : float, default 5.0
        Star detection threshold in background RMS.
    max_stars : int, default 500
        Stars kept in ``Grade.stars`` (the brightest); ``n_stars`` counts all detections.

    Returns
    -------
    Grade
        With the star list, which the caller keeps and reuses for alignment. A colour frame is graded on its
        luminance (the mean of its planes, :func:`nightshift.service.colour.luminance`).
    """
    if image.is_colour:
        image = luminance(image)
    stars = detect_stars(
        image.data,
        mask=image.mask,
        saturated=image.saturated,
        saturation=header_level(image.header),
        threshold=threshold,
        max_stars=max_stars,
    )
    return grade_from_stars(stars, exptime=_exptime(image.header))


def grade_from_stars(stars: StarList, *, exptime: float | None = None) -> Grade:
    """Build a :class:`Grade` from an already measured star list (for instance one read back from the archive).

    The shape is the median over the brightest measurable stars. A frame with fewer than
    :data:`MIN_SHAPE_STARS` of them (a sparse field, a short exposure) is graded on what it has: its
    unsaturated stars, else all its stars; ``note`` says so.
    """
    measurable = np.flatnonzero(stars.measurable)[:_N_SHAPE_STARS]
    note = None
    use = measurable
    if len(measurable) < MIN_SHAPE_STARS and len(stars):
        # fewer and fewer demands, and only the brightest of each set: a faint star's size is mostly noise
        for allowed in (FAINT, FAINT | BLENDED | EDGE | MASKED, SHAPE_FLAGS):
            use = np.flatnonzero((stars.flags & (SHAPE_FLAGS & ~allowed)) == 0)[:_N_FALLBACK_STARS]
            if len(use) >= min(MIN_SHAPE_STARS, len(stars)):
                break
        note = (
            f"few measurable stars ({len(measurable)} unsaturated, isolated, SNR >= {SNR_FLOOR:g}): "
            f"shape from the {len(use)} brightest usable"
        )
    shape_fwhm, shape_elongation = stars.fwhm[use], stars.elongation[use]
    fwhm = float(np.nanmedian(shape_fwhm)) if np.isfinite(shape_fwhm).any() else math.nan
    elongation = float(np.nanmedian(shape_elongation)) if np.isfinite(shape_elongation).any() else math.nan
    return Grade(
        background=stars.background,
        background_rms=stars.background_rms,
        n_stars=stars.n_detected,
        fwhm=fwhm,
        elongation=elongation,
        flux=float(np.sum(_comparable(stars).flux[:N_FLUX_STARS])),
        stars=stars,
        exptime=exptime,
        n_measured=len(use),
        note=note,
    )


def _comparable(stars: StarList) -> StarList:
    """The stars whose flux can be compared between frames (none saturated, masked or cut by the edge)."""
    return stars.select((stars.flags & _FLUX_FLAGS) == 0)


def transparency(grade: Grade, reference: Grade, *, transform: Any = None) -> float:
    """Brightness of a frame's stars relative to the same stars in the reference frame (1.0 = as clear).

    Stars are matched by position through ``transform`` (a :class:`service.register.Transform`, or a 3x3 matrix,
    mapping this frame's pixels onto the reference's; found with :func:`~nightshift.service.register.find_transform`
    when not given) and the result is the median of their flux ratios, over the measurable stars (unsaturated,
    isolated, bright: a faint star's aperture holds fainter neighbours' light that clouds do not dim alike). When
    the frames share no star pattern (thick cloud), the k-th brightest unsaturated stars of each frame are paired
    instead (k up to 20). Fluxes are compared per second when both exposure times are known.

    Returns 0.0 when the frame shows no star at all and NaN when the reference has none (nothing to compare).
    """
    src, ref = grade.stars, reference.stars
    if len(src) == 0 or len(ref) == 0:
        return 0.0 if len(src) == 0 and len(ref) > 0 else math.nan
    ratios = np.empty(0)
    if transform is None:
        try:
            transform = find_transform(src, ref)
        except AlignError:
            transform = None  # no common pattern (clouds, another field): compare by flux rank
    if transform is not None:
        matrix = np.asarray(getattr(transform, "matrix", transform), dtype=np.float64)
        ratios = _matched_ratios(src.select(src.measurable), ref.select(ref.measurable), matrix)
        if len(ratios) < 3:
            ratios = _matched_ratios(_comparable(src), _comparable(ref), matrix)
    if len(ratios) < 3:
        # by flux rank: every unsaturated star counts (edge and mask flags differ between frames, ranks would not)
        src, ref = (s.select((s.flags & SATURATED) == 0) for s in (src, ref))
        k = min(len(src), len(ref), N_FLUX_STARS)
        if k == 0:
            return math.nan
        ratios = src.flux[:k] / ref.flux[:k]
    value = float(np.median(ratios))
    if grade.exptime and reference.exptime:
        value *= reference.exptime / grade.exptime
    return value


def _matched_ratios(src: StarList, ref: StarList, matrix: np.ndarray) -> np.ndarray:
    xy = src.xy()
    mapped = xy @ matrix[:2, :2].T + matrix[:2, 2]
    dist, idx = cKDTree(ref.xy()).query(mapped, distance_upper_bound=_MATCH_RADIUS)
    found = np.isfinite(dist)
    if not found.any():
        return np.empty(0)
    # keep the brightest source for each reference star, so a blend is not counted twice
    pairs: dict[int, int] = {}
    for s in np.flatnonzero(found):
        pairs.setdefault(int(idx[s]), int(s))
    s_idx = np.fromiter(pairs.values(), dtype=np.intp)
    r_idx = np.fromiter(pairs.keys(), dtype=np.intp)
    return src.flux[s_idx] / ref.flux[r_idx]


@dataclass
class RejectRules:
    """Thresholds of :func:`judge`; the daemon's config passes them in.

    min_stars : reject with fewer stars than this: nothing to align on (clouds, a closed dome). Small on purpose:
        a sparse field is judged against its own group by ``min_star_fraction``, never by an absolute count.
    min_star_fraction : reject with fewer stars than this fraction of the group's best frame (cloudy).
    min_transparency : reject when stars are fainter than this fraction of the reference's (cloudy).
    max_fwhm_ratio : reject when the FWHM exceeds this multiple of the group median (out of focus, seeing).
    max_elongation : reject when stars are more elongated than this a/b (trailed, wind).
    max_background_ratio : reject when the sky exceeds this multiple of the group median (twilight, moon, lights).
    """

    min_stars: int = 3
    min_star_fraction: float = 0.3
    min_transparency: float = 0.5
    max_fwhm_ratio: float = 1.5
    max_elongation: float = 1.6
    max_background_ratio: float = 3.0


def judge(
    grade: Grade,
    *,
    transparency: float | None,
    group_fwhm_median: float | None,
    group_background_median: float | None,
    best_n_stars: int | None,
    rules: RejectRules,
) -> str | None:
    """Decide whether a graded frame goes into the stack.

    Group figures are for frames of the same object, filter and exposure; pass None for what is not known yet
    (the first frame of a group), and that rule is skipped.

    The rules are tried in this order: transparency (cloudy), sky level (bright sky), too few stars to align on
    (cloudy), elongation (trailed), star count against the group's best frame (cloudy), FWHM (blurred): a
    trailed frame loses faint stars to its streaks and is called trailed, not cloudy. The word before the colon
    is one of ``cloudy``, ``bright sky``, ``trailed``, ``blurred``: a bounded vocabulary for metrics.

    Returns
    -------
    str or None
        None when the frame is accepted, else the first failing rule as a short sentence, such as
        ``"cloudy: transparency 0.21 < 0.5"`` or ``"trailed: elongation 2.10 > 1.6"``.
    """
    if transparency is not None and math.isfinite(transparency) and transparency < rules.min_transparency:
        return f"cloudy: transparency {transparency:.2f} < {rules.min_transparency:g}"
    if (
        group_background_median is not None
        and group_background_median > 0
        and grade.background > rules.max_background_ratio * group_background_median
    ):
        return (
            f"bright sky: background {grade.background:.0f} > {rules.max_background_ratio:g} x "
            f"group median {group_background_median:.0f}"
        )
    if grade.n_stars < rules.min_stars:
        return f"cloudy: {grade.n_stars} stars < {rules.min_stars}"
    if math.isfinite(grade.elongation) and grade.elongation > rules.max_elongation:
        return f"trailed: elongation {grade.elongation:.2f} > {rules.max_elongation:g}"
    if best_n_stars and grade.n_stars < rules.min_star_fraction * best_n_stars:
        return f"cloudy: {grade.n_stars} stars < {rules.min_star_fraction:g} x best frame's {best_n_stars}"
    if (
        group_fwhm_median is not None
        and group_fwhm_median > 0
        and math.isfinite(grade.fwhm)
        and grade.fwhm > rules.max_fwhm_ratio * group_fwhm_median
    ):
        return f"blurred: FWHM {grade.fwhm:.2f} px > {rules.max_fwhm_ratio:g} x group median {group_fwhm_median:.2f} px"
    return None


def quality_score(grade: Grade) -> float:
    """How good a frame is for a reference, higher is better: stars per pixel of FWHM, penalised for elongation."""
    if grade.n_stars <= 0 or not math.isfinite(grade.fwhm) or grade.fwhm <= 0:
        return 0.0
    elongation = grade.elongation if math.isfinite(grade.elongation) and grade.elongation > 1 else 1.0
    return grade.n_stars / (grade.fwhm * elongation)
