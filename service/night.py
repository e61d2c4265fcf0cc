"""When a frame was taken: DATE-OBS in its many written forms, and the observing night it belongs to.

An observing night runs from local noon to the next local noon and is named by the date of its evening,
so a frame taken at 03:00 local belongs with the frames of the evening before.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nightshift.service.frame import FrameError

__all__ = ["date_obs_source", "observing_night", "parse_date_obs"]

_ISO = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<h>\d{1,2}):(?P<m>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d*))?)?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?)?$",
    re.IGNORECASE,
)
_TIME = re.compile(r"^(?P<h>\d{1,2}):(?P<m>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d*))?)?$")
_OLD_DATE = re.compile(r"^(?P<d>\d{1,2})/(?P<m>\d{1,2})/(?P<y>\d{2})$")
#: Keywords that carry the start time of the exposure when DATE-OBS holds only the date.
_TIME_KEYS = ("TIME-OBS", "UT", "UTSTART", "UT-START")
_MJD_EPOCH = datetime(1858, 11, 17)


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


def _time_of_day(header, day: date) -> tuple[datetime, str] | None:
    for key in _TIME_KEYS:
        raw = _text(header, key)
        if raw is None:
            continue
        match = _TIME.match(raw)
        if not match:
            raise FrameError("bad_header_value", f"{key} = {raw!r} is not a time hh:mm:ss")
        return _clock(match, day, key, raw), key
    return None


def _parse(header) -> tuple[datetime | None, str]:
    raw = _text(header, "DATE-OBS")
    key = "DATE-OBS"
    if raw is None:
        raw = _text(header, "DATE-BEG")
        key = "DATE-BEG"
    if raw is None:
        mjd = _text(header, "MJD-OBS")
        if mjd is None:
            return None, "none"
        try:
            return _MJD_EPOCH + timedelta(days=float(mjd)), "MJD-OBS"
        except (ValueError, OverflowError):
            raise FrameError("bad_header_value", f"MJD-OBS = {mjd!r} is not a number of days") from None
    match = _ISO.match(raw)
    if match:
        day = _day(match["date"], key, raw)
        if match["h"] is None:
            timed = _time_of_day(header, day)
            if timed is None:
                return datetime(day.year, day.month, day.day), f"{key} (date only)"
            return timed[0], f"{key}+{timed[1]}"
        when = _clock(match, day, key, raw)
        tz = match["tz"]
        if tz and tz.upper() != "Z":
            sign = 1 if tz[0] == "+" else -1
            digits = tz[1:].replace(":", "")
            when -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        return when, key
    match = _OLD_DATE.match(raw)
    if match:  # the pre-2000 FITS form DD/MM/YY, years 1900-1999
        try:
            day = date(1900 + int(match["y"]), int(match["m"]), int(match["d"]))
        except ValueError:
            raise FrameError("bad_header_value", f"{key} = {raw!r} is not a valid DD/MM/YY date") from None
        timed = _time_of_day(header, day)
        if timed is None:
            return datetime(day.year, day.month, day.day), f"{key} (date only)"
        return timed[0], f"{key}+{timed[1]}"
    raise FrameError(
        "bad_header_value", f"{key} = {raw!r} is not a date (expected YYYY-MM-DDThh:mm:ss[.f] or DD/MM/YY)"
    )


def parse_date_obs(header) -> datetime | None:
    """The UTC start of the exposure, from the header.

    Understands ISO ``YYYY-MM-DDThh:mm:ss[.f...]`` (``T`` or a space, optional ``Z`` or ``+hh:mm`` offset);
    ``DATE-OBS = 'YYYY-MM-DD'`` with the time in TIME-OBS (or UT, UTSTART); the old ``DD/MM/YY`` form
    (1900-1999); and, when DATE-OBS is absent, DATE-BEG or MJD-OBS.

    Parameters
    ----------
    header : astropy.io.fits.Header or mapping
        The frame's header.

    Returns
    -------
    datetime or None
        Naive UTC; None when the header carries no date at all (the caller decides what to fall back on).

    Raises
    ------
    FrameError
        ``bad_header_value`` when a date or time is present but cannot be understood.
    """
    return _parse(header)[0]


def date_obs_source(header) -> str:
    """Which keywords :func:`parse_date_obs` took the time from (``'DATE-OBS'``, ``'DATE-OBS+TIME-OBS'``)."""
    return _parse(header)[1]


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
