"""The cutover's proof that the source stood still (module_utils/sqlite_pg/stillness.py), in both journal modes.

Every commit must be seen (the marks move, and the content differs), in
rollback-journal and WAL mode; what only touches the files (a reader, the
backup copy itself, checkpoints, the last connection closing) must not count
as a write.
"""

import json
import sqlite3
from pathlib import Path

import pytest
from sqlite_pg.stillness import (
    change_marks,
    describe_changes,
    online_copy,
    sha256_of,
    wait_until_quiet,
    written_since,
)
from test_module_ansible import ansible


class Database:
    """A database in the given journal mode, an application connection that stays open, and a copy at rest."""

    def __init__(self, directory: Path, journal: str):
        self.path = str(directory / f"{journal}.db")
        self.directory = directory
        self.app = sqlite3.connect(self.path, isolation_level=None)
        self.app.execute(f"PRAGMA journal_mode = {journal}")
        self.app.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        self.app.execute("BEGIN")
        self.app.executemany("INSERT INTO t (v) VALUES (?)", [("x" * 100,)] * 2000)
        self.app.execute("COMMIT")

    def copy_at_rest(self):
        """What sqlite_backup does in the window: the marks, then the copy."""
        self.marks = change_marks(self.path)
        self.copy = str(self.directory / "copy.db")
        online_copy(self.path, self.copy).close()
        self.copy_sha256 = sha256_of(self.copy)

    def written(self):
        return written_since(self.path, self.marks, self.copy_sha256, str(self.directory / "compare.db"))

    def write(self, value="y"):
        self.app.execute("UPDATE t SET v = ? WHERE id = 5", (value,))

    def read_elsewhere(self):
        reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        reader.execute("SELECT count(*), max(v) FROM t").fetchone()
        reader.close()

    def checkpoint(self, kind):
        self.app.execute(f"PRAGMA wal_checkpoint({kind})").fetchone()

    def close_last_connection(self):
        self.app.close()


@pytest.fixture(params=["delete", "wal"])
def database(request, tmp_path):
    database = Database(tmp_path, request.param)
    yield database
    database.app.close()


@pytest.mark.parametrize("what", ["a write", "a same-size write", "a write after a full checkpoint (WAL reset)"])
def test_every_commit_after_the_copy_is_seen(database, what):
    if what == "a write after a full checkpoint (WAL reset)":
        database.write("before")
        database.copy_at_rest()
        database.checkpoint("TRUNCATE")
        database.write("after")
    else:
        database.copy_at_rest()
        database.write("y" * (100 if what == "a same-size write" else 3))
    assert change_marks(database.path) != database.marks
    written, evidence = database.written()
    assert written, evidence
    assert evidence and "checkpoint" not in evidence
    assert not Path(database.directory / "compare.db").exists()


@pytest.mark.parametrize("what", ["a reader", "another copy"])
def test_reading_leaves_every_mark_as_it_was(database, what):
    database.write()
    database.copy_at_rest()
    if what == "a reader":
        database.read_elsewhere()
    else:
        online_copy(database.path, str(database.directory / "another.db")).close()
    assert change_marks(database.path) == database.marks
    assert database.written() == (False, "its files are as they were at the copy")


@pytest.mark.parametrize("what", ["PASSIVE", "TRUNCATE", "RESTART", "the last connection closing"])
def test_a_checkpoint_without_a_write_is_not_a_write(tmp_path, what):
    database = Database(tmp_path, "wal")
    database.write()
    database.copy_at_rest()
    if what == "the last connection closing":
        database.close_last_connection()  # checkpoints, then deletes -wal and -shm
    else:
        database.checkpoint(what)
    # The marks moved (the database file was written, or the WAL truncated or removed) ...
    assert change_marks(database.path) != database.marks
    # ... but the content did not: no write.
    written, evidence = database.written()
    assert not written, evidence
    assert "a checkpoint, no write" in evidence
    database.app.close()


def test_in_wal_mode_the_change_counter_does_not_move_but_the_wal_index_does(tmp_path):
    """Why the database file's header alone proves nothing in WAL mode."""
    database = Database(tmp_path, "wal")
    before = change_marks(database.path)
    database.write()
    after = change_marks(database.path)
    assert after["db"] == before["db"]
    assert after["wal"] != before["wal"] and after["wal_index"] != before["wal_index"]
    assert "wal-index change counter" in describe_changes(before, after)
    database.app.close()


def test_in_rollback_mode_each_commit_moves_the_change_counter(tmp_path):
    database = Database(tmp_path, "delete")
    before = change_marks(database.path)
    database.write()
    database.write("z")
    changes = describe_changes(before, change_marks(database.path))
    counter = int(before["db"][3][48:56], 16)
    assert f"database file change counter {counter} -> {counter + 2}" in changes, changes
    database.app.close()


class FakeClock:
    """A clock that moves only when the waiter sleeps; each sleep may run what the application does then."""

    def __init__(self, on_sleep):
        self.now, self.on_sleep = 0.0, on_sleep

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        self.on_sleep(self.now)


def test_the_quiet_wait_waits_for_the_last_write(database):
    writes = []

    def application(now):
        if now < 3:  # stops writing after 3 s
            database.write(str(now))
            writes.append(now)

    clock = FakeClock(application)
    marks, still_changing = wait_until_quiet(database.path, 2, 60, interval=0.5, clock=clock, sleep=clock.sleep)
    assert still_changing is None
    assert writes and clock.now >= writes[-1] + 2
    assert marks == change_marks(database.path)


def test_the_quiet_wait_gives_up_on_a_source_that_keeps_changing(database):
    clock = FakeClock(lambda now: database.write(str(now)))
    _marks, still_changing = wait_until_quiet(database.path, 2, 10, interval=0.5, clock=clock, sleep=clock.sleep)
    assert still_changing and ("change counter" in still_changing or "-wal file" in still_changing)
    assert 10 <= clock.now < 11


def test_the_modules_compare_the_marks_the_copy_returned(database, tmp_path):
    dest = tmp_path / "final.db"
    done, copied = ansible(["-a", json.dumps({"src": database.path, "dest": str(dest), "quick_check": False})],
                           module="sqlite_backup")
    assert done.returncode == 0, copied
    assert copied["source_marks"] == change_marks(database.path)
    check = {"src": database.path, "marks": copied["source_marks"], "copy": str(dest), "copy_sha256": copied["sha256"]}
    done, result = ansible(["-a", json.dumps(check)], module="sqlite_unchanged")
    assert done.returncode == 0 and result["written"] is False and result["changed"] is False, result
    database.write()
    done, result = ansible(["-a", json.dumps(check)], module="sqlite_unchanged")
    assert done.returncode == 0 and result["written"] is True, result
    assert list(tmp_path.glob("*.compare")) == []
