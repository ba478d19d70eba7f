"""A connection lost mid-COPY (server restart, failover, network): one line naming the table; a rerun completes."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, assert_same_content, wait_until
from sqlite_pg import STATE_TABLE, migrate
from test_engine_crash import build, query

ALPHA_ROWS = 100  # build()'s parent table, loaded and committed before zeta
STREAMING = f"SELECT pid FROM pg_stat_progress_copy WHERE tuples_processed > {ALPHA_ROWS}"  # noqa: S608
EVERY_SESSION = "application_name LIKE 'sqlite_to_postgres %'"
EXCEPTION_NAME = re.compile(r"\b\w*(Error|Exception)\b|Traceback")


def start_run(src, conninfo, output, tables=None):
    """migrate() in a process of its own, which writes its outcome (or its MigrationError) to ``output`` as JSON
    and what it printed to stderr (the module's STDERR in Ansible's output) beside it."""
    options = {k: v for k, v in conninfo.items() if k != "password"}
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / "module_utils")!r})
        from sqlite_pg import MigrationError, migrate
        try:
            result = migrate({str(src)!r}, {options!r}, tables={tables!r}, jobs=1, integrity="quick")
        except MigrationError as error:
            result = dict(error.result or {{}}, msg=str(error))
        with open({str(output)!r}, "w") as stream:
            json.dump({{"msg": result["msg"], "status": result["status"]}}, stream)
    """)
    with open(stderr_file(output), "wb") as stderr:
        return subprocess.Popen([sys.executable, "-c", script], stderr=stderr,
                                env=dict(os.environ, PGPASSWORD=conninfo["password"]))


def stderr_file(output):
    return output.with_suffix(".stderr")


def interrupt(run, conninfo, who):
    """Terminate ``who`` (a pg_stat_activity condition) once a COPY is past alpha's row count: zeta's."""

    def terminated():
        return query(conninfo, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "  # noqa: S608
                               f"WHERE {who} AND EXISTS ({STREAMING})")[0][0]

    try:
        assert wait_until(lambda: terminated() or run.poll() is not None, timeout=60)
        assert run.poll() is None, "the run ended before its COPY could be interrupted"
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()


def check_outcome(output, conninfo):
    """The run failed with one plain line, and printed no exception of its own or of psycopg2's to stderr."""
    outcome = json.loads(output.read_text())
    assert outcome["status"] == "failed"
    printed = stderr_file(output).read_text()
    assert not EXCEPTION_NAME.search(printed), printed
    message = outcome["msg"]
    assert "\n" not in message and not EXCEPTION_NAME.search(message), message
    address = f"{conninfo['host']}:{conninfo['port']}"
    assert message.startswith(f"table zeta: the connection to {address} was lost while the table was loading "
                              "(server restart, failover or network); everything this run wrote was undone"), message
    assert message.endswith("a rerun starts again cleanly"), message


@pytest.mark.parametrize("victims", ["loader", "every session"])
def test_a_backend_terminated_mid_copy_gives_one_plain_line_naming_the_table(tmp_path, pg_database, victims):
    src = tmp_path / "big.db"
    build(src)
    output = tmp_path / "outcome.json"
    run = start_run(src, pg_database, output)
    # "every session" is what a server restart or failover does: the run's own session goes too.
    interrupt(run, pg_database, f"pid IN ({STREAMING})" if victims == "loader" else EVERY_SESSION)

    check_outcome(output, pg_database)
    # alpha had committed before zeta's connection went: the undo (on a new session) took it back.
    assert query(pg_database, "SELECT to_regclass('public.zeta'), to_regclass('public.alpha'), "
                              f"to_regclass('public.{STATE_TABLE}')") == [(None, None, None)]

    result = migrate(str(src), pg_database, jobs=1)

    assert result["tables"]["alpha"]["action"] == "loaded" and result["tables"]["zeta"]["action"] == "loaded"
    assert_same_content(src, pg_database, "alpha")
    assert_same_content(src, pg_database, "zeta")


def test_every_session_lost_before_any_table_committed_still_ends_in_one_line(tmp_path, pg_database):
    # Nothing loaded: the run tries to take back its state table on a session that is gone as well.
    src = tmp_path / "big.db"
    build(src)
    output = tmp_path / "outcome.json"
    run = start_run(src, pg_database, output, tables=["zeta"])
    interrupt(run, pg_database, EVERY_SESSION)

    check_outcome(output, pg_database)
    assert query(pg_database, "SELECT to_regclass('public.zeta')") == [(None,)]

    result = migrate(str(src), pg_database, tables=["zeta"], jobs=1)

    assert result["tables"]["zeta"]["action"] == "loaded"
    assert_same_content(src, pg_database, "zeta")
