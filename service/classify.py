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

from nightshift.service.cfa import PATTERNS, CfaError, header_layout
from nightshift.service.filters import filter_key, header_filter, tidy
from nightshift.service.frame import KINDS, OTHER_KIND, FrameError, FrameMeta
from nightshift.service.lookalike import override_hint
from nightshift.service.night import header_longitude, night_of_date, observation_time, observing_night
from nightshift.service.readout import AUTO, readout_of

__all__ = [
    "CAMERA_KEYWORDS",
    "DEFAULT_SYNONYMS",
    "SET_ASIDE_WORDS",
    "TYPE_KEYWORDS",
    "UNTYPED_NOTE",
    "ClassifyOptions",
    "classify_kind",
    "normalise",
    "type_word",
]

#: Keywords naming the camera, in the order they are trusted: masters of two cameras never mix.
CAMERA_KEYWORDS = ("INSTRUME", "DETECTOR", "CAMERA")

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
    "twilight": "flat",
    "sflat": "flat",
    "dflat": "flat",
    "screen flat": "flat",
    "panel flat": "flat",
    "lamp flat": "flat",
    "lampflat": "flat",
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

#: Frame-type words of frames that are neither imaging calibration nor science: set aside (status ``ignored``).
SET_ASIDE_WORDS: dict[str, str] = {
    "focus": "a focus frame",
    "focus frame": "a focus frame",
    "test": "a test frame",
    "test frame": "a test frame",
    "pointing": "a pointing frame",
    "pointing frame": "a pointing frame",
    "arc": "an arc-lamp frame (spectroscopy)",
    "arc lamp": "an arc-lamp frame (spectroscopy)",
    "comparison": "a comparison-lamp frame (spectroscopy)",
    "comp": "a comparison-lamp frame (spectroscopy)",
    "acquisition": "an acquisition frame",
    "guide": "a guider frame",
}
#: What the archive says of a light taken from OBJECT and EXPTIME alone.
UNTYPED_NOTE = "no frame-type keyword: taken as a light from OBJECT and EXPTIME"

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
        Filter names -> canonical names (``{"Green": "G"}``), matched as filters are compared.
    longitude, timezone
        Site longitude (degrees east) or IANA timezone, for the observing night (timezone wins). With
        neither, the header's longitude (LONGITUD, SITELONG, OBSGEO-L, LONG-OBS...) is used when it has one.
    untyped_lights : bool
        A frame with no frame-type keyword at all, a positive exposure and an OBJECT is a light (the default);
        False quarantines it as ``unknown_type``.
    filter_keep_case : bool
        Filters differing only in case are different filters (``r`` and ``R``). By default they are one.
    overscan, trim : str
        ``"auto"`` (the header's BIASSEC, TRIMSEC/DATASEC), ``"off"``, a section or a keyword name: what
        :func:`nightshift.service.readout.readout_of` does to the frame, recorded as its ``readout``.
    bayer_patterns : dict
        Per camera (its name, case-insensitive): the Bayer pattern of a colour camera whose headers state none
        (``"RGGB"``...), or ``"mono"`` to treat a camera as monochrome whatever its headers say.
    """

    synonyms: dict[str, str] = field(default_factory=dict)
    overrides: list[tuple[str, str]] = field(default_factory=list)
    filter_aliases: dict[str, str] = field(default_factory=dict)
    longitude: float | None = None
    timezone: str | None = None
    untyped_lights: bool = True
    filter_keep_case: bool = False
    overscan: str = AUTO
    trim: str = AUTO
    bayer_patterns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for camera, pattern in self.bayer_patterns.items():
            if str(pattern).strip().upper() not in (*PATTERNS, "MONO"):
                known = ", ".join(PATTERNS)
                raise ValueError(f"bayer pattern of {camera!r} is {pattern!r}, not one of {known} or mono")
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
    is not a frame-type word (FRAME = 'FK5' is a coordinate frame) is passed over for the next. A word of
    :data:`SET_ASIDE_WORDS` (FOCUS, TEST, ARC...) gives :data:`~nightshift.service.frame.OTHER_KIND`. With no
    type keyword at all, a frame with an OBJECT and a positive exposure is a light (dialect ``"untyped"``)
    unless ``options.untyped_lights`` is False.

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
        ``kind`` one of KINDS, or ``"other"``; ``dialect`` names the capture program when recognised
        (``"maxim"``, ``"nina"``, ``"ekos"``, ``"sgp"``, ...), ``"override"`` for a filename override,
        ``"user"`` for a user synonym, ``"untyped"`` for a light without a type keyword.

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
        if word in SET_ASIDE_WORDS:
            return OTHER_KIND, _software(header) or _word_dialect(key, raw)
        said.append(f"{key} = {raw!r}")
    if said:
        what = ", ".join(said)
        raise FrameError(
            "unknown_type",
            f"{what}: not a bias/dark/flat/light word; add it to the synonyms or add a filename override",
        )
    return _untyped(header, path, options), "untyped"


def _untyped(header, path: str, options: ClassifyOptions) -> str:
    """A frame without any type keyword: a light when it has an OBJECT and a positive exposure (if allowed)."""
    name = PurePath(path).name
    hint = f"add a filename override ({override_hint(path, 'light')} or another kind) or a type keyword"
    none = f"no {'/'.join(TYPE_KEYWORDS)} keyword"
    if not options.untyped_lights:
        raise FrameError(
            "unknown_type",
            f"{none} and no filename override matched {name!r} ([classify] untyped_lights is off); {hint}",
        )
    try:
        exptime = _first_number(header, ("EXPTIME", "EXPOSURE"))
    except FrameError:
        exptime = None
    obj = _text(header, "OBJECT")
    if obj and exptime is not None and exptime > 0:
        return "light"
    why = "no OBJECT" if not obj else ("no exposure time" if exptime is None else f"an exposure of {exptime:g} s")
    raise FrameError(
        "unknown_type",
        f"{none} and {why}, so not taken as a light; no filename override matched {name!r}: {hint}",
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


def _filter(header, options: ClassifyOptions, extra: dict[str, Any]) -> str | None:
    """The frame's filter: wheels combined (:func:`~nightshift.service.filters.header_filter`), aliases applied
    (compared as filters are: spaces dropped, case folded unless kept)."""
    name, source = header_filter(header)
    if source and source != "FILTER":
        extra["filter_source"] = source
    if name is None:
        return None
    keep = options.filter_keep_case
    by_key = {filter_key(str(k), keep_case=keep): tidy(v) for k, v in options.filter_aliases.items()}
    return by_key.get(filter_key(name, keep_case=keep), name)


def _camera(header, extra: dict[str, Any]) -> str | None:
    for key in CAMERA_KEYWORDS:
        text = _text(header, key)
        if text:
            if key != "INSTRUME":
                extra["camera_source"] = key
            return text
    return None


def _when(
    header, exptime: float | None, options: ClassifyOptions, path: str, mtime: float | None, notes: list[str]
) -> tuple[datetime, str, str, dict[str, Any]]:
    """(start, night, date source, extras) of a frame: its header's time, else the file's modification time."""
    extra: dict[str, Any] = {}
    found = observation_time(header, exptime)
    if found.note:
        notes.append(found.note)
    longitude, timezone = options.longitude, options.timezone
    if longitude is None and not timezone:
        site = header_longitude(header)
        if site is not None:
            longitude = site[0]
            extra["longitude"] = site[0]
            notes.append(f"night from the header's longitude {site[1]} ({site[0]:.4f} degrees east)")
    when = found.start
    source = found.source
    if when is None:
        if mtime is None:
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                raise FrameError("bad_header_value", "no DATE-OBS in the header and no file time") from None
        when = datetime.fromtimestamp(mtime, tz=UTC).replace(tzinfo=None)
        source = "mtime"
        notes.append("no date in the header: the file's modification time is used")
    if found.date_only:
        night = night_of_date(when.date(), longitude=longitude, timezone=timezone)
    else:
        night = observing_night(when, longitude=longitude, timezone=timezone)
    return when, night, source, extra


def normalise(
    header,
    *,
    path: str,
    sha256: str,
    size_bytes: int,
    options: ClassifyOptions,
    mtime: float | None = None,
    shape: tuple[int, ...] | None = None,
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
        date at all (``date_source = "mtime"``). When None, the file at ``path`` is asked.
    shape : tuple of int, optional
        The image's (rows, columns), or (3, rows, columns) for a colour cube, when known from the file's
        structure; else NAXIS2/NAXIS1 (and NAXIS3).

    Returns
    -------
    FrameMeta

    Raises
    ------
    FrameError
        ``unknown_type``, ``missing_exposure`` (a dark, flat, light or darkflat without EXPTIME/EXPOSURE;
        a bias gets 0.0), ``bad_header_value`` (naming the key and the value that cannot be parsed, a colour
        frame's Bayer pattern or ROWORDER that is not one nightshift knows), ``multiple_amplifiers``. A frame of
        kind ``"other"`` (FOCUS, TEST...) is returned with ``extra["set_aside"]`` saying why it is set aside.
    """
    extra: dict[str, Any] = {}
    notes: list[str] = []
    kind, dialect = classify_kind(header, path, options)
    for key in TYPE_KEYWORDS:
        try:
            raw = _text(header, key)
        except FrameError:
            continue
        if raw is not None:
            extra[key.lower()] = raw
    if kind == OTHER_KIND:
        word = next(extra[k.lower()] for k in TYPE_KEYWORDS if k.lower() in extra)
        what = SET_ASIDE_WORDS.get(type_word(word), "not a frame nightshift reduces")
        extra["set_aside"] = f"frame type {word!r}: {what}, not imaging calibration or science; set aside"
        notes.append(extra["set_aside"])
        exptime = _first_number(header, ("EXPTIME", "EXPOSURE"))
    else:
        exptime = _exposure(header, kind, extra)
    if dialect == "untyped":
        notes.append(UNTYPED_NOTE)
    if "exposure_note" in extra:
        notes.append(extra["exposure_note"])

    when, night, source, more = _when(header, exptime, options, path, mtime, notes)
    extra.update(more)
    extra["date_source"] = source

    width = shape[-1] if shape else int(_number(header, "NAXIS1") or 0)
    height = shape[-2] if shape else int(_number(header, "NAXIS2") or 0)
    plan = readout_of(header, (height, width), overscan=options.overscan, trim=options.trim)
    xbin, ybin = _binning(header)
    gain = _number(header, "GAIN")
    offset = _first_number(header, ("OFFSET", "BLKLEVEL"))
    readout_mode = _text(header, "READOUTM", "READMODE", "READOUT")
    if shape:
        naxis3 = shape[0] if len(shape) == 3 else None
    else:
        naxis3 = int(_number(header, "NAXIS3") or 0) if _number(header, "NAXIS") == 3 else None
    camera = _camera(header, extra)
    try:
        bayer, roworder, cfa = header_layout(header, height=height, configured=options.bayer_patterns, camera=camera)
    except CfaError as exc:
        raise FrameError("bad_header_value", str(exc)) from None
    said = _text(header, "BAYERPAT")
    if said and bayer is None:
        notes.append(f"BAYERPAT {said!r} set aside: the camera is set to mono ([classify] bayer_pattern)")
    elif bayer and not said:
        notes.append(f"Bayer pattern {bayer} from the camera's setting ([classify] bayer_pattern)")
    software = _text(header, "SWCREATE", "CREATOR", "PROGRAM", "SOFTWARE")
    if software:
        extra["software"] = software
    filter_name = _filter(header, options, extra)
    if "+" in extra.get("filter_source", "") and filter_name:
        notes.append(f"filter {filter_name!r} from {extra['filter_source']}")
    return FrameMeta(
        path=str(path),
        sha256=sha256,
        size_bytes=int(size_bytes),
        kind=kind,
        exptime=exptime,
        date_obs=when.isoformat(timespec="microseconds"),
        night=night,
        naxis1=width,
        naxis2=height,
        dtype=_dtype(header),
        object=_text(header, "OBJECT"),
        filter=filter_name,
        xbin=xbin,
        ybin=ybin,
        ccd_temp=_first_number(header, ("CCD-TEMP", "CCD_TEMP", "CCDTEMP", "TEMPERAT")),
        set_temp=_first_number(header, ("SET-TEMP", "SET_TEMP", "SETTEMP")),
        gain=gain,
        offset=offset,
        readout_mode=readout_mode,
        camera=camera,
        telescope=_text(header, "TELESCOP"),
        bayerpat=bayer,
        naxis3=naxis3,
        roworder=roworder,
        cfa=cfa,
        dialect=dialect,
        date_source=source,
        readout=plan.describe(),
        header_note="; ".join(notes) or None,
        extra=extra,
    )
