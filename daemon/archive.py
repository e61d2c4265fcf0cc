"""The SQLite archive: schema, migrations, and the small functions that read and write its rows.

The tables ``frames``, ``masters``, ``master_frames``, ``stacks``, ``stack_frames`` and ``events`` are a public
contract (README, "The archive"). Change them only with a new migration below and a note in the README.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

__all__ = [
    "DB_NAME",
    "FRAME_STATUSES",
    "GOOD_STATUSES",
    "Archive",
    "now_iso",
]

DB_NAME = "nightshift.db"

#: frames.status vocabulary. Rows in a status outside GOOD_STATUSES always carry a non-empty reason.
FRAME_STATUSES = {
    "ingested": "classified and recorded; a calibration frame waiting for its set to complete, or a light queued",
    "used": "a calibration frame combined into a master (see master_frames)",
    "pending": "a light waiting for a master (reason says which)",
    "calibrated": "a light calibrated (calibrated_path), waiting to be graded and stacked",
    "stacked": "a light graded, aligned and in its stack (see stack_frames)",
    "rejected": "a light kept out of the stack by grading or alignment (reason says why)",
    "quarantined": "bad input kept aside (reason says why); the raw file is untouched",
    "ignored": "neither imaging calibration nor science (focus, test, pointing, arc, comparison): set aside "
    "unprocessed (reason says which)",
    "duplicate": "the same content as another frame (reason names it)",
}
GOOD_STATUSES = ("ingested", "used", "calibrated", "stacked")

migrations = Migrations("nightshift")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["frames"].create(
        {
            "id": int,
            "path": str,
            "sha256": str,
            "size_bytes": int,
            "mtime": float,
            "kind": str,
            "object": str,
            "filter": str,
            "exptime": float,
            "date_obs": str,
            "night": str,
            "naxis1": int,
            "naxis2": int,
            "dtype": str,
            "xbin": int,
            "ybin": int,
            "ccd_temp": float,
            "set_temp": float,
            "gain": float,
            "offset": float,
            "readout_mode": str,
            "camera": str,
            "telescope": str,
            "bayerpat": str,
            "dialect": str,
            "status": str,
            "reason": str,
            "duplicate_of": int,
            "calibrated_path": str,
            "aligned_path": str,
            "preview_path": str,
            "bias_id": int,
            "dark_id": int,
            "flat_id": int,
            "dark_scale": float,
            "calibration_note": str,
            "background": float,
            "background_rms": float,
            "n_stars": int,
            "fwhm": float,
            "elongation": float,
            "transparency": float,
            "align_rms": float,
            "rotation_deg": float,
            "stack_id": int,
            "tries": int,
            "first_seen": str,
            "updated_at": str,
        },
        pk="id",
        not_null={"path", "status"},
        defaults={"tries": 0},
    )
    db["frames"].create_index(["path"], unique=True)
    db["frames"].create_index(["sha256"])
    db["frames"].create_index(["status", "kind"])
    db["frames"].create_index(["night", "object", "filter", "exptime"])
    db["masters"].create(
        {
            "id": int,
            "kind": str,
            "path": str,
            "sha256": str,
            "mask_path": str,
            "n_frames": int,
            "set_key": str,
            "version": int,
            "superseded_by": int,
            "night": str,
            "date_obs": str,
            "camera": str,
            "xbin": int,
            "ybin": int,
            "gain": float,
            "offset": float,
            "readout_mode": str,
            "naxis1": int,
            "naxis2": int,
            "telescope": str,
            "bayerpat": str,
            "set_temp": float,
            "ccd_temp": float,
            "filter": str,
            "exptime": float,
            "method": str,
            "bias_subtracted": int,
            "bias_id": int,
            "dark_id": int,
            "note": str,
            "created_at": str,
        },
        pk="id",
        not_null={"kind", "path"},
    )
    db["masters"].create_index(["path"], unique=True)
    db["masters"].create_index(["kind", "set_key"])
    db["master_frames"].create(
        {"master_id": int, "frame_id": int},
        pk=("master_id", "frame_id"),
        foreign_keys=[("master_id", "masters", "id"), ("frame_id", "frames", "id")],
    )
    db["stacks"].create(
        {
            "id": int,
            "object": str,
            "filter": str,
            "exptime": float,
            "night": str,
            "path": str,
            "preview_path": str,
            "n_frames": int,
            "total_exptime": float,
            "reference_frame_id": int,
            "state": str,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
    )
    db["stacks"].create_index(["night", "object", "filter", "exptime"], unique=True)
    db["stack_frames"].create(
        {"stack_id": int, "frame_id": int},
        pk=("stack_id", "frame_id"),
        foreign_keys=[("stack_id", "stacks", "id"), ("frame_id", "frames", "id")],
    )
    db["events"].create(
        {
            "id": int,
            "at": str,
            "frame_id": int,
            "master_id": int,
            "stack_id": int,
            "stage": str,
            "decision": str,
            "detail": str,
        },
        pk="id",
    )
    db["events"].create_index(["frame_id"])
    db["frame_sources"].create({"frame_id": int, "stars": str}, pk="frame_id")


@migrations()
def m002_alignment(db: sqlite_utils.Database) -> None:
    """How each light was aligned: stars matched, onto which reference, and the transform itself (JSON), so a
    change of reference composes transforms instead of matching stars again."""
    db["frames"].add_column("align_n", int)
    db["frames"].add_column("align_ref_id", int)
    db["frames"].add_column("align_transform", str)


@migrations()
def m003_observatory(db: sqlite_utils.Database) -> None:
    """Frames from observatories: where the time came from, the readout (overscan and region kept), and what
    reading the header decided; masters record their readout, which a light's must equal."""
    db["frames"].add_column("date_source", str)
    db["frames"].add_column("readout", str)
    db["frames"].add_column("header_note", str)
    db["masters"].add_column("readout", str)
    # before this migration, no frame had its overscan subtracted by default: every row was read as it was
    db.execute("UPDATE frames SET readout = 'raw' WHERE kind IS NOT NULL")
    db.execute("UPDATE masters SET readout = 'raw'")


@migrations()
def m004_colour(db: sqlite_utils.Database) -> None:
    """Colour cameras: a frame's and a master's colour layout, so a flat is only chosen for lights of its own.

    ``naxis3`` (3 for a debayered colour cube, NULL for a 2-D frame), ``roworder`` (ROWORDER as stated) and
    ``cfa`` (the Bayer pattern at the first stored pixel, NULL when not a mosaic) on ``frames`` and ``masters``.
    """
    for table in ("frames", "masters"):
        db[table].add_column("naxis3", int)
        db[table].add_column("roworder", str)
        db[table].add_column("cfa", str)


@migrations()
def m005_stack_setup(db: sqlite_utils.Database) -> None:
    """A stack per camera setup: lights of one object, filter and exposure taken by two cameras (a dual rig), two
    binnings or a mono and a colour camera have different pixels and never share a stack or a reference.

    ``camera``, ``xbin``, ``ybin`` and ``planes`` (1 mono, 3 colour) on ``stacks``, filled for existing stacks
    from their reference frame; the unique group becomes (night, object, filter, exposure, setup).
    """
    for column, kind in (("camera", str), ("xbin", int), ("ybin", int), ("planes", int)):
        db["stacks"].add_column(column, kind)
    db.execute(
        "UPDATE stacks SET camera = (SELECT camera FROM frames f WHERE f.id = stacks.reference_frame_id), "
        "xbin = (SELECT xbin FROM frames f WHERE f.id = stacks.reference_frame_id), "
        "ybin = (SELECT ybin FROM frames f WHERE f.id = stacks.reference_frame_id), "
        "planes = (SELECT CASE WHEN f.cfa IS NOT NULL OR f.naxis3 IS NOT NULL THEN 3 ELSE 1 END FROM frames f "
        "WHERE f.id = stacks.reference_frame_id)"
    )
    for index in db["stacks"].indexes:
        if index.unique and set(index.columns) == {"night", "object", "filter", "exptime"}:
            db.execute(f'DROP INDEX "{index.name}"')
    db.execute(
        "CREATE UNIQUE INDEX idx_stacks_group_setup ON stacks (night, object, filter, exptime, "
        "COALESCE(camera, ''), COALESCE(xbin, 1), COALESCE(ybin, 1), COALESCE(planes, 1))"
    )


def now_iso() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds")


class Archive:
    """One archive folder: ``<root>/nightshift.db`` and the product folders beside it."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = Path(root).absolute()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not (self.root / DB_NAME).exists():
            raise FileNotFoundError(f"no archive at {self.root} (no {DB_NAME}); run the daemon or reduce first")
        conn = sqlite3.connect(self.root / DB_NAME, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=30000")
        if create:
            migrations.apply(self.db)

    # -- housekeeping -------------------------------------------------------------------------------------------
    def close(self) -> None:
        with suppress(sqlite3.Error):
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.conn.close()

    @property
    def schema_version(self) -> int:
        return len(migrations.applied(self.db))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All statements inside happen together or not at all (use ``put``/``execute`` inside, not sqlite-utils
        table methods, which commit on their own)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def put(self, table: str, row: dict[str, Any], *, conflict: str = "") -> int:
        """INSERT ``row`` (``conflict`` e.g. "OR REPLACE" / "OR IGNORE"); returns the rowid. Transaction-safe."""
        cols = list(row)
        sql = f"INSERT {conflict} INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        cur = self.db.execute(sql, [row[c] for c in cols])
        return int(cur.lastrowid or 0)

    def execute(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, params)

    def query(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def one(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> Any:
        row = self.db.execute(sql, params).fetchone()
        return row[0] if row else None

    # -- frames -------------------------------------------------------------------------------------------------
    def frame(self, frame_id: int) -> dict[str, Any]:
        return self.db["frames"].get(frame_id)

    def frame_by_path(self, path: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM frames WHERE path = ?", [path])

    def frame_by_sha(self, sha256: str, *, exclude_path: str) -> dict[str, Any] | None:
        return self.one(
            "SELECT * FROM frames WHERE sha256 = ? AND path != ? AND status != 'duplicate' ORDER BY id LIMIT 1",
            [sha256, exclude_path],
        )

    def known(self, path: str, size: int, mtime: float) -> bool:
        """True when ``path`` is recorded with this size and mtime (so a rescan need not offer it again)."""
        row = self.db.execute("SELECT size_bytes, mtime FROM frames WHERE path = ?", [path]).fetchone()
        return row is not None and row[0] == size and row[1] is not None and abs(row[1] - mtime) < 1e-3

    def record_frame(self, row: dict[str, Any]) -> int:
        """Insert or update the row for ``row['path']`` (a real upsert on the unique path); returns its id."""
        row = dict(row)
        now = now_iso()
        row["updated_at"] = now
        existing = self.db.execute("SELECT first_seen FROM frames WHERE path = ?", [row["path"]]).fetchone()
        row.setdefault("first_seen", existing[0] if existing else now)
        row.pop("id", None)
        self.db["frames"].upsert(row, pk="path")
        return int(self.scalar("SELECT id FROM frames WHERE path = ?", [row["path"]]))

    def update_frame(self, frame_id: int, **values: Any) -> None:
        values["updated_at"] = now_iso()
        if values.get("status") in GOOD_STATUSES and "reason" not in values:
            values["reason"] = None
        self.db["frames"].update(frame_id, values)

    def set_status(self, frame_id: int, status: str, reason: str | None = None, **values: Any) -> None:
        if status not in FRAME_STATUSES:
            raise ValueError(f"unknown frame status {status!r}")
        if status not in GOOD_STATUSES and not reason:
            raise ValueError(f"status {status!r} needs a reason")
        self.update_frame(frame_id, status=status, reason=reason, **values)

    # -- events -------------------------------------------------------------------------------------------------
    def event(
        self,
        stage: str,
        decision: str,
        detail: str = "",
        *,
        frame_id: int | None = None,
        master_id: int | None = None,
        stack_id: int | None = None,
    ) -> None:
        self.db["events"].insert(
            {
                "at": now_iso(),
                "frame_id": frame_id,
                "master_id": master_id,
                "stack_id": stack_id,
                "stage": stage,
                "decision": decision,
                "detail": detail,
            }
        )

    # -- sources (star lists, so a frame is searched for stars once) ---------------------------------------------
    def save_sources(self, frame_id: int, stars: dict[str, Any]) -> None:
        self.db["frame_sources"].upsert({"frame_id": frame_id, "stars": json.dumps(stars)}, pk="frame_id")

    def load_sources(self, frame_id: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT stars FROM frame_sources WHERE frame_id = ?", [frame_id]).fetchone()
        return json.loads(row[0]) if row else None

    # -- summaries ----------------------------------------------------------------------------------------------
    def counts(self, night: str | None = None) -> dict[str, dict[str, int]]:
        """{kind: {status: n}} over all frames (or one night); unclassified frames count under kind '-'."""
        where, params = ("WHERE night = ?", [night]) if night else ("", [])
        out: dict[str, dict[str, int]] = {}
        for r in self.query(
            f"SELECT COALESCE(kind, '-') AS kind, status, COUNT(*) AS n FROM frames {where} GROUP BY 1, 2",
            params,
        ):
            out.setdefault(r["kind"], {})[r["status"]] = r["n"]
        return out
