"""Large tables load in rowid ranges, one session per range, committed together by two-phase commit: the
target still holds each table whole or not at all, a bad value is named by its own rowid, and a killed run
leaves prepared transactions that the rerun resolves before it completes the load."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import ROOT, assert_same_content, execute, running_server
from sqlite_pg import STATE_TABLE, migrate
from test_engine_crash import BIG_ROWS, build
from test_engine_one_pass import EXCEPTION_NAME, UNDONE, dump, fails_and_puts_back, precreate_crash_tables

PREPARED = "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
SECOND_RANGE_ROW = BIG_ROWS * 3 // 4  # zeta's rowids 1..200000 split in two: 100001 and up is the second range


def big_source(tmp_path, bad=None):
    src = tmp_path / "big.db"
    build(src)
    if bad:
        import sqlite3

        connection = sqlite3.connect(src)
        connection.execute(f"UPDATE zeta SET {bad[1]} = ? WHERE id = ?", (bad[2], bad[0]))  # noqa: S608
        connection.commit()
        connection.close()
    return src


class CopySessions(threading.Thread):
    """The most COPY sessions into table zeta seen at once while the run loads (pg_stat_progress_copy)."""

    def __init__(self, conninfo):
        super().__init__(daemon=True)
        self.conninfo, self.most, self.stop = conninfo, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            found = execute(self.conninfo, "SELECT count(*) FROM pg_stat_progress_copy p JOIN pg_class c "
                                           "ON c.oid = p.relid WHERE c.relname = 'zeta'")
            self.most = max(self.most, found[0][0])
            self.stop.wait(0.02)


def test_a_large_table_streams_in_two_sessions_and_commits_whole(tmp_path, pg_database):
    src = big_source(tmp_path)
    precreate_crash_tables(pg_database)
    watcher = CopySessions(pg_database)
    watcher.start()
    try:
        result = migrate(str(src), pg_database, jobs=2)
    finally:
        watcher.stop.set()
        watcher.join()

    assert watcher.most == 2, "zeta was never streamed by two sessions at once"
    assert result["tables"]["zeta"]["ranges"] == 2 and "ranges" not in result["tables"]["alpha"]
    gids = execute(pg_database, f"SELECT prepared_gids FROM {STATE_TABLE} WHERE table_name = 'zeta'")[0][0]  # noqa: S608
    assert [gid.split(" ")[-2:] for gid in gids] == [["1/2", "zeta"], ["2/2", "zeta"]]
    assert execute(pg_database, PREPARED) == [(0,)]
    assert_same_content(src, pg_database, "alpha")
    assert_same_content(src, pg_database, "zeta")


@pytest.mark.parametrize(("bad", "check", "fragment"), [
    ((SECOND_RANGE_ROW, "at", "now"), None, f"table zeta, column at, rowid {SECOND_RANGE_ROW}: value 'now' is not a "
                                            "timestamp"),
    # Only PostgreSQL refuses this one: the COPY line of the second range is mapped back by that range's query.
    (None, f"id <> {SECOND_RANGE_ROW}", f"table zeta, rowid {SECOND_RANGE_ROW}: was refused by PostgreSQL: new row "
                                        'for relation "zeta" violates check constraint'),
])
def test_a_bad_value_in_the_second_range_is_named_by_its_rowid_and_everything_is_put_back(
        tmp_path, pg_database, postgres_server, bad, check, fragment):
    src = big_source(tmp_path, bad)
    precreate_crash_tables(pg_database)
    if check:
        execute(pg_database, f"ALTER TABLE zeta ADD CHECK ({check})")
    fails_and_puts_back(src, pg_database, postgres_server, fragment, UNDONE, jobs=2)
    assert execute(pg_database, PREPARED) == [(0,)]


def killed_run(src, conninfo, point):
    """migrate() in a process of its own that kills itself (SIGKILL) at ``point`` of zeta's two-phase commit."""
    options = {k: v for k, v in conninfo.items() if k != "password"}
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "module_utils")!r})
        from sqlite_pg import load, migrate, ranges
        point = {point!r}

        def die():
            os.kill(os.getpid(), signal.SIGKILL)

        if point == "prepared":
            load.Load._decide_ranges = lambda *arguments: die()
        else:
            finish = ranges.finish

            def finish_then_die(connection, gids, commit):
                if commit and gids:
                    if point == "partly committed":
                        finish(connection, gids[:1], commit)
                    die()
                finish(connection, gids, commit)

            ranges.finish = finish_then_die
        migrate({str(src)!r}, {options!r}, jobs=2)
    """)
    run = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PGPASSWORD=conninfo["password"]),
                         timeout=300, check=False)
    assert run.returncode == -signal.SIGKILL


@pytest.mark.parametrize(("point", "left", "visible", "action"), [
    ("prepared", 2, 0, "loaded"),  # no decision: the rerun rolls both ranges back and loads zeta again
    ("decided", 2, 0, "skipped"),  # the state row names both: the rerun commits them
    ("partly committed", 1, BIG_ROWS // 2, "skipped"),  # inside the window: the rerun commits the second
])
def test_kill_9_during_the_two_phase_commit_then_a_rerun_gives_exact_content(tmp_path, pg_database, point, left,
                                                                            visible, action):
    src = big_source(tmp_path)
    precreate_crash_tables(pg_database)
    killed_run(src, pg_database, point)
    assert execute(pg_database, PREPARED) == [(left,)]
    assert execute(pg_database, "SELECT count(*) FROM zeta") == [(visible,)]

    result = migrate(str(src), pg_database, jobs=2)

    assert result["tables"]["zeta"]["action"] == action
    verb = "committed" if action == "skipped" else "rolled back"
    assert any(note.startswith("tables zeta: the ranges an interrupted run") and verb in note
               for note in result["profile"]["notes"]), result["profile"]["notes"]
    assert execute(pg_database, PREPARED) == [(0,)]
    assert_same_content(src, pg_database, "alpha")
    assert_same_content(src, pg_database, "zeta")


@pytest.fixture(scope="module")
def server_without_2pc():
    with running_server(max_prepared_transactions=0) as server:
        yield server


def test_without_prepared_transactions_a_large_table_loads_in_one_session_and_the_notes_say_why(
        tmp_path, server_without_2pc):
    conninfo = server_without_2pc.conninfo()
    src = big_source(tmp_path)
    precreate_crash_tables(conninfo)

    result = migrate(str(src), conninfo, jobs=2)

    assert "ranges" not in result["tables"]["zeta"]
    assert "tables zeta load in one session each, not in 2 rowid ranges: the server's max_prepared_transactions " \
           "is 0; ranges need at least 2 (one prepared transaction per range)" in result["profile"]["notes"]
    assert_same_content(src, conninfo, "zeta")


def test_a_server_restart_while_the_ranges_are_prepared_is_undone_and_a_rerun_completes(tmp_path, pg_database,
                                                                                        postgres_server):
    src = big_source(tmp_path)
    precreate_crash_tables(pg_database)
    before = dump(pg_database, postgres_server)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    restart = as_postgres + [str(postgres_server.bin / "pg_ctl"), "-D", os.path.join(postgres_server.directory, "data"),
                             "-m", "immediate", "-w", "-l", os.path.join(postgres_server.directory, "server.log"),
                             "restart"]
    options = {k: v for k, v in pg_database.items() if k != "password"}
    script = textwrap.dedent(f"""
        import json, subprocess, sys
        sys.path.insert(0, {str(ROOT / "module_utils")!r})
        from sqlite_pg import MigrationError, load, migrate
        decide = load.Load._decide_ranges

        def restart_then_decide(*arguments):  # both ranges are prepared: they outlive the restart
            subprocess.run({restart!r}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return decide(*arguments)

        load.Load._decide_ranges = restart_then_decide
        try:
            migrate({str(src)!r}, {options!r}, jobs=2)
            print("completed")
        except MigrationError as error:
            print(error)
    """)
    run = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PGPASSWORD=pg_database["password"]),
                         timeout=300, check=True, capture_output=True, text=True)
    message = run.stdout.strip()

    assert "\n" not in message and not EXCEPTION_NAME.search(message), message
    assert message.startswith(f"the connection to {pg_database['host']}:{pg_database['port']} was lost during the "
                              "load"), message
    assert f"{UNDONE} (tables alpha)" in message, message
    assert execute(pg_database, PREPARED) == [(0,)]
    assert sorted(dump(pg_database, postgres_server).splitlines()) == sorted(before.splitlines())

    result = migrate(str(src), pg_database, jobs=2)

    assert result["tables"]["zeta"]["ranges"] == 2
    assert_same_content(src, pg_database, "zeta")


def test_a_key_two_ranges_both_hold_fails_naming_the_row_instead_of_waiting_forever(tmp_path, pg_database,
                                                                                    postgres_server, monkeypatch):
    from sqlite_pg import ranges

    monkeypatch.setattr(ranges, "RANGE_LOCK_WAIT", "1s")  # inherited by the forked workers
    src = big_source(tmp_path, (SECOND_RANGE_ROW, "label", "row 10\twith a tab"))  # the label of row 10 (range 1)
    precreate_crash_tables(pg_database)
    execute(pg_database, "ALTER TABLE zeta ADD UNIQUE (label)")
    fails_and_puts_back(src, pg_database, postgres_server,
                        f"table zeta, rowid {SECOND_RANGE_ROW}: was refused by PostgreSQL: it waited 1s for a row "
                        "another session holds, most likely a row of another range of this table with the same key",
                        UNDONE, jobs=2)
    assert execute(pg_database, PREPARED) == [(0,)]
