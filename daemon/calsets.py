"""Calibration sets: which frames belong together, when a set is complete, and building its master.

A set is the calibration frames of one night that share the match keys and the readout (plus exposure for darks,
filter for flats and the set-point); its frames are overscan-subtracted and trimmed as their readout says. It is
complete with at least ``min_frames`` frames and either a quiet time with nothing new for it, or a newer frame of
another set or a light. Frames arriving later rebuild the master as a new version; the old one stays, marked
superseded.

:class:`CalibrationSets` finds the sets ready to build, plans each master (the masters it needs, its version and
path) and records it, on the archive's thread; :func:`compute_master` combines the frames from plain data only,
so a worker thread or a Dask worker can run it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nightshift.daemon.archive import now_iso
from nightshift.daemon.choose import find_master, readout_settings
from nightshift.daemon.config import ALWAYS_MATCHED, SETUP_KEYS, CalibrationConfig
from nightshift.daemon.mastercache import MASTERS
from nightshift.daemon.workspace import Timings, Workspace
from nightshift.service.cfa import state_pattern
from nightshift.service.fitsio import sha256_file, write_fits_atomic
from nightshift.service.frame import Image
from nightshift.service.masters import (
    bad_pixel_mask,
    make_master_bias,
    make_master_dark,
    make_master_darkflat,
    make_master_flat,
)
from nightshift.service.safepath import safe_component

__all__ = ["CAL_KINDS", "CalSet", "CalibrationSets", "MasterPlan", "MasterResult", "compute_master"]

log = logging.getLogger("nightshift.masters")

CAL_KINDS = ("bias", "darkflat", "dark", "flat")  # build order: what later kinds need comes first


@dataclass
class CalSet:
    kind: str
    key: str
    slug: str
    frames: list[dict[str, Any]] = field(default_factory=list)

    @property
    def new_frames(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["status"] == "ingested"]

    @property
    def first(self) -> dict[str, Any]:
        return self.frames[0]


#: A frame's colour layout: never merged across, whatever the match keys (see ``choose.same_layout``).
LAYOUT_KEYS = ("naxis3", "roworder", "cfa")


def _layout(frame: dict[str, Any]) -> tuple[Any, ...]:
    colour = frame.get("cfa") is not None or frame.get("naxis3") is not None
    return (frame.get("naxis3"), (frame.get("roworder") or "BOTTOM-UP") if colour else None, frame.get("cfa"))


def _keys(match_keys: list[str]) -> list[str]:
    return [*match_keys, *(k for k in ALWAYS_MATCHED if k not in match_keys)]


def set_key(frame: dict[str, Any], match_keys: list[str]) -> tuple[str, str]:
    """(key, file-name slug) of the calibration set ``frame`` belongs to (the readout always counts)."""
    parts = [frame["kind"], frame["night"]] + [f"{k}={frame.get(k)}" for k in _keys(match_keys)]
    naxis3, roworder, cfa = _layout(frame)
    if naxis3 is not None or cfa is not None:
        parts.append(f"layout={naxis3}/{roworder}/{cfa}")
    st = frame.get("set_temp")
    parts.append(f"set_temp={round(st) if st is not None else None}")
    slug_parts = [
        safe_component(frame.get("camera"), max_len=24),
        f"{frame.get('xbin') or 1}x{frame.get('ybin') or 1}",
    ]
    if frame["kind"] in ("dark", "darkflat"):
        parts.append(f"exptime={frame['exptime']:g}")
        slug_parts.append(f"{frame['exptime']:g}s")
    if frame["kind"] == "flat":
        parts.append(f"filter={frame.get('filter')}")
        slug_parts.append(safe_component(frame.get("filter"), default="nofilter"))
    if st is not None:
        slug_parts.append(f"{round(st):+d}C")
    readout = frame.get("readout")
    if readout and readout != "raw":
        slug_parts.append(safe_component(readout.rpartition(": ")[2], default="trimmed"))  # the trimmed shape
    if naxis3 is not None:
        slug_parts.append(f"rgb{'td' if roworder == 'TOP-DOWN' else 'bu'}")
    elif cfa is not None:
        slug_parts.append(f"{cfa.lower()}{'td' if roworder == 'TOP-DOWN' else 'bu'}")
    return "|".join(parts), "_".join(slug_parts)


def _merge_unstated(rows: list[dict[str, Any]], match_keys: list[str]) -> dict[str, CalSet]:
    """Group frames into sets by their keys, letting a key a header does not state match any value.

    Capture programs differ in what they write (one states the gain, another only the set-point), so groups
    that agree on every key both state are merged, most informative first. A set keeps the key of its earliest
    frame, so its masters' versions follow each other as frames arrive.
    """
    groups: dict[str, CalSet] = {}
    for r in rows:
        key, slug = set_key(r, match_keys)
        groups.setdefault(key, CalSet(r["kind"], key, slug)).frames.append(r)
    keys = [*_keys(match_keys), "set_temp", "exptime", "filter"]

    def stated(s: CalSet) -> dict[str, Any]:
        return {k: s.first.get(k) for k in keys if s.first.get(k) is not None}

    clusters: list[tuple[dict[str, Any], list[CalSet]]] = []
    for s in sorted(groups.values(), key=lambda g: -len(stated(g))):
        mine = stated(s)
        fits_ = [
            c
            for c in clusters
            if c[1][0].kind == s.kind
            and _layout(c[1][0].first) == _layout(s.first)
            and all(c[0].get(k, v) == v for k, v in mine.items())
        ]
        if len(fits_) == 1:
            fits_[0][0].update(mine)
            fits_[0][1].append(s)
        else:
            clusters.append((dict(mine), [s]))
    out: dict[str, CalSet] = {}
    for _profile, members in clusters:
        frames = sorted((f for m in members for f in m.frames), key=lambda f: f["id"])
        head = next(m for m in members if frames[0] in m.frames)
        out[head.key] = CalSet(head.kind, head.key, head.slug, frames)
    return out


def _age_seconds(iso: str) -> float:
    return time.time() - datetime.fromisoformat(iso + "+00:00").timestamp()


@dataclass
class MasterPlan:
    """Everything decided about one master before its pixels are combined (made on the archive's thread), as
    plain data: the set's frames, the masters it needs (rows, and their absolute paths), its path and the rules."""

    calset: CalSet
    why: str
    version: int
    path: Path
    rules: CalibrationConfig
    bias: dict[str, Any] | None = None
    dark: dict[str, Any] | None = None
    darkflat: dict[str, Any] | None = None
    master_paths: dict[str, str] = field(default_factory=dict)  # "bias"/"dark"/"darkflat" -> absolute path
    notes: list[str] = field(default_factory=list)


@dataclass
class MasterResult:
    sha256: str
    method: str
    has_mask: bool
    timings: Timings = field(default_factory=Timings)


class CalibrationSets:
    """The archive's calibration sets: which are complete, what each master needs, and the record of a master.

    ``ended(night)`` says whether the night is being closed (sets then build with what they have).
    """

    def __init__(self, ws: Workspace, rules: CalibrationConfig, ended: Callable[[str | None], bool]) -> None:
        self.ws = ws
        self.rules = rules
        self.ended = ended
        self._said: set[str] = set()

    # -- notes on sets that wait (said once each) ---------------------------------------------------------------
    def _say_once(self, key: str, message: str, frames: list[dict[str, Any]]) -> None:
        if key in self._said:
            return
        self._said.add(key)
        log.info("%s", message)
        for f in frames:
            self.ws.archive.update_frame(f["id"], reason=message)

    def _note(self, tag: str, s: CalSet, message: str) -> None:
        self._say_once(f"{tag}|{s.key}|{len(s.frames)}", f"{s.kind} set {s.slug}: {message}", s.new_frames)

    # -- which sets -----------------------------------------------------------------------------------------------
    def _sets(self) -> Iterator[CalSet]:
        archive = self.ws.archive
        nights = [
            r["night"]
            for r in archive.query(
                "SELECT DISTINCT night FROM frames WHERE status = 'ingested' "
                "AND kind IN ('bias','dark','flat','darkflat')"
            )
        ]
        for night in nights:
            rows = archive.query(
                "SELECT * FROM frames WHERE night = ? AND kind IN ('bias','dark','flat','darkflat') "
                "AND status IN ('ingested', 'used') ORDER BY id",
                [night],
            )
            groups = _merge_unstated(rows, self.rules.match_keys)
            for kind in CAL_KINDS:
                for s in groups.values():
                    if s.kind == kind and s.new_frames:
                        yield s

    def ready(self) -> Iterator[tuple[CalSet, str]]:
        """Sets whose master should be built now, with the reason they count as complete."""
        cfg = self.rules
        newest_id = self.ws.archive.scalar("SELECT MAX(id) FROM frames WHERE status != 'quarantined'") or 0
        for s in self._sets():
            end_of_night = self.ended(s.first["night"])
            n = len(s.frames)
            need = cfg.min_frames.get(s.kind, 3)
            if n < need:
                if end_of_night and s.new_frames:
                    self._note("few", s, f"only {n} of the {need} frames needed for a master {s.kind}")
                continue
            last = max(f["id"] for f in s.frames)
            if end_of_night:
                why = "end of the night"
            elif newest_id > last:
                why = "a frame of another set arrived"
            elif _age_seconds(max(f["first_seen"] for f in s.frames)) >= cfg.set_quiet_seconds:
                why = f"no new frame for {cfg.set_quiet_seconds:g} s"
            else:
                continue
            yield s, why

    # -- plan -----------------------------------------------------------------------------------------------------
    def plan(self, s: CalSet, why: str) -> MasterPlan | None:
        """Which masters the new master of ``s`` needs, its version and path; None when it must wait for a bias."""
        cfg, archive, layout = self.rules, self.ws.archive, self.ws.layout
        first = s.first
        version = 1 + (archive.scalar("SELECT MAX(version) FROM masters WHERE set_key = ?", [s.key]) or 0)
        plan = MasterPlan(s, why, version, layout.master(s.kind, s.slug, first["night"], version), cfg)
        plan.notes.append(f"complete: {why}")
        if s.kind in ("dark", "darkflat", "flat"):
            plan.bias = find_master(archive, cfg, "bias", first)
            if plan.bias is None and not self.ended(first["night"]):
                self._note("wait", s, f"waiting for a master bias to subtract from the {s.kind}s")
                return None
            plan.notes.append(
                f"bias: master #{plan.bias['id']}" if plan.bias else "no master bias: built without bias subtraction"
            )
        if s.kind == "flat":
            plan.darkflat = find_master(archive, cfg, "darkflat", first, exptime=first["exptime"])
            if plan.darkflat is None:
                plan.dark = find_master(archive, cfg, "dark", first, exptime=first["exptime"])
            if plan.darkflat is not None:
                plan.notes.append(f"darkflat: master #{plan.darkflat['id']}")
            elif plan.dark is not None:
                plan.notes.append(f"dark: master #{plan.dark['id']} (same exposure)")
        for kind in ("bias", "dark", "darkflat"):
            row = getattr(plan, kind)
            if row is not None:
                plan.master_paths[kind] = str(layout.root / row["path"])
        return plan

    # -- record ---------------------------------------------------------------------------------------------------
    def record(self, plan: MasterPlan, result: MasterResult) -> int:
        """The master's row, its links to its frames, the older version superseded, the frames used: all at once."""
        archive = self.ws.archive
        self.ws.observe(result.timings)
        s, first = plan.calset, plan.calset.first
        dates = sorted(f["date_obs"] for f in s.frames)
        temps = [f["ccd_temp"] for f in s.frames if f.get("ccd_temp") is not None]
        row = {
            "kind": s.kind,
            "path": self.ws.layout.relative(plan.path),
            "sha256": result.sha256,
            "mask_path": None,
            "n_frames": len(s.frames),
            "set_key": s.key,
            "version": plan.version,
            "superseded_by": None,
            "night": first["night"],
            "date_obs": dates[len(dates) // 2],
            "set_temp": first.get("set_temp"),
            "ccd_temp": sum(temps) / len(temps) if temps else None,
            "filter": first.get("filter") if s.kind == "flat" else None,
            "exptime": first["exptime"] if s.kind in ("dark", "darkflat", "flat") else 0.0,
            "method": result.method,
            "bias_subtracted": int(s.kind in ("dark", "darkflat", "flat") and plan.bias is not None),
            "bias_id": plan.bias["id"] if plan.bias else None,
            "dark_id": (plan.darkflat or plan.dark or {}).get("id"),
            "note": "; ".join(plan.notes),
            "created_at": now_iso(),
        }
        if result.has_mask:
            row["mask_path"] = row["path"] + "[MASK]"
        for k in SETUP_KEYS:
            row[k] = first.get(k)
        ids = [f["id"] for f in s.new_frames]
        with archive.transaction():
            existing = archive.one("SELECT id FROM masters WHERE path = ?", [row["path"]])
            if existing:  # a crash after the file was written and before the row: same version, same file
                row["id"] = existing["id"]
            master_id = archive.put("masters", row, conflict="OR REPLACE")
            archive.execute(
                "UPDATE masters SET superseded_by = ? WHERE set_key = ? AND id != ? AND superseded_by IS NULL",
                [master_id, s.key, master_id],
            )
            for f in s.frames:
                archive.put("master_frames", {"master_id": master_id, "frame_id": f["id"]}, conflict="OR IGNORE")
            marks = ",".join("?" * len(ids))
            archive.execute(
                f"UPDATE frames SET status = 'used', reason = NULL, updated_at = ? WHERE id IN ({marks})",
                [now_iso(), *ids],
            )
        archive.event("master", f"built v{plan.version}", row["note"], master_id=master_id)
        self.ws.metrics.masters_built.labels(kind=s.kind).inc()
        log.info(
            "built master %s v%d from %d frames (%s): %s", s.kind, plan.version, len(s.frames), plan.why, row["path"]
        )
        return master_id


def _load(plan: MasterPlan, kind: str) -> Image | None:
    path = plan.master_paths.get(kind)
    return None if path is None else MASTERS.get(path)


def compute_master(plan: MasterPlan) -> MasterResult:
    """Combine the set's frames and write the master atomically. Touches no database."""
    cfg = plan.rules
    s = plan.calset
    paths = [Path(f["path"]) for f in s.frames]
    inputs = [f"{Path(f['path']).name} sha256:{(f['sha256'] or '')[:16]}" for f in s.frames]
    mem = int(cfg.mem_limit_mb * 2**20)
    overscan, trim = readout_settings(s.first, cfg)
    read = {"overscan": overscan, "trim": trim}
    timings = Timings()
    first = s.first
    with timings.stage("master"):
        bias_img, dark_img, darkflat_img = _load(plan, "bias"), _load(plan, "dark"), _load(plan, "darkflat")
        if s.kind == "bias":
            img = make_master_bias(paths, inputs_note=inputs, sigma=cfg.sigma, mem_limit_bytes=mem, **read)
            method = f"sigclip-average {cfg.sigma:g}"
        elif s.kind in ("dark", "darkflat"):
            maker = make_master_dark if s.kind == "dark" else make_master_darkflat
            img = maker(
                paths,
                bias=bias_img,
                method=cfg.dark_method,
                sigma=cfg.sigma,
                inputs_note=inputs,
                mem_limit_bytes=mem,
                **read,
            )
            method = f"bias-subtracted {cfg.dark_method}" if bias_img is not None else cfg.dark_method
            if s.kind == "dark":
                img.mask = bad_pixel_mask(dark=img, hot_sigma=cfg.hot_sigma)
        else:
            img = make_master_flat(
                paths,
                bias=bias_img,
                dark=dark_img,
                darkflat=darkflat_img,
                method=cfg.flat_method,
                sigma=cfg.sigma,
                inputs_note=inputs,
                mem_limit_bytes=mem,
                **read,
                mosaic=first.get("cfa") is not None,
            )
            per = {"median per CFA position": " per CFA position", "median per plane": " per plane"}
            method = f"median-scaled {cfg.flat_method}, normalised to median 1{per.get(img.header['FLATNORM'], '')}"
            img.mask = bad_pixel_mask(flat=img, low=cfg.flat_low, high=cfg.flat_high)
        state_pattern(img.header, first.get("bayerpat") if first.get("naxis3") is None else None)
        img.header["MASTERV"] = (plan.version, "nightshift master version for this calibration set")
        write_fits_atomic(plan.path, img)
    return MasterResult(sha256_file(plan.path), method, img.mask is not None, timings)
