"""The night report: one HTML page of what the archive holds for an observing night.

The daemon keeps it up to date as the night goes and writes it when the night ends, ``nightshift reduce`` writes
one per night it reduced, and ``nightshift report --night N`` writes it on demand. The CSS is inline, the grading
plots are inline SVG drawn here, and a Content-Security-Policy forbids scripts and any fetch from elsewhere.
Every string that comes from a header or a file name (OBJECT, FILTER, paths, reasons) is escaped, because
whoever wrote the FITS file chose it.

The pictures are small JPEG thumbnails of the PNG previews in the archive (``previews/<night>/.../thumbs/``,
made the first time a report needs them and again when a preview changes; never from the FITS files), each a
relative link to its full-size preview, so the page stays small and fast for a night of hundreds of lights and
the archive folder can be moved or served as it is. With ``embed=True`` (``nightshift report --embed``) the
page is a single self-contained file instead, for mailing: at most :data:`MAX_FRAME_PREVIEWS` frame thumbnails
and :data:`MAX_IMAGE_BYTES` of pictures are embedded as ``data:`` URIs, with no link out; it says what it left
out.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nightshift.daemon.archive import FRAME_STATUSES, Archive, now_iso
from nightshift.daemon.products import Layout
from nightshift.service.fitsio import write_bytes_atomic
from nightshift.service.preview import thumbnail_jpeg
from PIL import Image as PILImage

__all__ = [
    "MAX_FRAME_PREVIEWS",
    "MAX_IMAGE_BYTES",
    "UNDATED_WINDOW",
    "NightReports",
    "render_report",
    "write_report",
    "write_reports",
]

log = logging.getLogger("nightshift.report")

#: Frame thumbnails embedded in a self-contained page, at most (a linked page shows every light's).
MAX_FRAME_PREVIEWS = 24
#: JPEG bytes embedded in a self-contained page, at most (stack pictures first, then frames); base64 adds a third.
MAX_IMAGE_BYTES = 6 * 2**20
#: Quarantined files with no night (no readable DATE-OBS) are listed with a night when they were first seen
#: between this long before its first frame was recorded and this long after its last.
UNDATED_WINDOW = timedelta(hours=1)

JPEG_URI = "data:image/jpeg;base64,"
_KIND_ORDER = ("bias", "dark", "darkflat", "flat", "light", "-")
#: Plot colours of common filters; other filters take the palette in turn.
_FILTER_COLOURS = {
    "L": "#4d4d4d",
    "R": "#d0342c",
    "G": "#2e9d47",
    "B": "#2f6bd8",
    "U": "#7b3fc4",
    "V": "#3f9f3f",
    "I": "#8c4a1c",
    "HA": "#b8235a",
    "OIII": "#1a9c9c",
    "SII": "#c77c12",
}
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_REJECT_COLOUR = "#d62728"


# -- formatting -------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    """``value`` as escaped HTML text; None as a dash."""
    if value is None or value == "":
        return "&ndash;"
    return html.escape(str(value), quote=True)


def _num(value: Any, fmt: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    return format(value, fmt)


def _exp(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:g}&nbsp;s"


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "0 s"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h} h {m:02d} min"
    if m:
        return f"{m} min {sec:02d} s" if sec else f"{m} min"
    return f"{sec} s"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _when(date_obs: str | None) -> datetime | None:
    if not date_obs:
        return None
    try:
        return datetime.fromisoformat(date_obs)
    except ValueError:
        return None


def _clock(date_obs: str | None) -> str:
    t = _when(date_obs)
    return t.strftime("%H:%M:%S") if t else "&ndash;"


def _name(row: dict[str, Any], href: str | None = None) -> str:
    """A frame's file name, with its full path as the hover text and, given ``href``, a link there."""
    path = row.get("path") or ""
    if href:
        return f'<a href="{_e(href)}" title="{_e(path)}">{_e(Path(path).name)}</a>'
    return f'<span title="{_e(path)}">{_e(Path(path).name)}</span>'


def _img(pic: _Picture, alt: str, *, lazy: bool = False) -> str:
    """An ``<img>`` of ``pic``, wrapped in a link to its full-size preview when it has one."""
    loading = ' loading="lazy"' if lazy else ""
    img = f'<img src="{_e(pic.src)}" width="{pic.width}" height="{pic.height}"{loading} alt="{_e(alt)}">'
    if pic.href:
        return f'<a href="{_e(pic.href)}" title="full-size preview">{img}</a>'
    return img


def _status(status: str | None) -> str:
    s = status or "-"
    return f'<span class="st st-{_e(s if s in FRAME_STATUSES else "other")}">{_e(s)}</span>'


def _table(headers: list[str], rows: list[list[str]], *, cls: str = "") -> str:
    """An HTML table; ``headers`` are literal text, ``rows`` cells already escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


# -- pictures ---------------------------------------------------------------------------------------------------
@dataclass
class _Picture:
    """A picture as the page shows it: ``src`` for the ``<img>``, ``href`` the full-size preview (None: no link)."""

    src: str
    width: int
    height: int
    href: str | None


@dataclass
class _Pictures:
    """The thumbnails of the archive's previews, made once (and again when a preview changes), then linked from
    the page or embedded in it while the byte budget lasts.

    ``page_dir`` is the folder the page is written to: pictures are relative links from there. None embeds them.
    """

    layout: Layout
    page_dir: Path | None
    budget: int
    used: int = 0
    unwritable: int = 0
    over_budget: int = 0
    missing: list[str] = field(default_factory=list)

    @property
    def embed(self) -> bool:
        return self.page_dir is None

    def picture(self, stored: str | None) -> _Picture | None:
        """The thumbnail of the preview at archive path ``stored``; None when missing, unreadable or over budget."""
        if not stored:
            return None
        try:
            preview = self.layout.absolute(stored)
            thumb, data = self._thumbnail(preview, self.layout.thumbnail(stored))
            with PILImage.open(io.BytesIO(data) if data is not None else thumb) as im:
                width, height = im.size
        except (OSError, ValueError, PILImage.DecompressionBombError) as exc:
            log.warning("report: no picture of %s: %s", stored, exc)
            self.missing.append(stored)
            return None
        if self.page_dir is None:
            assert data is not None
            if self.used + len(data) > self.budget:
                self.over_budget += 1
                return None
            self.used += len(data)
            return _Picture(JPEG_URI + base64.b64encode(data).decode("ascii"), width, height, None)
        return _Picture(self._link(thumb or preview), width, height, self._link(preview))

    def _thumbnail(self, preview: Path, thumb: Path) -> tuple[Path | None, bytes | None]:
        """The thumbnail's file (None when it cannot be written) and, when embedding or just made, its bytes."""
        drawn = preview.stat().st_mtime_ns
        try:
            if thumb.stat().st_mtime_ns >= drawn:
                return thumb, thumb.read_bytes() if self.embed else None
        except OSError:
            pass
        data = thumbnail_jpeg(preview.read_bytes())
        try:
            write_bytes_atomic(thumb, data)
        except OSError as exc:  # an archive this user may only read: the page makes do without the file
            if not self.unwritable:
                log.warning("report: cannot write thumbnail %s (%s); the page shows the previews instead", thumb, exc)
            self.unwritable += 1
            return None, data
        return thumb, data

    def link(self, stored: str | None) -> str | None:
        """A relative link from the page to the archive file at ``stored``; None when embedding or not there."""
        if not stored or self.page_dir is None:
            return None
        try:
            path = self.layout.absolute(stored)
        except ValueError:
            return None
        return self._link(path) if path.is_file() else None

    def _link(self, path: Path) -> str:
        assert self.page_dir is not None
        return quote(Path(os.path.relpath(path, self.page_dir)).as_posix())


def _pick_previews(lights: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """At most ``n`` lights to show: rejected ones first (up to half), the rest spread evenly over the night."""
    if n <= 0:
        return []
    if len(lights) <= n:
        return list(lights)
    rejected = [f for f in lights if f["status"] == "rejected"][: n // 2]
    first = {f["id"] for f in rejected}
    others = [f for f in lights if f["id"] not in first]
    k = n - len(rejected)
    if k >= len(others):
        chosen = others
    elif k == 1:
        chosen = [others[len(others) // 2]]
    else:
        chosen = [others[round(i * (len(others) - 1) / (k - 1))] for i in range(k)]
    ids = first | {f["id"] for f in chosen}
    return [f for f in lights if f["id"] in ids]


# -- plots ------------------------------------------------------------------------------------------------------
@dataclass
class _Point:
    t: datetime
    y: float
    rejected: bool
    label: str


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def _y_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo)
    lo = math.floor(lo / step) * step
    hi = math.ceil(hi / step) * step
    n = round((hi - lo) / step)
    return lo, hi, [lo + i * step for i in range(n + 1)]


def _x_ticks(t0: datetime, t1: datetime) -> tuple[datetime, datetime, list[datetime]]:
    if t1 - t0 < timedelta(minutes=2):
        t0, t1 = t0 - timedelta(minutes=5), t1 + timedelta(minutes=5)
    span_min = (t1 - t0).total_seconds() / 60
    step = next((s for s in (1, 2, 5, 10, 15, 20, 30, 60, 120, 180, 240, 360) if span_min / s <= 7), 720)
    first = t0.replace(second=0, microsecond=0)
    first -= timedelta(minutes=(first.hour * 60 + first.minute) % step)
    ticks = [first]
    while ticks[-1] < t1:
        ticks.append(ticks[-1] + timedelta(minutes=step))
    return ticks[0], ticks[-1], ticks


def _tick_label(v: float, step: float) -> str:
    decimals = 0
    while decimals < 6 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1
    return f"{v:.{decimals}f}"


def _svg_plot(title: str, y_label: str, series: dict[str, list[_Point]]) -> str:
    """A scatter of ``series`` (one per filter) against time, rejected points ringed in red, as inline SVG."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return f'<p class="muted">{_e(title)}: no graded lights with a value to plot.</p>'
    width, height = 640, 300
    left, right, top, bottom = 64, 112, 28, 44
    pw, ph = width - left - right, height - top - bottom
    x0, x1, xticks = _x_ticks(min(p.t for p in points), max(p.t for p in points))
    y0, y1, yticks = _y_ticks(min(p.y for p in points), max(p.y for p in points))
    xspan = (x1 - x0).total_seconds() or 1.0

    def sx(t: datetime) -> float:
        return left + pw * (t - x0).total_seconds() / xspan

    def sy(v: float) -> float:
        return top + ph * (1 - (v - y0) / (y1 - y0))

    out = [
        f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
        f'<text x="{left}" y="18" class="ptitle">{_e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>',
    ]
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
    for v in yticks:
        y = sy(v)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        label = _tick_label(v, ystep)
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{label}</text>')
    for t in xticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" class="tick" text-anchor="middle">{t:%H:%M}</text>')
    out.append(
        f'<text x="{left + pw / 2:.0f}" y="{height - 6}" class="axis" text-anchor="middle">DATE-OBS (UTC)</text>'
    )
    out.append(
        f'<text transform="translate(16 {top + ph / 2:.0f}) rotate(-90)" class="axis" '
        f'text-anchor="middle">{_e(y_label)}</text>'
    )
    legend_y = top + 8
    for i, (filt, pts) in enumerate(sorted(series.items())):
        colour = _colour(filt, i)
        pts = sorted(pts, key=lambda p: p.t)
        good = [p for p in pts if not p.rejected]
        if len(good) > 1:
            line = " ".join(f"{sx(p.t):.1f},{sy(p.y):.1f}" for p in good)
            out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.2" opacity="0.6"/>')
        for p in pts:
            cx, cy = sx(p.t), sy(p.y)
            tip = f"<title>{_e(p.label)}</title>"
            if p.rejected:
                out.append(
                    f'<g class="rejected"><circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="none" '
                    f'stroke="{_REJECT_COLOUR}" stroke-width="2"/><circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" '
                    f'fill="{colour}"/>{tip}</g>'
                )
            else:
                out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{colour}">{tip}</circle>')
        lx = left + pw + 14
        out.append(f'<circle cx="{lx}" cy="{legend_y}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{lx + 10}" y="{legend_y + 4}" class="tick">{_e(filt)}</text>')
        legend_y += 18
    if any(p.rejected for p in points):
        lx = left + pw + 14
        out.append(f'<circle cx="{lx}" cy="{legend_y}" r="5" fill="none" stroke="{_REJECT_COLOUR}" stroke-width="2"/>')
        out.append(f'<text x="{lx + 10}" y="{legend_y + 4}" class="tick">rejected</text>')
    out.append("</svg>")
    return "".join(out)


def _colour(filt: str, index: int) -> str:
    return _FILTER_COLOURS.get(filt.strip().upper(), _PALETTE[index % len(_PALETTE)])


def _series(lights: list[dict[str, Any]], value: str) -> dict[str, list[_Point]]:
    out: dict[str, list[_Point]] = {}
    for f in lights:
        t = _when(f.get("date_obs"))
        v = f.get(value)
        if t is None or v is None or not math.isfinite(v):
            continue
        if value == "background":
            if not f.get("exptime"):
                continue
            v = v / f["exptime"]
        rejected = f["status"] == "rejected"
        label = f"#{f['id']} {Path(f['path']).name} {t:%H:%M:%S} {f.get('filter') or 'no filter'}: {v:.3g}"
        if rejected:
            label += f" (rejected: {f.get('reason') or ''})"
        out.setdefault(f.get("filter") or "no filter", []).append(_Point(t, v, rejected, label))
    return out


# -- the data of a night ----------------------------------------------------------------------------------------
def _collect(archive: Archive, night: str) -> dict[str, Any]:
    frames = archive.query("SELECT * FROM frames WHERE night = ? ORDER BY date_obs, id", [night])
    undated: list[dict[str, Any]] = []
    window = archive.one("SELECT MIN(first_seen) AS lo, MAX(first_seen) AS hi FROM frames WHERE night = ?", [night])
    if window and window["lo"]:
        hours = UNDATED_WINDOW.total_seconds() / 86400
        undated = archive.query(
            "SELECT * FROM frames WHERE night IS NULL AND status = 'quarantined' "
            "AND julianday(first_seen) BETWEEN julianday(?) - ? AND julianday(?) + ? ORDER BY id",
            [window["lo"], hours, window["hi"], hours],
        )
    lights = [f for f in frames if f["kind"] == "light"]
    used_ids = Counter(f[col] for f in lights for col in ("bias_id", "dark_id", "flat_id") if f.get(col) is not None)
    masters = archive.query(
        f"SELECT * FROM masters WHERE night = ? OR id IN ({','.join('?' * len(used_ids)) or 'NULL'}) "
        "ORDER BY kind, filter, exptime, version, id",
        [night, *used_ids],
    )
    stacks = archive.query("SELECT * FROM stacks WHERE night = ? ORDER BY object, filter, exptime, id", [night])
    return {
        "frames": frames,
        "undated": undated,
        "lights": lights,
        "masters": masters,
        "used": used_ids,
        "stacks": stacks,
    }


# -- sections ---------------------------------------------------------------------------------------------------
def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{title}</h2>{body}</section>'


def _summary(d: dict[str, Any]) -> str:
    everything = d["frames"] + d["undated"]
    if not everything:
        return _section("summary", "Summary", '<p class="bad">The archive holds no frame of this night.</p>')
    counts: dict[str, Counter[str]] = {}
    for f in everything:
        counts.setdefault(f["kind"] or "-", Counter())[f["status"]] += 1
    statuses = [s for s in FRAME_STATUSES if any(c[s] for c in counts.values())]
    statuses += sorted({s for c in counts.values() for s in c} - set(statuses))
    kinds = [k for k in _KIND_ORDER if k in counts] + sorted(set(counts) - set(_KIND_ORDER))
    rows = []
    for k in kinds:
        c = counts[k]
        label = "unclassified" if k == "-" else k
        rows.append([_e(label), *[str(c[s]) if c[s] else "" for s in statuses], f"<b>{sum(c.values())}</b>"])
    rows.append(
        ["<b>all</b>", *[f"<b>{sum(c[s] for c in counts.values())}</b>" for s in statuses], f"<b>{len(everything)}</b>"]
    )
    table = _table(["kind", *[_status(s) for s in statuses], "total"], rows, cls="counts")

    lights = d["lights"]
    times = [t for t in (_when(f["date_obs"]) for f in lights) if t]
    by_status = Counter(f["status"] for f in lights)
    quarantined = sum(1 for f in everything if f["status"] == "quarantined")
    stacked_exp = sum(s["total_exptime"] or 0 for s in d["stacks"])
    used = [m for m in d["masters"] if m["id"] in d["used"]]
    facts = [
        ("lights", f"{len(lights)} ({', '.join(f'{n} {_e(s)}' for s, n in sorted(by_status.items())) or 'none'})"),
        ("first / last light", f"{min(times):%Y-%m-%d %H:%M:%S} / {max(times):%H:%M:%S} UTC" if times else "&ndash;"),
        ("stacks", f"{len(d['stacks'])}, {_duration(stacked_exp)} of exposure in them"),
        ("quarantined", f'<span class="{"bad" if quarantined else ""}">{quarantined}</span>'),
        (
            "masters used",
            ", ".join(
                f"{_e(m['kind'])} #{m['id']}"
                + (f" {_e(m['filter'])}" if m["filter"] else "")
                + (f" {m['exptime']:g}s" if m["kind"] == "dark" and m["exptime"] is not None else "")
                + f" ({d['used'][m['id']]} lights)"
                for m in used
            )
            or "none",
        ),
    ]
    dl = "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
    note = ""
    if d["undated"]:
        note = (
            f'<p class="muted">{len(d["undated"])} quarantined file(s) have no night (no readable DATE-OBS); they '
            "are counted here because they arrived while this night's frames were being recorded.</p>"
        )
    return _section("summary", "Summary", dl + "<h3>Frames by kind and status</h3>" + table + note)


def _masters(d: dict[str, Any]) -> str:
    if not d["masters"]:
        return _section("masters", "Masters", '<p class="muted">No master of this night and none used by it.</p>')
    rows = []
    for m in d["masters"]:
        sup = f'<span class="bad">yes, by #{m["superseded_by"]}</span>' if m["superseded_by"] else "no"
        rows.append(
            [
                f"#{m['id']}",
                _e(m["kind"]),
                _e(m["filter"]),
                _exp(m["exptime"]),
                _e(m["n_frames"]),
                _e(m["version"]),
                sup,
                _e(m["method"]),
                _e(m["note"]),
                f'<span class="nowrap">{_e(m["night"])}</span>',
                str(d["used"].get(m["id"], 0)),
            ]
        )
    headers = ["id", "kind", "filter", "exptime", "frames", "version", "superseded?", "method", "note", "night"]
    return _section("masters", "Masters", _table([*headers, "lights using it"], rows))


def _stacks(d: dict[str, Any], pics: _Pictures) -> str:
    if not d["stacks"]:
        return _section("stacks", "Stacks", '<p class="muted">No stack this night.</p>')
    cards = []
    for s in d["stacks"]:
        pic = pics.picture(s["preview_path"])
        alt = f"stack {s['object'] or ''} {s['filter'] or ''} {s['exptime'] or 0:g}s"
        picture = _img(pic, alt) if pic else '<div class="nopic">no picture</div>'
        state = s["state"] or "-"
        cards.append(
            f'<figure class="stack">{picture}<figcaption><b>{_e(s["object"])}</b> &middot; {_e(s["filter"])} '
            f"&middot; {_exp(s['exptime'])}<br>{_e(s['n_frames'])} frames, {_duration(s['total_exptime'])} total, "
            f'<span class="st st-{_e(state)}">{_e(state)}</span><br>'
            f'<span class="muted">reference frame #{_e(s["reference_frame_id"])} &middot; {_e(s["path"])}</span>'
            "</figcaption></figure>"
        )
    note = ""
    if pics.over_budget:
        note = (
            f'<p class="capped">{pics.over_budget} stack picture(s) were left out to keep the pictures of this page '
            f"under {_mib(pics.budget)}.</p>"
        )
    return _section("stacks", "Stacks", note + '<div class="stacks">' + "".join(cards) + "</div>")


def _masters_used(f: dict[str, Any]) -> str:
    ids = " &middot; ".join(
        f"{kind} #{f[col]}" for kind, col in (("bias", "bias_id"), ("dark", "dark_id"), ("flat", "flat_id")) if f[col]
    )
    if f["dark_id"] and f["dark_scale"] is not None and abs(f["dark_scale"] - 1.0) > 1e-6:
        ids += f" (dark &times;{f['dark_scale']:.3g})"
    if not ids and not f["calibration_note"]:
        return "&ndash;"
    return f'<span class="ids">{ids}</span><br><span class="note">{_e(f["calibration_note"])}</span>'


def _lights(d: dict[str, Any], pics: _Pictures) -> str:
    if not d["lights"]:
        return _section("lights", "Lights", '<p class="muted">No light this night.</p>')
    rows = [
        [
            f"#{f['id']}",
            _clock(f["date_obs"]),
            _name(f, pics.link(f["preview_path"])),
            f"{_e(f['object'])}<br>{_e(f['filter'])} &middot; {_exp(f['exptime'])}",
            _status(f["status"]),
            f'<span class="reason">{_e(f["reason"])}</span>',
            _num(f["fwhm"]),
            _e(f["n_stars"]),
            _num(f["background"], ".1f"),
            _num(f["transparency"]),
            _masters_used(f),
        ]
        for f in d["lights"]
    ]
    headers = ["id", "time", "file", "object, filter, exp", "status", "reason", "FWHM px", "stars"]
    headers += ['<abbr title="background, ADU">bkg</abbr>', '<abbr title="transparency">transp.</abbr>', "masters used"]
    return _section("lights", "Lights", _table(headers, rows, cls="lights"))


def _rejected(d: dict[str, Any]) -> str:
    rejected = [f for f in d["frames"] if f["status"] == "rejected"]
    others = [f for f in d["frames"] if f["status"] in ("pending", "duplicate", "ingested", "ignored")]
    if rejected:
        rows = [
            [
                f"#{f['id']}",
                _clock(f["date_obs"]),
                _name(f),
                _e(f["object"]),
                _e(f["filter"]),
                _exp(f["exptime"]),
                f'<span class="reason">{_e(f["reason"])}</span>',
            ]
            for f in rejected
        ]
        body = _table(["id", "time", "file", "object", "filter", "exp", "reason"], rows)
    else:
        body = '<p class="muted">No frame was rejected.</p>'
    if others:
        rows = [
            [
                f"#{f['id']}",
                _e(f["kind"]),
                _name(f),
                _e(f["object"]),
                _e(f["filter"]),
                _status(f["status"]),
                f'<span class="reason">{_e(f["reason"])}</span>',
            ]
            for f in others
        ]
        body += "<h3>Waiting, duplicate or set aside</h3>" + _table(
            ["id", "kind", "file", "object", "filter", "status", "reason"], rows
        )
    return _section("rejected", "Rejected frames", body)


def _quarantined(d: dict[str, Any]) -> str:
    rows = []
    for f in [f for f in d["frames"] if f["status"] == "quarantined"] + d["undated"]:
        code, _, message = (f["reason"] or "").partition(": ")
        rows.append(
            [
                f"#{f['id']}",
                f'<span class="path">{_e(f["path"])}</span>',
                f"<code>{_e(code)}</code>",
                f'<span class="reason">{_e(message or code)}</span>',
                f'<span class="nowrap">{_e(f["night"] or "no night")}</span>',
            ]
        )
    if not rows:
        return _section("quarantined", "Quarantined files", '<p class="muted">No file was quarantined.</p>')
    intro = '<p class="muted">The raw files were left where they are, untouched; nightshift took nothing from them.</p>'
    return _section(
        "quarantined", "Quarantined files", intro + _table(["id", "file", "reason", "detail", "night"], rows)
    )


def _plots(d: dict[str, Any]) -> str:
    lights = [f for f in d["lights"] if f["status"] in ("stacked", "rejected", "calibrated")]
    body = '<div class="plots">'
    body += _svg_plot("FWHM over the night", "FWHM (px)", _series(lights, "fwhm"))
    body += _svg_plot("Sky background over the night", "background (ADU per s)", _series(lights, "background"))
    body += "</div>"
    body += (
        '<p class="muted">One colour per filter; rejected frames ringed in red. The background is divided by each '
        "frame's exposure time so exposures of different length compare. Hover a point for its frame.</p>"
    )
    return _section("grading", "Grading over the night", body)


def _previews(d: dict[str, Any], pics: _Pictures, max_previews: int | None) -> str:
    candidates = [f for f in d["lights"] if f["preview_path"]]
    if not candidates:
        return _section("previews", "Frame previews", '<p class="muted">No frame preview in the archive.</p>')
    chosen = candidates if max_previews is None else _pick_previews(candidates, max_previews)
    figures = []
    before = pics.over_budget
    for f in chosen:
        pic = pics.picture(f["preview_path"])
        if pic is None:
            continue
        caption = (
            f"#{f['id']} {_clock(f['date_obs'])} &middot; {_name(f)} &middot; {_e(f['filter'])} "
            f"{_exp(f['exptime'])} &middot; {_status(f['status'])}"
        )
        if f["reason"]:
            caption += f' <span class="reason">{_e(f["reason"])}</span>'
        alt = f"raw and calibrated frame {f['id']}"
        cls = "preview rejected" if f["status"] == "rejected" else "preview"
        figures.append(f'<figure class="{cls}">{_img(pic, alt, lazy=True)}<figcaption>{caption}</figcaption></figure>')
    notes = []
    if len(chosen) < len(candidates):
        notes.append(
            f"{len(candidates)} lights have a preview; at most {max_previews} are embedded in this page "
            "(rejected frames first, the rest spread over the night)."
        )
    if pics.over_budget > before:
        notes.append(
            f"{pics.over_budget - before} more preview(s) were left out to keep the pictures of this page under "
            f"{_mib(pics.budget)}."
        )
    cap = "".join(f'<p class="capped">{n}</p>' for n in notes)
    where = (
        "The full-size previews of every frame are in the archive under previews/."
        if pics.embed
        else "Click a picture for its full-size preview."
    )
    intro = (
        f'<p class="muted">Showing {len(figures)} of {len(candidates)}: raw frame on the left, calibrated on the '
        f"right. {where}</p>"
    )
    return _section("previews", "Frame previews", intro + cap + '<div class="thumbs">' + "".join(figures) + "</div>")


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f4f5f7}
header{background:#14202e;color:#eef2f6;padding:18px 28px}
header h1{margin:0 0 4px;font-size:24px}
header p{margin:0;color:#a9b7c6}
nav{padding:8px 28px;background:#e4e8ee;position:sticky;top:0;z-index:1}
nav a{margin-right:16px;color:#24476b;text-decoration:none}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:12px 18px;margin:16px 0}
h2{margin:4px 0 10px;font-size:19px}
h3{margin:14px 0 6px;font-size:15px}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border-bottom:1px solid #e6e9ee;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}
table.counts{width:auto}
table.counts td:not(:first-child),table.counts th:not(:first-child){text-align:right}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px;margin:0 0 8px}
dt{font-weight:600;color:#4a5563}
dd{margin:0}
.muted{color:#6b7480}
.bad{color:#b3261e;font-weight:600}
.capped{background:#fff4d6;border:1px solid #e8c66a;border-radius:4px;padding:6px 10px}
.reason{color:#8a1c14}
.note{font-size:12px;color:#4a5563}
table.lights td:last-child{min-width:260px}
table.lights{font-size:12.5px}
table.lights td:nth-child(3){overflow-wrap:break-word}
.nowrap{white-space:nowrap}
.scroll{overflow-x:auto}
.ids{font-weight:600;white-space:nowrap}
.path{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.st{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;background:#e5e7eb}
.st-stacked,.st-used,.st-calibrated,.st-final{background:#d7f0dc;color:#14532d}
.st-rejected,.st-quarantined{background:#fadbd8;color:#8a1c14}
.st-pending,.st-live,.st-duplicate,.st-ignored{background:#fdf0c8;color:#6b4e00}
.stacks{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0}
figure.stack{width:360px;border:1px solid #dde2e8;border-radius:4px;padding:8px;background:#fafbfc}
figure.stack img{width:100%;height:auto;image-rendering:auto;background:#000;display:block}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
figure.preview img{width:100%;height:auto;background:#000;display:block}
figure.rejected img{outline:3px solid #d62728}
figcaption{font-size:13px;margin-top:4px}
.nopic{height:200px;display:flex;align-items:center;justify-content:center;background:#eee;color:#777}
.plots{display:flex;flex-wrap:wrap;gap:16px}
svg.plot{width:560px;max-width:100%;height:auto;background:#fff;font-family:system-ui,sans-serif}
svg .frame{fill:none;stroke:#9aa3ad}
svg .grid{stroke:#e3e6ea;stroke-width:1}
svg .tick{font-size:11px;fill:#4a5563}
svg .axis{font-size:12px;fill:#1d232a}
svg .ptitle{font-size:14px;font-weight:600;fill:#1d232a}
footer{padding:0 28px 24px;color:#6b7480;font-size:12px}
"""

#: Nothing may run, and nothing load from elsewhere: inline styles; images embedded or from the archive folder.
_CSP = "default-src 'none'; img-src {img}; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_CSP_EMBEDDED = _CSP.format(img="data:")
_CSP_LINKED = _CSP.format(img="'self' file:")


def render_report(
    archive: Archive,
    night: str,
    *,
    page_dir: Path | None = None,
    embed: bool = False,
    max_frame_previews: int | None = None,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> str:
    """The HTML page of ``night`` as a string.

    Parameters
    ----------
    archive : Archive
        The archive to read (only read; thumbnails of its previews are written when missing).
    night : str
        Observing night ``YYYY-MM-DD`` as in ``frames.night``.
    page_dir : Path, optional
        The folder the page will be written to, which its links are relative to; default ``<archive>/reports``.
    embed : bool
        A self-contained page: thumbnails embedded as ``data:`` URIs, no link out of the page.
    max_frame_previews : int, optional
        Frame thumbnails to show at most; default every light's, or :data:`MAX_FRAME_PREVIEWS` when embedding.
    max_image_bytes : int
        When embedding, JPEG bytes to embed at most, stack pictures first; what does not fit is left out and the
        page says so.
    """
    from nightshift.service import __version__

    layout = Layout(archive.root)
    if embed:
        where = None
        if max_frame_previews is None:
            max_frame_previews = MAX_FRAME_PREVIEWS
    else:
        where = Path(page_dir).resolve() if page_dir is not None else layout.report(night).parent
    d = _collect(archive, night)
    pics = _Pictures(layout, where, budget=max_image_bytes)
    sections = [
        _summary(d),
        _stacks(d, pics),
        _plots(d),
        _lights(d, pics),
        _rejected(d),
        _quarantined(d),
        _masters(d),
        _previews(d, pics, max_frame_previews),
    ]
    missing = ""
    if pics.missing:
        missing = (
            f'<p class="muted">{len(pics.missing)} preview file(s) named in the archive are missing or unreadable.</p>'
        )
    nav = "".join(
        f'<a href="#{sid}">{label}</a>'
        for sid, label in (
            ("summary", "Summary"),
            ("stacks", "Stacks"),
            ("grading", "Grading"),
            ("lights", "Lights"),
            ("rejected", "Rejected"),
            ("quarantined", "Quarantined"),
            ("masters", "Masters"),
            ("previews", "Previews"),
        )
    )
    if embed:
        footer = f"A self-contained page: {_mib(pics.used)} of thumbnails embedded, nothing loaded from elsewhere."
    else:
        footer = "Pictures are thumbnails from the archive's previews/ folder; each links to its full-size preview."
    title = f"nightshift: night {night}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP_EMBEDDED if embed else _CSP_LINKED}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>Night {_e(night)}</h1><p>nightshift report &middot; archive {_e(archive.root)}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(sections)}{missing}</main>"
        f"<footer>Written {_e(now_iso())} UTC by nightshift {_e(__version__)}. {footer}</footer>"
        "</body></html>\n"
    )


def write_report(
    archive: Archive,
    night: str,
    *,
    out: Path | None = None,
    embed: bool = False,
    max_frame_previews: int | None = None,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> Path:
    """Write the HTML page of ``night`` atomically and return its path.

    Parameters
    ----------
    archive : Archive
        The archive to report on.
    night : str
        Observing night ``YYYY-MM-DD``.
    out : Path, optional
        Where to write; default ``<archive>/reports/night-<night>.html``. The page's links are relative to its
        folder.
    embed : bool
        A self-contained single file (see :func:`render_report`).
    max_frame_previews, max_image_bytes : int
        Caps on what is shown and embedded (see :func:`render_report`).
    """
    path = Path(out) if out is not None else Layout(archive.root).report(night)
    page = render_report(
        archive,
        night,
        page_dir=path.parent,
        embed=embed,
        max_frame_previews=max_frame_previews,
        max_image_bytes=max_image_bytes,
    )
    write_bytes_atomic(path, page.encode("utf-8"))
    return path


def write_reports(archive: Archive, nights: list[str]) -> dict[str, Path]:
    """Write the page of each of ``nights`` at its default place; returns {night: path} of those written.

    A page that cannot be written is logged and left out; the others are still written.
    """
    written = {}
    for night in nights:
        try:
            written[night] = write_report(archive, night)
        except Exception:
            log.exception("the report of night %s could not be written", night)
    return written


class NightReports:
    """The daemon's reports: the page of every night whose frames, masters or stacks changed since the last
    :meth:`refresh` is rewritten (thumbnails already made are reused, so a refresh costs little)."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.since = now_iso()

    def changed_nights(self) -> list[str]:
        """Nights with a row changed since the last refresh (or since this object was made)."""
        rows = self.archive.query(
            "SELECT night FROM frames WHERE updated_at >= :t UNION SELECT night FROM stacks WHERE updated_at >= :t "
            "UNION SELECT night FROM masters WHERE created_at >= :t",
            {"t": self.since},
        )
        return sorted(r["night"] for r in rows if r["night"])

    def write(self, night: str) -> Path | None:
        """Rewrite the page of ``night`` now (the night has ended); returns its path, None if it failed."""
        path = write_reports(self.archive, [night]).get(night)
        if path is not None:
            log.info("report of night %s: %s", night, path)
        return path

    def refresh(self) -> dict[str, Path]:
        """Rewrite the page of every night that changed since the last refresh; returns {night: path}."""
        start = now_iso()
        written = write_reports(self.archive, self.changed_nights())
        self.since = start
        for night, path in written.items():
            log.debug("report of night %s updated: %s", night, path)
        return written
