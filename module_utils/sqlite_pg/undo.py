"""Putting back what a failed run wrote, so that the target is exactly as it was before the run.

A run only ever fills empty tables, creates tables, state rows and post-data
objects, and moves sequences forward; each of these is recorded here as it
happens (before the write: the state rows a load replaces, the value a sequence
had), and undone in reverse: post-data objects dropped, sequences set back,
filled tables emptied, created tables dropped, state rows put back, the state
table and schema dropped if the run created them. Tables keep their per-table
commit with their state row, so a ``kill -9`` (which leaves no chance to undo)
still leaves each table loaded or as it was, and a rerun completes the run.
The prepared transactions of tables loaded in rowid ranges are resolved first
(ranges.py): committed where the state row records them, so that the undo
then empties those tables like any other, rolled back otherwise.
"""

import json
import time

import psycopg2
from psycopg2 import errors, sql

from . import ranges
from .target import SPANS_TABLE, STATE_TABLE, connect, first_line, server_address

RECONNECT_SECONDS = 30  # how long the undo waits for a server that is restarting or failing over
RECONNECT_INTERVAL = 1.0


class Journal:
    """What this run wrote, in the order it wrote it."""

    def __init__(self, conninfo, schema, source_id):
        self.conninfo, self.schema, self.source_id = conninfo, schema, source_id
        self.created_schema = False
        self.created_state_table = False
        self.created = []  # target tables this run created (and filled)
        self.filled = []  # existing target tables this run filled (they were empty)
        self.replaced_state = []  # state rows (jsonb) a load of this run replaced
        self.recorded = []  # target tables whose state row this run wrote
        self.objects = []  # (kind, table, name, columns nullable before) of post-data objects on tables that existed
        self.sequences = []  # (sequence, last_value, is_called) before this run moved them
        self.prefix = ""  # what names this run's prepared transactions, once it loads a table in ranges

    @property
    def empty(self):
        return not (self.created_schema or self.created_state_table or self.created or self.filled
                    or self.objects or self.sequences)

    def loaded(self, table, created):
        (self.created if created else self.filled).append(table)
        self.recorded.append(table)

    def what(self):
        """The run's writes as an operator reads them: 'tables a, b' (by name: parallel loads commit in any order)."""
        tables = sorted(self.created + self.filled)
        parts = [f"tables {', '.join(tables)}" if tables else "",
                 f"{len(self.objects)} keys and indexes" if self.objects else "",
                 f"{len(self.sequences)} sequences" if self.sequences else ""]
        return ", ".join(p for p in parts if p) or "the state table"

    def resolve_prepared(self):
        """Commit or roll back this run's prepared transactions by the state rows; '' or why it could not."""
        return self._connected(lambda connection: None) if self.prefix else ""

    def undo(self):
        """Put everything back; returns '' when done, else why it could not be (one line)."""
        if self.empty:
            return self.resolve_prepared()
        return self._connected(self._undo)

    def _connected(self, work):
        """Resolve the prepared transactions, then ``work(connection)``, retrying while the server is away."""
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                connection = connect(self.conninfo)
            except Exception as error:  # MigrationError: the server is not back yet
                if time.monotonic() >= deadline:
                    return f"the server did not accept a connection for {RECONNECT_SECONDS} s ({error})"
                time.sleep(RECONNECT_INTERVAL)
                continue
            try:
                if self.prefix:
                    ranges.resolve(connection, self.schema, self.prefix)
                work(connection)
                return ""
            except psycopg2.OperationalError as error:
                if time.monotonic() >= deadline:
                    return first_line(error, self.conninfo)
                time.sleep(RECONNECT_INTERVAL)
            except errors.ReadOnlySqlTransaction as error:
                return self._read_only(connection, error)
            except psycopg2.Error as error:
                return first_line(error, self.conninfo)
            finally:
                connection.close()

    def _read_only(self, connection, error):
        """Why the server refused to write: a standby now (the leader moved during the run), or read-only sessions."""
        try:
            connection.rollback()
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_is_in_recovery()")
                standby = cursor.fetchone()[0]
        except psycopg2.Error:
            standby = False
        if standby:
            return f"{server_address(self.conninfo)} is a standby now: the leader moved during the run"
        return first_line(error, self.conninfo)

    def _undo(self, connection):
        """One transaction: either everything is put back or nothing is (and the undo can be retried)."""
        schema = sql.Identifier(self.schema)
        state = sql.Identifier(self.schema, STATE_TABLE)
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL lock_timeout = '10s'")
            mine = set(self.created)
            for kind, table, name, nullable in reversed(self.objects):
                if table in mine:
                    continue  # goes with its table
                target = sql.Identifier(self.schema, table)
                if kind.endswith("index"):
                    cursor.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(self.schema, name)))
                    continue
                cursor.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                    target, sql.Identifier(name)))
                for column in nullable:  # only columns the key made NOT NULL are in the list, but all were nullable
                    cursor.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(
                        target, sql.Identifier(column)))
            for sequence, last_value, is_called in reversed(self.sequences):
                cursor.execute("SELECT setval(%s::regclass, %s, %s)", (sequence, last_value, is_called))
            if self.filled:
                cursor.execute(sql.SQL("TRUNCATE ONLY {}").format(
                    sql.SQL(", ").join(sql.Identifier(self.schema, t) for t in self.filled)))
            for table in reversed(self.created):
                cursor.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(self.schema, table)))
            if self.recorded and not self.created_state_table:
                cursor.execute(sql.SQL("DELETE FROM {} WHERE source_id = %s AND table_name = ANY(%s)").format(state),
                               (self.source_id, self.recorded))
                for row in self.replaced_state:
                    cursor.execute(sql.SQL("INSERT INTO {0} SELECT * FROM jsonb_populate_record(NULL::{0}, %s) "
                                           "ON CONFLICT DO NOTHING").format(state), (json.dumps(row),))
            if self.created_state_table:
                cursor.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
                    state, sql.Identifier(self.schema, SPANS_TABLE)))
            if self.created_schema:
                cursor.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(schema))
        connection.commit()
