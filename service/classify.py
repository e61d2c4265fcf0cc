"""What a frame is and what its header says, in one vocabulary whatever program wrote it.

Capture programs disagree on the words (MaxIm DL 'Flat Field', N.I.N.A. 'DARKFLAT', INDI/Ekos 'FRAME',
IRAF 'zero'/'object'); :func:`classify_kind` maps them to the KINDS, and :func:`normalise` turns a raw header
into a :class:`~nightshift.service.frame.FrameMeta` or says, in a
:class:`~nightshift.service.frame.FrameError`, why it cannot.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import PurePath
from typing import Any

from nightshift.service.frame import KINDS, FrameError, FrameMeta
from nightshift.service.night import date_obs_source, observing_night, parse_date_obs

__all__ = ["DEFAULT_SYNONYMS", "TYPE_KEYWORDS", "ClassifyOptions", "classify_kind", "normalise", "type_word"]

#: Header keywords that may name the frame type, in the order they are trusted. INDI/Ekos writes the truth
#: in FRAME and often a constant IMAGETYP = 'Light Frame', so FRAME comes first.
TYPE_KEYWORDS = ("FRAME", "IMAGETYP", "IMAGETYPE", "OBSTYPE")

#: Built-in frame-type words (compared after :func:`type_word`: lower case, '_'/'-' as spaces, spaces
#: collapsed). MaxIm DL, APT and SGP: 'Light Frame', 'Dark Frame', 'Bias Frame', 'Flat Field'/'Flat Frame';
#: N.I.N.A.: 'LIGHT', 'DARK', 'FLAT', 'BIAS', 'DARKFLAT'; INDI/Ekos FRAME: 'Light', 'Dark', 'Flat', 'Bias';
#: SharpCap, ASIAIR: 'Light', 'Dark', 'Flat', 'Bias'; IRAF/observatories: 'zero', 'object', 'science'.
DEFAULT_SYNONYMS: dict[str, str] = {
    "bias": "bias",
    "bias frame": "bias",
    "biasframe": "bias",
    "zero": "bias",
    "zero frame": "bias",
    "offset": "bias",
    "offset frame": "bias",
    "dark": "dark",
    "dark frame": "dark",
    "darkframe": "dark",
    "flat": "flat",
    "flat field": "flat",
    "flatfield": "flat",
    "flat frame": "flat",
    "flatframe": "flat",
    "sky flat": "flat",
    "skyflat": "flat",
    "dome flat": "flat",
    "domeflat": "flat",
    "twilight flat": "flat",
    "twiflat": "flat",
    "twilightflat": "flat",
    "screen flat": "flat",
    "panel flat": "flat",
    "light": "light",
    "light frame": "light",
    "lightframe": "light",
    "object": "light",
    "science": "light",
    "science frame": "light",
    "darkflat": "darkflat",
    "dark flat": "darkflat",
    "dark flat frame": "darkflat",
    "flat dark": "darkflat",
    "flatdark": "darkflat",
    "flat dark frame": "darkflat",
}

#: Capture programs recognised from SWCREATE/CREATOR/PROGRAM/SOFTWARE (substring, lower case) -> dialect.
_SOFTWARE = (
    ("n.i.n.a", "nina"),
    ("nighttime imaging", "nina"),
    ("maxim", "maxim"),
    ("sharpcap", "sharpcap"),
    ("sequence generator", "sgp"),
    ("sgpro", "sgp"),
    ("astro photography tool", "apt"),
    ("astrophotography tool", "apt"),
    ("asiair", "asiair"),
    ("ekos", "ekos"),
    ("kstars", "ekos"),
    ("indi", "indi"),
    ("voyager", "voyager"),
    ("ccdciel", "ccdciel"),
    ("firecapture", "firecapture"),
    ("theskyx", "theskyx"),
    ("prism", "prism"),
)
_SOFTWARE_KEYS = ("SWCREATE", "CREATOR", "PROGRAM", "SOFTWARE", "SWOWNER")
_APT_WORD = re.compile(r"\bapt\b")


def type_word(value: Any) -> str:
    """A frame-type value as compared with synonyms: lower case, '_' and '-' as spaces, spaces collapsed."""
    return " ".join(str(value).lower().replace("_", " ").replace("-", " ").split())


@dataclass
class ClassifyOptions:
    """How to read headers at this site (from the user's config).

    Attributes
    ----------
    synonyms : dict
        Extra frame-type words -> kind, compared case- and space-insensitively; they win over the built-in
        table (:data:`DEFAULT_SYNONYMS`).
    overrides : list of (glob, kind)
        For headers that say nothing useful: the first glob matching the file's name or full path (case-
        insensitive; a relative glob with a '/' also matches the end of the path) decides the kind.
    filter_aliases : dict
        Filter names -> canonical names (``{"Green": "G"}``), matched case-insensitively after trimming.
    longitude, timezone
        Site longitude (degrees east) or IANA timezone, for the observing night (timezone wins).
    """

    synonyms: dict[str, str] = field(default_factory=dict)
    overrides: list[tuple[str, str]] = field(default_factory=list)
    filter_aliases: dict[str, str] = field(default_factory=dict)
    longitude: float | None = None
    timezone: str | None = None

    def __post_init__(self) -> None:
        for word, kind in self.synonyms.items():
            if kind not in KINDS:
                raise ValueError(f"synonym {word!r} maps to {kind!r}, not one of {', '.join(KINDS)}")
        self.overrides = [tuple(item) for item in self.overrides]  # type: ignore[misc]
        for item in self.overrides:
            if len(item) != 2 or item[1] not in KINDS:
                raise ValueError(f"override {item!r} must be (glob, kind) with kind one of {', '.join(KINDS)}")


def _value(header, key: str) -> Any:
    """``header[key]`` or None; an unparsable card becomes FrameError('bad_header_value') quoting it."""
    if key not in header:
        return None
    try:
        return header[key]
    except Exception:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # astropy warns while it repairs the card to print it
                image = str(header.cards[key]).rstrip()
        except Exception:
            image = key
        raise FrameError("bad_header_value", f"the {key} card cannot be parsed: {image!r}") from None


def _text(header, *keys: str) -> str | None:
    for key in keys:
        value = _value(header, key)
        if value is None:
            continue
        text = str(value).strip()
        if text:
            return text
    return None


def _match_override(path: str, overrides: list[tuple[str, str]]) -> tuple[str, str] | None:
    posix = PurePath(path).as_posix().lower()
    name = posix.rsplit("/", 1)[-1]
    for glob, kind in overrides:
        pattern = str(glob).lower()
        if fnmatchcase(name, pattern) or fnmatchcase(posix, pattern):
            return glob, kind
        if "/" in pattern and not pattern.startswith("/") and fnmatchcase(posix, "*/" + pattern):
            return glob, kind
    return None


def _software(header) -> str | None:
    for key in _SOFTWARE_KEYS:
        try:
            text = _text(header, key)
        except FrameError:
            continue
        if text:
            low = text.lower()
            for needle, dialect in _SOFTWARE:
                if needle in low:
                    return dialect
            if _APT_WORD.search(low):
                return "apt"
    return None


def _word_dialect(keyword: str, raw: str) -> str:
    """A guess at the writing program from the word's style when no SWCREATE/CREATOR says it."""
    word = type_word(raw)
    if keyword == "FRAME":
        return "ekos"
    if word in ("bias frame", "dark frame", "light frame", "flat field", "flat frame"):
        return "maxim"
    if word == "darkflat" or (raw.strip().isupper() and word in ("bias", "dark", "flat", "light")):
        return "nina"
    if word in ("zero", "object", "science") or raw.strip().islower():
        return "iraf"
    return "generic"


def classify_kind(header, path: str, options: ClassifyOptions) -> tuple[str, str]:
    """The kind of a frame and whose words said so.

    Order: a filename override; FRAME (INDI/Ekos); IMAGETYP (also IMAGETYPE); OBSTYPE. A keyword whose word
    is not a frame-type word (FRAME = 'FK5' is a coordinate frame) is passed over for the next.

    Parameters
    ----------
    header : astropy.io.fits.Header
        The raw header.
    path : str
        The file's path, for overrides.
    options : ClassifyOptions
        User synonyms and overrides.

    Returns
    -------
    (kind, dialect)
        ``kind`` one of KINDS; ``dialect`` names the capture program when recognised (``"maxim"``, ``"nina"``,
        ``"ekos"``, ``"sgp"``, ...), ``"override"`` for a filename override, ``"user"`` for a user synonym.

    Raises
    ------
    FrameError
        ``unknown_type``, quoting what the header said.
    """
    hit = _match_override(path, options.overrides)
    if hit is not None:
        return hit[1], "override"
    user = {type_word(word): kind for word, kind in options.synonyms.items()}
    said: list[str] = []
    for key in TYPE_KEYWORDS:
        try:
            raw = _text(header, key)
        except FrameError:
            said.append(f"{key} (unparsable)")
            continue
        if raw is None:
            continue
        word = type_word(raw)
        if word in user:
            return user[word], "user"
        if word in DEFAULT_SYNONYMS:
            return DEFAULT_SYNONYMS[word], _software(header) or _word_dialect(key, raw)
        said.append(f"{key} = {raw!r}")
    if said:
        what = ", ".join(said)
        raise FrameError(
            "unknown_type",
            f"{what}: not a bias/dark/flat/light word; add it to the synonyms or add a filename override",
        )
    raise FrameError(
        "unknown_type",
        f"no {', '.join(TYPE_KEYWORDS)} keyword and no filename override matched {PurePath(path).name!r}",
    )


def _number(header, key: str) -> float | None:
    value = _value(header, key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise FrameError("bad_header_value", f"{key} = {value!r} is a logical, not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FrameError("bad_header_value", f"{key} = {value!r} is not a number") from None
    if not math.isfinite(number):
        raise FrameError("bad_header_value", f"{key} = {value!r} is not a finite number")
    return number


def _first_number(header, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        number = _number(header, key)
        if number is not None:
            return number
    return None


def _exposure(header, kind: str, extra: dict[str, Any]) -> float | None:
    found: dict[str, float] = {}
    errors: list[FrameError] = []
    for key in ("EXPTIME", "EXPOSURE"):
        try:
            number = _number(header, key)
        except FrameError as exc:
            errors.append(exc)
            continue
        if number is None:
            continue
        if number < 0:
            errors.append(FrameError("bad_header_value", f"{key} = {number!r} is a negative exposure"))
            continue
        found[key] = number
    if errors and not found:
        raise errors[0]
    if errors:
        extra["exposure_note"] = f"{errors[0].message}; used {next(iter(found))}"
    if len(found) == 2 and not math.isclose(found["EXPTIME"], found["EXPOSURE"], rel_tol=1e-6, abs_tol=1e-6):
        extra["exposure_note"] = (
            f"EXPTIME = {found['EXPTIME']} and EXPOSURE = {found['EXPOSURE']} disagree; used EXPTIME"
        )
    if found:
        return found.get("EXPTIME", found.get("EXPOSURE"))
    if kind == "bias":
        return 0.0
    raise FrameError("missing_exposure", f"a {kind} frame with neither EXPTIME nor EXPOSURE in its header")


def _binning(header) -> tuple[int, int]:
    def one(keys: tuple[str, ...]) -> int | None:
        number = _first_number(header, keys)
        if number is None:
            return None
        if not number.is_integer() or number < 1:
            raise FrameError("bad_header_value", f"{keys[0]} = {number!r} is not a binning factor")
        return int(number)

    xbin, ybin = one(("XBINNING", "CCDXBIN", "BINX")), one(("YBINNING", "CCDYBIN", "BINY"))
    if xbin is None and ybin is None:
        ccdsum = _text(header, "CCDSUM")  # IRAF/observatory form '2 2'
        if ccdsum:
            parts = ccdsum.split()
            if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
                raise FrameError("bad_header_value", f"CCDSUM = {ccdsum!r} is not two binning factors")
            return int(parts[0]), int(parts[1])
    return xbin or 1, ybin or (xbin or 1)


_DTYPES = {8: "uint8", 16: "int16", 32: "int32", 64: "int64", -32: "float32", -64: "float64"}
_UNSIGNED = {8: ("int8", -128.0), 16: ("uint16", 32768.0), 32: ("uint32", 2.0**31), 64: ("uint64", 2.0**63)}


def _dtype(header) -> str:
    bitpix = int(_number(header, "BITPIX") or 0)
    bzero = _number(header, "BZERO") or 0.0
    bscale = _number(header, "BSCALE")
    bscale = 1.0 if bscale is None else bscale
    if bitpix not in _DTYPES:
        raise FrameError("bad_header_value", f"BITPIX = {bitpix} is not a FITS pixel type")
    if bitpix < 0 or (bzero == 0.0 and bscale == 1.0):
        return _DTYPES[bitpix]
    signed_shift = _UNSIGNED[bitpix]
    if bscale == 1.0 and bzero == signed_shift[1]:
        return signed_shift[0]
    return "float32"


def _filter(header, aliases: dict[str, str]) -> str | None:
    name = _text(header, "FILTER", "FILTNAME", "FILTER1")
    if name is None:
        return None
    if name in aliases:
        return aliases[name]
    folded = {str(k).strip().lower(): v for k, v in aliases.items()}
    return folded.get(name.lower(), name)


def normalise(
    header,
    *,
    path: str,
    sha256: str,
    size_bytes: int,
    options: ClassifyOptions,
    mtime: float | None = None,
) -> FrameMeta:
    """The normalised metadata of one raw frame, from its header.

    Parameters
    ----------
    header : astropy.io.fits.Header
        The header of the image HDU.
    path, sha256, size_bytes
        Stored as given.
    options : ClassifyOptions
        Synonyms, overrides, filter aliases, site longitude/timezone.
    mtime : float, optional
        The file's modification time (epoch seconds), used as the time of the frame when the header has no
        DATE-OBS (``extra["date_source"] = "mtime"``). When None, the file at ``path`` is asked.

    Returns
    -------
    FrameMeta

    Raises
    ------
    FrameError
        ``unknown_type``, ``missing_exposure`` (a dark, flat, light or darkflat without EXPTIME/EXPOSURE;
        a bias gets 0.0), ``bad_header_value`` (naming the key and the value that cannot be parsed).
    """
    extra: dict[str, Any] = {}
    kind, dialect = classify_kind(header, path, options)
    for key in TYPE_KEYWORDS:
        try:
            raw = _text(header, key)
        except FrameError:
            continue
        if raw is not None:
            extra[key.lower()] = raw
    exptime = _exposure(header, kind, extra)

    when = parse_date_obs(header)
    if when is None:
        if mtime is None:
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                raise FrameError("bad_header_value", "no DATE-OBS in the header and no file time") from None
        when = datetime.fromtimestamp(mtime, tz=UTC).replace(tzinfo=None)
        extra["date_source"] = "mtime"
    else:
        extra["date_source"] = date_obs_source(header)
    night = observing_night(when, longitude=options.longitude, timezone=options.timezone)

    xbin, ybin = _binning(header)
    gain = _number(header, "GAIN")
    offset = _first_number(header, ("OFFSET", "BLKLEVEL"))
    readout = _text(header, "READOUTM", "READMODE", "READOUT")
    bayer = _text(header, "BAYERPAT")
    software = _text(header, "SWCREATE", "CREATOR", "PROGRAM", "SOFTWARE")
    if software:
        extra["software"] = software
    return FrameMeta(
        path=str(path),
        sha256=sha256,
        size_bytes=int(size_bytes),
        kind=kind,
        exptime=exptime,
        date_obs=when.isoformat(timespec="microseconds"),
        night=night,
        naxis1=int(_number(header, "NAXIS1") or 0),
        naxis2=int(_number(header, "NAXIS2") or 0),
        dtype=_dtype(header),
        object=_text(header, "OBJECT"),
        filter=_filter(header, options.filter_aliases),
        xbin=xbin,
        ybin=ybin,
        ccd_temp=_first_number(header, ("CCD-TEMP", "CCD_TEMP", "CCDTEMP", "TEMPERAT")),
        set_temp=_first_number(header, ("SET-TEMP", "SET_TEMP", "SETTEMP")),
        gain=gain,
        offset=offset,
        readout_mode=readout,
        camera=_text(header, "INSTRUME"),
        telescope=_text(header, "TELESCOP"),
        bayerpat=bayer.upper() if bayer else None,
        dialect=dialect,
        extra=extra,
    )
