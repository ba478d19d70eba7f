"""The engine's undo when the server refuses to write: a standby now (the leader moved), or read-only sessions.

A switchover during a run can leave its undo talking to the demoted leader. The run's one line must then say so,
not quote a read-only error that reads like a configuration problem; and the data must stay where it is.
"""

import psycopg2
from conftest import execute, wait_until
from sqlite_pg.undo import Journal


def storage_nodes(conninfo):
    """The rows of storage_nodes, or None while the table is not there (a standby that has not replayed it yet)."""
    try:
        return execute(conninfo, "SELECT id FROM storage_nodes ORDER BY id")
    except psycopg2.Error:
        return None


def storage_nodes_with_two_rows(conninfo):
    execute(conninfo, "CREATE TABLE storage_nodes (id integer PRIMARY KEY); INSERT INTO storage_nodes VALUES (1), (2)")


def filled_by_a_run(conninfo):
    """A journal recording that a run filled storage_nodes, which the undo then empties."""
    journal = Journal(conninfo, "public", "a-source-id")
    journal.loaded("storage_nodes", created=False)
    return journal


def test_an_undo_that_meets_a_standby_says_the_leader_moved_and_leaves_the_rows(pg_database, standby):
    storage_nodes_with_two_rows(pg_database)
    on_standby = dict(standby, dbname=pg_database["dbname"])
    assert wait_until(lambda: storage_nodes(on_standby)) == [(1,), (2,)]

    problem = filled_by_a_run(on_standby).undo()

    assert problem == f"{standby['host']}:{standby['port']} is a standby now: the leader moved during the run"
    assert storage_nodes(pg_database) == [(1,), (2,)]


def test_an_undo_refused_by_read_only_sessions_on_a_leader_quotes_the_server(pg_database):
    storage_nodes_with_two_rows(pg_database)
    read_only = dict(pg_database, options="-c default_transaction_read_only=on")

    problem = filled_by_a_run(read_only).undo()

    assert problem == "ERROR: cannot execute TRUNCATE TABLE in a read-only transaction"
    assert storage_nodes(pg_database) == [(1,), (2,)]
