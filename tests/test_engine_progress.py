"""The progress files the runbook prints while a load or a validation runs: what the run does now, and honest
rates and ETAs."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import psycopg2
from conftest import ROOT, build_sqlite, execute, wait_until
from sqlite_pg import STATE_TABLE, migrate

SOURCE = """
CREATE TABLE big (id INTEGER PRIMARY KEY, label TEXT);
CREATE TABLE small (id INTEGER PRIMARY KEY, label TEXT);
"""


def progress_of(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def engine_script(call):
    """A Python program that runs ``call`` (migrate(...) or validate(...)) and exits 0 when it completed."""
    return textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "module_utils")!r})
        from sqlite_pg import migrate
        from sqlite_pg.validate import validate
        result = {call}
        sys.exit(0 if result["status"] == "completed" else 1)
    """)


@contextlib.contextmanager
def running_while_held(pg_database, lock, script):
    """``script`` in a process of its own while the test holds ``lock`` (a LOCK TABLE statement). Yields (the
    process, the lock's session, to roll back); on leaving, the lock is let go and the process waited for."""
    holder = psycopg2.connect(**pg_database)
    try:
        holder.cursor().execute(lock)
        # The password reaches the child through the environment (libpq reads PGPASSWORD), never its argv.
        run = subprocess.Popen([sys.executable, "-c", script],
                               env=dict(os.environ, PGPASSWORD=pg_database["password"]))
        try:
            yield run, holder
        finally:
            holder.rollback()
            run.wait(timeout=120)
    finally:
        holder.close()


def without_password(pg_database):
    return {k: v for k, v in pg_database.items() if k != "password"}


@contextlib.contextmanager
def run_held_at(tmp_path, pg_database, table):
    """migrate() with one job, writing progress.json, while the test holds a SHARE lock on ``table``, created in
    the target beforehand: the run can read it (its emptiness is checked) but not lock it to load it. Yields (the
    process, the progress file, the lock's session)."""
    src = build_sqlite(tmp_path / "source.db", SOURCE, {
        "big": [(i, f"big {i}") for i in range(1, 2001)],
        "small": [(i, f"small {i}") for i in range(1, 11)],
    })
    progress = tmp_path / "progress.json"
    execute(pg_database, f"CREATE TABLE {table} (id bigint, label text)")
    call = (f"migrate({src!r}, {without_password(pg_database)!r}, jobs=1, post_data=False, "
            f"progress_file={str(progress)!r})")
    with running_while_held(pg_database, f"LOCK TABLE {table} IN SHARE MODE", engine_script(call)) as (run, holder):
        yield run, progress, holder


def progress_with(progress, table, status):
    """The progress file's content once it shows ``table`` with ``status``, else None."""
    content = progress_of(progress)
    return content if content and content["tables"].get(table, {}).get("status") == status else None


def waiting_for_locks(pg_database, besides=None):
    """How many lock requests wait, leaving out those on table ``besides``."""
    return execute(pg_database, "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation IS DISTINCT FROM "
                                "to_regclass(%s)", (besides,))[0][0]


def final_tables(progress):
    return {name: (table["status"], table["rows_done"]) for name, table in progress_of(progress)["tables"].items()}


def test_a_table_waiting_for_a_worker_shows_as_queued_without_a_rate(tmp_path, pg_database):
    """With one job, the smaller table waits behind the larger one. The larger one is held by a lock the test
    takes on its target table, so its worker has taken it and waits: the smaller one is then queued, with no
    rate and no ETA, where it used to show as loading, its rate counted from when it was handed to the pool."""
    with run_held_at(tmp_path, pg_database, "big") as (run, progress, _):
        held = wait_until(lambda: progress_with(progress, "big", "loading"), timeout=60)
        assert held, f"the run never showed table big loading; progress: {progress_of(progress)}"
        assert waiting_for_locks(pg_database) == 1, "the worker loading big is not waiting for the test's lock"

    assert held["tables"]["small"] == {"rows_done": 0, "rows_total": 10, "rows_per_second": 0.0,
                                       "eta_seconds": None, "status": "queued"}
    assert held["tables"]["big"]["rows_done"] == 0 and held["tables"]["big"]["eta_seconds"] is None
    assert run.returncode == 0
    assert final_tables(progress) == {"big": ("completed", 2000), "small": ("completed", 10)}


def test_the_records_for_the_next_sync_show_as_their_own_phase(tmp_path, pg_database):
    """Once every row is loaded, the run records the source's pages and rows for the next sync (a minute at
    10M files), which the progress file names, instead of the load's phase at 100 %. The test holds table
    small's load (as above) until it has locked big's state row, which recording big must update: the run then
    waits in that phase."""
    with run_held_at(tmp_path, pg_database, "small") as (run, progress, holder):
        row_holder = psycopg2.connect(**pg_database)
        try:
            assert wait_until(lambda: progress_with(progress, "big", "completed") and waiting_for_locks(pg_database),
                              timeout=60), progress_of(progress)
            row_holder.cursor().execute(f"SELECT 1 FROM {STATE_TABLE} WHERE table_name = 'big' FOR UPDATE")  # noqa: S608
            holder.rollback()
            # Recording big reads its pages first, then waits for the test's lock to update its state row.
            recording = wait_until(lambda: waiting_for_locks(pg_database, besides="small")
                                   and (p := progress_of(progress))["phase"] == "records" and p, timeout=60)
            assert recording, f"the run never waited in the records phase; progress: {progress_of(progress)}"
        finally:
            row_holder.close()  # its lock goes with it, before the run is waited for

    assert recording["rows_done"] == recording["rows_total"] == 2010
    assert run.returncode == 0
    assert progress_of(progress)["phase"] == "done"
    assert final_tables(progress) == {"big": ("completed", 2000), "small": ("completed", 10)}


def test_a_validation_shows_its_step_and_the_rows_hashed_per_table(tmp_path, pg_database):
    """Validation names its step and, while it hashes, the rows hashed per table on the side that is behind. The
    test holds the PostgreSQL side of table unkeyed with an ACCESS EXCLUSIVE lock taken after the load: validation
    plans a table without a key from SQLite alone, so it hashes big on both sides and unkeyed on SQLite's, then
    waits, and the progress file shows it doing so."""
    src = build_sqlite(tmp_path / "source.db", "CREATE TABLE big (id INTEGER PRIMARY KEY, label TEXT);"
                                               "CREATE TABLE unkeyed (label TEXT);", {
        "big": [(i, f"big {i}") for i in range(1, 2001)],
        "unkeyed": [(f"unkeyed {i}",) for i in range(1, 11)],
    })
    assert migrate(str(src), pg_database)["status"] == "completed"
    progress = tmp_path / "validation.json"
    call = f"validate({str(src)!r}, {without_password(pg_database)!r}, jobs=2, progress_file={str(progress)!r})"
    with running_while_held(pg_database, "LOCK TABLE unkeyed IN ACCESS EXCLUSIVE MODE", engine_script(call)) as (
            run, _):
        held = wait_until(lambda: progress_with(progress, "unkeyed", "hashing")
                          and progress_with(progress, "big", "completed") and waiting_for_locks(pg_database)
                          and progress_of(progress), timeout=60)
        assert held, f"validation never waited on unkeyed with big hashed; progress: {progress_of(progress)}"

    assert held["phase"] == "hashing the tables"
    assert held["tables"] == {"big": {"rows_done": 2000, "rows_total": 2000, "status": "completed"},
                              "unkeyed": {"rows_done": 0, "rows_total": 10, "status": "hashing"}}
    assert (held["rows_done"], held["rows_total"]) == (2000, 2010)
    assert held["rows_per_second"] > 0 and held["eta_seconds"] is not None
    assert run.returncode == 0
    done = progress_of(progress)
    assert done["phase"] == "done" and done["eta_seconds"] is None
    assert final_tables(progress) == {"big": ("completed", 2000), "unkeyed": ("completed", 10)}
