"""When a frame was taken: DATE-OBS in its many written forms, and the observing night it belongs to.

An observing night runs from local noon to the next local noon and is named by the date of its evening,
so a frame taken at 03:00 local belongs with the frames of the evening before.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nightshift.service.frame import FrameError

__all__ = [
    "LONGITUDE_KEYS",
    "TIME_KEYS",
    "ObsTime",
    "date_obs_source",
    "header_longitude",
    "night_of_date",
    "observation_time",
    "observing_night",
    "parse_date_obs",
]

_ISO = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<h>\d{1,2}):(?P<m>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d*))?)?"
    r"\s*(?P<tz>Z|UTC|[+-]\d{2}(?::?\d{2})?)?)?$",
    re.IGNORECASE,
)
_TIME = re.compile(r"^(?P<h>\d{1,2})[: ](?P<m>\d{2})(?:[: ](?P<s>\d{2})(?:\.(?P<f>\d*))?)?\s*Z?$", re.IGNORECASE)
_OLD_DATE = re.compile(r"^(?P<d>\d{1,2})/(?P<m>\d{1,2})/(?P<y>\d{2})$")
#: Keywords that carry the UTC start time of the exposure (a time of day, or a whole date and time), in the
#: order they are trusted: they complete a DATE-OBS that holds only the date, and check one with a zone offset.
TIME_KEYS = ("TIME-OBS", "UT", "UTC-OBS", "UTCSTART", "UT-START", "UTSTART", "UT-OBS", "UTC")
#: Keywords with the start as a Julian date (MJD-OBS, JD, JD-OBS: start of exposure in MaxIm DL and others).
_JD_KEYS = (("MJD-OBS", 0.0), ("JD-OBS", 2400000.5), ("JD", 2400000.5))
#: Keywords that give the middle of the exposure: half the exposure is taken off.
_MID_KEYS = ("DATE-AVG", "MJD-AVG")
_MJD_EPOCH = datetime(1858, 11, 17)
#: Two readings of the start within this many seconds agree.
AGREE_SECONDS = 1.0


@dataclass(frozen=True)
class ObsTime:
    """When an exposure started, read from a header.

    ``start`` is naive UTC (None when the header has no date at all); ``source`` the keywords it came from
    (``"DATE-OBS"``, ``"DATE-OBS+UTC-OBS"``, ``"MJD-OBS"``, ``"DATE-AVG - EXPTIME/2"``, ``"DATE-OBS (date
    only)"``); ``date_only`` True when only the date is known (``start`` is then its 00:00); ``note`` what a
    person should know (a zone offset converted, two keys that disagree and which one won).
    """

    start: datetime | None
    source: str
    date_only: bool = False
    note: str | None = None


def _text(header, key: str) -> str | None:
    """The value of ``key`` as stripped text, or None if absent or blank."""
    if key not in header:
        return None
    try:
        value = header[key]
    except Exception as exc:  # astropy raises VerifyError for unparsable cards
        raise FrameError("bad_header_value", f"{key} card cannot be parsed: {exc}") from exc
    if value is None or isinstance(value, bool):
        return None if value is None else str(value)
    text = str(value).strip()
    return text or None


def _clock(match: re.Match, day: date, key: str, raw: str) -> datetime:
    hour, minute = int(match["h"]), int(match["m"])
    second = int(match["s"] or 0)
    fraction = match["f"] or ""
    micro = int((fraction + "000000")[:6]) if fraction else 0
    leap = second == 60  # a leap second: keep the instant, one microsecond short of the next minute
    if leap:
        second, micro = 59, 999999
    if hour > 23 or minute > 59 or second > 59:
        raise FrameError("bad_header_value", f"{key} = {raw!r} is not a valid time of day")
    return datetime(day.year, day.month, day.day, hour, minute, second, micro)


def _day(text: str, key: str, raw: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise FrameError("bad_header_value", f"{key} = {raw!r} is not a valid date") from None


def _offset(tz: str | None) -> timedelta | None:
    """The zone offset of an ISO time (``-0700``, ``+02:00``, ``-07``); None for none, ``Z`` or ``UTC``."""
    if not tz or tz.upper() in ("Z", "UTC"):
        return None
    sign = 1 if tz[0] == "+" else -1
    digits = tz[1:].replace(":", "")
    return sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))


def _iso(raw: str, key: str) -> tuple[datetime | None, date | None, timedelta | None]:
    """(local instant or None when only a date is written, the date, the zone offset) of an ISO value."""
    match = _ISO.match(raw)
    if match:
        day = _day(match["date"], key, raw)
        if match["h"] is None:
            return None, day, None
        return _clock(match, day, key, raw), day, _offset(match["tz"])
    match = _OLD_DATE.match(raw)
    if match:  # the pre-2000 FITS form DD/MM/YY, years 1900-1999
        try:
            day = date(1900 + int(match["y"]), int(match["m"]), int(match["d"]))
        except ValueError:
            raise FrameError("bad_header_value", f"{key} = {raw!r} is not a valid DD/MM/YY date") from None
        return None, day, None
    raise FrameError(
        "bad_header_value", f"{key} = {raw!r} is not a date (expected YYYY-MM-DDThh:mm:ss[.f] or DD/MM/YY)"
    )


def _utc_time(header, near: date | datetime) -> tuple[datetime, str] | None:
    """The UTC start from the first time keyword present: a time of day put on the date of ``near`` (the day
    before or after when that is closer to an instant ``near``), or a whole ISO date and time."""
    for key in TIME_KEYS:
        raw = _text(header, key)
        if raw is None:
            continue
        if not isinstance(header[key], str):
            continue  # a number (hours, seconds?) is not read as a time of day
        if _ISO.match(raw):
            when, _, offset = _iso(raw, key)
            if when is not None:
                return (when - offset if offset else when), key
            continue
        match = _TIME.match(raw)
        if not match:
            raise FrameError("bad_header_value", f"{key} = {raw!r} is not a time hh:mm:ss")
        day = near.date() if isinstance(near, datetime) else near
        when = _clock(match, day, key, raw)
        if isinstance(near, datetime):
            when = min((when + timedelta(days=k) for k in (-1, 0, 1)), key=lambda t: abs(t - near))
        return when, key
    return None


def _julian(header) -> tuple[datetime, str] | None:
    """The start from MJD-OBS / JD-OBS / JD; a whole-day MJD (``56486.0``) holds no time and is passed over."""
    for key, offset in _JD_KEYS:
        raw = _text(header, key)
        if raw is None:
            continue
        try:
            mjd = float(raw) - offset
            when = _MJD_EPOCH + timedelta(days=mjd)
        except (ValueError, OverflowError):
            raise FrameError("bad_header_value", f"{key} = {raw!r} is not a number of days") from None
        if mjd == int(mjd):
            continue
        return when, key
    return None


def _middle(header, exptime: float | None) -> tuple[datetime, str] | None:
    """The start from the middle of the exposure (DATE-AVG, MJD-AVG) minus half the exposure."""
    half = timedelta(seconds=(exptime or 0.0) / 2.0)
    what = " - EXPTIME/2" if exptime else ""
    for key in _MID_KEYS:
        raw = _text(header, key)
        if raw is None:
            continue
        if key == "MJD-AVG":
            try:
                return _MJD_EPOCH + timedelta(days=float(raw)) - half, key + what
            except (ValueError, OverflowError):
                raise FrameError("bad_header_value", f"{key} = {raw!r} is not a number of days") from None
        when, _, offset = _iso(raw, key)
        if when is not None:
            return (when - offset if offset else when) - half, key + what
    return None


def _seconds(delta: timedelta) -> str:
    return f"{abs(delta.total_seconds()):.0f} s" if abs(delta.total_seconds()) < 600 else f"{delta}"


def observation_time(header, exptime: float | None = None) -> ObsTime:
    """The UTC start of the exposure, from whichever keywords the header's writer used.

    Order: ``DATE-OBS`` (else ``DATE-BEG``) with a time, converted to UTC when it carries a zone offset
    (``-0700``, ``+02:00``; ``Z`` is UTC) and checked against a UTC time keyword (:data:`TIME_KEYS`) if one is
    present: they agree within :data:`AGREE_SECONDS`, or the UTC keyword wins, and the note says which. A
    ``DATE-OBS`` holding only the date (ISO or the old ``DD/MM/YY``) is completed from the first time keyword,
    else ``MJD-OBS``/``JD-OBS``/``JD``, else ``DATE-AVG``/``MJD-AVG`` minus half of ``exptime``. With no
    ``DATE-OBS``: those Julian dates, then the mid-exposure keys.

    Parameters
    ----------
    header : astropy.io.fits.Header or mapping
        The frame's header.
    exptime : float, optional
        Exposure in seconds, to go from a mid-exposure time to the start.

    Returns
    -------
    ObsTime

    Raises
    ------
    FrameError
        ``bad_header_value`` when a date or time is present but cannot be understood.
    """
    key = "DATE-OBS"
    raw = _text(header, key)
    if raw is None:
        key, raw = "DATE-BEG", _text(header, "DATE-BEG")
    if raw is None:
        found = _julian(header) or _middle(header, exptime)
        if found is None:
            return ObsTime(None, "none")
        return ObsTime(found[0], found[1])
    when, day, offset = _iso(raw, key)
    if when is not None and offset is None:
        return ObsTime(when, key)
    if when is not None:
        utc = when - offset
        hours = offset.total_seconds() / 3600.0
        said = f"{key} = {raw!r} is local time at UTC{hours:+g}: {utc.isoformat(timespec='seconds')} UTC"
        other = _utc_time(header, utc)
        if other is None:
            return ObsTime(utc, f"{key} (UTC{hours:+g} converted)", note=said)
        gap = other[0] - utc
        if abs(gap.total_seconds()) <= AGREE_SECONDS:
            return ObsTime(utc, f"{key} (UTC{hours:+g} converted)", note=f"{said}; {other[1]} agrees")
        return ObsTime(
            other[0],
            other[1],
            note=f"{said}, but {other[1]} (UTC) says {other[0].isoformat(timespec='seconds')}, "
            f"{_seconds(gap)} apart: {other[1]} used",
        )
    assert day is not None
    timed = _utc_time(header, day)
    if timed is not None:
        return ObsTime(timed[0], f"{key}+{timed[1]}")
    for found in (_julian(header), _middle(header, exptime)):
        if found is None:
            continue
        note = None
        if found[0].date() != day:
            note = f"{key} = {raw!r} but {found[1]} falls on {found[0].date().isoformat()}: {found[1]} used"
        return ObsTime(found[0], f"{key} (date only)+{found[1]}", note=note)
    return ObsTime(
        datetime(day.year, day.month, day.day),
        f"{key} (date only)",
        date_only=True,
        note=f"{key} = {raw!r} holds only the date and no other keyword gives the time",
    )


def parse_date_obs(header, exptime: float | None = None) -> datetime | None:
    """The UTC start of the exposure (see :func:`observation_time`); None when the header has no date.

    Raises
    ------
    FrameError
        ``bad_header_value`` when a date or time is present but cannot be understood.
    """
    return observation_time(header, exptime).start


def date_obs_source(header, exptime: float | None = None) -> str:
    """Which keywords the start was taken from (``'DATE-OBS'``, ``'DATE-OBS+TIME-OBS'``)."""
    return observation_time(header, exptime).source


_SEXAGESIMAL = re.compile(
    r"^(?P<sign>[+-])?\s*(?P<d>\d+(?:\.\d*)?)(?:[:\sd°]+(?P<m>\d+(?:\.\d*)?)(?:[:\sm']+(?P<s>\d+(?:\.\d*)?))?)?"
    r"\s*[s\"]?\s*(?P<hemi>[EW])?$",
    re.IGNORECASE,
)
#: Keywords that give the site's longitude, in the order they are trusted.
LONGITUDE_KEYS = ("LONGITUD", "SITELONG", "OBSGEO-L", "LONG-OBS", "OBSLON", "SITE-LON", "LON-OBS")


def _angle(raw, key: str) -> float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    match = _SEXAGESIMAL.match(str(raw).strip())
    if not match:
        raise FrameError("bad_header_value", f"{key} = {raw!r} is not a longitude")
    value = float(match["d"]) + float(match["m"] or 0) / 60.0 + float(match["s"] or 0) / 3600.0
    if match["sign"] == "-":
        value = -value
    if (match["hemi"] or "").upper() == "W":
        value = -abs(value)
    return value


def header_longitude(header) -> tuple[float, str] | None:
    """The site's longitude in degrees east from the header, and the card it came from; None when absent.

    Reads decimal degrees or sexagesimal text (``'-70 51 11.9'``, ``'-96:27:11.8008'``, ``'70 51 12 W'``),
    from :data:`LONGITUDE_KEYS`, else the geocentric OBSGEO-X/Y. A comment saying the value is west longitude
    (and not east) flips its sign.
    """
    for key in LONGITUDE_KEYS:
        raw = header.get(key) if key in header else None
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue
        value = _angle(raw, key)
        try:
            comment = str(header.comments[key]).lower()
        except (KeyError, IndexError, AttributeError):
            comment = ""
        if re.search(r"\bwest\b", comment) and not re.search(r"\beast\b|\+e\b", comment):
            value = -value
        if not -360.0 <= value <= 360.0:
            raise FrameError("bad_header_value", f"{key} = {raw!r} is not a longitude in degrees")
        return value, f"{key} = {raw!r}"
    x, y = header.get("OBSGEO-X"), header.get("OBSGEO-Y")
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and (x or y):
        return math.degrees(math.atan2(float(y), float(x))), "OBSGEO-X/Y"
    return None


def observing_night(when: datetime, *, longitude: float | None = None, timezone: str | None = None) -> str:
    """The observing night ``when`` belongs to: ``"YYYY-MM-DD"`` of the evening it began (local noon to noon).

    Parameters
    ----------
    when : datetime
        The instant; naive means UTC.
    longitude : float, optional
        Site longitude in degrees, east positive (0..360 accepted too): local mean solar time is used when
        no ``timezone`` is given.
    timezone : str, optional
        IANA zone name (``"America/Santiago"``); wins over ``longitude``. With neither, UTC is the local time.

    Raises
    ------
    ValueError
        An unknown timezone name.
    """
    utc = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if timezone:
        try:
            local = utc.astimezone(ZoneInfo(timezone)).replace(tzinfo=None)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {timezone!r}") from exc
    elif longitude is not None:
        east = (float(longitude) + 180.0) % 360.0 - 180.0  # 289.3 and -70.7 are the same meridian
        local = utc.replace(tzinfo=None) + timedelta(hours=east / 15.0)
    else:
        local = utc.replace(tzinfo=None)
    return (local - timedelta(hours=12)).date().isoformat()


def night_of_date(day: date, *, longitude: float | None = None, timezone: str | None = None) -> str:
    """The observing night of a frame whose header gives only its UTC date: the night holding the local
    midnight that falls on that date (most of a night's hours are on it, wherever the site is)."""
    base = datetime(day.year, day.month, day.day)
    best = base
    best_gap = None
    for minutes in range(0, 24 * 60, 15):
        t = base + timedelta(minutes=minutes)
        if timezone:
            local = t.replace(tzinfo=UTC).astimezone(ZoneInfo(timezone)).replace(tzinfo=None)
        elif longitude is not None:
            local = t + timedelta(hours=((float(longitude) + 180.0) % 360.0 - 180.0) / 15.0)
        else:
            local = t
        into = (local - datetime.combine(local.date(), datetime.min.time())).total_seconds()
        gap = min(into, 86400 - into)
        if best_gap is None or gap < best_gap:
            best, best_gap = t, gap
    return observing_night(best, longitude=longitude, timezone=timezone)
