"""Choosing masters: one SQL query per calibration, the BANZAI way.

A master matches when it has the same values for the configured match keys, the same readout (overscan
subtracted or not, the same region kept: always), a set-point within the tolerance, (flats) the same filter,
(darks) an exposure that can serve, and lies within its kind's age limit; among those, the one nearest in time
wins. Whatever the match keys, a master has the frame's colour layout (:func:`same_layout`): a colour light never
takes a mono flat, nor a flat of another Bayer pattern or row order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nightshift.daemon.archive import Archive
from nightshift.daemon.config import ALWAYS_MATCHED, CalibrationConfig
from nightshift.service.readout import OFF, Readout

__all__ = ["Choice", "choose_for_light", "describe_layout", "find_master", "readout_settings", "same_layout"]


def _where_match(keys: list[str], frame: dict[str, Any]) -> tuple[str, list[Any]]:
    """Equal on every match key that both sides state (a key a header does not state matches anything), and
    on the keys that always match (:data:`~nightshift.daemon.config.ALWAYS_MATCHED`) whatever they are."""
    parts, args = [], []
    for k in keys:
        if frame.get(k) is None or k in ALWAYS_MATCHED:
            continue
        parts.append(f"(m.{k} = ? OR m.{k} IS NULL)")
        args.append(frame[k])
    for k in ALWAYS_MATCHED:
        parts.append(f"m.{k} IS ?")
        args.append(frame.get(k))
    return " AND ".join(parts), args


def readout_settings(frame: dict[str, Any], rules: CalibrationConfig) -> tuple[str, str]:
    """(overscan, trim) settings that read ``frame`` (a frames row) as it was recorded at ingest: its own
    sections, so a frame is read the same way however the configuration changed since; the configured settings
    for a row without a readout."""
    text = frame.get("readout")
    if text is None or not frame.get("naxis1") or not frame.get("naxis2"):
        return rules.overscan or OFF, rules.trim or OFF
    readout = Readout.parse(text, (int(frame["naxis2"]), int(frame["naxis1"])))
    return readout.overscan or OFF, readout.trim or OFF


def same_layout(kind: str, frame: dict[str, Any]) -> tuple[str, list[Any]]:
    """SQL that keeps only masters of ``frame``'s colour layout (never relaxed, unlike the match keys).

    The same planes (a debayered cube's masters are cubes, a 2-D frame's are 2-D); for a colour frame the same row
    order (a frame stored upside down puts every pixel elsewhere; unstated means bottom-up, as in FITS); for a
    flat the same Bayer pattern at the first pixel, NULL for NULL: a mono flat never calibrates a colour light and
    a colour flat never a mono one.
    """
    parts, args = ["m.naxis3 IS ?"], [frame.get("naxis3")]
    if frame.get("cfa") is not None or frame.get("naxis3") is not None:
        parts.append("COALESCE(m.roworder, 'BOTTOM-UP') = ?")
        args.append(frame.get("roworder") or "BOTTOM-UP")
    if kind == "flat":
        parts.append("m.cfa IS ?")
        args.append(frame.get("cfa"))
    return " AND ".join(parts), args


def describe_layout(frame: dict[str, Any]) -> str:
    """A frame's colour layout in words for reasons and notes ("" for a mono frame)."""
    if frame.get("naxis3") is not None:
        return f"colour cube of {frame['naxis3']} planes, rows {(frame.get('roworder') or 'BOTTOM-UP').lower()}"
    if frame.get("cfa") is not None:
        return f"Bayer {frame['cfa']} at the first pixel, rows {(frame.get('roworder') or 'BOTTOM-UP').lower()}"
    return ""


def find_master(
    archive: Archive,
    cfg: CalibrationConfig,
    kind: str,
    frame: dict[str, Any],
    *,
    filter_: str | None = None,
    exptime: float | None = None,
    exptime_clause: str = "",
    exptime_order: str = "",
    extra: str = "",
) -> dict[str, Any] | None:
    """The best current master of ``kind`` for ``frame`` (a frames row or any dict with the match keys)."""
    match_sql, params = _where_match(cfg.match_keys, frame)
    layout_sql, layout_args = same_layout(kind, frame)
    sql = [f"SELECT m.* FROM masters m WHERE m.kind = ? AND m.superseded_by IS NULL AND {match_sql} AND {layout_sql}"]
    args: list[Any] = [kind, *params, *layout_args]
    if frame.get("set_temp") is not None:
        sql.append("AND (m.set_temp IS NULL OR abs(m.set_temp - ?) <= ?)")
        args += [frame["set_temp"], cfg.temp_tolerance]
    if kind == "flat":
        sql.append("AND m.filter IS ?")
        args.append(filter_)
    if exptime is not None and not exptime_clause:
        sql.append("AND abs(m.exptime - ?) < 1e-6")
        args.append(exptime)
    if exptime_clause:
        sql.append(exptime_clause)
        args.append(exptime)
    if extra:
        sql.append(extra)
    max_age = cfg.max_age_days.get(kind)
    if max_age is not None:
        sql.append("AND abs(julianday(m.date_obs) - julianday(?)) <= ?")
        args += [frame["date_obs"], max_age]
    order = [exptime_order] if exptime_order else []
    order.append("abs(julianday(m.date_obs) - julianday(?))")
    args.append(frame["date_obs"])
    sql.append("ORDER BY " + ", ".join(order) + ", m.id DESC LIMIT 1")
    if exptime_order:
        args.insert(len(args) - 1, exptime)
    return archive.one(" ".join(sql), args)


@dataclass
class Choice:
    """The masters chosen for one light, why, and what is still missing."""

    bias: dict[str, Any] | None = None
    dark: dict[str, Any] | None = None
    flat: dict[str, Any] | None = None
    dark_scale: float | None = None
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        return "; ".join(self.notes)

    @property
    def reason_missing(self) -> str:
        return "; ".join(self.missing)


def _describe(m: dict[str, Any]) -> str:
    what = f"master {m['kind']} #{m['id']} ({m['n_frames']} frames, night {m['night']}"
    if m["kind"] in ("dark", "darkflat"):
        what += f", {m['exptime']:g}s" + (", bias-subtracted" if m["bias_subtracted"] else ", bias included")
    if m["kind"] == "flat":
        what += f", filter {m['filter']}"
        if describe_layout(m):
            what += f", {describe_layout(m)}"
    return what + ")"


def choose_for_light(
    archive: Archive, cfg: CalibrationConfig, light: dict[str, Any], *, end_of_night: bool = False
) -> Choice:
    """Bias, dark (same exposure, else the closest longer bias-subtracted one, scaled) and flat for ``light``.

    ``missing`` lists what the light must wait for. At the end of the night a missing dark no longer holds a
    light back (it is calibrated without, and says so); a missing flat always does.
    """
    c = Choice()
    binning = f"binning {light.get('xbin') or 1}x{light.get('ybin') or 1}"
    exp = light["exptime"]
    dark = find_master(archive, cfg, "dark", light, exptime=exp)
    if dark is not None:
        c.dark, c.dark_scale = dark, 1.0
        c.notes.append(f"dark: {_describe(dark)}, same exposure")
    else:
        longer = find_master(
            archive,
            cfg,
            "dark",
            light,
            exptime=exp,
            exptime_clause="AND m.exptime > ?",
            exptime_order="m.exptime - ?",
            extra="AND m.bias_subtracted = 1",
        )
        shorter = longer or find_master(
            archive,
            cfg,
            "dark",
            light,
            exptime=exp,
            exptime_clause="AND m.exptime < ?",
            exptime_order="? - m.exptime",
            extra="AND m.bias_subtracted = 1 AND m.exptime > 0",
        )
        chosen = longer or shorter
        if chosen is not None:
            c.dark, c.dark_scale = chosen, exp / chosen["exptime"]
            side = "closest longer" if longer else "closest shorter (no longer one)"
            c.notes.append(
                f"dark: {_describe(chosen)}, {side}, scaled by {c.dark_scale:.4g} = {exp:g}s/{chosen['exptime']:g}s"
            )
        else:
            unsub = archive.scalar(
                "SELECT COUNT(*) FROM masters WHERE kind = 'dark' AND superseded_by IS NULL AND bias_subtracted = 0"
            )
            refusal = " (darks of other exposures still contain the bias and cannot be scaled)" if unsub else ""
            if end_of_night:
                c.notes.append(f"dark: none for {exp:g}s{refusal}; calibrated without dark at the end of the night")
            else:
                c.missing.append(f"no dark for {exp:g}s, {binning}{refusal}")
    needs_bias = c.dark is None or bool(c.dark["bias_subtracted"])
    bias = find_master(archive, cfg, "bias", light)
    if bias is not None and needs_bias:
        c.bias = bias
        c.notes.append(f"bias: {_describe(bias)}")
    elif needs_bias:
        c.missing.append(f"no bias for {binning}")
    else:
        c.notes.append("bias: contained in the same-exposure dark")
    flat = find_master(archive, cfg, "flat", light, filter_=light.get("filter"))
    if flat is not None:
        c.flat = flat
        c.notes.append(f"flat: {_describe(flat)}")
    else:
        layout = describe_layout(light)
        where = f"{binning}, {layout}" if layout else binning
        c.missing.append(f"no flat for filter {light.get('filter') or '(none)'}, {where}")
    for m in (c.bias, c.dark, c.flat):
        if m is not None and m["night"] != light["night"]:
            c.notes.append(f"{m['kind']} from the library: night {m['night']} (this night has none of its own)")
    return c
