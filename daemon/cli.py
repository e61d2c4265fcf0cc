"""The ``nightshift`` command line: a public contract (README, "Command line").

Exit codes: 0 ok, 2 usage or configuration error, 1 failure, 141 (128 + SIGPIPE) when the reader of the output went
away (``nightshift frames | head``): the command stops quietly, as Unix tools do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nightshift.daemon.config import Config, ConfigError, load_config
from nightshift.daemon.executor import Executor, ExecutorError
from nightshift.daemon.storagecheck import SharedStorageError
from nightshift.service.simulate import DIALECTS, OBSERVATORY, TIME_CONVENTIONS

__all__ = ["main"]

log = logging.getLogger("nightshift")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PIPE = 0, 1, 2, 141


def _common(parser: argparse.ArgumentParser, *, archive: bool = True) -> None:
    parser.add_argument("--config", type=Path, help="TOML configuration file (default: built-in defaults)")
    if archive:
        parser.add_argument("--archive", type=Path, help="archive folder (overrides [archive] path)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level")
    parser.add_argument("--log-format", choices=["text", "json"], help="log line format on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nightshift",
        description="Observatory daemon: watches the camera folder, builds masters, calibrates, grades, "
        "aligns and stacks, and records every decision in a SQLite archive.",
    )
    from nightshift.service import __version__

    parser.add_argument("--version", action="version", version=f"nightshift {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the daemon: watch folders and process frames as they arrive")
    _common(p)
    p.add_argument("--watch", type=Path, action="append", help="camera folder to watch (repeatable)")
    p.add_argument("--metrics", metavar="HOST:PORT", help='metrics endpoint, or "off" (overrides [metrics] listen)')

    p = sub.add_parser("reduce", help="run the whole pipeline over folders already on disk, then exit")
    _common(p)
    p.add_argument("folders", type=Path, nargs="+", metavar="FOLDER")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="files read, hashed, combined and calibrated at once (default: the number of cores)",
    )
    _dask_option(p)

    p = sub.add_parser("status", help="what the archive holds: counts, queue, last frame")
    _common(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("frames", help="list frames")
    _common(p)
    _listing(p)
    p.add_argument("--kind", choices=["bias", "dark", "flat", "light", "darkflat", "other"])
    p.add_argument("--status")

    p = sub.add_parser("quarantine", help="list quarantined files with their reasons")
    _common(p)
    _listing(p)

    p = sub.add_parser("masters", help="list master calibration frames")
    _common(p)
    _listing(p)

    p = sub.add_parser("stacks", help="list stacks")
    _common(p)
    _listing(p)

    p = sub.add_parser("reprocess", help="recalibrate lights with the current best masters")
    _common(p)
    p.add_argument("--night")
    p.add_argument("--object")
    p.add_argument("--frame", type=int, help="frame id")
    _dask_option(p)

    p = sub.add_parser("report", help="write the HTML page of a night")
    _common(p)
    p.add_argument("--night", help="observing night YYYY-MM-DD (default: the latest)")
    p.add_argument("--out", type=Path, help="output file (default: <archive>/reports/night-<night>.html)")
    p.add_argument(
        "--embed", action="store_true", help="one self-contained file with the pictures inside (for mailing)"
    )

    p = sub.add_parser("check-config", help="validate a configuration file and print the result")
    _common(p, archive=False)

    p = sub.add_parser("config", help="print a file shipped with nightshift: default configuration, units, alerts")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--print-default", action="store_true", help="the documented default configuration (TOML)")
    what.add_argument("--unit", choices=["nightshift.service", "nightshift@.service"], help="a systemd unit file")
    what.add_argument("--alerts", action="store_true", help="the Prometheus alert rules")
    what.add_argument("--alerts-test", action="store_true", help="the alert rules' promtool tests")
    what.add_argument("--dashboard", action="store_true", help="the Grafana dashboard (JSON)")

    p = sub.add_parser("simulate", help="write a simulated night of FITS files (for tests, demos, benchmarks)")
    p.add_argument("out", type=Path, metavar="OUT")
    _simulate_options(p)
    p.add_argument("--slow", action="store_true", help="write each file in chunks, like a slow camera")
    p.add_argument("--rename", action="store_true", help="write name.tmp, then rename")

    p = sub.add_parser("demo", help="run the daemon on a simulated night written live, then summarise")
    p.add_argument("--config", type=Path, help="base configuration (its folders and timings are set by the demo)")
    p.add_argument("--out", type=Path, default=Path("demo-night"), help="folder for camera/ and archive/")
    _simulate_options(p)
    p.add_argument("--metrics", metavar="HOST:PORT", default="off", help='metrics endpoint (default "off")')
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.add_argument("--log-format", choices=["text", "json"])
    return parser


def _dask_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="compute on a Dask cluster: a scheduler (tcp://host:8786) or local:N, N worker processes here; "
        "workers must see the folders and the archive at the same paths (overrides [processing] dask)",
    )


def _listing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--night")
    p.add_argument("--object")
    p.add_argument("--filter")
    p.add_argument("--limit", type=int, default=0, help="at most this many rows (0 = all)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def _simulate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=512, help="frame size in pixels (square)")
    p.add_argument("--lights", type=int, default=4, help="lights per object, filter and exposure")
    p.add_argument("--calibrations", type=int, default=5, help="bias frames, and darks/flats per set")
    p.add_argument("--order", choices=["natural", "lights-first", "shuffled"], default="natural")
    p.add_argument(
        "--dialect",
        choices=["mixed", *DIALECTS, OBSERVATORY],
        default="mixed",
        help="capture program's header words (observatory: OBSTYPE, date-only DATE-OBS with UTC-OBS, two filter "
        "wheels, CCDSUM, DETECTOR)",
    )
    p.add_argument("--broken", action="store_true", help="also write one file of each broken kind")
    p.add_argument("--no-flip", action="store_true", help="no meridian flip")
    p.add_argument("--cloudy", type=int, default=1, help="lights taken through cloud (in the largest group)")
    p.add_argument("--trailed", type=int, default=0, help="lights whose stars trail (the mount drifted)")
    p.add_argument("--stars", type=float, default=300.0, help="stars per 512 x 512 pixels (sparse fields: fewer)")
    p.add_argument("--faintest", type=float, default=8.0, help="faintest stars, ADU/s through V (below 8: deeper)")
    p.add_argument("--max-offset", type=float, default=4.0, help="pointing offset of a light, up to this many px")
    p.add_argument("--max-rotation", type=float, default=0.3, help="field rotation of a light, up to this many deg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--overscan",
        type=int,
        default=0,
        metavar="N",
        help="N overscan columns (and a prescan of N/3) declared in BIASSEC/TRIMSEC/DATASEC",
    )
    p.add_argument(
        "--bias-drift",
        type=float,
        metavar="ADU",
        help="how far the bias level drifts through the night (default 20 with --overscan, else 0)",
    )
    p.add_argument("--time-keys", choices=[t for t in TIME_CONVENTIONS if t], help="how the start time is written")
    p.add_argument("--untyped", choices=["lights", "all"], help="write no frame-type keyword on these frames")
    p.add_argument("--longitude", type=float, metavar="DEG", help="write the site's longitude (LONGITUD)")
    p.add_argument("--compress", choices=["fz", "gz", "zlib"], help="tile (.fits.fz) or gzip (.fits.gz); zlib: XISF")
    p.add_argument("--format", choices=["fits", "xisf"], default="fits", dest="file_format", help="file format")
    p.add_argument(
        "--bayer",
        choices=["RGGB", "GRBG", "GBRG", "BGGR"],
        help="a one-shot-colour camera with this Bayer pattern (no filter; BAYERPAT in the headers)",
    )
    p.add_argument(
        "--row-order",
        choices=["TOP-DOWN", "BOTTOM-UP"],
        default="TOP-DOWN",
        help="how the colour camera's files store rows (ROWORDER; default TOP-DOWN)",
    )
    p.add_argument(
        "--debayered", action="store_true", help="the capture program saves debayered 3-plane cubes (with --bayer)"
    )


def _config(args: argparse.Namespace, extra: dict[str, dict[str, Any]] | None = None) -> Config:
    overrides: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (extra or {}).items()}
    if getattr(args, "archive", None):
        overrides.setdefault("archive", {})["path"] = str(args.archive)
    if getattr(args, "watch", None):
        overrides.setdefault("watch", {})["paths"] = [str(p) for p in args.watch]
    if getattr(args, "log_level", None):
        overrides.setdefault("logging", {})["level"] = args.log_level
    if getattr(args, "log_format", None):
        overrides.setdefault("logging", {})["format"] = args.log_format
    if getattr(args, "dask", None):
        overrides.setdefault("processing", {})["dask"] = args.dask
    return load_config(args.config, overrides=overrides)


def _sim_config(args: argparse.Namespace) -> Any:
    from nightshift.service.simulate import SimConfig

    n = args.calibrations
    options = {
        "size": args.size,
        "n_bias": n,
        "n_dark": n,
        "n_flat": n,
        "n_light": args.lights,
        "order": args.order,
        "dialect": args.dialect,
        "broken": args.broken,
        "meridian_flip": not args.no_flip,
        "cloudy": args.cloudy,
        "trailed": args.trailed,
        "stars": args.stars,
        "faintest": args.faintest,
        "max_offset": args.max_offset,
        "max_rotation": args.max_rotation,
        "seed": args.seed,
        "overscan": args.overscan,
        "prescan": args.overscan // 3,
        "bias_drift": args.bias_drift if args.bias_drift is not None else (20.0 if args.overscan else 0.0),
        "time_keys": args.time_keys or "",
        "untyped": args.untyped or "",
        "longitude": args.longitude,
        "compress": args.compress or "",
        "file_format": args.file_format,
    }
    if args.bayer:
        from nightshift.service.simulate import COLOUR_CAMERA

        options.update(
            bayer=args.bayer, row_order=args.row_order, debayered=args.debayered, camera=COLOUR_CAMERA, filters=(None,)
        )
    elif args.debayered:
        raise ConfigError("--debayered needs --bayer (a colour camera)")
    try:
        return SimConfig(**options)
    except ValueError as exc:
        raise ConfigError(f"simulate: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``nightshift`` command; returns its exit code."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # what is still buffered meets a reader that went away here, not at interpreter exit
    except BrokenPipeError:
        return _reader_gone()
    return code


def _reader_gone() -> int:
    """The reader of our output went away: send what is left to /dev/null (so the flush at exit is quiet too)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (captured in-process): nothing will be flushed to it
        pass
    return EXIT_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from nightshift.daemon.logs import setup_logging

    try:
        if args.command == "simulate":
            setup_logging("info")
            return _cmd_simulate(args)
        if args.command == "demo":
            setup_logging(args.log_level, args.log_format or "text")
            from nightshift.daemon.demo import run_demo

            return run_demo(args.out, _sim_config(args), config_path=args.config, metrics=args.metrics)
        if args.command == "config":
            return _cmd_config(args)
        config = _config(args)
        setup_logging(config.logging.level, config.logging.format)
        handler = {
            "run": _cmd_run,
            "reduce": _cmd_reduce,
            "status": _cmd_status,
            "frames": _cmd_frames,
            "quarantine": _cmd_frames,
            "masters": _cmd_frames,
            "stacks": _cmd_frames,
            "reprocess": _cmd_reprocess,
            "report": _cmd_report,
            "check-config": _cmd_check_config,
        }[args.command]
        return handler(args, config)
    except ConfigError as exc:
        print(f"nightshift: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"nightshift: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (ExecutorError, SharedStorageError) as exc:
        print(f"nightshift: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:
        raise  # the reader went away: main stops quietly
    except Exception as exc:
        log.exception("nightshift %s failed", args.command)
        print(f"nightshift: {args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


# -- commands -------------------------------------------------------------------------------------------------------
def _cmd_config(args: argparse.Namespace) -> int:
    from nightshift.daemon.shipped import shipped_text

    if args.print_default:
        name = "default"
    elif args.unit:
        name = args.unit
    elif args.alerts:
        name = "alerts"
    elif args.alerts_test:
        name = "alerts-test"
    else:
        name = "dashboard"
    sys.stdout.write(shipped_text(name))
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace, config: Config) -> int:
    print(f"configuration OK ({config.source})")
    print(f"  watch:   {', '.join(config.watch.paths)} ({config.watch.observer} observer)")
    print(f"  archive: {config.archive.path}")
    print(f"  metrics: {config.metrics.listen}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, config: Config) -> int:
    from nightshift.daemon.runner import Daemon

    for folder in config.watch.paths:
        if not Path(folder).is_dir():
            print(f"nightshift: watch folder {folder} does not exist or is not a folder", file=sys.stderr)
            return EXIT_USAGE
    overrides: dict[str, dict[str, Any]] = {}
    if args.archive:
        overrides["archive"] = {"path": str(args.archive)}
    if args.watch:
        overrides["watch"] = {"paths": [str(p) for p in args.watch]}
    daemon = Daemon(config, config_path=args.config, overrides=overrides, metrics_listen=args.metrics)
    daemon.install_signal_handlers()
    return daemon.run()


def _open(config: Config, *, create: bool = True, workers: int = 1, executor: Executor | None = None):
    from nightshift.daemon.archive import Archive
    from nightshift.daemon.pipeline import Pipeline

    archive = Archive(config.archive_path, create=create)
    return archive, Pipeline(config, archive, workers=workers, executor=executor)


def _dask(config: Config) -> Executor | None:
    """The Dask cluster of ``[processing] dask`` (``--dask``), connected, said on stderr; None: local threads."""
    if not config.processing.dask:
        return None
    from nightshift.daemon.executor import DaskExecutor

    executor = DaskExecutor.connect(config.processing.dask)
    print(f"[dask] {executor.describe()}", file=sys.stderr, flush=True)
    return executor


def _print_summary(summary: dict[str, Any]) -> None:
    from nightshift.daemon.summary import summary_lines

    print("\n".join(summary_lines(summary)))


def _cmd_reduce(args: argparse.Namespace, config: Config) -> int:
    from nightshift.daemon.batch import reduce_folders

    executor = _dask(config)
    try:
        archive, pipeline = _open(config, workers=max(1, args.workers), executor=executor)
        try:
            summary = reduce_folders(pipeline, [f.absolute() for f in args.folders], show_progress=not args.json)
        finally:
            pipeline.close()
            archive.close()
    finally:
        if executor is not None:
            executor.close()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(f"reduced {summary['files']} file(s) in {summary['seconds']['total']:.1f} s into {config.archive.path}")
        _print_summary(summary)
        for night, path in summary["reports"].items():
            print(f"report of night {night}: {path}")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace, config: Config) -> int:
    archive, pipeline = _open(config, create=False)
    try:
        summary = pipeline.summary()
        last = archive.one("SELECT path, kind, status, night, updated_at FROM frames ORDER BY id DESC LIMIT 1")
        summary.update(
            archive=str(config.archive_path),
            schema_version=archive.schema_version,
            queue_depth=pipeline.queue_depth(),
            lights_pending=archive.scalar("SELECT COUNT(*) FROM frames WHERE status = 'pending'"),
            quarantined=archive.scalar("SELECT COUNT(*) FROM frames WHERE status = 'quarantined'"),
            last_frame=last,
        )
    finally:
        archive.close()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    print(f"archive {summary['archive']} (schema v{summary['schema_version']})")
    print(
        f"queue depth {summary['queue_depth']}, lights pending {summary['lights_pending']}, "
        f"quarantined {summary['quarantined']}"
    )
    if last:
        print(
            f"last frame: {last['path']} ({last['kind']}, {last['status']}, night {last['night']}, "
            f"{last['updated_at']})"
        )
    _print_summary(summary)
    return EXIT_OK


_LISTINGS = {
    "frames": ("frames", ["id", "night", "kind", "object", "filter", "exptime", "status", "reason", "path"]),
    "quarantine": ("frames", ["id", "night", "reason", "path"]),
    "masters": (
        "masters",
        ["id", "night", "kind", "filter", "exptime", "n_frames", "version", "superseded_by", "path"],
    ),
    "stacks": ("stacks", ["id", "night", "object", "filter", "exptime", "camera", "n_frames", "state", "path"]),
}


def _cmd_frames(args: argparse.Namespace, config: Config) -> int:
    from nightshift.daemon.archive import Archive

    table, columns = _LISTINGS[args.command]
    where, params = [], []
    if args.command == "quarantine":
        where.append("status = 'quarantined'")
    for col in ("night", "object", "filter", "kind", "status"):
        value = getattr(args, col, None)
        if value is not None and (table != "masters" or col not in ("object",)):
            where.append(f"{col} = ?")
            params.append(value)
    sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id"
    if args.limit:
        sql += f" LIMIT {int(args.limit)}"
    archive = Archive(config.archive_path, create=False)
    try:
        rows = archive.query(sql, params)
    finally:
        archive.close()
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str))
        return EXIT_OK
    _table(rows, columns)
    return EXIT_OK


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:g}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [min(60, max([len(c)] + [len(row[i]) for row in cells])) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def _cmd_reprocess(args: argparse.Namespace, config: Config) -> int:
    from nightshift.daemon.batch import reprocess

    if not (args.night or args.object or args.frame is not None):
        print("nightshift: reprocess needs --night, --object or --frame", file=sys.stderr)
        return EXIT_USAGE
    executor = _dask(config)
    try:
        archive, pipeline = _open(config, create=False, executor=executor)
        try:
            n = reprocess(pipeline, night=args.night, obj=args.object, frame_id=args.frame)
            summary = pipeline.summary()
        finally:
            pipeline.close()
            archive.close()
    finally:
        if executor is not None:
            executor.close()
    print(f"reprocessed {n} light(s)")
    _print_summary(summary)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace, config: Config) -> int:
    from nightshift.daemon.report import write_report

    archive, _pipeline = _open(config, create=False)
    try:
        night = args.night or archive.scalar("SELECT MAX(night) FROM frames")
        if not night:
            print("nightshift: the archive has no frames yet", file=sys.stderr)
            return EXIT_FAILURE
        path = write_report(archive, night, out=args.out, embed=args.embed)
    finally:
        archive.close()
    print(path)
    return EXIT_OK


def _cmd_simulate(args: argparse.Namespace) -> int:
    from nightshift.service.simulate import simulate_night

    plan = simulate_night(args.out, _sim_config(args), slow=args.slow, rename=args.rename)
    counts = plan.counts()
    print(f"wrote {len(plan.frames)} files to {args.out}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
