"""After calibration: grade a light, judge it against its group, align it, and keep its stack current.

One stack per (night, object, filter, exposure). All stacks of one (night, object, filter) share one alignment
reference, the first good frame, so a night's stacks of a target land on the same pixel grid. Live, each accepted
frame is added to a running mean on disk at once; when the group goes quiet (or the night ends) a sigma-clipped
combine of every accepted frame, re-judged against the whole group, replaces it.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from astropy.io import fits
from nightshift.daemon.archive import now_iso
from nightshift.service.fitsio import read_image, read_mask, write_bytes_atomic, write_fits_atomic
from nightshift.service.frame import Image
from nightshift.service.grade import Grade, grade_frame, judge, transparency
from nightshift.service.preview import preview_png
from nightshift.service.register import AlignError, apply_transform, find_transform
from nightshift.service.stack import LiveStack, final_combine
from nightshift.service.stars import StarList

if TYPE_CHECKING:
    from nightshift.daemon.pipeline import Pipeline

__all__ = ["finalize_stack", "grade_and_stack", "quiet_stacks"]

#: A live stack's picture is redrawn at most this often (the FITS file is rewritten with every frame).
STACK_PREVIEW_SECONDS = 60.0
#: A frame this many times better than the current alignment reference becomes the reference.
REBASE_FACTOR = 1.5

log = logging.getLogger("nightshift.stack")

_STACK_GROUP = "night = ? AND object IS ? AND filter IS ? AND abs(exptime - ?) < 1e-6"
_GROUP = _STACK_GROUP + " AND kind = 'light'"


def _group_args(f: dict[str, Any]) -> list[Any]:
    return [f["night"], f["object"], f["filter"], f["exptime"]]


def _grade_of(p: Pipeline, row: dict[str, Any]) -> Grade | None:
    src = p.archive.load_sources(row["id"])
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
    )


def _ensure_graded(p: Pipeline, frame: dict[str, Any]) -> tuple[Image, Grade]:
    path = p.layout.root / frame["calibrated_path"]
    img = read_image(path)
    img.mask = read_mask(path)
    if frame.get("n_stars") is not None:
        g = _grade_of(p, frame)
        if g is not None:
            return img, g
    with p.metrics.stage("grade"):
        g = grade_frame(img, threshold=p.config.grading.detect_threshold)
    p.archive.save_sources(frame["id"], {"stars": g.stars.to_dict(), "flux": g.flux})
    p.archive.update_frame(frame["id"], **g.row())
    frame.update(g.row())
    return img, g


def _judge(p: Pipeline, frame: dict[str, Any], grade: Grade, others: list[dict[str, Any]]) -> tuple[str | None, float]:
    """Judge ``frame`` against the graded frames of its group (``others`` may include itself)."""
    rows = [r for r in others if r["n_stars"] is not None] or [frame]
    best = max(rows, key=lambda r: (r["n_stars"] or 0) / max(r["fwhm"] or 0.5, 0.5))
    if best["id"] == frame["id"]:
        transp = 1.0
    else:
        ref = _grade_of(p, best)
        transp = transparency(grade, ref) if ref is not None else 1.0
    good_fwhm = [r["fwhm"] for r in rows if r["fwhm"]]
    good_bg = [r["background"] for r in rows if r["background"] is not None]
    reason = judge(
        grade,
        transparency=transp,
        group_fwhm_median=statistics.median(good_fwhm) if len(good_fwhm) >= 3 else None,
        group_background_median=statistics.median(good_bg) if len(good_bg) >= 3 else None,
        best_n_stars=best["n_stars"],
        rules=p.config.grading,
    )
    return reason, transp


def _reference(p: Pipeline, frame: dict[str, Any]) -> dict[str, Any] | None:
    return p.archive.one(
        "SELECT f.* FROM stacks s JOIN frames f ON f.id = s.reference_frame_id "
        "WHERE s.night = ? AND s.object IS ? AND s.filter IS ? ORDER BY s.id LIMIT 1",
        [frame["night"], frame["object"], frame["filter"]],
    )


def _align(p: Pipeline, frame: dict[str, Any], img: Image, grade: Grade, ref: dict[str, Any]) -> tuple[Path, Any]:
    """Align ``img`` onto ``ref``'s grid and write the aligned product; returns its path and the transform."""
    with p.metrics.stage("align"):
        if ref["id"] == frame["id"]:
            aligned, transform = img, None
        else:
            ref_grade = _grade_of(p, ref)
            if ref_grade is None and ref.get("calibrated_path"):
                ref_grade = _ensure_graded(p, ref)[1]
            if ref_grade is None:
                raise AlignError("the reference frame has no star list")
            transform = find_transform(grade.stars, ref_grade.stars)
            aligned = apply_transform(img, transform, (ref["naxis2"], ref["naxis1"]))
        path = p.layout.aligned(frame)
        write_fits_atomic(path, aligned)
    return path, transform


def _stack_row(p: Pipeline, frame: dict[str, Any], reference_id: int) -> dict[str, Any]:
    row = p.archive.one(f"SELECT * FROM stacks WHERE {_STACK_GROUP}", _group_args(frame))
    if row is not None:
        return row
    path = p.layout.stack(frame["night"], frame["object"], frame["filter"], frame["exptime"])
    now = now_iso()
    p.archive.put(
        "stacks",
        {
            "object": frame["object"],
            "filter": frame["filter"],
            "exptime": frame["exptime"],
            "night": frame["night"],
            "path": p.layout.relative(path),
            "n_frames": 0,
            "total_exptime": 0.0,
            "reference_frame_id": reference_id,
            "state": "live",
            "created_at": now,
            "updated_at": now,
        },
        conflict="OR IGNORE",
    )
    return p.archive.one(f"SELECT * FROM stacks WHERE {_STACK_GROUP}", _group_args(frame))


def _stack_header(p: Pipeline, stack: dict[str, Any], members: list[dict[str, Any]], *, final: bool) -> fits.Header:
    ref = p.archive.frame(stack["reference_frame_id"])
    header = fits.getheader(p.layout.root / ref["calibrated_path"])
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


def _write_stack(p: Pipeline, stack: dict[str, Any], image: Image, members: list[dict[str, Any]], final: bool) -> None:
    path = p.layout.root / stack["path"]
    write_fits_atomic(path, image)
    preview = p.layout.stack_preview(stack["night"], stack["object"], stack["filter"], stack["exptime"])
    last = p.stack_previews.get(stack["id"])
    if final or last is None or time.monotonic() - last >= STACK_PREVIEW_SECONDS or not preview.exists():
        with p.metrics.stage("preview"):
            title = f"{stack['object']} {stack['filter']} {stack['exptime']:g}s x{len(members)}"
            write_bytes_atomic(preview, preview_png(image.data, mask=image.mask, title=title))
        p.stack_previews[stack["id"]] = time.monotonic()
    ids = [m["id"] for m in members]
    with p.archive.transaction():
        p.archive.execute("DELETE FROM stack_frames WHERE stack_id = ?", [stack["id"]])
        for fid in ids:
            p.archive.put("stack_frames", {"stack_id": stack["id"], "frame_id": fid}, conflict="OR IGNORE")
        p.archive.execute(
            "UPDATE stacks SET n_frames = ?, total_exptime = ?, state = ?, preview_path = ?, updated_at = ? "
            "WHERE id = ?",
            [
                len(ids),
                sum(m["exptime"] for m in members),
                "final" if final else "live",
                p.layout.relative(preview),
                now_iso(),
                stack["id"],
            ],
        )
        if ids:
            p.archive.execute(
                f"UPDATE frames SET status = 'stacked', reason = NULL, stack_id = ?, updated_at = ? "
                f"WHERE id IN ({','.join('?' * len(ids))})",
                [stack["id"], now_iso(), *ids],
            )
    p.metrics.set_stack_frames(stack["id"], len(ids))


def _members(p: Pipeline, stack_id: int) -> list[dict[str, Any]]:
    return p.archive.query(
        "SELECT f.* FROM stack_frames sf JOIN frames f ON f.id = sf.frame_id WHERE sf.stack_id = ? ORDER BY f.id",
        [stack_id],
    )


def _live(p: Pipeline, stack: dict[str, Any], members: list[dict[str, Any]], shape: tuple[int, int]) -> LiveStack:
    """The running stack of ``stack`` in memory, rebuilt from the aligned frames on disk after a restart."""
    live = p.live_stacks.get(stack["id"])
    if live is not None and live.n == len(members):
        return live
    live = LiveStack(shape)
    for m in members:
        path = p.layout.root / m["aligned_path"]
        img = read_image(path)
        img.mask = read_mask(path)
        live.add(img)
    p.live_stacks[stack["id"]] = live
    return live


def _score(row: dict[str, Any]) -> float:
    """How good a frame is as an alignment reference: many sharp stars."""
    return (row.get("n_stars") or 0) / max(row.get("fwhm") or 0.5, 0.5)


def _rebase(p: Pipeline, frame: dict[str, Any], old: dict[str, Any]) -> None:
    """Make ``frame`` the alignment reference of its (night, object, filter) and move the stacks onto it."""
    args = [frame["night"], frame["object"], frame["filter"]]
    where = "night = ? AND object IS ? AND filter IS ?"
    p.archive.execute(f"UPDATE stacks SET reference_frame_id = ? WHERE {where}", [frame["id"], *args])
    log.info(
        "%s is the new alignment reference of %s %s (%.1f vs %.1f stars per pixel of FWHM); re-aligning its stacks",
        frame["path"],
        frame["object"],
        frame["filter"],
        _score(frame),
        _score(old),
    )
    for stack in p.archive.query(f"SELECT * FROM stacks WHERE {where}", args):
        p.live_stacks.pop(stack["id"], None)
        kept = []
        for m in _members(p, stack["id"]):
            img, g = _ensure_graded(p, m)
            try:
                path, transform = _align(p, m, img, g, frame)
            except AlignError as exc:
                p.archive.execute(
                    "DELETE FROM stack_frames WHERE stack_id = ? AND frame_id = ?", [stack["id"], m["id"]]
                )
                p.archive.set_status(m["id"], "rejected", f"unaligned: {exc}", stack_id=None)
                continue
            p.archive.update_frame(
                m["id"],
                aligned_path=p.layout.relative(path),
                align_rms=getattr(transform, "rms", 0.0),
                rotation_deg=getattr(transform, "rotation_deg", 0.0),
            )
            kept.append(p.archive.frame(m["id"]))
        if kept:
            live = _live(p, stack, kept, (frame["naxis2"], frame["naxis1"]))
            _write_stack(
                p, stack, live.image(_stack_header(p, stack, kept, final=False), history=False), kept, final=False
            )
        p.archive.event("align", "rebased", f"new reference frame {frame['id']}", stack_id=stack["id"])


def grade_and_stack(p: Pipeline, frame: dict[str, Any]) -> None:
    """Grade a calibrated light; reject it with a reason or align it and add it to its live stack."""
    img, grade = _ensure_graded(p, frame)
    others = p.archive.query(f"SELECT * FROM frames WHERE {_GROUP} AND n_stars IS NOT NULL", _group_args(frame))
    reason, transp = _judge(p, frame, grade, others)
    p.archive.update_frame(frame["id"], transparency=transp)
    if reason:
        p.archive.set_status(frame["id"], "rejected", reason)
        p.archive.event("grade", "rejected", reason, frame_id=frame["id"])
        p.metrics.frames_rejected.labels(reason=reason).inc()
        log.info("rejected %s: %s", frame["path"], reason)
        return
    ref = _reference(p, frame)
    if ref is None:
        ref = frame
    elif _score(frame) > REBASE_FACTOR * _score(ref):
        _rebase(p, frame, ref)
        ref = frame
    try:
        aligned_path, transform = _align(p, frame, img, grade, ref)
    except AlignError as exc:
        why = f"unaligned: {exc}"
        p.archive.set_status(frame["id"], "rejected", why)
        p.archive.event("align", "rejected", why, frame_id=frame["id"])
        p.metrics.frames_rejected.labels(reason=why).inc()
        log.warning("could not align %s: %s", frame["path"], exc)
        return
    p.metrics.frames_aligned.inc()
    p.archive.update_frame(
        frame["id"],
        aligned_path=p.layout.relative(aligned_path),
        align_rms=getattr(transform, "rms", 0.0),
        rotation_deg=getattr(transform, "rotation_deg", 0.0),
    )
    frame = p.archive.frame(frame["id"])
    stack = _stack_row(p, frame, ref["id"])
    members = [m for m in _members(p, stack["id"]) if m["id"] != frame["id"]]
    with p.metrics.stage("stack"):
        shape = (ref["naxis2"], ref["naxis1"])
        live = _live(p, stack, members, shape)
        aligned = read_image(aligned_path)
        aligned.mask = read_mask(aligned_path)
        live.add(aligned)
        members.append(frame)
        header = _stack_header(p, stack, members, final=False)
        _write_stack(p, stack, live.image(header, history=False), members, final=False)
    p.archive.event(
        "stack",
        "stacked",
        f"live stack #{stack['id']} now {len(members)} frames",
        frame_id=frame["id"],
        stack_id=stack["id"],
    )
    p.metrics.frames_stacked.inc()
    log.info("stacked %s into %s (%d frames)", frame["path"], stack["path"], len(members))


def quiet_stacks(p: Pipeline, *, night: str | None = None) -> list[dict[str, Any]]:
    """Live stacks whose group has been quiet long enough (or all live stacks of ``night``) to finalise."""
    if night is not None:
        return p.archive.query("SELECT * FROM stacks WHERE state = 'live' AND night = ?", [night])
    cutoff = p.config.stacking.final_after_seconds
    return p.archive.query(
        "SELECT * FROM stacks WHERE state = 'live' AND (julianday('now') - julianday(updated_at)) * 86400 >= ?",
        [cutoff],
    )


def _drop_empty_stack(p: Pipeline, stack: dict[str, Any]) -> None:
    """No frame of the group survived: remove the stack's own products and row (the events keep the story)."""
    for stored in (stack["path"], stack.get("preview_path")):
        if stored:
            (p.layout.root / stored).unlink(missing_ok=True)
    with p.archive.transaction():
        p.archive.execute("DELETE FROM stack_frames WHERE stack_id = ?", [stack["id"]])
        p.archive.execute("UPDATE frames SET stack_id = NULL WHERE stack_id = ?", [stack["id"]])
        p.archive.execute("DELETE FROM stacks WHERE id = ?", [stack["id"]])
    p.archive.event("stack", "dropped", "no frame of the group was accepted", stack_id=stack["id"])


def finalize_stack(p: Pipeline, stack: dict[str, Any]) -> None:
    """Re-judge the whole group and replace the live stack by a sigma-clipped combine of the accepted frames."""
    group = p.archive.query(
        f"SELECT * FROM frames WHERE {_GROUP} AND n_stars IS NOT NULL AND status IN ('stacked', 'rejected') "
        "AND (reason IS NULL OR reason NOT LIKE 'unaligned:%') ORDER BY id",
        [stack["night"], stack["object"], stack["filter"], stack["exptime"]],
    )
    ref = p.archive.frame(stack["reference_frame_id"])
    accepted: list[dict[str, Any]] = []
    for f in group:
        grade = _grade_of(p, f)
        if grade is None:
            continue
        reason, transp = _judge(p, f, grade, group)
        p.archive.update_frame(f["id"], transparency=transp)
        if reason:
            if f["status"] != "rejected" or f["reason"] != reason:
                p.archive.set_status(f["id"], "rejected", reason, stack_id=None)
                p.archive.event(
                    "grade",
                    "rejected",
                    f"on the whole group: {reason}",
                    frame_id=f["id"],
                    stack_id=stack["id"],
                )
                log.info("rejected %s on the whole group: %s", f["path"], reason)
            continue
        if not f.get("aligned_path"):
            img, _ = _ensure_graded(p, f)
            try:
                path, transform = _align(p, f, img, grade, ref)
            except AlignError as exc:
                p.archive.set_status(f["id"], "rejected", f"unaligned: {exc}")
                continue
            p.archive.update_frame(
                f["id"], aligned_path=p.layout.relative(path), align_rms=getattr(transform, "rms", 0.0)
            )
            f = p.archive.frame(f["id"])
        accepted.append(f)
    with p.metrics.stage("stack"):
        if accepted:
            header = _stack_header(p, stack, accepted, final=True)
            image = final_combine(
                [p.layout.root / f["aligned_path"] for f in accepted],
                header=header,
                sigma=p.config.stacking.sigma,
                mem_limit_bytes=int(p.config.stacking.mem_limit_mb * 2**20),
                history=False,
            )
            _write_stack(p, stack, image, accepted, final=True)
        else:
            _drop_empty_stack(p, stack)
    p.live_stacks.pop(stack["id"], None)
    p.archive.event("stack", "final", f"sigma-clipped combine of {len(accepted)} frames", stack_id=stack["id"])
    log.info("final stack %s: %d frames", stack["path"], len(accepted))
