"""Grading and rejection: star measurements against known fields, and the rules on a simulated night."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.io import fits
from nightshift.service.frame import Image
from nightshift.service.grade import (
    MIN_SHAPE_STARS,
    Grade,
    RejectRules,
    grade_frame,
    judge,
    quality_score,
    transparency,
)
from nightshift.service.register import find_transform
from nightshift.service.simulate import GAIN, READ_NOISE, SimConfig, plan_night
from nightshift.service.stars import SATURATED, StarList, detect_stars


def _gaussian_field(
    n: int = 60,
    size: int = 256,
    fwhm: float = 3.0,
    elongation: float = 1.0,
    sky: float = 500.0,
    noise: float = 8.0,
    seed: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian stars (elongated along x if asked) on a flat sky: image, true (x, y), true fluxes."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(12, size - 12, (n, 2))
    flux = 10 ** rng.uniform(3.5, 5.0, n)
    sy = fwhm / 2.3548
    sx = sy * elongation
    img = np.full((size, size), sky, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for (x0, y0), f in zip(xy, flux, strict=True):
        img += (
            f / (2 * np.pi * sx * sy) * np.exp(-((xx - x0) ** 2 / (2 * sx**2) + (yy - y0) ** 2 / (2 * sy**2)))
        ).astype(np.float32)
    img += rng.normal(0, noise, img.shape).astype(np.float32)
    return img, xy, flux


def _calibrated(plan, frame) -> Image:
    """A perfectly calibrated light: the simulator's true signal plus its shot and read noise."""
    signal = plan.truth_signal(frame)
    rng = np.random.default_rng([7, frame.index])
    sigma = np.sqrt(np.maximum(signal, 0) / GAIN + READ_NOISE**2)
    data = (signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)).astype(np.float32)
    header = fits.Header({"EXPTIME": frame.exptime, "OBJECT": frame.object, "FILTER": frame.filter})
    return Image(data=data, header=header)


@pytest.fixture(scope="module")
def night():
    """One group (object, filter, exposure) of 6 lights: the second cloudy, the last half meridian-flipped; the
    field has faint stars down to 2 ADU/s, as the real sky has ever more faint stars."""
    plan = plan_night(SimConfig(size=512, n_light=6, filters=("V",), light_exptimes=(300.0,), cloudy=1, faintest=2.0))
    frames = plan.by_kind("light")
    images = [_calibrated(plan, f) for f in frames]
    grades = [grade_frame(im) for im in images]
    return plan, frames, images, grades


def test_detect_stars_measures_known_gaussian_field():
    img, xy, _ = _gaussian_field(fwhm=3.0)
    stars = detect_stars(img)
    assert stars.n_detected == len(xy)
    assert np.median(stars.fwhm) == pytest.approx(3.0, rel=0.05)
    assert np.median(stars.elongation) < 1.1
    assert stars.background == pytest.approx(500.0, abs=1.0)
    assert stars.background_rms == pytest.approx(8.0, rel=0.1)
    assert np.all(np.diff(stars.flux) <= 0), "brightest first"
    dist = np.min(np.hypot(*(stars.xy()[:, None, :] - xy[None, :, :]).transpose(2, 0, 1)), axis=1)
    assert np.median(dist) < 0.05


def test_detect_stars_ignores_masked_pixels_and_does_not_modify_input():
    img, xy, _ = _gaussian_field()
    grid = [(x, y) for x in range(30, 230, 10) for y in range(30, 230, 10)]
    cx, cy = max(grid, key=lambda p: np.min(np.hypot(xy[:, 0] - p[0], xy[:, 1] - p[1])))
    img[cy - 5 : cy + 5, cx - 5 : cx + 5] = 60000.0  # a blob that is not a star, masked as bad
    mask = np.zeros(img.shape, dtype=bool)
    mask[cy - 7 : cy + 7, cx - 7 : cx + 7] = True
    before = img.copy()
    stars = detect_stars(img, mask=mask)
    assert np.array_equal(img, before)
    assert not ((np.abs(stars.x - cx) < 8) & (np.abs(stars.y - cy) < 8)).any()
    unmasked = detect_stars(img)
    assert ((np.abs(unmasked.x - cx) < 8) & (np.abs(unmasked.y - cy) < 8)).any()


def test_cosmic_ray_is_not_a_star():
    img, xy, _ = _gaussian_field()
    img[50, 200] += 5000.0  # one hot pixel / cosmic ray, far sharper than the optics deliver
    stars = detect_stars(img)
    assert stars.n_detected == len(xy)
    assert not ((np.abs(stars.x - 200) < 1) & (np.abs(stars.y - 50) < 1)).any()


def test_star_list_round_trips_through_json():
    stars = detect_stars(_gaussian_field()[0], max_stars=20)
    stars.fwhm[3] = np.nan
    back = StarList.from_dict(json.loads(json.dumps(stars.to_dict(), allow_nan=False)))
    assert len(back) == 20 and back.n_detected == stars.n_detected
    assert np.allclose(back.xy(), stars.xy(), atol=1e-4)
    assert np.allclose(back.flux, stars.flux, rtol=1e-6)
    assert np.isnan(back.fwhm[3]) and np.allclose(np.delete(back.fwhm, 3), np.delete(stars.fwhm, 3), atol=1e-4)
    assert back.background == pytest.approx(stars.background)
    assert back.xy(5).shape == (5, 2)


def test_grade_of_empty_sky():
    rng = np.random.default_rng(3)
    image = Image(rng.normal(300, 10, (128, 128)).astype(np.float32), fits.Header({"EXPTIME": 60.0}))
    grade = grade_frame(image)
    assert grade.n_stars == 0 and math.isnan(grade.fwhm)
    assert grade.row() == {
        "background": pytest.approx(300, abs=2),
        "background_rms": pytest.approx(10, rel=0.1),
        "n_stars": 0,
        "fwhm": None,
        "elongation": None,
    }
    assert quality_score(grade) == 0.0
    reason = judge(
        grade,
        transparency=None,
        group_fwhm_median=3.0,
        group_background_median=300.0,
        best_n_stars=100,
        rules=RejectRules(),
    )
    assert reason == "cloudy: 0 stars < 3"


def test_trailed_frame_is_rejected():
    grade = grade_frame(Image(_gaussian_field(elongation=2.0)[0], fits.Header()))
    assert grade.elongation == pytest.approx(2.0, rel=0.15)
    reason = judge(
        grade,
        transparency=1.0,
        group_fwhm_median=grade.fwhm,
        group_background_median=grade.background,
        best_n_stars=grade.n_stars,
        rules=RejectRules(),
    )
    assert reason is not None and reason.startswith("trailed: elongation")


def _grade(**kw) -> Grade:
    values = {"background": 100.0, "background_rms": 10.0, "n_stars": 100, "fwhm": 3.0, "elongation": 1.05}
    values.update(kw)
    empty = np.empty(0)
    return Grade(**values, flux=1e5, stars=StarList(empty, empty, empty, empty, empty, 100.0, 10.0))


@pytest.mark.parametrize(
    ("changes", "context", "expected"),
    [
        ({}, {}, None),
        ({}, {"transparency": 0.21}, "cloudy: transparency 0.21 < 0.5"),
        ({"n_stars": 20}, {}, "cloudy: 20 stars < 0.3 x best frame's 100"),
        ({"n_stars": 2}, {}, "cloudy: 2 stars < 3"),
        # a sparse field: few stars, but as many as its group shows
        ({"n_stars": 6}, {"best": 8}, None),
        ({"elongation": 2.1}, {}, "trailed: elongation 2.10 > 1.6"),
        ({"fwhm": 5.0}, {}, "blurred: FWHM 5.00 px > 1.5 x group median 3.00 px"),
        ({"background": 400.0}, {}, "bright sky: background 400 > 3 x group median 100"),
        # unknown group figures skip their rules
        ({"fwhm": 5.0, "background": 400.0, "n_stars": 20}, {"fwhm": None, "bg": None, "best": None}, None),
    ],
)
def test_judge_rules(changes, context, expected):
    reason = judge(
        _grade(**changes),
        transparency=context.get("transparency", 0.98),
        group_fwhm_median=context.get("fwhm", 3.0),
        group_background_median=context.get("bg", 100.0),
        best_n_stars=context.get("best", 100),
        rules=RejectRules(),
    )
    assert reason == expected


def test_rules_come_from_config():
    strict = RejectRules(max_elongation=1.02)
    assert judge(
        _grade(),
        transparency=None,
        group_fwhm_median=None,
        group_background_median=None,
        best_n_stars=None,
        rules=strict,
    ) == ("trailed: elongation 1.05 > 1.02")


def test_simulated_night_rejects_the_cloudy_frame_and_only_it(night):
    _, frames, _, grades = night
    ref = max(range(len(grades)), key=lambda i: quality_score(grades[i]))
    assert not frames[ref].cloudy
    fwhm_median = float(np.median([g.fwhm for g in grades]))
    background_median = float(np.median([g.background for g in grades]))
    best_n = max(g.n_stars for g in grades)
    reasons = []
    for g in grades:
        t = transparency(g, grades[ref], transform=find_transform(g.stars, grades[ref].stars))
        reasons.append(
            judge(
                g,
                transparency=t,
                group_fwhm_median=fwhm_median,
                group_background_median=background_median,
                best_n_stars=best_n,
                rules=RejectRules(),
            )
        )
    for frame, reason in zip(frames, reasons, strict=True):
        if frame.cloudy:
            assert reason is not None and reason.startswith("cloudy: transparency")
        else:
            assert reason is None, f"{frame.name} wrongly rejected: {reason}"
    assert sum(f.cloudy for f in frames) == 1


def test_transparency_follows_the_true_sky(night):
    _, frames, _, grades = night
    ref = 0
    assert transparency(grades[ref], grades[ref]) == pytest.approx(1.0)
    for frame, g in zip(frames, grades, strict=True):
        truth = frame.transparency / frames[ref].transparency
        matched = transparency(g, grades[ref], transform=find_transform(g.stars, grades[ref].stars))
        assert matched == pytest.approx(truth, abs=0.05), frame.name
        assert transparency(g, grades[ref]) == pytest.approx(truth, abs=0.12), frame.name


def test_transparency_compares_per_second():
    a, b = _grade(), _grade()
    a.stars = b.stars = detect_stars(_gaussian_field()[0])
    a.exptime, b.exptime = 60.0, 30.0  # same stars in twice the time: half as transparent
    assert transparency(a, b) == pytest.approx(0.5)


def test_grade_measures_the_simulated_sky(night):
    _, frames, _, grades = night
    for frame, g in zip(frames, grades, strict=True):
        expected_rms = math.sqrt(frame.level / GAIN + READ_NOISE**2)
        assert g.background == pytest.approx(frame.level, rel=0.05)
        assert g.background_rms == pytest.approx(expected_rms, rel=0.1)
    sharp = [g.fwhm for f, g in zip(frames, grades, strict=True) if not f.cloudy]
    cloudy = next(g for f, g in zip(frames, grades, strict=True) if f.cloudy)
    assert cloudy.n_stars < 0.5 * min(g.n_stars for f, g in zip(frames, grades, strict=True) if not f.cloudy)
    assert cloudy.fwhm > max(sharp)  # the simulator blurs cloudy frames


# -- the right stars: saturated long exposures, trailed frames, sparse fields (real calibration, perfect masters) --
@pytest.fixture(scope="module")
def mixed():
    """30 s and 300 s V lights of one field (the 300 s ones saturate their brightest stars) and a trailed one."""
    from conftest import calibrated_light

    plan = plan_night(SimConfig(size=512, n_light=2, filters=("V",), light_exptimes=(30.0, 300.0), cloudy=0, trailed=1))
    frames = plan.by_kind("light")
    images = [calibrated_light(plan, f) for f in frames]
    return plan, frames, images, [grade_frame(im) for im in images]


def test_long_exposures_truly_saturate_and_their_stars_say_so(mixed):
    plan, frames, images, grades = mixed
    for frame, image, grade in zip(frames, images, grades, strict=True):
        raw, _ = plan.render(frame)
        clipped = raw == 65535
        assert np.array_equal(image.saturated, clipped), "every raw pixel at 65535 is flagged, and only those"
        assert image.header["SATURATE"] == pytest.approx(65535 - 949 - 0.07 * frame.exptime, rel=0.25)
        flagged = (grade.stars.flags & SATURATED) != 0
        if frame.exptime == 300.0:
            assert clipped.sum() > 20 and flagged.sum() >= 3
            # each saturated blob is one star, whole, at the true position of a catalogue star
            xy = grade.stars.xy()[flagged]
            true = plan.star_positions(frame)
            assert np.max(np.min(np.hypot(*(xy[:, None, :] - true[None, :, :]).transpose(2, 0, 1)), axis=1)) < 0.5
        assert not (grade.stars.measurable & flagged).any()


def test_round_stars_are_never_called_trailed_and_trailed_ones_are(mixed):
    _, frames, _, grades = mixed
    for frame, grade in zip(frames, grades, strict=True):
        if frame.trailed:
            assert grade.elongation > 2.0
            reason = judge(
                grade,
                transparency=1.0,
                group_fwhm_median=None,
                group_background_median=None,
                best_n_stars=max(g.n_stars for g in grades),
                rules=RejectRules(),
            )
            assert reason is not None and reason.startswith("trailed:")
        else:
            assert grade.elongation < 1.1, frame.name
            assert grade.note is None and grade.n_measured >= MIN_SHAPE_STARS


def test_a_sparse_field_is_graded_on_what_it_has_and_kept():
    from conftest import calibrated_light

    plan = plan_night(
        SimConfig(size=192, n_light=3, filters=("B",), light_exptimes=(30.0,), cloudy=0, stars=150, seed=2)
    )
    grades = [grade_frame(calibrated_light(plan, f)) for f in plan.by_kind("light")]
    assert all(3 <= g.n_stars <= 15 for g in grades), [g.n_stars for g in grades]
    assert all(g.note and "few measurable stars" in g.note for g in grades if g.n_measured < MIN_SHAPE_STARS)
    best = max(g.n_stars for g in grades)
    for g in grades:
        assert math.isfinite(g.fwhm)
        reason = judge(
            g,
            transparency=1.0,
            group_fwhm_median=float(np.median([x.fwhm for x in grades])),
            group_background_median=float(np.median([x.background for x in grades])),
            best_n_stars=best,
            rules=RejectRules(),
        )
        assert reason is None, reason
