"""Atomic per table and resumable: a run killed with SIGKILL in the middle of a COPY, then run again."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import psycopg2
from conftest import ROOT, assert_same_content, wait_until
from sqlite_pg import STATE_TABLE, migrate

BIG_ROWS = 200_000


def build(path):
    connection = sqlite3.connect(path)
    connection.executescript("""
        CREATE TABLE alpha (id INTEGER PRIMARY KEY, name TEXT);
        CREATE TABLE zeta (id INTEGER PRIMARY KEY, alpha_id INTEGER REFERENCES alpha(id), label TEXT, amount REAL,
                           at DATETIME, flag BOOLEAN);
    """)
    # alpha is zeta's parent, so with one job it loads (and commits) first.
    connection.executemany("INSERT INTO alpha VALUES (?, ?)", [(i, f"a{i}") for i in range(1, 101)])
    connection.executemany("INSERT INTO zeta VALUES (?, ?, ?, ?, ?, ?)",
                           ((i, i % 100 + 1, f"row {i}\twith a tab", i / 3, f"2024-01-01 00:00:{i % 60:02d}", i % 2)
                            for i in range(1, BIG_ROWS + 1)))
    connection.commit()
    connection.close()


def query(conninfo, statement):
    connection = psycopg2.connect(**conninfo)
    try:
        cursor = connection.cursor()
        cursor.execute(statement)
        return cursor.fetchall()
    finally:
        connection.close()


def copying(conninfo):
    rows = query(conninfo, "SELECT tuples_processed FROM pg_stat_progress_copy WHERE tuples_processed > 0")
    return rows and rows[0][0]


def migration_sessions(conninfo):
    statement = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'sqlite_to_postgres %'"
    return query(conninfo, statement)[0][0]


def test_sigkill_mid_copy_leaves_each_table_whole_or_absent_and_a_rerun_completes(tmp_path, pg_database):
    src = tmp_path / "big.db"
    build(src)
    progress = tmp_path / "progress.json"
    conninfo = {k: v for k, v in pg_database.items() if k != "password"}
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "module_utils")!r})
        from sqlite_pg import migrate
        migrate({str(src)!r}, {conninfo!r}, jobs=1, progress_file={str(progress)!r}, integrity="quick")
    """)
    # The password reaches the child through the environment (libpq reads PGPASSWORD), never its argv.
    run = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PGPASSWORD=pg_database["password"]))
    try:
        assert wait_until(lambda: copying(pg_database) or run.poll() is not None, timeout=60)
        assert run.poll() is None, "the run ended before it could be killed mid-COPY"
        snapshot = json.loads(progress.read_text())
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
    # The workers die with the run; their sessions end and their transactions roll back.
    assert wait_until(lambda: migration_sessions(pg_database) == 0, timeout=30) is not None

    assert set(snapshot) >= {"updated_at", "tables", "rows_done", "rows_total"}
    assert set(snapshot["tables"]["zeta"]) == {"rows_done", "rows_total", "rows_per_second", "eta_seconds",
                                               "status"}
    assert snapshot["tables"]["zeta"]["rows_total"] == BIG_ROWS
    assert snapshot["tables"]["alpha"]["status"] == "completed"

    recorded = query(pg_database, f"SELECT table_name, rows_loaded FROM {STATE_TABLE} ORDER BY 1")  # noqa: S608
    assert recorded == [("alpha", 100)]
    assert query(pg_database, "SELECT to_regclass('public.zeta')") == [(None,)]  # created in the killed transaction
    assert query(pg_database, "SELECT count(*) FROM alpha") == [(100,)]

    result = migrate(str(src), pg_database, jobs=1)

    assert result["changed"] is True
    assert result["tables"]["alpha"]["action"] == "skipped" and result["tables"]["zeta"]["action"] == "loaded"
    assert result["total_rows"] == BIG_ROWS + 100
    assert_same_content(src, pg_database, "zeta")
    assert_same_content(src, pg_database, "alpha")
    assert migrate(str(src), pg_database)["changed"] is False
