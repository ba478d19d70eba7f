"""The lease: a load stops, and rolls back what is streaming, once the run that started it is gone.

The run's lock session is ended while the big table streams (as it ends when
ansible-playbook is killed): the load must stop within seconds, leave each
table loaded or as it was, and a rerun must complete the migration.
"""

import re
import threading
import time

import psycopg2
import pytest
from conftest import assert_same_content, wait_until
from sqlite_pg import STATE_TABLE, MigrationError, migrate
from test_engine_crash import BIG_ROWS, build, copying, migration_sessions, query

LOCK_KEY = 4608230915


def hold_lock(conninfo):
    holder = psycopg2.connect(**conninfo)
    holder.autocommit = True
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    return holder


def test_load_stops_when_the_runs_lock_session_ends_and_a_rerun_completes(tmp_path, pg_database):
    src = tmp_path / "big.db"
    build(src)
    holder = hold_lock(pg_database)
    lease = {"key": LOCK_KEY, "backend_pid": holder.get_backend_pid()}
    outcome = {}

    def run():
        try:
            outcome["result"] = migrate(str(src), pg_database, jobs=1, integrity="quick", lease=lease)
        except MigrationError as error:
            outcome["error"] = error

    loading = threading.Thread(target=run)
    loading.start()
    try:
        assert wait_until(lambda: copying(pg_database) or not loading.is_alive(), timeout=60)
        assert loading.is_alive(), "the load ended before its lease could be taken away"
        ended = time.monotonic()
        holder.close()  # what happens to the lock session when ansible-playbook is killed
        loading.join(timeout=30)
        stopped_after = time.monotonic() - ended
    finally:
        holder.close()
        loading.join(timeout=60)
    assert not loading.is_alive()
    assert "error" in outcome, "the load went on after its run was gone"
    message = str(outcome["error"])
    assert message.startswith("load stopped: the run that started this load is gone"), message
    # Alpha has committed; on a busy machine zeta (and its sequences) may commit before the lease's next
    # check: either way all of it must be undone.
    assert re.search(r"everything this run wrote was undone \(tables alpha(, zeta[^)]*)?\)", message), message
    assert stopped_after < 10, f"the load took {stopped_after:.1f} s to stop"
    assert wait_until(lambda: migration_sessions(pg_database) == 0, timeout=10) is not None

    assert query(pg_database, "SELECT to_regclass('public.zeta'), to_regclass('public.alpha'), "
                              f"to_regclass('public.{STATE_TABLE}')") == [(None, None, None)]

    result = migrate(str(src), pg_database, jobs=1)
    assert result["tables"]["alpha"]["action"] == "loaded" and result["tables"]["zeta"]["action"] == "loaded"
    assert result["total_rows"] == BIG_ROWS + 100
    assert_same_content(src, pg_database, "zeta")


def test_a_load_whose_run_is_already_gone_writes_nothing(tmp_path, pg_database):
    src = tmp_path / "big.db"
    build(src)
    holder = hold_lock(pg_database)
    lease = {"key": LOCK_KEY, "backend_pid": holder.get_backend_pid()}
    holder.close()
    gone = r"^load stopped: the run that started this load is gone.*; nothing was written$"
    with pytest.raises(MigrationError, match=gone):
        migrate(str(src), pg_database, jobs=1, integrity="quick", lease=lease)
    assert query(pg_database, "SELECT to_regclass('public.zeta'), to_regclass('public.alpha')") == [(None, None)]
