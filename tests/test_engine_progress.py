"""The progress file the runbook prints while a load runs: a table's rate and ETA count from when a worker took it."""

import json
import os
import subprocess
import sys
import textwrap

import psycopg2
from conftest import ROOT, build_sqlite, execute, wait_until

SOURCE = """
CREATE TABLE big (id INTEGER PRIMARY KEY, label TEXT);
CREATE TABLE small (id INTEGER PRIMARY KEY, label TEXT);
"""


def progress_of(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_a_table_waiting_for_a_worker_shows_as_queued_without_a_rate(tmp_path, pg_database):
    """With one job, the smaller table waits behind the larger one. The larger one is held by a lock the test
    takes on its target table, so its worker has taken it and waits: the smaller one is then queued, with no
    rate and no ETA, where it used to show as loading, its rate counted from when it was handed to the pool."""
    src = build_sqlite(tmp_path / "source.db", SOURCE, {
        "big": [(i, f"big {i}") for i in range(1, 2001)],
        "small": [(i, f"small {i}") for i in range(1, 11)],
    })
    execute(pg_database, "CREATE TABLE big (id bigint, label text)")
    progress = tmp_path / "progress.json"
    conninfo = {k: v for k, v in pg_database.items() if k != "password"}
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "module_utils")!r})
        from sqlite_pg import migrate
        result = migrate({src!r}, {conninfo!r}, jobs=1, post_data=False, progress_file={str(progress)!r})
        sys.exit(0 if result["status"] == "completed" else 1)
    """)
    holder = psycopg2.connect(**pg_database)
    try:
        # SHARE lets the run read the table (its emptiness is checked) but not lock it to load it.
        holder.cursor().execute("LOCK TABLE big IN SHARE MODE")
        run = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PGPASSWORD=pg_database["password"]))
        try:
            held = wait_until(lambda: (p := progress_of(progress)) and p["tables"].get("big", {}).get("status")
                              == "loading" and p, timeout=60)
            assert held, f"the run never showed table big loading; progress: {progress_of(progress)}"
            blocked = execute(pg_database, "SELECT count(*) FROM pg_locks WHERE relation = 'big'::regclass "
                                           "AND NOT granted")
            assert blocked == [(1,)], "the worker loading big is not waiting for the test's lock"
        finally:
            holder.rollback()
            run.wait(timeout=120)
    finally:
        holder.close()

    assert held["tables"]["small"] == {"rows_done": 0, "rows_total": 10, "rows_per_second": 0.0,
                                       "eta_seconds": None, "status": "queued"}
    assert held["tables"]["big"]["rows_done"] == 0 and held["tables"]["big"]["eta_seconds"] is None
    assert run.returncode == 0
    final = progress_of(progress)
    assert {name: (table["status"], table["rows_done"]) for name, table in final["tables"].items()} == {
        "big": ("completed", 2000), "small": ("completed", 10)}
