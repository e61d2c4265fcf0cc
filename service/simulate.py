"""A simulated observing night: raw FITS frames written the way real capture programs write them.

nightshift's own camera. It plans a night (bias, darks, flats per filter, lights per object, filter and
exposure), renders each frame from a fixed camera model and writes it as a real camera would: uint16 with
BZERO=32768, in the header words of one of several capture programs, optionally slowly in chunks or as a
temporary file renamed at the end, plus deliberately broken files. The same tool makes a 512-pixel test night
and a 4k benchmark night.

The camera model (all in ADU unless stated)::

    raw = bias + dark_rate * t + response * signal + noise + cosmic rays      (rounded, clipped to 0..65535)

``bias`` is a level of ~949 with a fixed column/row pattern, ``dark_rate`` (ADU/s) a low dark current with a
faint amplifier glow and hot pixels, ``response`` the flat field of the filter (vignetting x dust donuts x
pixel-to-pixel variation, median 1) and ``signal`` what falls on the sensor: sky + stars for a light, a
uniform level for a flat, nothing for bias and dark. The noise is shot noise of ``dark_rate * t + response *
signal`` at a gain of 1.4 e-/ADU plus 12 ADU of read noise. The true maps are exposed
(:meth:`NightPlan.true_bias`, :meth:`NightPlan.true_dark_rate`, :meth:`NightPlan.true_response`) and
:meth:`NightPlan.truth_signal` gives ``signal`` noise-free, so ``(raw - bias - dark_rate * t) / response ==
truth_signal + noise``.

Pixel coordinates are 0-based ``(x, y)`` = (column, row) with pixel centres on integers, as sep and astroalign
use. A star at reference position ``p0`` of its object appears in a light at ``c + F R (p0 - c) + offset``,
where ``c`` is the image centre ``((W-1)/2, (H-1)/2)``, ``R`` the frame's small rotation, ``F`` = -1 after a
meridian flip (180 degrees about the centre) and ``offset`` the frame's pointing offset (dither) in its own
pixels.

Observatory conventions (:class:`SimConfig` ``overscan``, ``prescan``, ``bias_drift``, ``time_keys``,
``filter_keys``, ``filter_case``, ``untyped``, ``compress``, ``file_format``, dialect ``"observatory"``): a raw
frame can be wider than the light-sensitive ``shape``, with prescan columns before it and overscan columns after
it declared in BIASSEC/TRIMSEC/DATASEC, whose level is the bias level of that very readout; with ``bias_drift``
the bias level of every pixel drifts through the night (:meth:`NightPlan.bias_offset`), which only the overscan
can follow. ``truth_signal`` and the true maps stay in the light-sensitive shape, which is what a calibrated
frame trimmed to TRIMSEC has. Files can be written tile-compressed (``.fits.fz``), gzip-compressed (``.fits.gz``)
or as XISF.

A colour night (``SimConfig(bayer="RGGB")``, a one-shot-colour camera) renders the same scene per colour channel
and keeps, at each pixel, the channel its Bayer filter passes: stars of different colours (their B-V), a sky with
a colour, channels of different sensitivity and vignetting, a flat lamp with a colour; the headers say
``BAYERPAT`` (optionally shifted by ``XBAYROFF``/``YBAYROFF``) and ``ROWORDER`` as capture programs write them,
and the capture program may debayer and save 3-plane cubes (``debayered=True``, as SharpCap and ASIAIR can). See
the section "colour camera" below for the model and the truth it exposes.

Nothing here is imported by the pipeline; tests, the demo and the benchmark use it.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import re
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

__all__ = [
    "BAYER_PATTERNS",
    "BIAS_LEVEL",
    "BROKEN_FILES",
    "DIALECTS",
    "FILTER_KEYS",
    "GAIN",
    "OBSERVATORY",
    "READ_NOISE",
    "SATURATION",
    "TIME_CONVENTIONS",
    "TRUTH_FILE",
    "NightPlan",
    "SimConfig",
    "SimFrame",
    "corner_error",
    "plan_night",
    "simulate_night",
    "write_frame",
]

#: Camera model.
BIAS_LEVEL = 949.0  # ADU
READ_NOISE = 12.0  # ADU
GAIN = 1.4  # e-/ADU
SATURATION = 65535
DARK_RATE = 0.07  # ADU/s, typical pixel: a 300 s dark holds ~25 ADU on average
HOT_FRACTION = 3e-4  # of pixels
HOT_RATES = (0.5, 200.0)  # ADU/s, log-uniform: the brightest saturate in 300 s
COLUMN_PATTERN = 4.5  # ADU rms of the fixed column pattern of the bias
ROW_PATTERN = 1.0  # ADU rms of the fixed row pattern
PIXEL_SIZE_UM = 5.4
FOCAL_LENGTH_MM = 1600.0

#: Capture programs that plate-solve each light and write a WCS into it.
PLATE_SOLVED = ("nina", "asiair", "sharpcap")
#: Capture programs whose header words the simulator writes; "mixed" cycles through them frame by frame.
DIALECTS = ("maxim", "nina", "ekos", "sharpcap", "sgp", "apt", "asiair", "iraf")
#: An observatory's data-taking system (NOAO/IRAF style): OBSTYPE, date-only DATE-OBS with UTC-OBS, MJD-OBS,
#: CCDSUM, two filter wheels, DETECTOR, LONGITUD; not part of "mixed".
OBSERVATORY = "observatory"
#: How the start time is written (``SimConfig.time_keys``): "" = the dialect's own way.
TIME_CONVENTIONS = (
    "",
    "time-obs",
    "ut",
    "utc-obs",
    "utcstart",
    "ut-start",
    "mjd",
    "jd",
    "date-avg",
    "offset",
    "date-only",
)
#: Where the filter is written (``SimConfig.filter_keys``): "" = FILTER (the observatory dialect: two wheels).
FILTER_KEYS = ("", "FILTER", "FILTNAME", "wheels")
#: Random stream of the overscan's read noise.
_S_OSCAN = 8

#: Deliberately broken files written with ``SimConfig(broken=True)``: file stem -> FrameError reason expected.
BROKEN_FILES: dict[str, str] = {
    "empty": "empty",
    "not_fits": "not_fits",
    "truncated": "truncated",
    "no_image_data": "no_image_data",
    "cube": "unsupported_dimensions",
    "unknown_type": "unknown_type",
    "missing_exposure": "missing_exposure",
    "bad_exptime": "bad_header_value",
    "bad_date": "bad_header_value",
    "constant": "constant_data",
    "nan": "nan_data",
}
HOSTILE_NAME = "odd/hostile.fits"
#: The truth file :func:`simulate_night` writes beside the night's files.
TRUTH_FILE = "truth.json"
HOSTILE_OBJECT = "../../etc/passwd"
HOSTILE_FILTER = "B/V"

_TYPE_WORDS = {
    "maxim": {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field", "light": "Light Frame"},
    "nina": {"bias": "BIAS", "dark": "DARK", "flat": "FLAT", "light": "LIGHT"},
    "ekos": {"bias": "Bias", "dark": "Dark", "flat": "Flat", "light": "Light"},  # in FRAME
    "sharpcap": {"bias": "Bias", "dark": "Dark", "flat": "Flat", "light": "Light"},
    "sgp": {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Frame", "light": "Light Frame"},
    "apt": {"bias": "Bias", "dark": "Dark", "flat": "Flat", "light": "Light"},
    "asiair": {"bias": "Bias", "dark": "Dark", "flat": "Flat", "light": "Light"},
    "iraf": {"bias": "zero", "dark": "dark", "flat": "flat", "light": "object"},
    OBSERVATORY: {"bias": "ZERO", "dark": "DARK", "flat": "SKYFLAT", "light": "OBJECT"},
}
_SOFTWARE = {
    "maxim": "MaxIm DL Version 6.40 220803 1HM03",
    "nina": "N.I.N.A. 3.1.2.9001 (x64)",
    "ekos": "KStars 3.7.4 Ekos",
    "sharpcap": "SharpCap v4.1.12367.0, 64 bit",
    "sgp": "Sequence Generator Pro v4.3.0.1227",
    "apt": "Astro Photography Tool - APT v.4.30",
    "asiair": "ASIAIR Plus 2.2",
    "iraf": None,
    OBSERVATORY: None,
}
_EXTENSIONS = {
    OBSERVATORY: ".fits",
    "maxim": ".fit",
    "nina": ".fits",
    "ekos": ".fits",
    "sharpcap": ".fits",
    "sgp": ".fit",
    "apt": ".fits",
    "asiair": ".fit",
    "iraf": ".fits",
}
#: Star flux through each filter relative to V (blue ones also depend on the star's colour); sky in ADU/s.
_THROUGHPUT = {"U": 0.15, "B": 0.6, "V": 1.0, "R": 1.2, "I": 0.9, "L": 2.5, "HA": 0.12, "OIII": 0.08}
_SKY_RATE = {"U": 0.2, "B": 0.4, "V": 0.9, "R": 1.3, "I": 1.6, "L": 3.0, "HA": 0.08, "OIII": 0.06}
_KNOWN_COORDS = {"NGC 6939": (307.875, 60.65), "M 31": (10.6847, 41.2690), "M 42": (83.8221, -5.3911)}

# Random streams: every random thing comes from default_rng([seed, stream, ...]) so it is reproducible alone.
_S_PLAN, _S_BIAS, _S_DARK, _S_RESP, _S_DUST, _S_STARS, _S_NOISE, _S_COSMIC, _S_TRAIL = range(9)
#: Length range (pixels) of the drift that trails a ``trailed`` light: a real tracking failure, far beyond seeing.
_TRAIL_LENGTH = (9.0, 14.0)

#: Colour camera model (one-shot colour), channels in the order R, G, B: sensitivity of each channel, the
#: strength of its radial vignetting (the mono camera's is 0.3), the flat lamp's colour and the sky's colour.
BAYER_PATTERNS = ("RGGB", "GRBG", "GBRG", "BGGR")
COLOUR_QE = (0.82, 1.0, 0.64)
COLOUR_VIGNETTING = (0.24, 0.30, 0.40)
FLAT_LAMP = (1.0, 0.95, 0.7)
SKY_COLOUR = (1.3, 1.0, 0.75)
#: Dialects whose capture programs write XBAYROFF/YBAYROFF; the others state the pattern at the top-left pixel.
_OFFSET_DIALECTS = ("nina", "ekos", "maxim", "sharpcap")
COLOUR_CAMERA = "ZWO ASI2600MC Pro"

_BETA = 3.5  # Moffat PSF
_STAMP_RADII = (7, 15, 31, 63)
_F_MIN, _F_SLOPE, _F_MAX = 8.0, 0.7, 3.0e4  # star fluxes in V, ADU/s: Pareto tail N(>F) ~ F^-0.7
_READOUT_S = 3.0


@dataclass
class SimConfig:
    """What night to simulate. Counts are per group; sizes in pixels; times in seconds.

    ``order``: "natural" (bias, darks, flats, lights), "lights-first" (lights, flats, darks, bias) or "shuffled"
    (times of a natural night, written in random order). ``dialect``: one of :data:`DIALECTS` or "mixed" (cycles
    through them; broken files always use N.I.N.A.'s words). ``cloudy`` lights go into the largest light group;
    ``trailed`` lights (the mount drifted during the exposure: every star a streak of 9-14 px) into the largest
    other group, its last frames. ``max_offset`` (pixels) and ``max_rotation`` (degrees) bound each light's pointing
    offset and field rotation. ``stars`` is the density of the star field per 512 x 512 pixels (stars brighter than
    8 ADU/s through V); ``faintest`` (ADU/s through V, below 8) extends the field to fainter stars, as many more as
    the real sky's counts give, so long exposures reach deeper than short ones. ``cosmic_rays`` hits per megapixel
    per 100 s of exposure (0 for none); ``exact_poisson`` draws true Poisson shot noise instead of its Gaussian
    approximation (slower). ``extension`` overrides each dialect's own file extension (".fit" for MaxIm, SGP,
    ASIAIR; ".fits" else).

    Colour: ``bayer`` is the sensor's Bayer pattern read from the top-left of the picture (None: a mono camera);
    ``row_order`` how files store rows ("TOP-DOWN" or "BOTTOM-UP"); ``bayer_offset`` the (XBAYROFF, YBAYROFF)
    written by the programs that write them (the stated pattern is shifted to match, so the sensor is the same);
    ``bayer_header`` False writes no BAYERPAT (a header that says nothing); ``debayered`` writes 3-plane cubes
    debayered by the capture program. A colour camera usually has no filter: use ``filters=(None,)``.
    """

    size: int = 512
    n_bias: int = 5
    n_dark: int = 5
    dark_exptimes: tuple[float, ...] = (30.0, 300.0)
    n_flat: int = 5
    flat_exptime: float = 2.0
    filters: tuple[str | None, ...] = ("B", "V")
    objects: tuple[str, ...] = ("NGC 6939",)
    light_exptimes: tuple[float, ...] = (30.0, 300.0)
    n_light: int = 4
    order: str = "natural"
    dialect: str = "mixed"
    cloudy: int = 1
    trailed: int = 0
    meridian_flip: bool = True
    broken: bool = False
    set_temp: float = -10.0
    camera: str = "SBIG ST-8300M"
    start: str = "2026-11-25T18:30:00"
    seed: int = 0
    subfolders: bool = True
    width: int | None = None
    height: int | None = None
    stars: float = 300.0
    faintest: float = 8.0
    max_offset: float = 4.0
    max_rotation: float = 0.3
    cosmic_rays: float = 20.0
    exact_poisson: bool = False
    extension: str | None = None
    overscan: int = 0
    prescan: int = 0
    bias_drift: float = 0.0
    time_keys: str = ""
    utc_offset: float = -7.0
    filter_keys: str = ""
    filter_case: str = ""
    untyped: str = ""
    longitude: float | None = None
    compress: str = ""
    file_format: str = "fits"
    bayer: str | None = None
    row_order: str = "TOP-DOWN"
    bayer_offset: tuple[int, int] = (0, 0)
    bayer_header: bool = True
    debayered: bool = False

    def __post_init__(self) -> None:
        if self.order not in ("natural", "lights-first", "shuffled"):
            raise ValueError(f"unknown order {self.order!r}")
        if self.dialect not in ("mixed", *DIALECTS, OBSERVATORY):
            raise ValueError(f"unknown dialect {self.dialect!r}; one of {('mixed', *DIALECTS, OBSERVATORY)}")
        if min(self.shape) < 16:
            raise ValueError(f"frames of {self.shape} are too small to simulate")
        choices = {
            "time_keys": TIME_CONVENTIONS,
            "filter_keys": FILTER_KEYS,
            "filter_case": ("", "mixed"),
            "untyped": ("", "lights", "all"),
            "file_format": ("fits", "xisf"),
            "compress": ("", "zlib") if self.file_format == "xisf" else ("", "fz", "gz"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r}: one of {allowed}")
        if self.overscan < 0 or self.prescan < 0:
            raise ValueError("overscan and prescan are numbers of columns, >= 0")
        if self.bayer is not None and self.bayer not in BAYER_PATTERNS:
            raise ValueError(f"unknown Bayer pattern {self.bayer!r}; one of {BAYER_PATTERNS}")
        if self.row_order not in ("TOP-DOWN", "BOTTOM-UP"):
            raise ValueError(f"row_order must be TOP-DOWN or BOTTOM-UP, got {self.row_order!r}")
        if self.debayered and self.bayer is None:
            raise ValueError("debayered cubes need a colour camera (bayer)")
        if self.bayer is not None and (self.overscan or self.prescan or self.file_format != "fits"):
            raise ValueError("the colour camera writes FITS without overscan or prescan columns")

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return (self.height or self.size, self.width or self.size)


@dataclass
class SimFrame:
    """One planned file: what it truly is and how it was taken.

    ``date_obs`` is naive UTC, exactly as written in the header (truncated to the dialect's precision).
    ``level`` is the flat's illumination or the light's mean sky (ADU); ``sky_gradient`` the sky's slope in
    ADU per pixel along x and y; ``rotation`` degrees; ``transparency`` scales star fluxes (about 0.2 when
    cloudy). ``trail`` is the drift (x, y pixels) of the field during a trailed exposure, centred on the frame's
    pointing (its stars' centroids stay where :meth:`NightPlan.transform` puts them). ``broken`` is the
    FrameError reason nightshift must give for a deliberately broken file.
    """

    name: str
    kind: str
    exptime: float
    filter: str | None
    object: str | None
    date_obs: datetime
    dialect: str
    index: int
    cloudy: bool = False
    flipped: bool = False
    offset: tuple[float, float] = (0.0, 0.0)
    broken: str | None = None
    rotation: float = 0.0
    fwhm: float = 3.0
    transparency: float = 1.0
    level: float = 0.0
    sky_gradient: tuple[float, float] = (0.0, 0.0)
    ccd_temp: float = 0.0
    trail: tuple[float, float] = (0.0, 0.0)

    @property
    def trailed(self) -> bool:
        """True when the field drifted during the exposure (stars are streaks)."""
        return bool(self.trail[0] or self.trail[1])


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _filter_key(name: str | None) -> str:
    return (name or "").strip().upper()


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_.") or "object"


def _exp_word(t: float) -> str:
    return f"{t:g}s"


@dataclass
class NightPlan:
    """A planned night: the frames in writing order and the true camera and sky that render them."""

    config: SimConfig
    frames: list[SimFrame]
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    # -- geometry --------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of every frame."""
        return self.config.shape

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the image centre, the axis of rotations and meridian flips."""
        h, w = self.shape
        return ((w - 1) / 2.0, (h - 1) / 2.0)

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, *keys])

    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        if "grid" not in self._cache:
            h, w = self.shape
            cx, cy = self.centre
            x = np.arange(w, dtype=np.float32)[None, :] - np.float32(cx)
            y = np.arange(h, dtype=np.float32)[:, None] - np.float32(cy)
            self._cache["grid"] = (x, y)
        return self._cache["grid"]

    # -- true camera -----------------------------------------------------------------------------------------
    def true_bias(self) -> np.ndarray:
        """The noise-free bias per pixel (ADU, float32, read-only): ~949 with a column and row pattern."""
        if "bias" not in self._cache:
            h, w = self.shape
            rng = self._rng(_S_BIAS)
            cols = rng.normal(0.0, COLUMN_PATTERN, w).astype(np.float32)
            bad = rng.choice(w, size=max(1, w // 500), replace=False)
            cols[bad] += rng.uniform(15.0, 40.0, bad.size).astype(np.float32)  # a few bright columns
            rows = rng.normal(0.0, ROW_PATTERN, h).astype(np.float32)
            _, y = self._grid()
            ramp = np.float32(1.5) * y / np.float32(h)  # a faint slope along the readout direction
            bias = np.float32(BIAS_LEVEL) + cols[None, :] + rows[:, None] + ramp
            shift = np.float32(bias.mean() - BIAS_LEVEL)
            bias -= shift
            self._cache["bias"] = _readonly(bias.astype(np.float32))
            level = np.float32(BIAS_LEVEL) - shift + rows[:, None] + ramp  # each row's readout level
            self._cache["bias_rows"] = _readonly(np.ascontiguousarray(level[:, 0], dtype=np.float32))
        return self._cache["bias"]

    def true_row_level(self) -> np.ndarray:
        """The bias level of each row's readout (ADU, shape (rows,), read-only): what a noise-free overscan
        shows, without the columns' fixed pattern and before any drift (:meth:`bias_offset`)."""
        self.true_bias()
        return self._cache["bias_rows"]

    @property
    def raw_shape(self) -> tuple[int, int]:
        """(rows, columns) of the raw files: the light-sensitive ``shape`` plus prescan and overscan columns."""
        h, w = self.shape
        return h, self.config.prescan + w + self.config.overscan

    def sections(self) -> dict[str, str]:
        """BIASSEC, TRIMSEC and DATASEC of the raw files (empty without prescan and overscan)."""
        c = self.config
        if not c.prescan and not c.overscan:
            return {}
        h, w = self.shape
        out = {
            "TRIMSEC": f"[{c.prescan + 1}:{c.prescan + w},1:{h}]",
            "DATASEC": f"[{c.prescan + 1}:{c.prescan + w},1:{h}]",
        }
        if c.overscan:
            skip = 2 if c.overscan > 8 else 0  # the first overscan columns hold charge-transfer tails
            out["BIASSEC"] = f"[{c.prescan + w + 1 + skip}:{c.prescan + w + c.overscan},1:{h}]"
        elif c.prescan:
            out["BIASSEC"] = f"[1:{c.prescan},1:{h}]"
        return out

    def bias_offset(self, frame: SimFrame) -> np.ndarray:
        """How far the bias level of ``frame``'s readout has drifted, per row (ADU, float32, shape (rows,)).

        ``bias_drift`` x (the fraction of the night gone by + a slow wobble), and a slope of a tenth of that
        along the rows; zero without ``bias_drift``.
        """
        h = self.shape[0]
        drift = self.config.bias_drift
        if not drift:
            return np.zeros(h, dtype=np.float32)
        if "night_span" not in self._cache:
            times = [f.date_obs for f in self.frames]
            self._cache["night_span"] = (min(times), max((max(times) - min(times)).total_seconds(), 1.0))
        first, span = self._cache["night_span"]
        u = (frame.date_obs - first).total_seconds() / span
        level = drift * (u + 0.3 * math.sin(2.0 * math.pi * 1.5 * u))
        slope = np.linspace(-0.05, 0.05, h, dtype=np.float32) * np.float32(level)
        return (np.float32(level) + slope).astype(np.float32)

    def true_dark_rate(self) -> np.ndarray:
        """Dark current per pixel in ADU/s (float32, read-only), amplifier glow and hot pixels included."""
        if "dark" not in self._cache:
            h, w = self.shape
            rng = self._rng(_S_DARK)
            rate = rng.lognormal(0.0, 0.3, (h, w)).astype(np.float32)
            rate *= np.float32(DARK_RATE / math.exp(0.3**2 / 2))
            x, y = self._grid()
            cx, cy = self.centre
            glow_scale = np.float32(0.08 * max(h, w))
            dist = np.sqrt((x - np.float32(cx)) ** 2 + (y + np.float32(cy)) ** 2)  # from pixel (w-1, 0)
            rate += np.float32(0.1) * np.exp(-dist / glow_scale)
            n_hot = max(3, round(HOT_FRACTION * h * w))
            flat_idx = rng.choice(h * w, size=n_hot, replace=False)
            lo, hi = HOT_RATES
            rate.ravel()[flat_idx] = np.exp(rng.uniform(math.log(lo), math.log(hi), n_hot)).astype(np.float32)
            hot = np.zeros((h, w), dtype=bool)
            hot.ravel()[flat_idx] = True
            self._cache["hot"] = _readonly(hot)
            self._cache["dark"] = _readonly(rate)
        return self._cache["dark"]

    def hot_pixels(self) -> np.ndarray:
        """Boolean mask of the hot pixels (read-only)."""
        self.true_dark_rate()
        return self._cache["hot"]

    def _dust(self, stream_key: int, count: int, rng: np.random.Generator) -> np.ndarray:
        h, w = self.shape
        scale = max(h, w) / 512.0
        out = np.ones((h, w), dtype=np.float32)
        for _ in range(count):
            x0 = rng.uniform(0.05 * w, 0.95 * w)
            y0 = rng.uniform(0.05 * h, 0.95 * h)
            radius = rng.uniform(8.0, 25.0) * scale
            width = radius * rng.uniform(0.15, 0.3)
            depth = rng.uniform(0.02, 0.08)
            half = int(radius + 4 * width) + 1
            xa, xb = max(0, int(x0) - half), min(w, int(x0) + half + 1)
            ya, yb = max(0, int(y0) - half), min(h, int(y0) + half + 1)
            yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
            r = np.sqrt((xx - x0) ** 2 + (yy - y0) ** 2)
            ring = np.exp(-0.5 * ((r - radius) / width) ** 2)
            disc = 0.35 * np.exp(-0.5 * (r / (0.6 * radius)) ** 2)  # the donut's centre is less dark
            out[ya:yb, xa:xb] *= (1.0 - depth * np.maximum(ring, disc)).astype(np.float32)
        return out

    def true_response(self, filter: str | None) -> np.ndarray:
        """The flat-field response for ``filter`` (float32, median exactly 1, read-only).

        Vignetting x dust donuts (some on the sensor window, shared by all filters; some on the filter) x a
        small pixel-to-pixel variation shared by all filters. A colour camera's response is a mosaic: see
        :meth:`_colour_response`.
        """
        if self.config.bayer is not None:
            return self._colour_response(filter)
        return self._mono_response(filter)

    def _mono_response(self, filter: str | None) -> np.ndarray:
        fkey = _filter_key(filter)
        if ("resp", fkey) not in self._cache:
            if "resp_common" not in self._cache:
                h, w = self.shape
                rng = self._rng(_S_RESP)
                x, y = self._grid()
                r2 = (x * x + y * y) / np.float32((0.5 * max(h, w)) ** 2 * 2)
                vignette = np.float32(1.0) - np.float32(0.3) * r2 - np.float32(0.05) * r2 * r2
                prnu = np.float32(1.0) + np.float32(0.008) * rng.standard_normal((h, w), dtype=np.float32)
                window = self._dust(0, int(rng.integers(3, 6)), rng)
                self._cache["resp_common"] = vignette * prnu * window
            rng = self._rng(_S_DUST, _key(fkey))
            resp = self._cache["resp_common"] * self._dust(1, int(rng.integers(1, 3)), rng)
            resp /= np.float32(np.median(resp))
            self._cache[("resp", fkey)] = _readonly(resp.astype(np.float32))
        return self._cache[("resp", fkey)]

    # -- the sky ---------------------------------------------------------------------------------------------
    def star_catalogue(self, obj: str) -> dict[str, np.ndarray]:
        """The object's fixed star field at its reference pointing, brightest first.

        Returns ``{"x", "y", "flux_v" (ADU/s through V), "colour" (B-V)}``; the field extends a margin
        beyond the frame so that offsets and rotations do not leave empty edges.
        """
        if ("cat", obj) not in self._cache:
            h, w = self.shape
            c = self.config
            rng = self._rng(_S_STARS, _key(obj))
            margin = c.max_offset + math.radians(max(c.max_rotation, 0.0)) * max(h, w) + 8.0
            area = (w + 2 * margin) * (h + 2 * margin)
            faintest = min(c.faintest, _F_MIN)
            n = int(rng.poisson(c.stars * area / 512.0**2 * (_F_MIN / faintest) ** _F_SLOPE))
            x = rng.uniform(-margin, w - 1 + margin, n)
            y = rng.uniform(-margin, h - 1 + margin, n)
            flux = np.minimum(faintest * (1.0 - rng.random(n)) ** (-1.0 / _F_SLOPE), _F_MAX)
            colour = rng.uniform(0.2, 1.4, n)
            order = np.argsort(-flux, kind="stable")
            cat = {"x": x[order], "y": y[order], "flux_v": flux[order], "colour": colour[order]}
            self._cache[("cat", obj)] = {k: _readonly(v) for k, v in cat.items()}
        return self._cache[("cat", obj)]

    def transform(self, frame: SimFrame) -> np.ndarray:
        """3x3 affine matrix taking reference (x, y, 1) of ``frame.object`` to its (x, y, 1) in ``frame``."""
        cx, cy = self.centre
        a = math.radians(frame.rotation)
        f = -1.0 if frame.flipped else 1.0
        rot = f * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        m = np.eye(3)
        m[:2, :2] = rot
        m[:2, 2] = np.array([cx, cy]) - rot @ np.array([cx, cy]) + np.asarray(frame.offset, dtype=float)
        return m

    def star_positions(self, frame: SimFrame) -> np.ndarray:
        """(N, 2) true x, y of every catalogue star of the frame's object in that frame, brightest first.

        All catalogue stars are returned in the same order for every frame of an object, so rows correspond
        between frames; some lie outside the frame (select with ``0 <= x <= W-1`` etc. if needed).
        """
        if frame.kind != "light" or frame.object is None:
            return np.empty((0, 2))
        cat = self.star_catalogue(frame.object)
        m = self.transform(frame)
        ref = np.stack([cat["x"], cat["y"]], axis=1)
        return ref @ m[:2, :2].T + m[:2, 2]

    def star_fluxes(self, frame: SimFrame) -> np.ndarray:
        """Total ADU of each star (order of :meth:`star_positions`) in the frame, before the flat response."""
        if frame.kind != "light" or frame.object is None:
            return np.empty(0)
        cat = self.star_catalogue(frame.object)
        fk = _filter_key(frame.filter)
        through = _THROUGHPUT.get(fk, 1.0)
        if fk in ("U", "B"):
            colour_term = 10.0 ** (-0.4 * cat["colour"] * (1.5 if fk == "U" else 1.0))
        elif fk in ("R", "I"):
            colour_term = 10.0 ** (0.15 * cat["colour"])
        else:
            colour_term = 1.0
        return cat["flux_v"] * through * colour_term * frame.exptime * frame.transparency

    def truth_signal(self, frame: SimFrame) -> np.ndarray:
        """The noise-free signal in ADU before the flat response (float32, a new array).

        Light: sky (with its gradient) + stars after offset, rotation and flip; flat: its uniform
        illumination; bias and dark: zeros. A perfect calibration ``(raw - bias - dark_rate * t) / response``
        recovers it plus noise (and cosmic rays), except where the raw pixel saturated. For a colour camera each
        pixel holds the signal of its own colour (:meth:`truth_rgb` picked through :meth:`colour_map`).
        """
        if self.config.bayer is not None:
            return self._mosaic(self.truth_rgb(frame))
        h, w = self.shape
        if frame.kind == "flat":
            return np.full((h, w), frame.level, dtype=np.float32)
        if frame.kind != "light":
            return np.zeros((h, w), dtype=np.float32)
        x, y = self._grid()
        gx, gy = frame.sky_gradient
        sig = np.float32(frame.level) + np.float32(gx) * x + np.float32(gy) * y
        sig = np.ascontiguousarray(np.broadcast_to(sig, (h, w)), dtype=np.float32)
        pos = self.star_positions(frame)
        if not frame.trailed:
            _add_stars(sig, pos[:, 0], pos[:, 1], self.star_fluxes(frame), frame.fwhm)
            return sig
        stars = np.zeros((h, w), dtype=np.float32)
        _add_stars(stars, pos[:, 0], pos[:, 1], self.star_fluxes(frame), frame.fwhm)
        return sig + _smear(stars, frame.trail)

    # -- frames ----------------------------------------------------------------------------------------------
    def render(self, frame: SimFrame) -> tuple[np.ndarray, fits.Header]:
        """The frame's uint16 pixels and its capture program's header; deterministic (seed + frame index).

        Raises ValueError for deliberately broken files, which have no sound image: see :meth:`frame_bytes`.
        """
        if frame.broken is not None:
            raise ValueError(f"{frame.name} is a deliberately broken file ({frame.broken}); use frame_bytes()")
        pixels = self._pixels(frame)
        if self.config.debayered:
            pixels = self._debayered(pixels)
        return pixels, self.header(frame)

    def _pixels(self, frame: SimFrame) -> np.ndarray:
        h, w = self.shape
        c = self.config
        t = np.float32(frame.exptime if frame.kind != "bias" else 0.0)
        rng = self._rng(_S_NOISE, frame.index)
        expected = self.true_dark_rate() * t
        if frame.kind in ("light", "flat"):
            expected += self.true_response(frame.filter) * self.truth_signal(frame)
        if c.exact_poisson:
            shot = rng.poisson(np.maximum(expected, 0) * GAIN).astype(np.float32) / np.float32(GAIN)
            raw = shot + np.float32(READ_NOISE) * rng.standard_normal((h, w), dtype=np.float32)
        else:
            sigma = np.sqrt(np.maximum(expected, 0) / np.float32(GAIN) + np.float32(READ_NOISE**2))
            raw = expected + sigma * rng.standard_normal((h, w), dtype=np.float32)
        raw += self.true_bias()
        if frame.kind != "bias" and c.cosmic_rays > 0:
            _add_cosmic_rays(raw, self._rng(_S_COSMIC, frame.index), c.cosmic_rays * float(t) / 100.0 * h * w / 1e6)
        raw = self._with_readout(raw, frame)
        np.rint(raw, out=raw)
        np.clip(raw, 0, SATURATION, out=raw)
        return raw.astype(np.uint16)

    def _with_readout(self, raw: np.ndarray, frame: SimFrame) -> np.ndarray:
        """The light-sensitive pixels placed between prescan and overscan columns (the readout's level plus read
        noise), and the bias drift added to every pixel; ``raw`` itself when there is neither."""
        c = self.config
        if not c.prescan and not c.overscan and not c.bias_drift:
            return raw
        h, w = self.shape
        drift = self.bias_offset(frame)[:, None]
        if not c.prescan and not c.overscan:
            return raw + drift
        out = np.empty(self.raw_shape, dtype=np.float32)
        out[:, c.prescan : c.prescan + w] = raw + drift
        noise = self._rng(_S_OSCAN, frame.index).standard_normal((h, c.prescan + c.overscan), dtype=np.float32)
        level = self.true_row_level()[:, None] + drift
        out[:, : c.prescan] = level + np.float32(READ_NOISE) * noise[:, : c.prescan]
        out[:, c.prescan + w :] = level + np.float32(READ_NOISE) * noise[:, c.prescan :]
        return out

    def header(self, frame: SimFrame) -> fits.Header:
        """The header the frame's capture program writes (no structural cards: astropy adds those).

        Lights of the programs that plate-solve as they capture (N.I.N.A., ASIAIR, SharpCap) carry a TAN WCS
        that matches where the frame's stars really are (offset, rotation, meridian flip included)."""
        hdr = _dialect_header(frame, self.config)
        for key, section in self.sections().items():
            hdr[key] = (section, _SECTION_COMMENTS[key])
        if self.config.bayer is not None:
            hdr.update(self._colour_cards(frame))
        if frame.kind == "light" and frame.dialect in PLATE_SOLVED and frame.object is not None:
            hdr.update(self.wcs(frame))
            if self.config.prescan:
                hdr["CRPIX1"] = hdr["CRPIX1"] + self.config.prescan  # the WCS of the raw frame, prescan included
        return hdr

    def wcs(self, frame: SimFrame) -> fits.Header:
        """A TAN WCS for a light: the object's reference pointing (north up, east left) moved by the frame's
        transform, so that sky positions of the stars agree between frames."""
        cx, cy = self.centre
        m = self.transform(frame)
        scale = math.degrees(PIXEL_SIZE_UM * 1e-3 / FOCAL_LENGTH_MM)  # deg per pixel
        cd = np.array([[-scale, 0.0], [0.0, scale]]) @ np.linalg.inv(m[:2, :2])
        crpix = m @ np.array([cx, cy, 1.0])
        ra, dec = _coords(frame.object)
        cards = fits.Header()
        cards["CTYPE1"], cards["CTYPE2"] = "RA---TAN", "DEC--TAN"
        cards["CRVAL1"], cards["CRVAL2"] = round(ra, 8), round(dec, 8)
        cards["CRPIX1"], cards["CRPIX2"] = round(float(crpix[0]) + 1.0, 4), round(float(crpix[1]) + 1.0, 4)
        for (i, j), value in np.ndenumerate(cd):
            cards[f"CD{i + 1}_{j + 1}"] = float(value)
        return cards

    def frame_bytes(self, frame: SimFrame) -> bytes:
        """The exact bytes of the file, broken or not (broken files are always plain FITS)."""
        if frame.broken is None:
            data, hdr = self.render(frame)
            c = self.config
            if c.file_format == "xisf":
                return _xisf_bytes(data, hdr, codec=c.compress or None)
            if c.compress == "fz":
                return _fz_bytes(data, hdr)
            if c.compress == "gz":
                return gzip.compress(_fits_bytes(data, hdr), mtime=0)
            return _fits_bytes(data, hdr)
        return self._broken_bytes(frame)

    def _broken_bytes(self, frame: SimFrame) -> bytes:
        stem = Path(frame.name).stem
        h, w = self.shape
        good = replace(frame, broken=None)
        hdr = self.header(good)
        if stem == "empty":
            return b""
        if stem == "not_fits":
            return b"Observing log 2026-11-25\nseeing 3 px, cloud from 21:10\ndome closed at 04:55\n" * 40
        if stem == "truncated":
            full = _fits_bytes(self._pixels(good), hdr)
            data_len = -(-(h * w * 2) // 2880) * 2880
            return full[: len(full) - data_len + h * w]
        if stem == "no_image_data":
            return _fits_bytes(None, hdr)
        if stem == "cube":
            # four planes: a 3-plane cube is a colour frame, anything else is not a frame nightshift takes
            cube = np.stack([self._pixels(good)[: min(h, 512), : min(w, 512)]] * 4)
            return _fits_bytes(cube, hdr)
        if stem == "unknown_type":
            for k in ("FRAME", "IMAGETYP"):
                hdr.remove(k, ignore_missing=True)
            hdr["IMAGETYP"] = "Mystery"
            return _fits_bytes(self._pixels(good), hdr)
        if stem == "missing_exposure":
            for k in ("EXPTIME", "EXPOSURE"):
                hdr.remove(k, ignore_missing=True)
            return _fits_bytes(self._pixels(good), hdr)
        if stem == "bad_exptime":
            hdr.remove("EXPOSURE", ignore_missing=True)
            hdr["EXPTIME"] = "abc"
            return _fits_bytes(self._pixels(good), hdr)
        if stem == "bad_date":
            hdr["DATE-OBS"] = "yesterday"
            return _fits_bytes(self._pixels(good), hdr)
        if stem == "constant":
            return _fits_bytes(np.full((h, w), 1000, dtype=np.uint16), hdr)
        if stem == "nan":
            return _fits_bytes(np.full((h, w), np.nan, dtype=np.float32), hdr)
        raise ValueError(f"unknown broken file {frame.name!r}")

    def truth(self) -> dict[str, Any]:
        """What every file of the night truly is, JSON-able: what :func:`simulate_night` writes to ``truth.json``.

        ``frames`` maps each file's name (relative to the camera folder) to its kind, settings and flags
        (``cloudy``, ``trailed``, ``flipped``, ``broken``) and, for a light, ``transform``: the 3x3 matrix taking
        (x, y, 1) of the object's reference pointing to the frame's pixels (0-based, pixel centres on integers).
        The transform taking frame A's pixels onto frame B's is ``T_B @ inv(T_A)``.
        """
        frames: dict[str, Any] = {}
        for f in self.frames:
            entry: dict[str, Any] = {
                "kind": f.kind,
                "exptime": f.exptime,
                "filter": f.filter,
                "object": f.object,
                "date_obs": f.date_obs.isoformat(),
                "dialect": f.dialect,
                "broken": f.broken,
            }
            if f.kind == "light" and f.broken is None:
                entry.update(
                    cloudy=f.cloudy,
                    trailed=f.trailed,
                    flipped=f.flipped,
                    good=not (f.cloudy or f.trailed) and f.name != HOSTILE_NAME,
                    offset=list(f.offset),
                    rotation_deg=f.rotation,
                    trail=list(f.trail),
                    fwhm=f.fwhm,
                    transparency=f.transparency,
                    sky=f.level,
                    transform=self.transform(f).tolist(),
                )
            frames[f.name] = entry
        h, w = self.shape
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()}
        out = {"shape": [h, w], "saturation": SATURATION, "config": config, "frames": frames}
        if self.config.bayer is not None:  # which colour each stored pixel saw, and what a calibration leaves
            out["colour"] = {"stored_pattern": self.stored_pattern(), "channel_qe": list(COLOUR_QE)}
        return out

    def counts(self) -> dict[str, int]:
        """Frames per true kind among the sound files (the hostile one is a light), plus "broken"."""
        out = {"bias": 0, "dark": 0, "flat": 0, "light": 0, "broken": 0}
        for f in self.frames:
            out["broken" if f.broken else f.kind] += 1
        return out

    def by_kind(self, kind: str) -> list[SimFrame]:
        """The sound frames of one kind, in writing order."""
        return [f for f in self.frames if f.kind == kind and f.broken is None]

    # -- colour camera ---------------------------------------------------------------------------------------
    # The scene is rendered per channel (R, G, B) on the stored pixel grid, and each stored pixel keeps the channel
    # its filter passes. The sensor reads its rows top-down with ``config.bayer`` at its top-left pixel; a file
    # stored bottom-up holds the sensor's last row first. A perfect calibration with a flat normalised per colour
    # channel leaves channel c of a pixel equal to truth_rgb[c] * COLOUR_QE[c] (:meth:`calibrated_rgb`).
    def colour_map(self) -> np.ndarray:
        """Channel (0 R, 1 G, 2 B) of every stored pixel (uint8 (rows, columns), read-only)."""
        if "cmap" not in self._cache:
            h, w = self.shape
            pattern = self.config.bayer or "RGGB"
            rows = np.arange(h)
            sensor_row = rows if self.config.row_order == "TOP-DOWN" else (h - 1 - rows)
            cell = np.array([["RGB".index(pattern[2 * i + j]) for j in range(2)] for i in range(2)], dtype=np.uint8)
            cmap = cell[(sensor_row % 2)[:, None], (np.arange(w) % 2)[None, :]]
            self._cache["cmap"] = _readonly(np.ascontiguousarray(cmap))
        return self._cache["cmap"]

    def stored_pattern(self) -> str:
        """The Bayer pattern starting at the first stored pixel (what a debayer of the file must be told)."""
        cmap = self.colour_map()
        return "".join("RGB"[int(c)] for c in (cmap[0, 0], cmap[0, 1], cmap[1, 0], cmap[1, 1]))

    def channel_qe(self) -> np.ndarray:
        """Sensitivity of the R, G and B channels (what a flat normalised per channel leaves in the lights)."""
        return np.array(COLOUR_QE, dtype=np.float64)

    def star_colour_factors(self, obj: str) -> np.ndarray:
        """(N, 3) flux of each catalogue star in R, G, B relative to its V flux (from its B-V), before the QE."""
        cat = self.star_catalogue(obj)
        bv = np.asarray(cat["colour"], dtype=np.float64) - 0.65
        return np.stack([10.0 ** (0.25 * bv), np.ones_like(bv), 10.0 ** (-0.45 * bv)], axis=1)

    def star_colours(self, obj: str) -> np.ndarray:
        """(N, 3) true colour of each catalogue star as a calibrated colour frame shows it: R, G, B fluxes
        relative to G (so column 1 is 1); channel flux ratios of a stack must match these."""
        rgb = self.star_colour_factors(obj) * self.channel_qe()[None, :]
        return rgb / rgb[:, 1:2]

    def truth_rgb(self, frame: SimFrame) -> np.ndarray:
        """The noise-free signal of each channel (float32 (3, rows, columns), ADU before the response)."""
        h, w = self.shape
        out = np.zeros((3, h, w), dtype=np.float32)
        if frame.kind == "flat":
            for c in range(3):
                out[c] = np.float32(frame.level * FLAT_LAMP[c])
            return out
        if frame.kind != "light":
            return out
        x, y = self._grid()
        gx, gy = frame.sky_gradient
        sky = np.float32(frame.level) + np.float32(gx) * x + np.float32(gy) * y
        pos = self.star_positions(frame)
        fluxes = self.star_fluxes(frame)[:, None] * self.star_colour_factors(frame.object)
        for c in range(3):
            out[c] = sky * np.float32(SKY_COLOUR[c])
            _add_stars(out[c], pos[:, 0], pos[:, 1], fluxes[:, c], frame.fwhm)
        return out

    def calibrated_rgb(self, frame: SimFrame) -> np.ndarray:
        """What a perfect calibration and debayer give for ``frame``: truth_rgb x channel QE (float32)."""
        return self.truth_rgb(frame) * self.channel_qe().astype(np.float32)[:, None, None]

    def _mosaic(self, rgb: np.ndarray) -> np.ndarray:
        cmap = self.colour_map()
        return np.take_along_axis(rgb, cmap[None].astype(np.intp), axis=0)[0]

    def _colour_response(self, filter: str | None) -> np.ndarray:
        """The mosaic's response: channel QE x the channel's own vignetting x the shared dust and pixel variation,
        each of the four CFA positions with median exactly its channel's QE."""
        fkey = _filter_key(filter)
        if ("colour resp", fkey) not in self._cache:
            h, w = self.shape
            x, y = self._grid()
            r2 = (x * x + y * y) / np.float32((0.5 * max(h, w)) ** 2 * 2)
            mono_vignette = np.float32(1.0) - np.float32(0.3) * r2 - np.float32(0.05) * r2 * r2
            cmap = self.colour_map()
            strength = np.asarray(COLOUR_VIGNETTING, dtype=np.float32)[cmap]
            vignette = np.float32(1.0) - strength * r2 - np.float32(0.05) * r2 * r2
            shape = self._mono_response(filter) / mono_vignette * vignette
            for dy in range(2):
                for dx in range(2):
                    view = shape[dy::2, dx::2]
                    view /= np.float32(np.median(view))
            resp = shape * np.asarray(COLOUR_QE, dtype=np.float32)[cmap]
            self._cache[("colour resp", fkey)] = _readonly(resp.astype(np.float32))
        return self._cache[("colour resp", fkey)]

    def _colour_cards(self, frame: SimFrame) -> fits.Header:
        """BAYERPAT, XBAYROFF/YBAYROFF and ROWORDER as the frame's capture program writes them."""
        c = self.config
        cards = fits.Header()
        d = frame.dialect
        if not c.debayered and c.bayer_header and c.bayer is not None:
            xo, yo = c.bayer_offset if d in _OFFSET_DIALECTS else (0, 0)
            # the stated pattern starts (xo, yo) into the picture: its cell [i][j] is the sensor's [i + yo][j + xo]
            stated = "".join(c.bayer[2 * ((i + yo) % 2) + (j + xo) % 2] for i in range(2) for j in range(2))
            cards["BAYERPAT"] = (stated, "Bayer color pattern")
            if d in _OFFSET_DIALECTS:
                cards["XBAYROFF"] = (int(xo), "X offset of Bayer array")
                cards["YBAYROFF"] = (int(yo), "Y offset of Bayer array")
        if c.row_order == "TOP-DOWN" or d not in ("maxim", "iraf"):  # an absent ROWORDER means bottom-up
            cards["ROWORDER"] = (c.row_order, "Order of the rows in image array")
        return cards

    def _debayered(self, mosaic: np.ndarray) -> np.ndarray:
        """The capture program's own debayer of a raw uint16 mosaic (OpenCV bilinear): uint16 (3, rows, columns)."""
        import cv2

        rgb = cv2.cvtColor(mosaic, getattr(cv2, f"COLOR_Bayer{self.stored_pattern()}2RGB"))
        return np.ascontiguousarray(np.moveaxis(rgb, -1, 0))


# -- stars and cosmic rays -----------------------------------------------------------------------------------
def _add_stars(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, fluxes: np.ndarray, fwhm: float) -> None:
    """Add Moffat stars in place, each as a small stamp sized so its cut-off edge is under 0.5 ADU."""
    h, w = img.shape
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / _BETA) - 1.0))
    peak = fluxes * (_BETA - 1.0) / (math.pi * alpha**2)
    radius = np.full(xs.shape, _STAMP_RADII[-1])
    for r in reversed(_STAMP_RADII):
        radius[peak * (1.0 + (r / alpha) ** 2) ** (-_BETA) < 0.5] = r
    ix = np.rint(xs).astype(np.int64)
    iy = np.rint(ys).astype(np.int64)
    flat = img.reshape(-1)  # a view of the C-contiguous image: adding to it adds to img
    for r in _STAMP_RADII:
        near = (ix >= -r) & (ix <= w - 1 + r) & (iy >= -r) & (iy <= h - 1 + r) & (fluxes > 0) & (radius == r)
        whole = (ix >= r) & (ix < w - r) & (iy >= r) & (iy < h - r)
        for inside_only, part in ((True, near & whole), (False, near & ~whole)):
            if not part.any():
                continue
            d = np.arange(-r, r + 1)
            dd = d.astype(np.float32)
            fx = (xs[part] - ix[part]).astype(np.float32)[:, None, None]
            fy = (ys[part] - iy[part]).astype(np.float32)[:, None, None]
            u = np.float32(1.0) + ((dd[None, None, :] - fx) ** 2 + (dd[None, :, None] - fy) ** 2) / np.float32(alpha**2)
            vals = peak[part].astype(np.float32)[:, None, None] * u ** np.float32(-_BETA)
            tx = np.broadcast_to(ix[part][:, None, None] + d[None, None, :], vals.shape)
            ty = np.broadcast_to(iy[part][:, None, None] + d[None, :, None], vals.shape)
            if inside_only:  # stamps wholly in the frame need no per-pixel mask
                np.add.at(flat, (ty * w + tx).reshape(-1), vals.reshape(-1))
            else:
                keep = (tx >= 0) & (tx < w) & (ty >= 0) & (ty < h)
                np.add.at(flat, (ty * w + tx)[keep], vals[keep])


def _smear(img: np.ndarray, trail: tuple[float, float]) -> np.ndarray:
    """``img`` moved uniformly along ``trail`` (x, y pixels) during the exposure, centred: a motion blur."""
    import cv2

    dx, dy = trail
    n = max(2, math.ceil(math.hypot(dx, dy) * 4) + 1)
    half = math.ceil(max(abs(dx), abs(dy)) / 2) + 2
    kernel = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float64)
    for u in np.linspace(-0.5, 0.5, n):  # sub-pixel steps spread bilinearly: the streak's centroid stays put
        x, y = half + u * dx, half + u * dy
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0
        kernel[y0, x0] += (1 - fx) * (1 - fy)
        kernel[y0, x0 + 1] += fx * (1 - fy)
        kernel[y0 + 1, x0] += (1 - fx) * fy
        kernel[y0 + 1, x0 + 1] += fx * fy
    kernel /= kernel.sum()
    return cv2.filter2D(img, -1, kernel.astype(np.float32), borderType=cv2.BORDER_CONSTANT)


def _add_cosmic_rays(img: np.ndarray, rng: np.random.Generator, mean_hits: float) -> None:
    h, w = img.shape
    n = int(rng.poisson(mean_hits))
    for _ in range(n):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        length = int(rng.integers(1, 4))
        dx, dy = (1, 0) if rng.random() < 0.5 else (0, 1)
        energy = float(rng.uniform(300.0, 5000.0))
        for k in range(length):
            xx, yy = x + k * dx, y + k * dy
            if xx < w and yy < h:
                img[yy, xx] += energy / length


# -- headers -------------------------------------------------------------------------------------------------
def _coords(obj: str | None) -> tuple[float, float]:
    if obj in _KNOWN_COORDS:
        return _KNOWN_COORDS[obj]
    rng = np.random.default_rng(_key(obj or ""))
    return float(rng.uniform(0, 360)), float(np.degrees(np.arcsin(rng.uniform(-0.5, 1.0))))


def _sexagesimal(value: float, hours: bool) -> str:
    v = value / 15.0 if hours else value
    sign = "-" if v < 0 else ("" if hours else "+")
    v = abs(v)
    d = int(v)
    m = int((v - d) * 60)
    s = (v - d - m / 60) * 3600
    return f"{sign}{d:02d} {m:02d} {s:05.2f}"


def _date_cards(dt: datetime, dialect: str) -> tuple[dict[str, str], datetime]:
    """DATE-OBS (and TIME-OBS) as ``dialect`` writes them, and the instant they say."""
    if dialect in ("sgp", "apt"):
        dt = dt.replace(microsecond=0)
        return {"DATE-OBS": dt.strftime("%Y-%m-%dT%H:%M:%S")}, dt
    if dialect in ("maxim", "ekos"):
        dt = dt.replace(microsecond=dt.microsecond // 1000 * 1000)
        return {"DATE-OBS": dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}"}, dt
    if dialect == "sharpcap":
        return {"DATE-OBS": dt.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0"}, dt
    if dialect == "iraf":
        dt = dt.replace(microsecond=dt.microsecond // 100000 * 100000)
        return {
            "DATE-OBS": dt.strftime("%Y-%m-%d"),
            "TIME-OBS": dt.strftime("%H:%M:%S.") + str(dt.microsecond // 100000),
        }, dt
    return {"DATE-OBS": dt.strftime("%Y-%m-%dT%H:%M:%S.%f")}, dt


def _clock_text(dt: datetime, decimals: int) -> str:
    text = dt.strftime("%H:%M:%S")
    return text + ("." + f"{dt.microsecond:06d}"[:decimals] if decimals else "")


def _mjd(dt: datetime) -> float:
    return (dt - datetime(1858, 11, 17)).total_seconds() / 86400.0


def _time_cards(dt: datetime, dialect: str, config: SimConfig, exptime: float) -> tuple[dict[str, Any], datetime]:
    """The start time as the dialect, or ``config.time_keys``, writes it, and the instant it says.

    For ``"date-only"`` the instant is the true start (the header says only its date)."""
    convention = config.time_keys or ("utc-obs" if dialect == OBSERVATORY else "")
    if not convention:
        return _date_cards(dt, dialect)
    ms = dt.replace(microsecond=dt.microsecond // 1000 * 1000)
    day = ms.strftime("%Y-%m-%d")
    if convention in ("time-obs", "utc-obs"):
        return {"DATE-OBS": day, convention.upper(): _clock_text(ms, 3)}, ms
    if convention in ("ut", "ut-start"):
        cs = dt.replace(microsecond=dt.microsecond // 10000 * 10000)
        return {"DATE-OBS": day, convention.upper(): _clock_text(cs, 2)}, cs
    if convention == "utcstart":
        whole = dt.replace(microsecond=0)
        return {"DATE-OBS": day, "UTCSTART": _clock_text(whole, 0)}, whole
    if convention == "mjd":
        return {"MJD-OBS": round(_mjd(ms), 10)}, ms
    if convention == "jd":
        return {"JD": _mjd(ms) + 2400000.5}, ms
    if convention == "date-avg":
        middle = ms + timedelta(seconds=exptime / 2.0)
        return {"DATE-AVG": middle.strftime("%Y-%m-%dT%H:%M:%S.%f")}, ms
    if convention == "offset":
        local = ms + timedelta(hours=config.utc_offset)
        sign = "-" if config.utc_offset < 0 else "+"
        minutes = round(abs(config.utc_offset) * 60)
        zone = f"{sign}{minutes // 60:02d}{minutes % 60:02d}"
        stamp = local.strftime("%Y-%m-%dT%H:%M:%S.") + f"{local.microsecond // 1000:03d}" + zone
        return {"DATE-OBS": stamp, "UT-OBS": _clock_text(ms, 3)}, ms
    if convention == "date-only":
        return {"DATE-OBS": day}, ms
    raise ValueError(f"unknown time convention {convention!r}")


def _filter_cards(name: str | None, frame: SimFrame, config: SimConfig) -> dict[str, str]:
    """The filter as ``config.filter_keys`` (the dialect's own way by default) and ``filter_case`` write it."""
    where = config.filter_keys or ("wheels" if frame.dialect == OBSERVATORY else "FILTER")
    spelled = name
    if name is not None and config.filter_case == "mixed":
        spelled = (name, name.lower(), f" {name}")[frame.index % 3]
    if where == "wheels":
        if spelled is None:
            return {"FILTER1": "open", "FILTER2": "open"}
        return (
            {"FILTER1": spelled, "FILTER2": "open"}
            if frame.index % 2 == 0
            else {"FILTER1": "Clear", "FILTER2": spelled}
        )
    if spelled is None:
        return {}
    if where == "FILTER" and frame.dialect in ("sgp", "apt"):
        return {"FILTER": spelled.ljust(12)}
    return {where: spelled}


def _sexagesimal_longitude(value: float) -> str:
    sign = "-" if value < 0 else ""
    tenths = round(abs(value) * 36000)  # tenths of an arcsecond
    d, rest = divmod(tenths, 36000)
    m, t = divmod(rest, 600)
    return f"{sign}{d} {m:02d} {t / 10:04.1f}"


_TIME_COMMENTS = {
    "DATE-OBS": "UTC start of exposure",
    "UT-OBS": "UTC time of start of exposure",
    "MJD-OBS": "[d] MJD at start of exposure",
    "JD": "[d] Julian date at start of exposure",
    "DATE-AVG": "UTC middle of exposure",
}


def _dialect_header(frame: SimFrame, config: SimConfig) -> fits.Header:
    d = frame.dialect
    kind = frame.kind
    word = _TYPE_WORDS[d][kind]
    hdr = fits.Header()
    exptime = round(float(frame.exptime), 6) if kind != "bias" else 0.0
    dates, _ = _time_cards(frame.date_obs, d, config, exptime)
    ccd_temp = round(frame.ccd_temp, 2)
    filt = frame.filter if kind in ("flat", "light") else None
    obj = frame.object if kind == "light" else None
    ra, dec = _coords(obj)
    pier = ("West" if frame.flipped else "East") if kind == "light" else None

    def put(key: str, value: Any, comment: str = "") -> None:
        if value is not None:
            hdr[key] = (value, comment)

    observatory = d == OBSERVATORY
    iraf_like = d in ("iraf", OBSERVATORY)
    untyped = config.untyped == "all" or (config.untyped == "lights" and kind == "light")
    if untyped:
        pass  # the simplest cameras write no frame type at all
    elif d == "ekos":
        put("IMAGETYP", "Light Frame", "Image type")
        put("FRAME", word, "Frame Type")
    elif observatory:
        put("OBSTYPE", word, "observation type")
    else:
        put("IMAGETYP", word, "Type of image")
    if d == "apt":
        put("EXPOSURE", exptime, "[s] Exposure duration")
    elif d in ("maxim", "nina", "sgp", "asiair"):
        put("EXPTIME", exptime, "[s] Exposure duration")
        put("EXPOSURE", exptime, "[s] Exposure duration")
    else:
        put("EXPTIME", exptime, "Total Exposure Time (s)")
    for k, v in dates.items():
        put(k, v, _TIME_COMMENTS.get(k, "UTC time of start of exposure"))
    if d == "nina":
        local = frame.date_obs - timedelta(hours=6)
        put("DATE-LOC", local.strftime("%Y-%m-%dT%H:%M:%S.%f"), "Time of observation (local)")
    if observatory:
        put("DETECTOR", config.camera, "detector")
        put("TELESCOP", "1.0m", "telescope")
        put("OBSERVAT", "Observatory", "observatory")
        put("CCDTEMP", ccd_temp, "[degC] CCD temperature")
        put("SET-TEMP", float(config.set_temp), "[degC] CCD temperature setpoint")
        put("GAIN", GAIN, "[e-/ADU] gain")
        put("RDNOISE", READ_NOISE * GAIN, "[e-] read noise")
    else:
        put("INSTRUME", config.camera, "Imaging instrument name")
        put("TELESCOP", "16-inch RC" if d != "iraf" else None, "Telescope")
        put("OBSERVAT", "Observatory" if d == "iraf" else None)
        put("CCD-TEMP", ccd_temp, "[degC] CCD temperature")
    if d not in ("ekos", "iraf", OBSERVATORY):
        put("SET-TEMP", float(config.set_temp), "[degC] CCD temperature setpoint")
    if config.longitude is not None:
        put("LONGITUD", _sexagesimal_longitude(config.longitude), "[deg east] observatory longitude")
    if iraf_like:
        put("CCDSUM", "1 1", "Binning")
    else:
        put("XBINNING", 1, "Binning factor in width")
        put("YBINNING", 1, "Binning factor in height")
    if d == "ekos":
        put("PIXSIZE1", PIXEL_SIZE_UM, "[um] Pixel Size 1")
        put("PIXSIZE2", PIXEL_SIZE_UM, "[um] Pixel Size 2")
    elif not iraf_like:
        put("XPIXSZ", PIXEL_SIZE_UM, "[um] Pixel X axis size")
        put("YPIXSZ", PIXEL_SIZE_UM, "[um] Pixel Y axis size")
    if d in ("nina", "ekos", "sharpcap", "asiair"):
        put("GAIN", 0, "Sensor gain")
        put("OFFSET", 0, "Sensor gain offset")
    if d == "nina":
        put("READOUTM", "Normal", "Sensor readout mode")
    if d in ("maxim", "nina"):
        put("EGAIN", GAIN, "[e-/ADU] Electrons per A/D unit")
    for key, value in _filter_cards(filt, frame, config).items():
        put(key, value, "Active filter name" if key == "FILTER" else "filter wheel position")
    if obj is not None:
        put("OBJECT", obj, "Name of the object of interest")
        if d in ("maxim", "ekos", "sgp", "apt"):
            put("OBJCTRA", _sexagesimal(ra, True), "[H M S] RA of imaged object")
            put("OBJCTDEC", _sexagesimal(dec, False), "[D M S] Declination of imaged object")
        else:
            put("RA", round(ra, 6), "[deg] RA of telescope")
            put("DEC", round(dec, 6), "[deg] Declination of telescope")
        if d in ("maxim", "nina", "ekos"):
            put("PIERSIDE", pier.upper() if d == "ekos" else pier, "Telescope pier side")
    put("FOCALLEN", FOCAL_LENGTH_MM if not iraf_like else None, "[mm] Focal length")
    put("SWCREATE", _SOFTWARE[d], "Capture software")
    return hdr


_SECTION_COMMENTS = {
    "BIASSEC": "overscan region",
    "TRIMSEC": "useful part of the data",
    "DATASEC": "light-sensitive region",
}


def _fits_bytes(data: np.ndarray | None, header: fits.Header) -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(data=data, header=header).writeto(buf)
    return buf.getvalue()


def _fz_bytes(data: np.ndarray, header: fits.Header) -> bytes:
    """fpack's layout: an empty primary HDU, the image Rice-compressed in tiles of rows in extension 1."""
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data=data, header=header, compression_type="RICE_1")]).writeto(
        buf
    )
    return buf.getvalue()


def _xisf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value) if isinstance(value, float) else str(value)


def _xisf_bytes(data: np.ndarray, header: fits.Header, *, codec: str | None = None) -> bytes:
    """An XISF file as N.I.N.A. writes one: the image (mono, rows stored top row first as they are in ``data``)
    and the header's cards as FITS keywords."""
    from xisf import XISF

    keywords: dict[str, list[dict[str, str]]] = {}
    for card in header.cards:
        if card.keyword in ("", "COMMENT", "HISTORY"):
            continue
        keywords.setdefault(card.keyword, []).append({"value": _xisf_value(card.value), "comment": card.comment})
    with tempfile.TemporaryDirectory(prefix="nightshift-xisf-") as folder:
        path = Path(folder) / "frame.xisf"
        XISF.write(
            str(path),
            np.ascontiguousarray(data)[:, :, None],
            creator_app="nightshift simulator",
            image_metadata={"FITSKeywords": keywords},
            codec=codec,
        )
        return path.read_bytes()


# -- planning ------------------------------------------------------------------------------------------------
def plan_night(config: SimConfig) -> NightPlan:
    """Plan a night: every frame's kind, settings, time, pointing, header dialect and file name.

    Parameters
    ----------
    config
        What to simulate.

    Returns
    -------
    NightPlan
        The frames in writing order (``index`` 0..N-1) and the true camera and sky that render them.
    """
    c = config
    rng = np.random.default_rng([c.seed, _S_PLAN])
    h, w = c.shape
    specs: list[dict[str, Any]] = []
    specs += [{"kind": "bias", "exptime": 0.0} for _ in range(c.n_bias)]
    for t in c.dark_exptimes:
        specs += [{"kind": "dark", "exptime": float(t)} for _ in range(c.n_dark)]
    for f in c.filters:
        for _ in range(c.n_flat):
            specs.append({"kind": "flat", "exptime": float(c.flat_exptime), "filter": f})
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    lights: list[dict[str, Any]] = []
    for obj in c.objects:
        mine = []
        for _ in range(c.n_light):
            for f in c.filters:
                for t in c.light_exptimes:
                    s = {"kind": "light", "exptime": float(t), "filter": f, "object": obj}
                    mine.append(s)
                    groups.setdefault((obj, f, float(t)), []).append(s)
        for i, s in enumerate(mine):
            s["flipped"] = c.meridian_flip and i >= len(mine) // 2
        lights += mine
    if groups and c.cloudy > 0:
        key = max(groups, key=lambda k: (len(groups[k]), k[2]))
        members = groups[key]
        picks = list(range(1, len(members))) or [0]
        for i in picks[: c.cloudy]:
            members[i]["cloudy"] = True
    if groups and c.trailed > 0:
        trail_rng = np.random.default_rng([c.seed, _S_TRAIL])  # its own stream: other frames stay as they were
        others = [k for k in groups if not any(s.get("cloudy") for s in groups[k])] or list(groups)
        key = max(others, key=lambda k: (len(groups[k]), k[2]))
        clear = [s for s in groups[key] if not s.get("cloudy")]
        for s in clear[::-1][: c.trailed]:
            length, angle = trail_rng.uniform(*_TRAIL_LENGTH), trail_rng.uniform(0, 2 * math.pi)
            s["trail"] = (float(length * math.cos(angle)), float(length * math.sin(angle)))
    for s in lights:
        s["rotation"] = float(rng.uniform(-c.max_rotation, c.max_rotation))
        s["offset"] = (
            float(rng.uniform(-c.max_offset, c.max_offset)),
            float(rng.uniform(-c.max_offset, c.max_offset)),
        )
        cloudy = s.get("cloudy", False)
        s["fwhm"] = float(rng.uniform(3.5, 3.9) if cloudy else rng.uniform(2.7, 3.3))
        s["transparency"] = float(rng.uniform(0.18, 0.22) if cloudy else rng.uniform(0.92, 1.0))
        fk = _filter_key(s["filter"])
        s["level"] = float(_SKY_RATE.get(fk, 1.0) * s["exptime"] * (3.0 if cloudy else 1.0) * rng.uniform(0.9, 1.1))
        angle = rng.uniform(0, 2 * math.pi)
        slope = s["level"] * rng.uniform(0.02, 0.08) / max(h, w)
        s["sky_gradient"] = (float(slope * math.cos(angle)), float(slope * math.sin(angle)))
    for s in specs:
        if s["kind"] == "flat":
            s["level"] = float(rng.uniform(20000.0, 30000.0))

    if c.order == "lights-first":
        flats = [s for s in specs if s["kind"] == "flat"]
        darks = [s for s in specs if s["kind"] == "dark"]
        bias = [s for s in specs if s["kind"] == "bias"]
        sequence = lights + flats + darks + bias
    else:
        sequence = specs + lights

    if c.broken:
        extras = [{"broken": stem} for stem in BROKEN_FILES] + [{"hostile": True}]
        base = {"kind": "light", "exptime": float(min(c.light_exptimes, default=30.0))}
        base.update(filter=c.filters[0] if c.filters else "V", object=c.objects[0] if c.objects else "Field")
        base.update(level=_SKY_RATE.get(_filter_key(base["filter"]), 1.0) * base["exptime"], fwhm=3.0)
        step = len(sequence) / (len(extras) + 1)
        for k, e in reversed(list(enumerate(extras))):
            s = dict(base, **e)
            if e.get("hostile"):
                s.update(object=HOSTILE_OBJECT, filter=HOSTILE_FILTER)
            sequence.insert(round((k + 1) * step), s)

    start = datetime.fromisoformat(c.start)
    if start.tzinfo is not None:
        start = start.astimezone(UTC).replace(tzinfo=None)
    cursor = start
    previous_kind = None
    for s in sequence:
        if previous_kind is not None and s["kind"] != previous_kind:
            cursor += timedelta(seconds=60.0)
        s["time"] = cursor
        cursor += timedelta(seconds=s["exptime"] + _READOUT_S + float(rng.uniform(0.0, 0.9)))
        previous_kind = s["kind"]
        s["ccd_temp"] = float(c.set_temp + rng.normal(0.0, 0.08))
    if c.order == "shuffled":
        sequence = [sequence[i] for i in rng.permutation(len(sequence))]

    night = start.strftime("%Y-%m-%d")
    frames: list[SimFrame] = []
    n_sound = 0
    for index, s in enumerate(sequence):
        if "broken" in s:
            dialect = "nina"  # broken files always speak N.I.N.A.: plain words, so only the defect is wrong
        else:
            dialect = DIALECTS[n_sound % len(DIALECTS)] if c.dialect == "mixed" else c.dialect
            n_sound += 1
        _, when = _time_cards(s["time"], dialect, c, s["exptime"])
        frames.append(
            SimFrame(
                name="",
                kind=s["kind"],
                exptime=s["exptime"],
                filter=s.get("filter"),
                object=s.get("object"),
                date_obs=when,
                dialect=dialect,
                index=index,
                cloudy=s.get("cloudy", False),
                flipped=s.get("flipped", False),
                offset=s.get("offset", (0.0, 0.0)),
                broken=BROKEN_FILES[s["broken"]] if "broken" in s else None,
                rotation=s.get("rotation", 0.0),
                fwhm=s.get("fwhm", 3.0),
                transparency=s.get("transparency", 1.0),
                level=s.get("level", 0.0),
                sky_gradient=s.get("sky_gradient", (0.0, 0.0)),
                ccd_temp=s["ccd_temp"],
                trail=s.get("trail", (0.0, 0.0)),
            )
        )
        if "broken" in s:
            frames[-1].name = f"broken/{s['broken']}.fits"
        elif s.get("hostile"):
            frames[-1].name = HOSTILE_NAME
    _number(frames, c, night)
    return NightPlan(config=c, frames=frames)


def _file_extension(c: SimConfig, dialect: str) -> str:
    """The file name's ending: the dialect's own (or ``extension``), ``.fz``/``.gz`` when compressed, ``.xisf``."""
    if c.file_format == "xisf":
        return ".xisf"
    ext = c.extension or _EXTENSIONS[dialect]
    return ext + {"fz": ".fz", "gz": ".gz"}.get(c.compress, "")


def _number(frames: list[SimFrame], c: SimConfig, night: str) -> None:
    """Name the frames not yet named as capture programs do: numbered per group in time order."""
    seq: dict[tuple[Any, ...], int] = {}
    for f in sorted((f for f in frames if not f.name), key=lambda f: (f.date_obs, f.index)):
        group = (f.kind, f.object, f.filter, f.exptime)
        seq[group] = seq.get(group, 0) + 1
        n = seq[group]
        ext = _file_extension(c, f.dialect)
        if f.kind == "bias":
            stem, folder = f"Bias_{n:04d}", "CALIB/BIAS"
        elif f.kind == "dark":
            stem, folder = f"Dark_{_exp_word(f.exptime)}_{n:04d}", "CALIB/DARK"
        elif f.kind == "flat":
            stem, folder = f"Flat_{_slug(f.filter or 'none')}_{n:04d}", "CALIB/FLAT"
        else:
            obj = _slug(f.object or "object")
            stem = f"{obj}_Light_{_slug(f.filter or 'none')}_{_exp_word(f.exptime)}_{n:04d}"
            folder = f"{obj}/LIGHT"
        f.name = f"{night}/{folder}/{stem}{ext}" if c.subfolders else f"{stem}{ext}"


# -- writing -------------------------------------------------------------------------------------------------
def write_frame(
    plan: NightPlan,
    frame: SimFrame,
    out: Path,
    *,
    slow: bool = False,
    chunk_bytes: int = 65536,
    chunk_delay: float = 0.05,
    rename: bool = False,
) -> Path:
    """Write one planned frame under ``out`` as a camera would.

    Parameters
    ----------
    plan, frame
        The night and the frame to write. out The camera folder; ``frame.name`` is relative to it (sub-folders
        are created). slow Write in chunks of ``chunk_bytes`` with ``chunk_delay`` seconds between them,
        flushing each, like a slow camera or a network copy. rename Write ``<name>.tmp`` and rename it to the
        final name when complete.

    Returns
    -------
    Path
        The final path.
    """
    payload = plan.frame_bytes(frame)
    final = Path(out) / frame.name
    final.parent.mkdir(parents=True, exist_ok=True)
    target = final.with_name(final.name + ".tmp") if rename else final
    with open(target, "wb") as fh:
        if slow and payload:
            step = max(1, int(chunk_bytes))
            for start in range(0, len(payload), step):
                if start:
                    time.sleep(chunk_delay)
                fh.write(payload[start : start + step])
                fh.flush()
        else:
            fh.write(payload)
    if rename:
        os.replace(target, final)
    return final


def simulate_night(
    out: Path,
    config: SimConfig | None = None,
    *,
    interval: float = 0.0,
    on_written: Callable[[SimFrame, Path], None] | None = None,
    truth: bool = True,
    **write_options: Any,
) -> NightPlan:
    """Plan a night and write all its frames under ``out`` in plan order.

    Parameters
    ----------
    out
        The camera folder (created if missing).
    config
        The night; the default :class:`SimConfig` if None.
    interval
        Seconds to wait between files, for a demo that looks like a night going by.
    on_written
        Called with each frame and its final path once it is written (progress for a command line).
    truth
        Write :meth:`NightPlan.truth` to ``out/truth.json`` first (not a FITS file: a watcher leaves it alone),
        so an independent checker can score a reduction of the night.
    **write_options
        Passed to :func:`write_frame`: ``slow``, ``chunk_bytes``, ``chunk_delay``, ``rename``.

    Returns
    -------
    NightPlan
        The plan that was written, with its truth.
    """
    plan = plan_night(config or SimConfig())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if truth:
        (out / TRUTH_FILE).write_text(json.dumps(plan.truth(), indent=1))
    for i, frame in enumerate(plan.frames):
        if i and interval > 0:
            time.sleep(interval)
        path = write_frame(plan, frame, out, **write_options)
        if on_written is not None:
            on_written(frame, path)
    return plan


def corner_error(estimate: Any, truth: Any, shape: tuple[int, int]) -> float:
    """Largest distance (px) between where two frame -> reference 3x3 transforms put the frame's four corners:
    a registration scored against ``truth.json`` (the true frame A -> B transform is ``T_B @ inv(T_A)``)."""
    h, w = shape
    corners = np.array([[0.0, 0.0], [w - 1.0, 0.0], [0.0, h - 1.0], [w - 1.0, h - 1.0]])
    a = corners @ np.asarray(estimate)[:2, :2].T + np.asarray(estimate)[:2, 2]
    b = corners @ np.asarray(truth)[:2, :2].T + np.asarray(truth)[:2, 2]
    return float(np.max(np.hypot(*(a - b).T)))
