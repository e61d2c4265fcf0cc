"""The daemon's configuration: TOML in, a validated, typed ``Config`` out, or one clear error naming the key.

The defaults here are the ones documented in ``config/nightshift.toml`` (a test keeps the two equal).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from nightshift.service.cfa import PATTERNS
from nightshift.service.frame import KINDS
from nightshift.service.grade import RejectRules

__all__ = ["ALWAYS_MATCHED", "DEFAULT_INCLUDE", "SETUP_KEYS", "Config", "ConfigError", "load_config", "parse_listen"]


_SECTION = re.compile(r"^\[\s*\d+\s*:\s*\d+\s*,\s*\d+\s*:\s*\d+\s*\]$")
_KEYWORD = re.compile(r"^[A-Z][A-Z0-9_-]{0,7}$")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what was expected."""


#: File names taken by default: FITS under its usual names, tile- and gzip-compressed FITS, XISF.
DEFAULT_INCLUDE = [
    "*.fits",
    "*.fit",
    "*.fts",
    "*.fits.fz",
    "*.fit.fz",
    "*.fz",
    "*.fits.gz",
    "*.fit.gz",
    "*.fts.gz",
    "*.xisf",
]


@dataclass
class WatchConfig:
    paths: list[str] = field(default_factory=lambda: ["/srv/camera"])
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: ["*.tmp", "*.part", ".*", "*~"])
    quiet_seconds: float = 2.0
    incomplete_timeout_seconds: float = 600.0
    observer: str = "native"
    poll_interval_seconds: float = 1.0
    rescan_interval_seconds: float = 300.0


@dataclass
class ArchiveConfig:
    path: str = "/var/lib/nightshift"
    min_free_mb: float = 2048


@dataclass
class SiteConfig:
    timezone: str = ""
    longitude: float | None = None


@dataclass
class ClassifyConfig:
    synonyms: dict[str, str] = field(default_factory=dict)
    filter_aliases: dict[str, str] = field(default_factory=dict)
    overrides: list[dict[str, str]] = field(default_factory=list)
    untyped_lights: bool = True
    filter_case: str = "ignore"
    bayer_pattern: dict[str, str] = field(default_factory=dict)


#: ``[calibration] match_keys`` by default: what makes a dark or a flat fit a light of the same camera.
DEFAULT_MATCH_KEYS = ("camera", "xbin", "ybin", "gain", "offset", "readout_mode", "naxis1", "naxis2")


@dataclass
class CalibrationConfig:
    min_frames: dict[str, int] = field(default_factory=lambda: {"bias": 3, "dark": 3, "flat": 3, "darkflat": 3})
    set_quiet_seconds: float = 120.0
    match_keys: list[str] = field(default_factory=lambda: list(DEFAULT_MATCH_KEYS))
    temp_tolerance: float = 2.0
    max_age_days: dict[str, float] = field(
        default_factory=lambda: {"bias": 180, "dark": 90, "flat": 30, "darkflat": 30}
    )
    dark_method: str = "median"
    flat_method: str = "average"
    sigma: float = 3.0
    mem_limit_mb: float = 512
    overscan: str = "auto"
    trim: str = "auto"
    saturation: float = 65535.0
    cosmic_rays: bool = False
    hot_sigma: float = 8.0
    flat_low: float = 0.5
    flat_high: float = 1.5


@dataclass
class GradingConfig(RejectRules):
    """The rejection rules (``nightshift.service.grade.RejectRules``) plus the star detection threshold."""

    detect_threshold: float = 5.0


@dataclass
class StackingConfig:
    sigma: float = 3.0
    final_after_seconds: float = 1800.0
    mem_limit_mb: float = 512
    interpolation: str = "lanczos"
    colour_interpolation: str = "cubic"


@dataclass
class ProcessingConfig:
    workers: int = 1
    dask: str = ""


@dataclass
class ReportConfig:
    interval_seconds: float = 300.0


@dataclass
class MetricsConfig:
    listen: str = "127.0.0.1:9810"


@dataclass
class LoggingConfig:
    level: str = "info"
    format: str = "text"


@dataclass
class Config:
    watch: WatchConfig = field(default_factory=WatchConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    grading: GradingConfig = field(default_factory=GradingConfig)
    stacking: StackingConfig = field(default_factory=StackingConfig)
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "defaults"  # where it was read from, for messages

    @property
    def archive_path(self) -> Path:
        return Path(self.archive.path)


#: Archive columns a calibration can be matched on (``[calibration] match_keys`` picks from these).
SETUP_KEYS = (
    *DEFAULT_MATCH_KEYS,
    "telescope",
    "bayerpat",
    "readout",
    "naxis3",
    "roworder",
    "cfa",
)
#: Keys every calibration matches on, whatever ``match_keys`` says: the readout (overscan subtracted or not,
#: the region kept and so the shape) must be the light's, or the masters would not even fit it.
ALWAYS_MATCHED = ("readout",)


def _expect(key: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"config key {key}: expected {what}, got {value!r}")


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against a dataclass field's type hint; ints are accepted where floats are expected."""
    text = str(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise _expect(key, "true or false", value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expect(key, "a whole number", value)
        return value
    if hint is float or text == "float | None":
        if value is None and text == "float | None":
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(float(value)):
            raise _expect(key, "a number", value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _expect(key, "a string", value)
        return value
    if text.startswith("list[str]"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _expect(key, "a list of strings", value)
        return list(value)
    if text.startswith("list[dict"):
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise _expect(key, 'a list of tables like { glob = "*/Bias/*", kind = "bias" }', value)
        return [dict(v) for v in value]
    if text.startswith("dict[str, str]"):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _expect(key, "a table of strings", value)
        return dict(value)
    if text.startswith("dict[str, int]") or text.startswith("dict[str, float]"):
        num = int if "int]" in text else float
        if not isinstance(value, dict):
            raise _expect(key, "a table of numbers", value)
        out = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or (num is int and not isinstance(v, int)):
                raise _expect(f"{key}.{k}", "a whole number" if num is int else "a number", v)
            out[k] = num(v)
        return out
    raise _expect(key, text, value)  # pragma: no cover - a field type this loader does not know


def _fill(section_name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise _expect(f"[{section_name}]", "a table", raw)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"config key [{section_name}] {unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    obj = cls()
    for name, value in raw.items():
        setattr(obj, name, _coerce(f"[{section_name}] {name}", hints[name], value))
    return obj


def _validate(cfg: Config) -> None:
    w = cfg.watch
    if not w.paths:
        raise ConfigError("config key [watch] paths: expected at least one folder to watch")
    if w.observer not in ("native", "polling"):
        raise _expect("[watch] observer", '"native" or "polling"', w.observer)
    for key in (
        "quiet_seconds",
        "incomplete_timeout_seconds",
        "poll_interval_seconds",
        "rescan_interval_seconds",
    ):
        if getattr(w, key) < 0:
            raise _expect(f"[watch] {key}", "a number >= 0", getattr(w, key))
    if w.incomplete_timeout_seconds <= w.quiet_seconds:
        raise _expect(
            "[watch] incomplete_timeout_seconds",
            f"more than quiet_seconds ({w.quiet_seconds:g})",
            w.incomplete_timeout_seconds,
        )
    if w.poll_interval_seconds <= 0:
        raise _expect("[watch] poll_interval_seconds", "a number > 0", w.poll_interval_seconds)
    if cfg.archive.min_free_mb < 0:
        raise _expect("[archive] min_free_mb", "a number >= 0", cfg.archive.min_free_mb)
    if cfg.site.timezone:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(cfg.site.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise _expect(
                "[site] timezone", 'an IANA time zone such as "America/Santiago"', cfg.site.timezone
            ) from None
    if cfg.site.longitude is not None and not -180 <= cfg.site.longitude <= 360:
        raise _expect("[site] longitude", "degrees east between -180 and 360", cfg.site.longitude)
    for word, kind in cfg.classify.synonyms.items():
        if kind not in KINDS:
            raise _expect(f"[classify] synonyms.{word}", f"one of {', '.join(KINDS)}", kind)
    for camera, pattern in cfg.classify.bayer_pattern.items():
        if str(pattern).strip().upper() not in (*PATTERNS, "MONO"):
            raise _expect(f"[classify] bayer_pattern.{camera}", f"one of {', '.join(PATTERNS)} or mono", pattern)
    for i, rule in enumerate(cfg.classify.overrides):
        if set(rule) != {"glob", "kind"} or rule["kind"] not in KINDS:
            raise _expect(f"[classify] overrides[{i}]", f'{{ glob = "...", kind = one of {", ".join(KINDS)} }}', rule)
    if cfg.classify.filter_case not in ("ignore", "keep"):
        raise _expect("[classify] filter_case", '"ignore" (V and v are one filter) or "keep"', cfg.classify.filter_case)
    c = cfg.calibration
    for key in ("overscan", "trim"):
        value = getattr(c, key).strip()
        if value.lower() in ("auto", "off", "") or _SECTION.match(value) or _KEYWORD.match(value.upper()):
            continue
        what = '"auto", "off", a section "[x1:x2,y1:y2]" or a header keyword such as "BIASSEC"'
        raise _expect(f"[calibration] {key}", what, value)
    for kind in c.min_frames:
        if kind not in ("bias", "dark", "flat", "darkflat"):
            raise _expect(f"[calibration] min_frames.{kind}", "one of bias, dark, flat, darkflat", kind)
        if c.min_frames[kind] < 1:
            raise _expect(f"[calibration] min_frames.{kind}", "at least 1", c.min_frames[kind])
    for kind in c.max_age_days:
        if kind not in ("bias", "dark", "flat", "darkflat"):
            raise _expect(f"[calibration] max_age_days.{kind}", "one of bias, dark, flat, darkflat", kind)
    bad = [k for k in c.match_keys if k not in SETUP_KEYS]
    if bad:
        raise _expect("[calibration] match_keys", f"names from {', '.join(sorted(SETUP_KEYS))}", bad[0])
    if c.dark_method not in ("median", "average"):
        raise _expect("[calibration] dark_method", '"median" or "average"', c.dark_method)
    if c.flat_method not in ("median", "average"):
        raise _expect("[calibration] flat_method", '"median" or "average"', c.flat_method)
    for key in ("sigma", "mem_limit_mb", "temp_tolerance", "saturation", "hot_sigma"):
        if getattr(c, key) <= 0:
            raise _expect(f"[calibration] {key}", "a number > 0", getattr(c, key))
    if cfg.stacking.sigma <= 0 or cfg.stacking.mem_limit_mb <= 0:
        raise _expect("[stacking] sigma / mem_limit_mb", "numbers > 0", (cfg.stacking.sigma, cfg.stacking.mem_limit_mb))
    for key in ("interpolation", "colour_interpolation"):
        if getattr(cfg.stacking, key) not in ("lanczos", "cubic"):
            raise _expect(f"[stacking] {key}", '"lanczos" or "cubic"', getattr(cfg.stacking, key))
    if not 1 <= cfg.processing.workers <= 64:
        raise _expect("[processing] workers", "a whole number from 1 to 64", cfg.processing.workers)
    if cfg.report.interval_seconds < 0:
        raise _expect("[report] interval_seconds", "a number >= 0", cfg.report.interval_seconds)
    if cfg.processing.dask:
        from nightshift.daemon.executor import parse_dask_address

        try:
            parse_dask_address(cfg.processing.dask)
        except ValueError:
            raise _expect(
                "[processing] dask", '"", "local:N" or a scheduler address like "tcp://host:8786"', cfg.processing.dask
            ) from None
    parse_listen(cfg.metrics.listen)
    if cfg.logging.level.lower() not in ("debug", "info", "warning", "error"):
        raise _expect("[logging] level", "debug, info, warning or error", cfg.logging.level)
    if cfg.logging.format not in ("text", "json"):
        raise _expect("[logging] format", '"text" or "json"', cfg.logging.format)


def parse_listen(listen: str) -> tuple[str, int] | None:
    """``"host:port"`` -> (host, port); ``"off"`` or port 0 -> None (metrics disabled)."""
    text = listen.strip()
    if text.lower() in ("off", "", "0"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _expect("[metrics] listen", '"HOST:PORT" (e.g. "127.0.0.1:9810") or "off"', listen)
    if int(port) == 0:
        return None
    return (host.strip("[]") or "127.0.0.1", int(port))


def config_from_dict(raw: dict[str, Any], *, source: str = "<dict>") -> Config:
    """Build and validate a Config from a parsed TOML document."""
    cfg = Config(source=source)
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"config key [{name}]: unknown section (known: {', '.join(sections)})")
        setattr(cfg, name, _fill(name, type(getattr(cfg, name)), value))
    _validate(cfg)
    return cfg


def load_config(path: Path | None, *, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read ``path`` (None = built-in defaults), apply ``overrides`` ({section: {key: value}}), validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot read it ({exc.strerror or exc})") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
        source = str(path)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise _expect(f"[{section}]", "a table", raw[section])
        raw[section].update(values)
    return config_from_dict(raw, source=source)
