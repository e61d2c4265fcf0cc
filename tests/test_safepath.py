"""service.safepath: header values never choose where nightshift writes."""

from __future__ import annotations

import re

import pytest
from nightshift.service.safepath import JOIN_MAX_LEN, safe_component, safe_join

SAFE = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$")

HOSTILE = [
    "../../etc",
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "...",
    ".hidden",
    "B/V",
    "a\\b\\..\\..\\c",
    "M31\x00.fits",
    "x" * 1000,
    "  ",
    "",
    "Ω Centauri",
    "NGC 6939; rm -rf ~",
    "$(reboot)",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_components_are_always_one_harmless_name(value):
    name = safe_component(value)
    assert SAFE.match(name), name
    assert name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name
    assert 0 < len(name) <= 64


@pytest.mark.parametrize("value", HOSTILE)
def test_safe_join_stays_under_root(tmp_path, value):
    root = tmp_path / "products"
    root.mkdir()
    path = safe_join(root, "stacks", value, value, f"{value}.fits")
    assert path.is_relative_to(root.resolve())
    assert len(path.relative_to(root.resolve()).parts) == 4


def test_examples():
    assert safe_component("NGC 6939") == "NGC_6939"
    assert safe_component("B/V") == "BV"
    assert safe_component("../../etc") == "etc"
    assert safe_component("M31\x00.fits") == "M31.fits"
    assert safe_component("H-alpha+7nm") == "H-alpha+7nm"
    assert safe_component("  Lum ") == "Lum"
    for empty in (None, "", "..", ".", "   ", "/"):
        assert safe_component(empty) == "unknown"
    assert safe_component(None, default="nofilter") == "nofilter"


def test_long_names_are_cut_but_stay_distinct():
    a, b = "A" * 500 + "1", "A" * 500 + "2"
    assert len(safe_component(a)) == 64 and len(safe_component(b)) == 64
    assert safe_component(a) != safe_component(b)
    assert safe_component(a) == safe_component(a)
    assert len(safe_component("x" * 1000, max_len=24)) == 24
    kept = safe_component("y" * 300 + ".fits", max_len=80)
    assert kept.endswith(".fits") and len(kept) == 80
    with pytest.raises(ValueError):
        safe_component("abc", max_len=4)


def test_safe_join_keeps_file_names_built_from_safe_parts(tmp_path):
    stem = "000123_" + safe_component("z" * 200, max_len=80) + ".png"
    path = safe_join(tmp_path, "previews", "2024-06-14", stem)
    assert path.name == stem
    assert len(safe_join(tmp_path, "q" * 1000).name) == JOIN_MAX_LEN


def test_safe_join_refuses_a_symlink_out_of_root(tmp_path):
    root = tmp_path / "products"
    outside = tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "evil").symlink_to(outside)
    with pytest.raises(ValueError):
        safe_join(root, "evil", "file.fits")
    assert safe_join(root, "fine", "file.fits") == root.resolve() / "fine" / "file.fits"
