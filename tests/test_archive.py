"""The archive on a real SQLite file: WAL, migrations recorded and not re-applied, upserts keyed on the path,
the status vocabulary enforced, and a reader beside a writer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from nightshift.daemon.archive import DB_NAME, FRAME_STATUSES, GOOD_STATUSES, Archive, migrations


def _row(path: str, **extra: object) -> dict:
    return {"path": path, "sha256": "ab" * 32, "kind": "bias", "status": "ingested", "night": "2026-11-25", **extra}


def test_a_new_archive_is_migrated_in_wal_mode(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    assert archive.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert archive.schema_version == len(migrations.applied(archive.db)) >= 1
    assert migrations.pending(archive.db) == []
    tables = set(archive.db.table_names())
    assert {"frames", "masters", "master_frames", "stacks", "stack_frames", "events"} <= tables
    archive.close()


def test_reopening_keeps_rows_and_applies_nothing_twice(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    fid = archive.record_frame(_row("/cam/a.fits"))
    version = archive.schema_version
    archive.close()
    again = Archive(tmp_path)
    assert again.schema_version == version
    applied = again.query("SELECT name FROM _sqlite_migrations")
    assert len(applied) == len({r["name"] for r in applied}) == version
    assert again.frame(fid)["path"] == "/cam/a.fits"
    again.close()


def test_record_frame_upserts_on_the_path(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    first = archive.record_frame(_row("/cam/a.fits"))
    seen = archive.frame(first)["first_seen"]
    second = archive.record_frame(_row("/cam/a.fits", kind="dark", exptime=30.0))
    assert first == second
    row = archive.frame(first)
    assert row["kind"] == "dark" and row["exptime"] == 30.0 and row["first_seen"] == seen
    assert archive.scalar("SELECT COUNT(*) FROM frames") == 1
    archive.close()


def test_status_vocabulary_and_reasons_are_enforced(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    fid = archive.record_frame(_row("/cam/a.fits"))
    for status in FRAME_STATUSES:
        if status not in GOOD_STATUSES:
            with pytest.raises(ValueError, match="needs a reason"):
                archive.set_status(fid, status)
    with pytest.raises(ValueError, match="unknown frame status"):
        archive.set_status(fid, "lost", "no")
    archive.set_status(fid, "pending", "no flat for filter V, binning 1x1")
    archive.set_status(fid, "calibrated")
    assert archive.frame(fid)["reason"] is None, "a good status clears the old reason"
    archive.close()


def test_a_transaction_is_all_or_nothing(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    with pytest.raises(RuntimeError), archive.transaction():
        archive.put("frames", _row("/cam/a.fits"))
        raise RuntimeError("crash in the middle")
    assert archive.scalar("SELECT COUNT(*) FROM frames") == 0
    archive.close()


def test_a_reader_sees_the_archive_while_the_daemon_writes(tmp_path: Path) -> None:
    writer = Archive(tmp_path)
    writer.record_frame(_row("/cam/a.fits"))
    reader = sqlite3.connect(f"file:{tmp_path / DB_NAME}?mode=ro", uri=True)
    with writer.transaction():
        writer.put("frames", _row("/cam/b.fits"))
        assert reader.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 1  # WAL: readers are not blocked
    assert reader.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 2
    reader.close()
    writer.close()


def test_opening_a_missing_archive_read_only_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no archive at"):
        Archive(tmp_path / "nowhere", create=False)


def test_an_archive_from_before_stack_setups_is_migrated_with_its_stacks_kept(tmp_path: Path) -> None:
    """m005_stack_setup on an archive made by the previous version: a stack row gets its reference frame's camera
    setup, and a second setup of the same (night, object, filter, exposure) can then have its own stack."""
    import sqlite_utils

    db = sqlite_utils.Database(tmp_path / DB_NAME)
    earlier = [m for m in migrations._migrations if m.name != "m005_stack_setup"]
    for m in earlier:
        m.fn(db)
    db["_sqlite_migrations"].insert_all(
        [{"migration_set": "nightshift", "name": m.name, "applied_at": "2026-11-30T00:00:00"} for m in earlier],
        pk="id",
    )
    ref = (
        db["frames"]
        .insert({"path": "/cam/a.fits", "status": "stacked", "camera": "QHY268M", "xbin": 2, "ybin": 2, "cfa": None})
        .last_pk
    )
    group = {"night": "2026-11-25", "object": "M 42", "filter": "V", "exptime": 30.0}
    db["stacks"].insert({**group, "path": "stacks/a.fits", "reference_frame_id": ref, "state": "final"})
    db.conn.close()

    archive = Archive(tmp_path)
    try:
        assert migrations.pending(archive.db) == []
        (row,) = archive.query("SELECT * FROM stacks")
        assert (row["camera"], row["xbin"], row["ybin"], row["planes"]) == ("QHY268M", 2, 2, 1)
        archive.put("stacks", {**group, "path": "stacks/b.fits", "camera": "ZWO", "xbin": 1, "ybin": 1, "planes": 3})
        with pytest.raises(sqlite3.IntegrityError):  # the same setup twice is still one stack
            archive.put(
                "stacks", {**group, "path": "stacks/c.fits", "camera": "ZWO", "xbin": 1, "ybin": 1, "planes": 3}
            )
    finally:
        archive.close()
