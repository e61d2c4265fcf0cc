"""Alignment: meridian flips and rotations against the simulator's true star positions, and the warp."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from astropy.io import fits
from nightshift.service.frame import Image
from nightshift.service.grade import grade_frame
from nightshift.service.register import AlignError, Transform, apply_transform, find_transform
from nightshift.service.simulate import GAIN, READ_NOISE, SimConfig, plan_night
from nightshift.service.stars import StarList, detect_stars
from scipy.spatial import cKDTree

SIZE = 512


def _calibrated(plan, frame) -> Image:
    """A perfectly calibrated light: the simulator's true signal plus its shot and read noise."""
    signal = plan.truth_signal(frame)
    rng = np.random.default_rng([11, frame.index, abs(int(frame.rotation * 1000))])
    sigma = np.sqrt(np.maximum(signal, 0) / GAIN + READ_NOISE**2)
    data = (signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)).astype(np.float32)
    header = fits.Header({"EXPTIME": frame.exptime, "CRPIX1": 256.0, "CRVAL1": 10.0, "CTYPE1": "RA---TAN"})
    return Image(data=data, header=header)


@pytest.fixture(scope="module")
def night():
    """Four lights of one group, the last two after a meridian flip; stars detected once per frame."""
    plan = plan_night(SimConfig(size=SIZE, n_light=4, filters=("V",), light_exptimes=(300.0,), cloudy=0))
    frames = plan.by_kind("light")
    assert [f.flipped for f in frames] == [False, False, True, True]
    images = [_calibrated(plan, f) for f in frames]
    stars = [detect_stars(im.data) for im in images]
    return plan, frames, images, stars


def _truth_error(plan, frame, reference, transform: Transform) -> float:
    """RMS distance (px) between the frame's true star positions mapped by ``transform`` and the reference's."""
    src, ref = plan.star_positions(frame), plan.star_positions(reference)
    inside = np.all((ref >= 0) & (ref <= SIZE - 1), axis=1)
    mapped = transform.apply(src[inside])
    return float(np.sqrt(np.mean(np.sum((mapped - ref[inside]) ** 2, axis=1))))


def test_meridian_flipped_frames_land_within_a_tenth_of_a_pixel(night):
    plan, frames, _, stars = night
    for i in (2, 3):
        t = find_transform(stars[i], stars[0])
        assert abs(abs(t.rotation_deg) - 180.0) < 1.0
        assert t.scale == pytest.approx(1.0, abs=1e-3)
        assert t.n_matches >= 20
        assert t.rms < 0.3
        assert _truth_error(plan, frames[i], frames[0], t) < 0.1


def test_unflipped_frame_aligns_and_reference_is_identity(night):
    plan, frames, _, stars = night
    t = find_transform(stars[1], stars[0])
    assert abs(t.rotation_deg) < 1.0
    assert _truth_error(plan, frames[1], frames[0], t) < 0.1
    back = Transform.from_dict(json.loads(json.dumps(t.to_dict())))
    assert np.array_equal(back.matrix, t.matrix) and back.n_matches == t.n_matches and back.rms == t.rms
    same = find_transform(stars[0], stars[0])
    assert np.allclose(same.matrix, np.eye(3), atol=1e-9) and same.rms < 1e-9


@pytest.mark.parametrize("rotation", [2.5, -4.0])
def test_small_rotation_is_recovered(night, rotation):
    plan, frames, _, stars = night
    turned = replace(frames[1], rotation=rotation, offset=(7.3, -5.1))
    t = find_transform(detect_stars(_calibrated(plan, turned).data), stars[0])
    # the simulator rotates the sky into the frame; the transform takes the frame back onto the reference
    assert t.rotation_deg == pytest.approx(frames[0].rotation - rotation, abs=0.05)
    assert _truth_error(plan, turned, frames[0], t) < 0.1


def test_shallow_frame_aligns_on_a_deep_reference():
    """A short exposure shows a fraction of the stars of the long one it is aligned to (same object and filter)."""
    plan = plan_night(SimConfig(size=384, n_light=2, filters=("B",), light_exptimes=(30.0, 300.0), cloudy=0))
    frames = plan.by_kind("light")
    deep = next(f for f in frames if f.exptime == 300.0 and not f.flipped)
    shallow = next(f for f in frames if f.exptime == 30.0 and f.flipped)
    ref_stars = detect_stars(_calibrated(plan, deep).data)
    found = detect_stars(_calibrated(plan, shallow).data)
    n = 15  # as few as a 30 s frame through B shows on a sparse field: astroalign fails on 15 against 50
    src_stars = StarList(found.x[:n], found.y[:n], found.flux[:n], found.fwhm[:n], found.elongation[:n], 0.0, 1.0)
    assert len(ref_stars) > 4 * n
    t = find_transform(src_stars, ref_stars)
    assert abs(abs(t.rotation_deg) - 180.0) < 1.0
    size = plan.shape[0]
    src, ref = plan.star_positions(shallow), plan.star_positions(deep)
    inside = np.all((ref >= 0) & (ref <= size - 1), axis=1)
    assert np.sqrt(np.mean(np.sum((t.apply(src[inside]) - ref[inside]) ** 2, axis=1))) < 0.1


def test_warped_frame_puts_its_stars_on_the_reference(night):
    _, _, images, stars = night
    t = find_transform(stars[2], stars[0])
    aligned = apply_transform(images[2], t, images[0].data.shape)
    assert aligned.data.dtype == np.float32 and aligned.data.shape == (SIZE, SIZE)
    found = detect_stars(aligned.data, mask=aligned.mask)
    dist, _ = cKDTree(stars[0].xy(100)).query(found.xy(100))
    assert np.median(dist) < 0.1
    assert aligned.header["ALIGNN"] == t.n_matches
    assert aligned.header["ALIGNROT"] == pytest.approx(t.rotation_deg, abs=1e-3)
    assert "CRPIX1" not in aligned.header and "CTYPE1" not in aligned.header  # its own WCS no longer applies
    assert aligned.header["EXPTIME"] == 300.0


def test_warp_masks_out_of_field_and_bad_pixels_and_leaves_input_alone():
    rng = np.random.default_rng(5)
    data = rng.normal(100, 5, (64, 80)).astype(np.float32)
    mask = np.zeros(data.shape, dtype=bool)
    mask[30, 40] = True
    image = Image(data, fits.Header(), mask)
    before, mask_before = data.copy(), mask.copy()
    shift = np.array([[1.0, 0.0, 5.0], [0.0, 1.0, -3.0], [0.0, 0.0, 1.0]])  # +5 px in x, -3 px in y
    out = apply_transform(image, Transform(shift, 0.0, 10, 0.0), (64, 80))
    assert np.array_equal(data, before) and np.array_equal(mask, mask_before)
    assert out.mask[:, :5].all() and out.mask[61:, :].all()  # uncovered strips
    assert np.isnan(out.data[out.mask]).all() and np.isfinite(out.data[~out.mask]).all()
    assert out.mask[27, 45] and not out.mask[27, 47]  # the bad pixel moved with the frame
    assert out.data[10, 10] == pytest.approx(data[13, 5])  # integer shift: values carried exactly
    assert out.mask.sum() == 5 * 64 + 3 * 80 - 5 * 3 + 1


def test_too_few_stars_raise_align_error(night):
    _, _, _, stars = night
    two = StarList(stars[1].x[:2], stars[1].y[:2], stars[1].flux[:2], stars[1].fwhm[:2], stars[1].elongation[:2], 0, 1)
    with pytest.raises(AlignError, match="too few stars") as info:
        find_transform(two, stars[0])
    assert "2 in frame" in info.value.reason
    four = StarList(stars[1].x[:4], stars[1].y[:4], stars[1].flux[:4], stars[1].fwhm[:4], stars[1].elongation[:4], 0, 1)
    with pytest.raises(AlignError):
        find_transform(four, stars[0])


def test_empty_sky_and_a_foreign_field_raise_align_error(night):
    _, _, _, stars = night
    blank = detect_stars(np.random.default_rng(2).normal(100, 10, (SIZE, SIZE)).astype(np.float32))
    with pytest.raises(AlignError):
        find_transform(blank, stars[0])
    other = plan_night(SimConfig(size=SIZE, n_light=1, filters=("V",), light_exptimes=(300.0,), objects=("M 42",)))
    foreign = detect_stars(_calibrated(other, other.by_kind("light")[0]).data)
    with pytest.raises(AlignError) as info:
        find_transform(foreign, stars[0])
    assert info.value.reason


# -- across depths, filters, flips, large offsets and rotations (real calibration, perfect masters) ---------------
@pytest.fixture(scope="module")
def hard():
    """B and V, 30 s and 300 s, a flip in every group, offsets up to a third of the frame between two lights and
    rotations up to 6 degrees between two lights."""
    from conftest import calibrated_light

    config = SimConfig(size=512, n_light=2, cloudy=0, max_offset=512 / 6, max_rotation=3.0, seed=11)
    plan = plan_night(config)
    frames = plan.by_kind("light")
    images = [calibrated_light(plan, f) for f in frames]
    return plan, frames, images, [grade_frame(im).stars for im in images]


def test_every_pair_of_lights_registers_to_truth(hard):
    from nightshift.service.simulate import corner_error

    plan, frames, _, stars = hard
    errors = []
    for i, ref in enumerate(frames):
        for j, frame in enumerate(frames):
            if i == j:
                continue
            t = find_transform(stars[j], stars[i])
            truth = plan.transform(ref) @ np.linalg.inv(plan.transform(frame))
            errors.append(corner_error(t.matrix, truth, plan.shape))
            assert t.n_matches >= 10
    # every frame onto every other: shallow B onto deep V, flipped onto unflipped, far apart
    assert max(errors) < 0.1 and float(np.median(errors)) < 0.03, (max(errors), float(np.median(errors)))


def test_wcs_guess_and_composed_transforms_agree_with_truth(hard):
    from nightshift.service.register import compose, wcs_transform
    from nightshift.service.simulate import corner_error

    plan, frames, _, stars = hard
    a, b, c = 0, 3, 6  # B 30 s, V 300 s, V 30 s flipped
    plan_wcs = [plan.wcs(frames[k]) for k in (a, b)]
    guess = wcs_transform(plan_wcs[0], plan_wcs[1], plan.shape)
    truth_ab = plan.transform(frames[b]) @ np.linalg.inv(plan.transform(frames[a]))
    assert corner_error(guess, truth_ab, plan.shape) < 0.01, "the simulator's WCS is exact"
    assert wcs_transform(fits.Header(), plan_wcs[1], plan.shape) is None
    t_ab = find_transform(stars[a], stars[b], guess=guess)
    assert t_ab.method == "wcs" and corner_error(t_ab.matrix, truth_ab, plan.shape) < 0.05
    # frame c -> b, then b -> a: one composed transform c -> a
    t_cb, t_ba = find_transform(stars[c], stars[b]), find_transform(stars[b], stars[a])
    truth_ca = plan.transform(frames[a]) @ np.linalg.inv(plan.transform(frames[c]))
    composed = compose(t_ba, t_cb)
    assert composed.method == "composed" and composed.n_matches == min(t_ba.n_matches, t_cb.n_matches)
    assert corner_error(composed.matrix, truth_ca, plan.shape) < 0.08
    assert np.allclose(t_ab.inverse().matrix, np.linalg.inv(t_ab.matrix))


def test_lanczos_keeps_stars_sharp_and_saturated_cores_flagged(hard):
    plan, _, images, stars = hard
    frame, ref = 3, 0  # a 300 s V frame (saturated stars) onto a 30 s B one
    t = find_transform(stars[frame], stars[ref])
    image = images[frame]
    for interpolation in ("lanczos", "cubic"):
        aligned = apply_transform(image, t, plan.shape, interpolation=interpolation)
        before, after = grade_frame(image), grade_frame(aligned)
        assert after.fwhm <= 1.02 * before.fwhm, interpolation
        assert after.background_rms >= 0.8 * before.background_rms, "the noise is not smoothed away"
        assert aligned.header["ALIGNINT"] == interpolation
    # saturated cores travel as saturated (not as a 2x2-grown hole), with as many pixels as they had
    assert image.saturated.sum() > 20
    assert aligned.saturated.sum() == pytest.approx(image.saturated.sum(), rel=0.15)
    # no dark ring: around each saturated core, nothing falls below the sky's low tail
    sky, noise = before.background, before.background_rms
    ring = cv2_dilate(aligned.saturated, 4) & ~cv2_dilate(aligned.saturated, 1)
    assert np.nanmin(aligned.data[ring]) > sky - 5 * noise


def cv2_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    import cv2

    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
