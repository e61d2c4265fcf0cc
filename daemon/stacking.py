"""After calibration: grade a light, judge it against its group, align it, and keep its stack current.

One stack per (night, object, filter, exposure). All stacks of one (night, object, filter) share one alignment
reference, so a night's stacks of a target land on the same pixel grid: the first good frame, until a frame
REBASE_FACTOR times better (more, sharper stars) takes over. Star matching works between deep and shallow
frames, so either can be the reference. A change of reference moves every member through one composed transform
(new reference <- old reference <- frame, from the stored transforms) and re-warps it from its calibrated file:
no member is matched again, none is lost. Live, each accepted frame is added to a running mean on disk at once;
when the group goes quiet (or the night ends) a sigma-clipped combine of every accepted frame, re-judged against
the whole group, replaces it.

Aligning is split like calibrating: :func:`compute_align` takes an :class:`AlignJob` of plain data (paths, star
lists, a transform) and returns an :class:`AlignResult` (the transform as a dict), touching no database.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from nightshift.daemon.archive import now_iso
from nightshift.daemon.config import GradingConfig, StackingConfig
from nightshift.daemon.products import product_shape
from nightshift.daemon.workspace import Timings, Workspace
from nightshift.service.colour_preview import colour_preview_png
from nightshift.service.fitsio import read_flags, read_image, write_bytes_atomic, write_fits_atomic
from nightshift.service.frame import Image
from nightshift.service.grade import Grade, grade_frame, judge, transparency
from nightshift.service.preview import preview_png
from nightshift.service.register import (
    AlignError,
    Transform,
    apply_transform,
    compose,
    find_transform,
    wcs_transform,
)
from nightshift.service.stack import LiveStack, final_combine
from nightshift.service.stars import StarList

__all__ = [
    "AlignJob",
    "AlignResult",
    "FinalJob",
    "FinalResult",
    "GradeJob",
    "GradeResult",
    "Stacker",
    "compute_align",
    "compute_final",
    "compute_grade",
    "read_frame",
]

#: A live stack's picture is redrawn at most this often (the FITS file is rewritten with every frame).
STACK_PREVIEW_SECONDS = 60.0
#: A frame this many times better than the current alignment reference becomes the reference.
REBASE_FACTOR = 1.5
#: Members tried as bridges for a frame the reference alone does not match.
MAX_BRIDGES = 6

log = logging.getLogger("nightshift.stack")

#: A frame's camera setup: lights of two cameras, two binnings, or a mono and a colour camera never share a stack or
#: an alignment reference (their pixels differ). In SQL over ``frames``, and over ``stacks`` (which store it).
_FRAME_SETUP = (
    "camera IS ? AND COALESCE(xbin, 1) = ? AND COALESCE(ybin, 1) = ? "
    "AND (CASE WHEN cfa IS NOT NULL OR naxis3 IS NOT NULL THEN 3 ELSE 1 END) = ?"
)
_STACK_SETUP = "camera IS ? AND COALESCE(xbin, 1) = ? AND COALESCE(ybin, 1) = ? AND COALESCE(planes, 1) = ?"
#: A (night, object, filter) of one setup shares one alignment reference; a stack adds the exposure.
_TARGET = "night = ? AND object IS ? AND filter IS ?"
_STACK_GROUP = f"{_TARGET} AND abs(exptime - ?) < 1e-6 AND {_STACK_SETUP}"
_GROUP = f"{_TARGET} AND abs(exptime - ?) < 1e-6 AND {_FRAME_SETUP} AND kind = 'light'"


def _planes(frame: dict[str, Any]) -> int:
    """3 for a colour camera's light (a Bayer mosaic or a debayered cube), else 1."""
    return 3 if frame.get("cfa") is not None or frame.get("naxis3") is not None else 1


def _setup(frame: dict[str, Any]) -> list[Any]:
    return [frame.get("camera"), frame.get("xbin") or 1, frame.get("ybin") or 1, _planes(frame)]


def _target_args(f: dict[str, Any]) -> list[Any]:
    """A frame's (night, object, filter) and setup: the group sharing one alignment reference."""
    return [f["night"], f["object"], f["filter"], *_setup(f)]


def _group_args(f: dict[str, Any]) -> list[Any]:
    """A frame's stack group: (night, object, filter, exposure) and setup."""
    return [f["night"], f["object"], f["filter"], f["exptime"], *_setup(f)]


def _stack_args(stack: dict[str, Any]) -> list[Any]:
    """A stack row's group, to find its frames with :data:`_GROUP`."""
    setup = [stack.get("camera"), stack.get("xbin") or 1, stack.get("ybin") or 1, stack.get("planes") or 1]
    return [stack["night"], stack["object"], stack["filter"], stack["exptime"], *setup]


def _score(row: dict[str, Any]) -> float:
    """How good a frame is as an alignment reference: many sharp stars."""
    return (row.get("n_stars") or 0) / max(row.get("fwhm") or 0.5, 0.5)


def stack_shape(frame: dict[str, Any]) -> tuple[int, ...]:
    """The shape of the stack a frame (its reference) sets: its product shape, with 3 planes for a colour camera."""
    shape = product_shape(frame)
    return (3, *shape) if frame.get("cfa") is not None or frame.get("naxis3") is not None else shape


def stack_picture(image: Image, title: str) -> bytes:
    """A stack's PNG: in colour (neutral sky, one stretch) for a colour stack, grey for a mono one."""
    if image.is_colour:
        return colour_preview_png(image.data, mask=image.mask, title=title)
    return preview_png(image.data, mask=image.mask, title=title)


def read_frame(path: Path) -> Image:
    """A calibrated or aligned product with its bad and saturated pixels."""
    img = read_image(path)
    img.mask, img.saturated = read_flags(path)
    return img


@dataclass
class AlignJob:
    """Everything needed to align one calibrated light, as plain data.

    With ``transform`` (a :meth:`Transform.to_dict`, frame -> reference) the frame is only warped: a change of
    reference. Otherwise the transform is found from the star lists (:meth:`StarList.to_dict`), with the two
    calibrated headers' celestial WCS, when both have one, as a first guess.
    """

    calibrated: Path
    aligned: Path
    shape: tuple[int, int]  # the reference's (rows, columns)
    interpolation: str = "lanczos"
    transform: dict[str, Any] | None = None
    stars: dict[str, Any] | None = None
    reference_stars: dict[str, Any] | None = None
    reference_calibrated: Path | None = None
    #: Frames already on the reference's grid to match through when the reference itself shares too few stars
    #: with this frame (a large dither, a sparse field): {"stars": star list dict, "transform": member -> reference}.
    bridges: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AlignResult:
    aligned: Path
    transform: dict[str, Any]
    timings: Timings = field(default_factory=Timings)


@dataclass
class GradeJob:
    """One calibrated light to grade, as plain data."""

    calibrated: Path
    threshold: float


@dataclass
class GradeResult:
    grade: Grade
    timings: Timings = field(default_factory=Timings)


def compute_grade(job: GradeJob) -> GradeResult:
    """Read a calibrated light with its flags and grade it. Touches no database."""
    timings = Timings()
    with timings.stage("grade"):
        grade = grade_frame(read_frame(job.calibrated), threshold=job.threshold)
    return GradeResult(grade, timings)


@dataclass
class FinalJob:
    """A final combine as plain data: the stack's row and members (rows), their aligned files, the header, where
    the stack and its picture go, and the rules."""

    stack: dict[str, Any]
    members: list[dict[str, Any]]
    aligned: list[Path]
    header: fits.Header
    path: Path
    preview: Path
    sigma: float
    mem_limit_bytes: int


@dataclass
class FinalResult:
    timings: Timings = field(default_factory=Timings)


def compute_final(job: FinalJob) -> FinalResult:
    """Combine the aligned frames (sigma-clipped mean in row bands) and write the stack and its picture."""
    result = FinalResult()
    with result.timings.stage("stack"):
        image = final_combine(
            job.aligned, header=job.header, sigma=job.sigma, mem_limit_bytes=job.mem_limit_bytes, history=False
        )
        write_fits_atomic(job.path, image)
    with result.timings.stage("preview"):
        stack = job.stack
        title = f"{stack['object']} {stack['filter'] or 'no filter'} {stack['exptime']:g}s x{len(job.members)}"
        write_bytes_atomic(job.preview, stack_picture(image, title))
    return result


def compute_align(job: AlignJob) -> AlignResult:
    """Find the transform (unless given), warp the calibrated frame onto the reference's grid and write it.

    Touches no database. Raises AlignError when the frame shares no star pattern with the reference.
    """
    timings = Timings()
    with timings.stage("align"):
        img = read_frame(job.calibrated)
        if job.transform is not None:
            transform = Transform.from_dict(job.transform)
        else:
            if job.stars is None or job.reference_stars is None:
                raise AlignError("no star list to align with")
            guess = None
            if job.reference_calibrated is not None:
                guess = wcs_transform(img.header, fits.getheader(job.reference_calibrated), img.plane_shape)
            stars = StarList.from_dict(job.stars)
            try:
                transform = find_transform(stars, StarList.from_dict(job.reference_stars), guess=guess)
            except AlignError as exc:
                transform = _through_bridges(stars, job.bridges, exc)
        if transform.method == "identity":
            aligned = img  # the reference itself: its own pixels
        else:
            aligned = apply_transform(img, transform, job.shape, interpolation=job.interpolation)
        write_fits_atomic(job.aligned, aligned)
    return AlignResult(job.aligned, transform.to_dict(), timings)


def _through_bridges(stars: StarList, bridges: list[dict[str, Any]], failure: AlignError) -> Transform:
    """The frame matched to a member already on the reference's grid, composed with that member's transform: a
    frame whose stars overlap the reference's too little still overlaps one of the group. Raises ``failure``
    when no member matches either."""
    for bridge in bridges:
        try:
            onto_member = find_transform(stars, StarList.from_dict(bridge["stars"]))
        except AlignError:
            continue
        return compose(Transform.from_dict(bridge["transform"]), onto_member)
    raise failure


class Stacker:
    """Grading, alignment and stacking of calibrated lights, on the archive's thread.

    Holds the live stacks in memory (rebuilt from the aligned frames on disk after a restart) and when each
    stack's picture was last drawn.
    """

    def __init__(self, ws: Workspace, grading: GradingConfig, rules: StackingConfig, *, live: bool = True) -> None:
        """``live`` False (a batch reduce, finalised at once): members are recorded as they come but the running
        mean is not redrawn and rewritten after every light, only the final combine is made."""
        self.ws = ws
        self.archive, self.layout, self.metrics = ws.archive, ws.layout, ws.metrics
        self.grading = grading
        self.rules = rules
        self.live = live
        self.live_stacks: dict[int, LiveStack] = {}
        self.stack_previews: dict[int, float] = {}  # stack id -> when its picture was last drawn (monotonic)

    def forget(self) -> None:
        """Drop the live stacks held in memory (they are rebuilt from disk when next needed)."""
        self.live_stacks.clear()

    def _grade_of(self, row: dict[str, Any]) -> Grade | None:
        src = self.archive.load_sources(row["id"])
        if src is None:
            return None
        return Grade(
            background=row["background"],
            background_rms=row["background_rms"],
            n_stars=row["n_stars"],
            fwhm=row["fwhm"],
            elongation=row["elongation"],
            flux=src["flux"],
            stars=StarList.from_dict(src["stars"]),
            exptime=row["exptime"],
            n_measured=int(src.get("n_measured", 0)),
            note=src.get("note"),
        )

    def grade_job(self, frame: dict[str, Any]) -> GradeJob | None:
        """The grading to do for ``frame``; None when its grade is already in the archive."""
        if frame.get("n_stars") is not None and self.archive.load_sources(frame["id"]) is not None:
            return None
        return GradeJob(self.layout.root / frame["calibrated_path"], self.grading.detect_threshold)

    def _ensure_graded(self, frame: dict[str, Any]) -> Grade:
        job = self.grade_job(frame)
        if job is None:
            g = self._grade_of(frame)
            assert g is not None
            return g
        return self.record_grade(frame, compute_grade(job))

    def record_grade(self, frame: dict[str, Any], result: GradeResult) -> Grade:
        self.ws.observe(result.timings)
        g = result.grade
        sources = {"stars": g.stars.to_dict(), "flux": g.flux, "n_measured": g.n_measured, "note": g.note}
        self.archive.save_sources(frame["id"], sources)
        self.archive.update_frame(frame["id"], **g.row())
        frame.update(g.row())
        if g.note:
            self.archive.event("grade", "graded", g.note, frame_id=frame["id"])
        return g

    def _judge(self, frame: dict[str, Any], grade: Grade, others: list[dict[str, Any]]) -> tuple[str | None, float]:
        """Judge ``frame`` against the graded frames of its group (``others`` may include itself)."""
        rows = [r for r in others if r["n_stars"] is not None] or [frame]
        best = max(rows, key=lambda r: (r["n_stars"] or 0) / max(r["fwhm"] or 0.5, 0.5))
        if best["id"] == frame["id"]:
            transp = 1.0
        else:
            ref = self._grade_of(best)
            transp = transparency(grade, ref) if ref is not None else 1.0
        good_fwhm = [r["fwhm"] for r in rows if r["fwhm"]]
        good_bg = [r["background"] for r in rows if r["background"] is not None]
        reason = judge(
            grade,
            transparency=transp,
            group_fwhm_median=statistics.median(good_fwhm) if len(good_fwhm) >= 3 else None,
            group_background_median=statistics.median(good_bg) if len(good_bg) >= 3 else None,
            best_n_stars=best["n_stars"],
            rules=self.grading,
        )
        return reason, transp

    def _reference(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """The alignment reference of the frame's (night, object, filter) and setup, or None before the first."""
        setup = _STACK_SETUP.replace("camera", "s.camera").replace("xbin", "s.xbin").replace("ybin", "s.ybin")
        setup = setup.replace("planes", "s.planes")
        return self.archive.one(
            "SELECT f.* FROM stacks s JOIN frames f ON f.id = s.reference_frame_id "
            f"WHERE s.night = ? AND s.object IS ? AND s.filter IS ? AND {setup} ORDER BY s.id LIMIT 1",
            _target_args(frame),
        )

    def _align(self, frame: dict[str, Any], grade: Grade, ref: dict[str, Any]) -> None:
        """Align ``frame`` onto ``ref``'s grid (stars matched), write the product and record how."""
        if ref["id"] == frame["id"]:
            job = self._align_job(frame, ref, transform=Transform.identity())
        else:
            ref_grade = self._grade_of(ref)
            if ref_grade is None and ref.get("calibrated_path"):
                ref_grade = self._ensure_graded(ref)
            if ref_grade is None:
                raise AlignError("the reference frame has no star list")
            job = self._align_job(frame, ref)
            job.stars, job.reference_stars = grade.stars.to_dict(), ref_grade.stars.to_dict()
            job.bridges = self._bridges(frame, ref)
        self._record_align(frame, ref, compute_align(job))

    def _align_job(self, frame: dict[str, Any], ref: dict[str, Any], transform: Transform | None = None) -> AlignJob:
        return AlignJob(
            calibrated=self.layout.root / frame["calibrated_path"],
            aligned=self.layout.aligned(frame),
            shape=product_shape(ref),
            interpolation=self.rules.colour_interpolation if len(stack_shape(ref)) == 3 else self.rules.interpolation,
            transform=transform.to_dict() if transform is not None else None,
            reference_calibrated=self.layout.root / ref["calibrated_path"],
        )

    def _record_align(self, frame: dict[str, Any], ref: dict[str, Any], result: AlignResult) -> None:
        self.ws.observe(result.timings)
        t = result.transform
        self.archive.update_frame(
            frame["id"],
            aligned_path=self.layout.relative(result.aligned),
            align_rms=t["rms"],
            align_n=t["n_matches"],
            align_ref_id=ref["id"],
            align_transform=json.dumps(t),
            rotation_deg=t["rotation_deg"],
        )

    def _stored_transform(self, frame: dict[str, Any], ref: dict[str, Any]) -> Transform:
        """The transform ``frame`` was aligned with, onto ``ref`` (matched again only for rows aligned before
        transforms were stored)."""
        if frame["id"] == ref["id"]:
            return Transform.identity()
        if frame.get("align_transform") and frame.get("align_ref_id") == ref["id"]:
            return Transform.from_dict(json.loads(frame["align_transform"]))
        grade, ref_grade = self._ensure_graded(frame), self._ensure_graded(ref)
        return find_transform(grade.stars, ref_grade.stars)

    def _stack_row(self, frame: dict[str, Any], reference_id: int) -> dict[str, Any]:
        row = self.archive.one(f"SELECT * FROM stacks WHERE {_STACK_GROUP}", _group_args(frame))
        if row is not None:
            return row
        # a second setup for the same (night, object, filter, exposure) names its stack after its camera
        others = self.archive.scalar(
            f"SELECT COUNT(*) FROM stacks WHERE {_TARGET} AND abs(exptime - ?) < 1e-6", _group_args(frame)[:4]
        )
        setup = None
        if others:
            setup = f"{frame.get('camera') or 'camera'}_{frame.get('xbin') or 1}x{frame.get('ybin') or 1}"
            setup += "_rgb" if _planes(frame) == 3 else ""
        path = self.layout.stack(frame["night"], frame["object"], frame["filter"], frame["exptime"], setup=setup)
        now = now_iso()
        camera, xbin, ybin, planes = _setup(frame)
        self.archive.put(
            "stacks",
            {
                "object": frame["object"],
                "filter": frame["filter"],
                "exptime": frame["exptime"],
                "night": frame["night"],
                "camera": camera,
                "xbin": xbin,
                "ybin": ybin,
                "planes": planes,
                "path": self.layout.relative(path),
                "n_frames": 0,
                "total_exptime": 0.0,
                "reference_frame_id": reference_id,
                "state": "live",
                "created_at": now,
                "updated_at": now,
            },
            conflict="OR IGNORE",
        )
        return self.archive.one(f"SELECT * FROM stacks WHERE {_STACK_GROUP}", _group_args(frame))

    def _stack_header(self, stack: dict[str, Any], members: list[dict[str, Any]], *, final: bool) -> fits.Header:
        ref = self.archive.frame(stack["reference_frame_id"])
        header = fits.getheader(self.layout.root / ref["calibrated_path"])
        for key in ("BZERO", "BSCALE", "CALSTAT"):
            header.remove(key, ignore_missing=True, remove_all=True)
        header["IMAGETYP"] = "STACK"
        header["OBJECT"] = stack["object"] or ""
        header["NCOMBINE"] = (len(members), "frames in this stack")
        header["EXPTIME"] = (stack["exptime"], "[s] exposure of each frame")
        header["EXPTOTAL"] = (sum(m["exptime"] for m in members), "[s] total exposure")
        header["STACKSTA"] = ("final" if final else "live", "live running mean, or final sigma-clipped combine")
        header["STACKREF"] = (Path(ref["path"]).name[:60], "alignment reference frame")
        for m in members:
            header.add_history(f"nightshift stack input: {Path(m['path']).name} sha256:{(m['sha256'] or '')[:16]}")
        return header

    def _write_stack(
        self, stack: dict[str, Any], image: Image | None, members: list[dict[str, Any]], final: bool
    ) -> None:
        """Write the stack's FITS and picture (unless ``image`` is None: membership only) and record its members."""
        preview = self.layout.stack_preview(stack)
        if image is not None:
            write_fits_atomic(self.layout.root / stack["path"], image)
            last = self.stack_previews.get(stack["id"])
            if final or last is None or time.monotonic() - last >= STACK_PREVIEW_SECONDS or not preview.exists():
                with self.metrics.stage("preview"):
                    title = f"{stack['object']} {stack['filter'] or 'no filter'} {stack['exptime']:g}s x{len(members)}"
                    write_bytes_atomic(preview, stack_picture(image, title))
                self.stack_previews[stack["id"]] = time.monotonic()
        ids = [m["id"] for m in members]
        with self.archive.transaction():
            self.archive.execute("DELETE FROM stack_frames WHERE stack_id = ?", [stack["id"]])
            for fid in ids:
                self.archive.put("stack_frames", {"stack_id": stack["id"], "frame_id": fid}, conflict="OR IGNORE")
            self.archive.execute(
                "UPDATE stacks SET n_frames = ?, total_exptime = ?, state = ?, preview_path = ?, updated_at = ? "
                "WHERE id = ?",
                [
                    len(ids),
                    sum(m["exptime"] for m in members),
                    "final" if final else "live",
                    self.layout.relative(preview) if preview.exists() else None,
                    now_iso(),
                    stack["id"],
                ],
            )
            if ids:
                self.archive.execute(
                    f"UPDATE frames SET status = 'stacked', reason = NULL, stack_id = ?, updated_at = ? "
                    f"WHERE id IN ({','.join('?' * len(ids))})",
                    [stack["id"], now_iso(), *ids],
                )
        self.metrics.set_stack_frames(stack["id"], len(ids))

    def _members(self, stack_id: int) -> list[dict[str, Any]]:
        return self.archive.query(
            "SELECT f.* FROM stack_frames sf JOIN frames f ON f.id = sf.frame_id WHERE sf.stack_id = ? ORDER BY f.id",
            [stack_id],
        )

    def _live(self, stack: dict[str, Any], members: list[dict[str, Any]], shape: tuple[int, ...]) -> LiveStack:
        """The running stack of ``stack`` in memory, rebuilt from the aligned frames on disk after a restart."""
        live = self.live_stacks.get(stack["id"])
        if live is not None and live.n == len(members):
            return live
        live = LiveStack(shape)
        for m in members:
            live.add(read_frame(self.layout.root / m["aligned_path"]))
        self.live_stacks[stack["id"]] = live
        return live

    def _rebase(self, frame: dict[str, Any], grade: Grade, old: dict[str, Any]) -> bool:
        """Make ``frame`` the alignment reference of its (night, object, filter) and move the stacks onto it.

        The new reference is matched once to the old one; every member then goes through one composed
        transform (new <- old <- member) from its stored transform, re-warped from its calibrated file. Returns
        False (nothing changed) when the new frame cannot be matched to the old reference.
        """
        old_grade = self._ensure_graded(old)
        try:
            to_old = find_transform(grade.stars, old_grade.stars)  # new reference -> old reference
        except AlignError as exc:
            log.warning("%s would be a better reference but does not match the current one: %s", frame["path"], exc)
            return False
        to_new = to_old.inverse()
        args = _target_args(frame)
        where = f"{_TARGET} AND {_STACK_SETUP}"
        log.info(
            "%s is the new alignment reference of %s %s (%.1f vs %.1f stars per pixel of FWHM); moving its stacks",
            frame["path"],
            frame["object"],
            frame["filter"],
            _score(frame),
            _score(old),
        )
        moved: dict[int, list[dict[str, Any]]] = {}
        for stack in self.archive.query(f"SELECT * FROM stacks WHERE {where}", args):
            self.live_stacks.pop(stack["id"], None)
            moved[stack["id"]] = []
            for m in self._members(stack["id"]):
                composed = compose(to_new, self._stored_transform(m, old))
                self._record_align(m, frame, compute_align(self._align_job(m, frame, composed)))
                moved[stack["id"]].append(self.archive.frame(m["id"]))
        self.archive.execute(f"UPDATE stacks SET reference_frame_id = ? WHERE {where}", [frame["id"], *args])
        for stack in self.archive.query(f"SELECT * FROM stacks WHERE {where}", args):
            members = moved[stack["id"]]
            if members:
                image = None
                if self.live:
                    live = self._live(stack, members, stack_shape(frame))
                    image = live.image(self._stack_header(stack, members, final=False), history=False)
                self._write_stack(stack, image, members, final=False)
            self.archive.event(
                "align",
                "rebased",
                f"new reference frame {frame['id']}: {len(members)} member(s) moved through composed transforms",
                stack_id=stack["id"],
            )
        return True

    def grade_and_stack(self, frame: dict[str, Any]) -> None:
        """Grade a calibrated light; reject it with a reason or align it and add it to its stack (one light; the
        pipeline does the same in batches, computing on its workers)."""
        if not self.place(frame):
            return
        ref, job = self.align_job(frame)
        try:
            result = compute_align(job)
        except AlignError:
            ref, job = self.align_job(frame, bridges=True)
            try:
                result = compute_align(job)
            except AlignError as exc:
                self.unaligned(frame, exc)
                return
        self.record_placed(frame, ref, result)

    def place(self, frame: dict[str, Any]) -> bool:
        """Judge a graded light against its group: reject it (False), or accept it (True), making it the
        reference of its (night, object, filter) if it is the first or much better than the current one."""
        grade = self._ensure_graded(frame)
        others = self.archive.query(f"SELECT * FROM frames WHERE {_GROUP} AND n_stars IS NOT NULL", _group_args(frame))
        reason, transp = self._judge(frame, grade, others)
        self.archive.update_frame(frame["id"], transparency=transp)
        if reason:
            self.archive.set_status(frame["id"], "rejected", reason)
            self.archive.event("grade", "rejected", reason, frame_id=frame["id"])
            self.metrics.frames_rejected.labels(reason=reason).inc()
            log.info("rejected %s: %s", frame["path"], reason)
            return False
        ref = self._reference(frame)
        if ref is None:
            self._stack_row(frame, frame["id"])  # the first good frame of its target and filter: the reference
        elif _score(frame) > REBASE_FACTOR * _score(ref):
            self._rebase(frame, grade, ref)
        return True

    def align_job(self, frame: dict[str, Any], *, bridges: bool = False) -> tuple[dict[str, Any], AlignJob]:
        """The alignment of an accepted light onto its (night, object, filter)'s reference, as plain data; with
        ``bridges``, also through the members already aligned (for a frame the reference alone did not match)."""
        ref = self._reference(frame)
        assert ref is not None, "place() made the reference"
        if ref["id"] == frame["id"]:
            return ref, self._align_job(frame, ref, transform=Transform.identity())
        grade, ref_grade = self._ensure_graded(frame), self._ensure_graded(ref)
        job = self._align_job(frame, ref)
        job.stars, job.reference_stars = grade.stars.to_dict(), ref_grade.stars.to_dict()
        if bridges:
            job.bridges = self._bridges(frame, ref)
        return ref, job

    def _bridges(self, frame: dict[str, Any], ref: dict[str, Any]) -> list[dict[str, Any]]:
        """Members of the frame's (night, object, filter) aligned onto ``ref``, farthest from it first (a frame
        the reference does not reach is likely dithered far from it), at most :data:`MAX_BRIDGES`."""
        rows = self.archive.query(
            f"SELECT * FROM frames WHERE {_TARGET} AND {_FRAME_SETUP} AND kind = 'light' "
            "AND status = 'stacked' AND align_ref_id = ? AND id NOT IN (?, ?) AND align_transform IS NOT NULL",
            [*_target_args(frame), ref["id"], frame["id"], ref["id"]],
        )
        found = []
        for row in rows:
            transform = Transform.from_dict(json.loads(row["align_transform"]))
            grade = self._grade_of(row)
            if grade is not None and len(grade.stars) >= 3:
                found.append((float(np.hypot(*transform.matrix[:2, 2])), transform, grade))
        found.sort(key=lambda item: -item[0])
        return [{"stars": g.stars.to_dict(), "transform": t.to_dict()} for _, t, g in found[:MAX_BRIDGES]]

    def unaligned(self, frame: dict[str, Any], exc: AlignError) -> None:
        why = f"unaligned: {exc}"
        self.archive.set_status(frame["id"], "rejected", why)
        self.archive.event("align", "rejected", why, frame_id=frame["id"])
        self.metrics.frames_rejected.labels(reason=why).inc()
        log.warning("could not align %s: %s", frame["path"], exc)

    def record_placed(self, frame: dict[str, Any], ref: dict[str, Any], result: AlignResult) -> None:
        """Record an aligned light and add it to its stack."""
        current = self._reference(frame)
        if current is not None and current["id"] != ref["id"]:
            # the reference changed while this light was being aligned: one composed transform onto the new one
            to_new = compose(self._stored_transform(ref, current), Transform.from_dict(result.transform))
            result = compute_align(self._align_job(frame, current, to_new))
            ref = current
        self._record_align(frame, ref, result)
        self.metrics.frames_aligned.inc()
        frame = self.archive.frame(frame["id"])
        stack = self._stack_row(frame, ref["id"])
        members = [m for m in self._members(stack["id"]) if m["id"] != frame["id"]]
        with self.metrics.stage("stack"):
            members.append(frame)
            image = None
            if self.live:
                live = self._live(stack, members[:-1], stack_shape(ref))
                live.add(read_frame(self.layout.root / frame["aligned_path"]))
                image = live.image(self._stack_header(stack, members, final=False), history=False)
            self._write_stack(stack, image, members, final=False)
        self.archive.event(
            "stack",
            "stacked",
            f"{'live ' if self.live else ''}stack #{stack['id']} now {len(members)} frames",
            frame_id=frame["id"],
            stack_id=stack["id"],
        )
        self.metrics.frames_stacked.inc()
        log.info("stacked %s into %s (%d frames)", frame["path"], stack["path"], len(members))

    def quiet_stacks(self, quiet_seconds: float) -> list[dict[str, Any]]:
        """Live stacks whose group has had no new frame for ``quiet_seconds``: time to finalise them."""
        return self.archive.query(
            "SELECT * FROM stacks WHERE state = 'live' AND (julianday('now') - julianday(updated_at)) * 86400 >= ?",
            [quiet_seconds],
        )

    def night_stacks(self, night: str) -> list[dict[str, Any]]:
        """The live stacks of ``night`` (finalised when the night ends)."""
        return self.archive.query("SELECT * FROM stacks WHERE state = 'live' AND night = ?", [night])

    def _drop_empty_stack(self, stack: dict[str, Any]) -> None:
        """No frame of the group survived: remove the stack's own products and row (the events keep the story)."""
        for stored in (stack["path"], stack.get("preview_path")):
            if stored:
                (self.layout.root / stored).unlink(missing_ok=True)
        with self.archive.transaction():
            self.archive.execute("DELETE FROM stack_frames WHERE stack_id = ?", [stack["id"]])
            self.archive.execute("UPDATE frames SET stack_id = NULL WHERE stack_id = ?", [stack["id"]])
            self.archive.execute("DELETE FROM stacks WHERE id = ?", [stack["id"]])
        self.archive.event("stack", "dropped", "no frame of the group was accepted", stack_id=stack["id"])

    def finalize_stack(self, stack: dict[str, Any]) -> None:
        """Re-judge the whole group and replace the live stack by a sigma-clipped combine of the accepted frames."""
        job = self.plan_final(stack)
        if job is not None:
            self.record_final(job, compute_final(job))

    def plan_final(self, stack: dict[str, Any]) -> FinalJob | None:
        """Re-judge the whole group (aligning any accepted frame not yet on the reference's grid) and return the
        final combine to compute; None when no frame survived (the stack is dropped)."""
        group = self.archive.query(
            f"SELECT * FROM frames WHERE {_GROUP} AND n_stars IS NOT NULL AND status IN ('stacked', 'rejected') "
            "ORDER BY id",
            _stack_args(stack),
        )
        ref = self.archive.frame(stack["reference_frame_id"])
        accepted: list[dict[str, Any]] = []
        for f in group:
            grade = self._grade_of(f)
            if grade is None:
                continue
            reason, transp = self._judge(f, grade, group)
            self.archive.update_frame(f["id"], transparency=transp)
            if reason:
                if f["status"] != "rejected" or f["reason"] != reason:
                    self.archive.set_status(f["id"], "rejected", reason, stack_id=None)
                    self.archive.event(
                        "grade",
                        "rejected",
                        f"on the whole group: {reason}",
                        frame_id=f["id"],
                        stack_id=stack["id"],
                    )
                    log.info("rejected %s on the whole group: %s", f["path"], reason)
                continue
            unaligned = f["status"] == "rejected" and (f["reason"] or "").startswith("unaligned:")
            if unaligned or not f.get("aligned_path") or (f.get("align_ref_id") not in (None, ref["id"])):
                # never aligned, aligned onto an earlier reference while out of the stack, or not matched while
                # the group was smaller: one more try, through every member now on the reference's grid
                try:
                    self._align(f, grade, ref)
                except AlignError as exc:
                    if not unaligned:
                        self.archive.set_status(f["id"], "rejected", f"unaligned: {exc}", stack_id=None)
                    continue
                if unaligned:
                    self.archive.event("align", "aligned", "matched through the group at the end", frame_id=f["id"])
                f = self.archive.frame(f["id"])
            accepted.append(f)
        self.live_stacks.pop(stack["id"], None)
        if not accepted:
            self._drop_empty_stack(stack)
            return None
        return FinalJob(
            stack=stack,
            members=accepted,
            aligned=[self.layout.root / f["aligned_path"] for f in accepted],
            header=self._stack_header(stack, accepted, final=True),
            path=self.layout.root / stack["path"],
            preview=self.layout.stack_preview(stack),
            sigma=self.rules.sigma,
            mem_limit_bytes=int(self.rules.mem_limit_mb * 2**20),
        )

    def record_final(self, job: FinalJob, result: FinalResult) -> None:
        stack = job.stack
        self.ws.observe(result.timings)
        self.stack_previews[stack["id"]] = time.monotonic()
        self._write_stack(stack, None, job.members, final=True)
        n = len(job.members)
        self.archive.event("stack", "final", f"sigma-clipped combine of {n} frames", stack_id=stack["id"])
        log.info("final stack %s: %d frames", stack["path"], n)
