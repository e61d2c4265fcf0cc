"""daemon.report: the night's HTML page, written from an archive the real pipeline filled, looked at in a real
headless browser (Debian's chromium)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import reduce_night, require_tool
from nightshift.daemon.archive import Archive
from nightshift.daemon.cli import main
from nightshift.daemon.products import Layout
from nightshift.daemon.report import MAX_FRAME_PREVIEWS, render_report, write_report
from nightshift.service.simulate import NightPlan
from PIL import Image as PILImage

NIGHT = "2026-11-25"
PNG_URI = "data:image/png;base64,"
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


# -- looking at a page in chromium ------------------------------------------------------------------------------
def chromium(page: Path, tmp: Path, *args: str) -> str:
    """Run headless chromium on ``page`` with ``args``; returns its stdout."""
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
        f"--user-data-dir={tmp / 'chromium-profile'}",
        *args,
        page.absolute().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-3000:]}"
    return done.stdout


class Sections(HTMLParser):
    """What the rendered DOM shows, per ``<section id=...>``: text, image sources, and element counts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.current: str | None = None
        self.text: dict[str, list[str]] = {}
        self.imgs: dict[str, list[str]] = {}
        self.tags: dict[str, dict[str, int]] = {}
        self.all_tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.all_tags.add(tag)
        if tag == "section":
            self.current = a.get("id")
        if self.current is None:
            return
        counts = self.tags.setdefault(self.current, {})
        counts[tag] = counts.get(tag, 0) + 1
        if tag == "g" and "rejected" in (a.get("class") or ""):
            counts["rejected-marker"] = counts.get("rejected-marker", 0) + 1
        if tag == "img":
            self.imgs.setdefault(self.current, []).append(a.get("src") or "")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.current = None

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


def png_of(uri: str) -> bytes:
    assert uri.startswith(PNG_URI), uri[:60]
    data = base64.b64decode(uri[len(PNG_URI) :], validate=True)
    with PILImage.open(io.BytesIO(data)) as im:
        im.verify()
        assert im.format == "PNG"
    return data


@pytest.fixture(scope="module")
def dom(report: Path, tmp_path_factory: pytest.TempPathFactory) -> Sections:
    return parse(chromium(report, tmp_path_factory.mktemp("chromium"), "--dump-dom"))


# -- the page of a real night -----------------------------------------------------------------------------------
def test_written_atomically_at_the_layout_path(archive: Archive, report: Path) -> None:
    assert report == Layout(archive.root).report(NIGHT)
    assert report.is_file()
    assert [p.name for p in report.parent.iterdir()] == [report.name]  # no temp file left behind
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert f"Night {NIGHT}" in page


def test_self_contained(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    assert not re.search(r"(?:https?|file|ftp):|//", re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page))
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert sources, "no image or link at all"
    for s in sources:
        assert s.startswith((PNG_URI, "#")), s[:80]
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert "Content-Security-Policy" in page


def test_browser_shows_the_stacks(archive: Archive, dom: Sections) -> None:
    stacks = archive.query("SELECT * FROM stacks WHERE night = ? ORDER BY object, filter, exptime, id", [NIGHT])
    assert len(stacks) == 4
    imgs = dom.imgs.get("stacks", [])
    assert len(imgs) == len(stacks)
    for stack, uri in zip(stacks, imgs, strict=True):
        assert png_of(uri) == (archive.root / stack["preview_path"]).read_bytes()
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


def test_browser_shows_lights_masters_and_previews(archive: Archive, dom: Sections) -> None:
    lights = archive.query("SELECT * FROM frames WHERE night = ? AND kind = 'light'", [NIGHT])
    assert dom.count("lights", "tr") == len(lights) + 1
    shown = dom.shown("lights")
    assert "../../etc/passwd" in shown  # the hostile OBJECT, shown as text
    assert "bias #1" in shown and "master flat" in shown
    masters = archive.query("SELECT * FROM masters")
    assert dom.count("masters", "tr") == len(masters) + 1
    assert "sigclip" in dom.shown("masters") or "median" in dom.shown("masters")
    with_preview = [f for f in lights if f["preview_path"]]
    imgs = dom.imgs.get("previews", [])
    assert len(imgs) == len(with_preview) <= MAX_FRAME_PREVIEWS
    files = {(archive.root / f["preview_path"]).read_bytes() for f in with_preview}
    assert {png_of(u) for u in imgs} == files
    assert "script" not in dom.all_tags


def test_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    chromium(report, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400")
    assert shot.is_file()
    with PILImage.open(shot) as im:
        assert im.size == (1280, 2400)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50


def test_cli_report(archive: Archive, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "night.html"
    assert main(["report", "--archive", str(archive.root), "--night", NIGHT, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "Stacks" in out.read_text(encoding="utf-8")


# -- caps on what is embedded -----------------------------------------------------------------------------------
@pytest.fixture
def long_night(archive: Archive, tmp_path: Path) -> Iterator[Archive]:
    """A copy of the archive with 300 more lights, each pointing at a real preview of the night."""
    root = tmp_path / "archive"
    root.mkdir()
    with sqlite3.connect(root / "nightshift.db") as dst:
        archive.db.conn.backup(dst)
    dst.close()
    shutil.copytree(archive.root / "previews", root / "previews")
    previews = archive.query("SELECT preview_path FROM frames WHERE preview_path IS NOT NULL ORDER BY id")
    copy = Archive(root)
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


def test_a_long_night_caps_the_previews(long_night: Archive) -> None:
    page = render_report(long_night, NIGHT)
    d = parse(page)
    assert len(d.imgs["previews"]) == MAX_FRAME_PREVIEWS
    assert f"at most {MAX_FRAME_PREVIEWS} are embedded" in d.shown("previews")
    assert "Showing 24 of 316" in d.shown("previews")
    # rejected frames come first: the cloudy one is among the few shown
    assert "cloudy" in d.shown("previews")
    assert d.count("lights", "tr") == 17 + 300 + 1
    assert "left out to keep" not in page and "missing or not PNG" not in page
    assert len(page) < 20 * 2**20


def test_a_byte_budget_leaves_pictures_out_and_says_so(long_night: Archive) -> None:
    one = long_night.root / long_night.scalar("SELECT preview_path FROM frames WHERE preview_path IS NOT NULL")
    budget = 6 * one.stat().st_size
    page = render_report(long_night, NIGHT, max_image_bytes=budget)
    d = parse(page)
    embedded = [png_of(u) for s in ("stacks", "previews") for u in d.imgs.get(s, [])]
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
