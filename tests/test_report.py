"""daemon.report: the night's HTML page, written from an archive the real pipeline filled, looked at in a real
headless browser (Debian's chromium): thumbnails linked to the full-size previews, or embedded in one file."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from conftest import reduce_night, require_tool
from nightshift.daemon.archive import Archive, now_iso
from nightshift.daemon.cli import main
from nightshift.daemon.products import Layout
from nightshift.daemon.report import MAX_FRAME_PREVIEWS, NightReports, render_report, write_report
from nightshift.service.fitsio import write_bytes_atomic
from nightshift.service.preview import THUMBNAIL_SIZE
from nightshift.service.simulate import NightPlan, SimConfig, simulate_night
from PIL import Image as PILImage

NIGHT = "2026-11-25"
JPEG_URI = "data:image/jpeg;base64,"
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def archive(night: tuple[NightPlan, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """The session's simulated night (with every broken file) reduced by the real pipeline into this module's
    own archive, so nothing here depends on what other modules do to theirs."""
    _plan, camera = night
    archive = reduce_night(camera, tmp_path_factory.mktemp("report") / "archive")
    yield archive
    archive.close()


@pytest.fixture(scope="module")
def report(archive: Archive) -> Path:
    return write_report(archive, NIGHT)


@pytest.fixture(scope="module")
def embedded(archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-file page, written outside the archive (as for mailing)."""
    return write_report(archive, NIGHT, out=tmp_path_factory.mktemp("mail") / "night.html", embed=True)


def copy_archive(archive: Archive, root: Path) -> Archive:
    """A copy of ``archive`` (database and previews) at ``root``, to change without touching the module's."""
    root.mkdir(parents=True)
    with sqlite3.connect(root / "nightshift.db") as dst:
        archive.db.conn.backup(dst)
    dst.close()
    shutil.copytree(archive.root / "previews", root / "previews")
    return Archive(root)


# -- looking at a page in chromium ------------------------------------------------------------------------------
def chromium(page: Path, tmp: Path, *args: str) -> str:
    """Run headless chromium on ``page`` with ``args``; returns its stdout. The page's console must show no
    Content-Security-Policy violation (a picture the page's own policy blocked)."""
    exe = require_tool("chromium")
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        *args,
        page.absolute().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-3000:]}"
    assert "Content Security Policy" not in done.stderr, done.stderr[-3000:]
    return done.stdout


class Sections(HTMLParser):
    """What the rendered DOM shows, per ``<section id=...>``: text, pictures (image source and the link around
    it), links, and element counts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.current: str | None = None
        self.href: str | None = None
        self.text: dict[str, list[str]] = {}
        self.imgs: dict[str, list[str]] = {}
        self.pictures: dict[str, list[tuple[str, str | None]]] = {}
        self.links: dict[str, list[str]] = {}
        self.tags: dict[str, dict[str, int]] = {}
        self.all_tags: set[str] = set()
        self.sources: list[str] = []  # every src and href of the page

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.all_tags.add(tag)
        self.sources += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "section":
            self.current = a.get("id")
        if self.current is None:
            return
        counts = self.tags.setdefault(self.current, {})
        counts[tag] = counts.get(tag, 0) + 1
        if tag == "g" and "rejected" in (a.get("class") or ""):
            counts["rejected-marker"] = counts.get("rejected-marker", 0) + 1
        if tag == "a":
            self.href = a.get("href")
            self.links.setdefault(self.current, []).append(self.href or "")
        if tag == "img":
            self.imgs.setdefault(self.current, []).append(a.get("src") or "")
            self.pictures.setdefault(self.current, []).append((a.get("src") or "", self.href))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.current = None
        if tag == "a":
            self.href = None

    def handle_data(self, data: str) -> None:
        if self.current is not None:
            self.text.setdefault(self.current, []).append(data)

    def shown(self, section: str) -> str:
        return " ".join(" ".join(self.text.get(section, [])).split())

    def count(self, section: str, tag: str) -> int:
        return self.tags.get(section, {}).get(tag, 0)


def parse(dom: str) -> Sections:
    s = Sections()
    s.feed(dom)
    s.close()
    return s


def jpeg_of(uri: str) -> bytes:
    assert uri.startswith(JPEG_URI), uri[:60]
    data = base64.b64decode(uri[len(JPEG_URI) :], validate=True)
    with PILImage.open(io.BytesIO(data)) as im:
        im.verify()
        assert im.format == "JPEG"
    return data


def target(page: Path, link: str, root: Path) -> Path:
    """The archive file a relative link of ``page`` points at; fails if it is not relative, not inside ``root``
    or not there."""
    assert link and not re.match(r"^[a-z][a-z0-9+.-]*:|^/", link, re.I), f"not a relative link: {link[:80]}"
    path = Path(os.path.normpath(page.parent / unquote(link)))
    assert path.is_relative_to(root.resolve()), f"{link} points out of the archive"
    assert path.is_file(), f"{link} points at no file"
    return path


def check_links(page: Path, root: Path) -> tuple[set[Path], set[Path]]:
    """Every source and link of ``page`` is an anchor or a relative link to a file in the archive ``root``;
    returns (the pictures it shows, the files it links to). Pictures are JPEG thumbnails, never the PNGs."""
    d = parse(page.read_text(encoding="utf-8"))
    shown = set()
    for pictures in d.pictures.values():
        for src, _href in pictures:
            thumb = target(page, src, root)
            assert thumb.parent.name == "thumbs" and thumb.suffix == ".jpg", thumb
            with PILImage.open(thumb) as im:
                assert im.format == "JPEG" and max(im.size) <= THUMBNAIL_SIZE
            shown.add(thumb)
    linked = {target(page, h, root) for links in d.links.values() for h in links if not h.startswith("#")}
    assert all(p.suffix == ".png" for p in linked), linked
    return shown, linked


@pytest.fixture(scope="module")
def dom(report: Path, tmp_path_factory: pytest.TempPathFactory) -> Sections:
    return parse(chromium(report, tmp_path_factory.mktemp("chromium"), "--dump-dom"))


def previews_of(archive: Archive) -> dict[str, Path]:
    """{archive path of each preview the archive names: the file}, frames and stacks."""
    rows = archive.query(
        "SELECT preview_path FROM frames WHERE preview_path IS NOT NULL UNION "
        "SELECT preview_path FROM stacks WHERE preview_path IS NOT NULL"
    )
    return {r["preview_path"]: (archive.root / r["preview_path"]).resolve() for r in rows}


# -- the page of a real night -----------------------------------------------------------------------------------
def test_written_atomically_at_the_layout_path(archive: Archive, report: Path) -> None:
    assert report == Layout(archive.root).report(NIGHT)
    assert report.is_file()
    assert [p.name for p in report.parent.iterdir()] == [report.name]  # no temp file left behind
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert f"Night {NIGHT}" in page


def test_pictures_are_thumbnails_linked_to_the_previews(archive: Archive, report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    assert "data:" not in page and "<script" not in page.lower() and "<link" not in page.lower()
    assert "Content-Security-Policy" in page
    shown, linked = check_links(report, archive.root)
    previews = previews_of(archive)
    layout = Layout(archive.root)
    assert shown == {layout.thumbnail(p) for p in previews}  # every preview, as its thumbnail
    assert linked == set(previews.values())  # and each full-size preview a click away


def test_thumbnails_are_the_previews_made_small(archive: Archive, report: Path) -> None:
    layout = Layout(archive.root)
    for stored, preview in previews_of(archive).items():
        thumb = layout.thumbnail(stored)
        with PILImage.open(preview) as big, PILImage.open(thumb) as small:
            assert small.size[0] <= THUMBNAIL_SIZE and small.size[1] <= THUMBNAIL_SIZE
            assert abs(small.size[0] / small.size[1] - big.size[0] / big.size[1]) < 0.02
            expected = np.asarray(big.convert("L").resize(small.size, PILImage.Resampling.LANCZOS), dtype=float)
            got = np.asarray(small.convert("L"), dtype=float)
        assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.9, stored
        assert np.abs(expected - got).mean() < 10, stored
        assert thumb.stat().st_size < 80_000 if "/stacks/" in stored else thumb.stat().st_size < 50_000


def test_embedded_page_is_self_contained(archive: Archive, embedded: Path) -> None:
    page = embedded.read_text(encoding="utf-8")
    assert not re.search(r"(?:https?|file|ftp):|//", re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "", page))
    d = parse(page)
    assert d.sources, "no image or link at all"
    for s in d.sources:
        assert s.startswith((JPEG_URI, "#")), s[:80]
    assert "<script" not in page.lower() and "<link" not in page.lower()
    layout = Layout(archive.root)
    thumbs = {layout.thumbnail(p).read_bytes() for p in previews_of(archive)}
    assert {jpeg_of(s) for s in d.sources if s.startswith(JPEG_URI)} == thumbs


def test_browser_shows_the_stacks(archive: Archive, report: Path, dom: Sections) -> None:
    stacks = archive.query("SELECT * FROM stacks WHERE night = ? ORDER BY object, filter, exptime, id", [NIGHT])
    assert len(stacks) == 4
    pictures = dom.pictures.get("stacks", [])
    assert len(pictures) == len(stacks)
    layout = Layout(archive.root)
    for stack, (src, href) in zip(stacks, pictures, strict=True):
        assert target(report, src, archive.root) == layout.thumbnail(stack["preview_path"])
        assert href and target(report, href, archive.root) == (archive.root / stack["preview_path"]).resolve()
    shown = dom.shown("stacks")
    for stack in stacks:
        assert f"{stack['n_frames']} frames" in shown
        assert stack["state"] in shown
    assert "2 min total" in shown and "20 min total" in shown  # 4 x 30 s and 4 x 300 s


def test_browser_shows_quarantined_reasons(archive: Archive, dom: Sections) -> None:
    quarantined = archive.query("SELECT * FROM frames WHERE status = 'quarantined'")
    assert len(quarantined) == 11
    shown = dom.shown("quarantined")
    for f in quarantined:
        code, _, message = f["reason"].partition(": ")
        assert code in shown
        assert " ".join(message.split()) in shown
        assert Path(f["path"]).name in shown
    assert "quarantined 11" in dom.shown("summary")


def test_browser_shows_the_rejected_cloudy_frame(night: tuple[NightPlan, Path], dom: Sections) -> None:
    plan, _camera = night
    cloudy = [Path(f.name).name for f in plan.frames if f.cloudy]
    assert len(cloudy) == 1
    shown = dom.shown("rejected")
    assert cloudy[0] in shown
    assert re.search(r"cloudy: transparency 0\.\d+ < 0\.5", shown), shown
    assert "rejected" in dom.shown("lights")


def test_browser_shows_the_grading_plots(dom: Sections) -> None:
    assert dom.count("grading", "svg") == 2
    # 16 graded lights in each plot, plus legend dots; the rejected one ringed in each plot
    assert dom.count("grading", "circle") >= 2 * 16
    assert dom.count("grading", "rejected-marker") == 2
    shown = dom.shown("grading")
    assert "FWHM over the night" in shown and "Sky background over the night" in shown
    assert "DATE-OBS (UTC)" in shown
    for label in ("B", "V", "rejected", "19:30"):
        assert label in shown


def test_browser_shows_lights_masters_and_previews(archive: Archive, report: Path, dom: Sections) -> None:
    lights = archive.query("SELECT * FROM frames WHERE night = ? AND kind = 'light' ORDER BY date_obs, id", [NIGHT])
    assert dom.count("lights", "tr") == len(lights) + 1
    shown = dom.shown("lights")
    assert "../../etc/passwd" in shown  # the hostile OBJECT, shown as text
    assert "bias #1" in shown and "master flat" in shown
    masters = archive.query("SELECT * FROM masters")
    assert dom.count("masters", "tr") == len(masters) + 1
    assert "sigclip" in dom.shown("masters") or "median" in dom.shown("masters")
    with_preview = [f for f in lights if f["preview_path"]]
    assert len(with_preview) == 16
    layout = Layout(archive.root)
    # every light's thumbnail, in the order of the night, each a link to its full-size preview
    pictures = dom.pictures.get("previews", [])
    assert [(target(report, s, archive.root), target(report, h or "", archive.root)) for s, h in pictures] == [
        (layout.thumbnail(f["preview_path"]), (archive.root / f["preview_path"]).resolve()) for f in with_preview
    ]
    # and each file name in the table of lights links to the same preview
    links = [target(report, h, archive.root) for h in dom.links.get("lights", [])]
    assert links == [(archive.root / f["preview_path"]).resolve() for f in with_preview]
    assert "script" not in dom.all_tags


def test_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    chromium(report, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400")
    assert shot.is_file()
    with PILImage.open(shot) as im:
        assert im.size == (1280, 2400)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50


def test_browser_shows_the_embedded_page(archive: Archive, embedded: Path, tmp_path: Path) -> None:
    d = parse(chromium(embedded, tmp_path, "--dump-dom"))
    layout = Layout(archive.root)
    stacks = archive.query("SELECT * FROM stacks WHERE night = ? ORDER BY object, filter, exptime, id", [NIGHT])
    assert [jpeg_of(s) for s in d.imgs["stacks"]] == [layout.thumbnail(s["preview_path"]).read_bytes() for s in stacks]
    assert len(d.imgs["previews"]) == 16 <= MAX_FRAME_PREVIEWS
    assert all(h.startswith("#") for h in d.sources if not h.startswith(JPEG_URI))  # no link out of the page
    assert "thumbnails embedded, nothing loaded from elsewhere" in embedded.read_text(encoding="utf-8")


def test_cli_report(archive: Archive, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "elsewhere" / "night.html"
    assert main(["report", "--archive", str(archive.root), "--night", NIGHT, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    check_links(out, archive.root)  # links relative to where the page is, still into the archive
    mail = tmp_path / "mail.html"
    assert main(["report", "--archive", str(archive.root), "--night", NIGHT, "--out", str(mail), "--embed"]) == 0
    assert capsys.readouterr().out.strip() == str(mail)
    assert JPEG_URI in mail.read_text() and 'href="../' not in mail.read_text()


def test_thumbnails_are_made_once_and_again_when_a_preview_changes(archive: Archive, tmp_path: Path) -> None:
    copy = copy_archive(archive, tmp_path / "archive")
    try:
        write_report(copy, NIGHT)
        layout = Layout(copy.root)
        thumbs = {stored: layout.thumbnail(stored) for stored in previews_of(copy)}
        before = {stored: t.stat().st_mtime_ns for stored, t in thumbs.items()}
        write_report(copy, NIGHT)
        assert {stored: t.stat().st_mtime_ns for stored, t in thumbs.items()} == before
        stack = copy.one("SELECT preview_path FROM stacks ORDER BY id LIMIT 1")["preview_path"]
        with PILImage.open(copy.root / stack) as im:
            flipped = im.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        flipped.save(buffer, format="PNG")
        write_bytes_atomic(copy.root / stack, buffer.getvalue())  # the live stack's picture, redrawn
        write_report(copy, NIGHT)
        after = {stored: t.stat().st_mtime_ns for stored, t in thumbs.items()}
        assert [s for s in thumbs if after[s] != before[s]] == [stack]
        with PILImage.open(thumbs[stack]) as small:
            got = np.asarray(small.convert("L"), dtype=float)
            expected = np.asarray(flipped.convert("L").resize(small.size, PILImage.Resampling.LANCZOS), dtype=float)
        assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.9
    finally:
        copy.close()


def test_a_thumbnail_that_cannot_be_written_shows_the_preview_itself(archive: Archive, tmp_path: Path) -> None:
    copy = copy_archive(archive, tmp_path / "archive")
    try:
        blocked = copy.root / "previews" / NIGHT / "frames" / "thumbs"
        shutil.rmtree(blocked, ignore_errors=True)
        blocked.write_text("a file where the thumbnails folder would be\n")
        page = write_report(copy, NIGHT)
        d = parse(page.read_text(encoding="utf-8"))
        lights = copy.query("SELECT * FROM frames WHERE kind = 'light' AND preview_path IS NOT NULL ORDER BY date_obs")
        assert [target(page, s, copy.root) for s, _h in d.pictures["previews"]] == [
            (copy.root / f["preview_path"]).resolve() for f in lights
        ]
        assert len(d.pictures["stacks"]) == 4  # the stacks' thumbnails are unaffected
    finally:
        copy.close()


def test_a_missing_preview_is_left_out_and_said(archive: Archive, tmp_path: Path) -> None:
    copy = copy_archive(archive, tmp_path / "archive")
    try:
        light = copy.one("SELECT * FROM frames WHERE kind = 'light' AND preview_path IS NOT NULL ORDER BY id LIMIT 1")
        (copy.root / light["preview_path"]).unlink()
        shutil.rmtree(copy.root / "previews" / NIGHT / "frames" / "thumbs", ignore_errors=True)
        page = write_report(copy, NIGHT)
        _shown, linked = check_links(page, copy.root)  # every link still leads to a file
        d = parse(page.read_text(encoding="utf-8"))
        assert len(d.pictures["previews"]) == 15 and len(d.links["lights"]) == 15
        assert (copy.root / light["preview_path"]).resolve() not in linked
        assert "1 preview file(s) named in the archive are missing or unreadable" in page.read_text(encoding="utf-8")
    finally:
        copy.close()


def test_night_reports_rewrite_only_the_nights_that_changed(archive: Archive, tmp_path: Path) -> None:
    copy = copy_archive(archive, tmp_path / "archive")
    try:
        reports = NightReports(copy)
        assert reports.refresh() == {}  # nothing changed since it started looking
        other = "2026-11-20"
        copy.record_frame({"path": "/camera/old/a.fits", "kind": "bias", "night": other, "status": "used"})
        assert reports.changed_nights() == [other]
        written = reports.refresh()
        assert written == {other: Layout(copy.root).report(other)} and written[other].is_file()
        assert not Layout(copy.root).report(NIGHT).exists()
        assert reports.refresh() == {}
        light = copy.one("SELECT id FROM frames WHERE kind = 'light' AND night = ? LIMIT 1", [NIGHT])
        copy.update_frame(light["id"], reason="looked at again " + now_iso())
        assert list(reports.refresh()) == [NIGHT]
    finally:
        copy.close()


# -- a long night ---------------------------------------------------------------------------------------------
@pytest.fixture
def long_night(archive: Archive, tmp_path: Path) -> Iterator[Archive]:
    """A copy of the archive with 300 more lights, each pointing at a real preview of the night."""
    copy = copy_archive(archive, tmp_path / "archive")
    previews = archive.query("SELECT preview_path FROM frames WHERE preview_path IS NOT NULL ORDER BY id")
    start = datetime(2026, 11, 25, 20, 10)
    for i in range(300):
        copy.record_frame(
            {
                "path": f"/camera/long/L_{i:04d}.fits",
                "kind": "light",
                "object": "NGC 6939",
                "filter": "V",
                "exptime": 30.0,
                "night": NIGHT,
                "date_obs": (start + timedelta(seconds=35 * i)).isoformat(),
                "status": "stacked",
                "fwhm": 3.0 + (i % 7) * 0.1,
                "background": 25.0,
                "n_stars": 40,
                "transparency": 1.0,
                "preview_path": previews[i % len(previews)]["preview_path"],
            }
        )
    yield copy
    copy.close()


def test_a_long_night_shows_every_light_small(long_night: Archive) -> None:
    page = render_report(long_night, NIGHT)
    d = parse(page)
    assert len(d.imgs["previews"]) == 316
    assert "Showing 316 of 316" in d.shown("previews")
    assert d.count("lights", "tr") == 17 + 300 + 1
    assert "left out" not in page and "missing or unreadable" not in page
    assert len(page.encode()) < 2_000 * 316 + 100_000  # the page holds no picture, only links to them


def test_a_long_night_embeds_a_few_and_says_so(long_night: Archive) -> None:
    page = render_report(long_night, NIGHT, embed=True)
    d = parse(page)
    assert len(d.imgs["previews"]) == MAX_FRAME_PREVIEWS
    assert f"at most {MAX_FRAME_PREVIEWS} are embedded" in d.shown("previews")
    assert "Showing 24 of 316" in d.shown("previews")
    # rejected frames come first: the cloudy one is among the few shown
    assert "cloudy" in d.shown("previews")
    assert len(page.encode()) < 60_000 * MAX_FRAME_PREVIEWS + 2_000 * 316 + 600_000


def test_a_byte_budget_leaves_pictures_out_and_says_so(long_night: Archive) -> None:
    layout = Layout(long_night.root)
    stored = long_night.scalar("SELECT preview_path FROM frames WHERE preview_path IS NOT NULL")
    render_report(long_night, NIGHT)  # the thumbnails exist now
    stacks = long_night.query("SELECT preview_path FROM stacks")
    budget = sum(layout.thumbnail(s["preview_path"]).stat().st_size for s in stacks)
    budget += 3 * layout.thumbnail(stored).stat().st_size
    page = render_report(long_night, NIGHT, embed=True, max_image_bytes=budget)
    d = parse(page)
    embedded = [jpeg_of(u) for s in ("stacks", "previews") for u in d.imgs.get(s, [])]
    assert 0 < sum(map(len, embedded)) <= budget
    assert len(d.imgs["stacks"]) == 4  # stack pictures first
    assert "stack picture" not in d.shown("stacks")
    assert len(d.imgs["previews"]) < MAX_FRAME_PREVIEWS
    assert "left out to keep the pictures of this page under" in d.shown("previews")


# -- hostile header values ---------------------------------------------------------------------------------------
def hostile_archive(root: Path) -> Archive:
    """An archive whose header-derived strings are all HTML."""
    a = Archive(root)
    evil_filter = '"><img src=x onerror=alert(2)>'
    light = {
        "kind": "light",
        "object": HOSTILE,
        "filter": evil_filter,
        "exptime": 60.0,
        "night": NIGHT,
        "date_obs": "2026-11-25T21:00:00",
        "fwhm": 3.2,
        "background": 40.0,
        "n_stars": 30,
        "transparency": 0.9,
        "calibration_note": "<i>flat</i> from <script>x()</script>",
    }
    a.record_frame({**light, "path": "/camera/<script>alert(1)</script>.fits", "status": "stacked"})
    a.record_frame(
        {
            **light,
            "path": "/camera/b.fits",
            "date_obs": "2026-11-25T21:05:00",
            "status": "rejected",
            "reason": "cloudy: <b>transparency</b> 0.1 < 0.5",
        }
    )
    a.record_frame({"path": "/camera/../../etc/<q>.fits", "status": "quarantined", "reason": f"empty: {HOSTILE}"})
    a.put(
        "masters",
        {"kind": "flat", "path": "masters/x.fits", "filter": evil_filter, "night": NIGHT, "note": HOSTILE},
    )
    a.put(
        "stacks",
        {
            "object": HOSTILE,
            "filter": evil_filter,
            "exptime": 60.0,
            "night": NIGHT,
            "path": "stacks/x.fits",
            "n_frames": 1,
            "total_exptime": 60.0,
            "state": "live",
        },
    )
    return a


def test_header_strings_are_escaped(tmp_path: Path) -> None:
    a = hostile_archive(tmp_path / "archive")
    try:
        path = write_report(a, NIGHT)
    finally:
        a.close()
    page = path.read_text(encoding="utf-8")
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    assert "<img" not in page  # no preview exists, and the FILTER's <img> is text
    assert "<b>transparency</b>" not in page and "<i>flat</i>" not in page
    d = parse(page)
    assert HOSTILE in d.shown("stacks") and HOSTILE in d.shown("lights") and HOSTILE in d.shown("quarantined")
    assert "img" not in d.all_tags


def test_header_strings_stay_text_in_the_browser(tmp_path: Path) -> None:
    a = hostile_archive(tmp_path / "archive")
    try:
        path = write_report(a, NIGHT)
    finally:
        a.close()
    d = parse(chromium(path, tmp_path, "--dump-dom"))
    assert "script" not in d.all_tags and "img" not in d.all_tags
    assert HOSTILE in d.shown("lights")
    assert '"><img src=x onerror=alert(2)>' in d.shown("stacks")
    assert "cloudy: <b>transparency</b> 0.1 < 0.5" in d.shown("rejected")


def test_a_night_without_frames_says_so(tmp_path: Path) -> None:
    a = hostile_archive(tmp_path / "archive")
    try:
        page = render_report(a, "2030-01-01")
    finally:
        a.close()
    d = parse(page)
    assert "holds no frame of this night" in d.shown("summary")
    assert "No stack this night" in d.shown("stacks")
    assert HOSTILE not in d.shown("quarantined")  # an undated file seen on another night is not listed


# -- a night at 2k ------------------------------------------------------------------------------------------------
#: The report of a night, pictures included, stays within this per light plus FIXED_BYTES (the page's own
#: structure and one thumbnail per stack): a night of 200 lights stays under 12.5 MB, whichever the frame size.
BYTES_PER_LIGHT = 60_000
FIXED_BYTES = 500_000


@pytest.mark.slow
def test_a_2k_night_gives_a_small_report_that_renders(tmp_path: Path) -> None:
    """A 2048 px night reduced by a real ``nightshift reduce``: its report shows thumbnails, not the PNGs, links
    only into the archive, and stays within the size bound linked or embedded; chromium shows both."""
    camera, root = tmp_path / "camera", tmp_path / "archive"
    plan = simulate_night(camera, SimConfig(size=2048, n_light=4, n_bias=3, n_dark=3, n_flat=3))
    n_lights = len(plan.by_kind("light"))
    assert n_lights == 16
    cli = [sys.executable, "-m", "nightshift.daemon.cli"]
    done = subprocess.run(
        [*cli, "reduce", str(camera), "--archive", str(root), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    page = Layout(root).report(NIGHT)
    assert f"report of night {NIGHT}: {page}" in done.stdout
    html = page.read_text(encoding="utf-8")
    assert "data:image" not in html  # pictures are files: thumbnails shown, previews linked (below)
    a = Archive(root, create=False)
    try:
        previews = previews_of(a)
        stacks = a.scalar("SELECT COUNT(*) FROM stacks")
    finally:
        a.close()
    shown, linked = check_links(page, root)
    assert shown == {Layout(root).thumbnail(p) for p in previews} and linked == set(previews.values())
    assert len(previews) == n_lights + stacks
    size = page.stat().st_size + sum(p.stat().st_size for p in shown)
    full = sum(p.stat().st_size for p in linked)
    assert size <= BYTES_PER_LIGHT * n_lights + FIXED_BYTES, (size, full)
    assert size < full / 4  # what embedding the PNGs used to cost
    mail = tmp_path / "mail" / "night.html"
    done = subprocess.run(
        [*cli, "report", "--archive", str(root), "--embed", "--out", str(mail)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == str(mail), done.stderr[-3000:]
    assert mail.stat().st_size <= BYTES_PER_LIGHT * n_lights + FIXED_BYTES
    d = parse(chromium(page, tmp_path / "linked", "--dump-dom", "--window-size=1280,8000"))
    assert len(d.pictures["previews"]) == n_lights and len(d.pictures["stacks"]) == stacks
    d = parse(chromium(mail, tmp_path / "embedded", "--dump-dom"))
    assert len(d.imgs["previews"]) == n_lights and all(s.startswith(JPEG_URI) for s in d.imgs["previews"])
