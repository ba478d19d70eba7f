"""One consistent, read-only snapshot of the source, whatever its journal mode."""

import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from conftest import assert_same_content, file_digests, target_snapshot
from sqlite_pg import MigrationError, migrate

ROWS_IN_MAIN_FILE = 500
ROWS_IN_WAL = 700


# A writer that leaves rows in the -wal file: it never checkpoints, and then exits without closing
# (as a crashed application does) or stays open (as a running one does). argv: path, rows in the main
# file, rows in the WAL, "keep" to stay open until its stdin closes.
WRITER = textwrap.dedent("""
    import os, sqlite3, sys
    path, in_main, in_wal, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "keep"
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, label TEXT, weight REAL)")
    c.executemany("INSERT INTO items VALUES (?, ?, ?)", [(i, f"main {i}", i / 7) for i in range(1, in_main + 1)])
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.execute("BEGIN")
    c.executemany("INSERT INTO items VALUES (?, ?, ?)",
                  [(i, f"wal\\t{i}", i / 3) for i in range(in_main + 1, in_main + in_wal + 1)])
    c.execute("COMMIT")
    print("ready", flush=True)
    if keep:
        sys.stdin.readline()
    os._exit(0)
""")

# Commits to the database every 5 ms until killed. argv: path.
BUSY_WRITER = textwrap.dedent("""
    import sqlite3, sys, time
    c = sqlite3.connect(sys.argv[1], isolation_level=None)
    print("ready", flush=True)
    while True:
        c.execute("INSERT INTO log (at) VALUES (datetime('now'))")
        time.sleep(0.005)
""")


def writer(path, keep_open):
    return [sys.executable, "-c", WRITER, str(path), str(ROWS_IN_MAIN_FILE), str(ROWS_IN_WAL),
            "keep" if keep_open else "exit"]


def wal_count(path):
    # Reading it the way the engine does, without touching the -shm, to know what the snapshot holds.
    connection = sqlite3.connect(f"file:{path}?mode=ro&readonly_shm=1", uri=True)
    try:
        return connection.execute("SELECT count(*) FROM items").fetchone()[0]
    finally:
        connection.close()


def test_wal_database_with_rows_only_in_the_wal_file_is_read_whole_and_left_unchanged(tmp_path, pg_database):
    path = tmp_path / "app.db"
    subprocess.run(writer(path, keep_open=False), check=True, capture_output=True)
    assert os.path.getsize(f"{path}-wal") > 0
    before = file_digests(path)

    result = migrate(str(path), pg_database)

    assert file_digests(path) == before  # main file, -wal and -shm: not a byte changed
    assert result["tables"]["items"]["migrated"] == ROWS_IN_MAIN_FILE + ROWS_IN_WAL
    assert result["profile"]["source"]["journal"] == "wal"
    assert_same_content(path, pg_database, "items")


def test_wal_database_held_open_by_a_live_writer(tmp_path, pg_database):
    path = tmp_path / "live.db"
    live = subprocess.Popen(writer(path, keep_open=True), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "ready"
        before = file_digests(path)
        result = migrate(str(path), pg_database)
        assert file_digests(path) == before
        assert result["total_rows"] == ROWS_IN_MAIN_FILE + ROWS_IN_WAL == wal_count(path)
    finally:
        live.stdin.close()
        live.wait(timeout=30)


def test_cleanly_closed_wal_database_gets_no_wal_or_shm_files(tmp_path, pg_database):
    path = tmp_path / "closed.db"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, label TEXT)")
    connection.executemany("INSERT INTO items VALUES (?, ?)", [(i, str(i)) for i in range(100)])
    connection.commit()
    connection.close()
    before = file_digests(path)
    assert before["-wal"] is None and before["-shm"] is None

    assert migrate(str(path), pg_database)["total_rows"] == 100

    assert file_digests(path) == before


def test_rollback_journal_database_is_left_unchanged(sample_db, pg_database):
    before = file_digests(sample_db)
    migrate(str(sample_db), pg_database, jobs=3)
    assert file_digests(sample_db) == before
    assert not os.path.exists(f"{sample_db}-journal")


def test_a_source_written_to_during_the_run_fails_it_and_writes_nothing(tmp_path, pg_database):
    path = tmp_path / "busy.db"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, payload TEXT)")
    connection.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, at TEXT)")
    connection.executemany("INSERT INTO big VALUES (?, ?)", ((i, "x" * 200) for i in range(200_000)))
    connection.commit()
    connection.close()
    writer = subprocess.Popen([sys.executable, "-c", BUSY_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        snapshot = target_snapshot(pg_database)
        with pytest.raises(MigrationError) as failure:
            migrate(str(path), pg_database)
        assert "changed while it was being read" in str(failure.value)
        assert target_snapshot(pg_database) == snapshot
    finally:
        writer.kill()
        writer.wait()
