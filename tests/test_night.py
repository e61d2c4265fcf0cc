"""service.night: DATE-OBS in the forms capture programs write, and the observing night of a frame."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from astropy.io import fits
from nightshift.service.frame import FrameError
from nightshift.service.night import date_obs_source, observing_night, parse_date_obs


def header(**cards) -> fits.Header:
    h = fits.Header()
    for key, value in cards.items():
        h[key.replace("_", "-")] = value
    return h


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-15T03:04:05", datetime(2024, 3, 15, 3, 4, 5)),
        ("2024-03-15T03:04:05.123", datetime(2024, 3, 15, 3, 4, 5, 123000)),
        ("2024-03-15T03:04:05.1234567", datetime(2024, 3, 15, 3, 4, 5, 123456)),  # SharpCap: 7 digits
        ("2024-03-15T03:04:05Z", datetime(2024, 3, 15, 3, 4, 5)),
        ("2024-03-15T03:04:05.5Z", datetime(2024, 3, 15, 3, 4, 5, 500000)),
        ("2024-03-15 03:04:05", datetime(2024, 3, 15, 3, 4, 5)),
        ("2024-03-15T05:04:05+02:00", datetime(2024, 3, 15, 3, 4, 5)),
        ("  2024-03-15T03:04:05  ", datetime(2024, 3, 15, 3, 4, 5)),
        ("2016-12-31T23:59:60", datetime(2016, 12, 31, 23, 59, 59, 999999)),  # leap second
    ],
)
def test_iso_forms(value, expected):
    assert parse_date_obs(header(DATE_OBS=value)) == expected


def test_date_with_time_obs():
    h = header(DATE_OBS="2024-03-15", TIME_OBS="03:04:05.25")
    assert parse_date_obs(h) == datetime(2024, 3, 15, 3, 4, 5, 250000)
    assert date_obs_source(h) == "DATE-OBS+TIME-OBS"


def test_old_fits_day_month_year_with_ut():
    h = header(DATE_OBS="28/03/93", UT="07:18:51")
    assert parse_date_obs(h) == datetime(1993, 3, 28, 7, 18, 51)


def test_date_only_is_midnight_and_says_so():
    h = header(DATE_OBS="2024-03-15")
    assert parse_date_obs(h) == datetime(2024, 3, 15)
    assert date_obs_source(h) == "DATE-OBS (date only)"


def test_absent_date_is_none_and_fallbacks():
    assert parse_date_obs(header(OBJECT="M 31")) is None
    assert date_obs_source(header()) == "none"
    assert parse_date_obs(header(DATE_BEG="2024-03-15T01:00:00")) == datetime(2024, 3, 15, 1)
    assert parse_date_obs(header(MJD_OBS=60384.5)) == datetime(2024, 3, 15, 12)


@pytest.mark.parametrize(
    "cards",
    [
        {"DATE_OBS": "yesterday"},
        {"DATE_OBS": "2024-13-01T00:00:00"},
        {"DATE_OBS": "2024-02-30T00:00:00"},
        {"DATE_OBS": "2024-03-15T25:00:00"},
        {"DATE_OBS": "31/02/93"},
        {"DATE_OBS": 2024.5},
        {"DATE_OBS": "2024-03-15", "TIME_OBS": "noon"},
        {"MJD_OBS": "soon"},
    ],
)
def test_unparsable_dates_are_bad_header_values(cards):
    with pytest.raises(FrameError) as info:
        parse_date_obs(header(**cards))
    assert info.value.reason == "bad_header_value"
    assert str(list(cards.values())[-1]) in info.value.message


def test_night_in_utc_is_noon_to_noon():
    assert observing_night(datetime(2024, 3, 15, 11, 59)) == "2024-03-14"
    assert observing_night(datetime(2024, 3, 15, 12, 0)) == "2024-03-15"
    assert observing_night(datetime(2024, 3, 15, 23, 0)) == "2024-03-15"


def test_night_in_chile_by_timezone():
    # 03:00 UTC is 23:00 the evening before in Santiago (UTC-4 in June): that evening's night
    assert observing_night(datetime(2024, 6, 15, 3, 0), timezone="America/Santiago") == "2024-06-14"
    # 13:00 UTC is 09:00 local: still the night that began on the 14th (UTC alone would say the 15th)
    assert observing_night(datetime(2024, 6, 15, 13, 0), timezone="America/Santiago") == "2024-06-14"
    assert observing_night(datetime(2024, 6, 15, 13, 0)) == "2024-06-15"


def test_night_east_of_greenwich():
    # 09:00 UTC is 19:00 in Sydney: the evening of the 15th, which UTC noon-to-noon would put on the 14th
    assert observing_night(datetime(2024, 6, 15, 9, 0), timezone="Australia/Sydney") == "2024-06-15"
    assert observing_night(datetime(2024, 6, 15, 9, 0)) == "2024-06-14"


def test_night_by_longitude_and_timezone_wins():
    when = datetime(2024, 6, 15, 13, 0)
    assert observing_night(when, longitude=-70.7) == "2024-06-14"  # local mean time 08:17
    assert observing_night(when, longitude=289.3) == "2024-06-14"  # the same meridian counted 0..360
    assert observing_night(when, longitude=151.2) == "2024-06-15"  # local mean time 23:05
    assert observing_night(when, longitude=151.2, timezone="America/Santiago") == "2024-06-14"


def test_night_across_daylight_saving_change():
    # Europe/Berlin: clocks go forward at 01:00 UTC on 2024-03-31; 10:30 UTC is 12:30 local (CEST)
    assert observing_night(datetime(2024, 3, 31, 10, 30), timezone="Europe/Berlin") == "2024-03-31"
    assert observing_night(datetime(2024, 3, 30, 11, 30), timezone="Europe/Berlin") == "2024-03-30"


def test_aware_datetimes_are_converted_and_bad_zone_refused():
    aware = datetime(2024, 6, 15, 23, 0, tzinfo=timezone(timedelta(hours=-4)))  # 03:00 UTC on the 16th
    assert observing_night(aware) == "2024-06-15"
    assert observing_night(datetime(2024, 6, 16, 3, 0, tzinfo=UTC)) == "2024-06-15"
    with pytest.raises(ValueError):
        observing_night(datetime(2024, 6, 15), timezone="Mars/Olympus_Mons")
