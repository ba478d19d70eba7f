"""Loading one table: a SQLite query streamed into COPY ... FROM STDIN in one transaction.

Runs in a worker process (one per table at a time, ``jobs`` at once): Python's
per-row work, not PostgreSQL, is what limits one stream, so tables go in
parallel on separate processes and connections.
"""

import ctypes
import datetime
import os
import signal
import sqlite3
import time
from dataclasses import dataclass

import psycopg2
from psycopg2 import sql

from .errors import MigrationError
from .profile import describe_key
from .rules import Invalid, rule_for
from .target import connect, first_line, has_rows, record_load

CHUNK_BYTES = 1 << 20  # what each read() hands to COPY: large writes, flat memory
FETCH_ROWS = 2000  # most rows per fetch; fewer when rows are wide (a quarter chunk per fetch)
FIRST_FETCH_ROWS = 8
STORAGE_CLASS = {b"integer": "integer", b"real": "real", b"text": "text", b"blob": "blob", b"null": "null"}
PR_SET_PDEATHSIG = 1

# Rows streamed per table, shared with the parent (which writes the progress file).
# Set by the engine before the worker processes are forked.
progress_counters = None


@dataclass
class LoadPlan:
    index: int  # slot in progress_counters
    source_table: str
    target_table: str
    schema: str
    create_sql: str  # CREATE TABLE, or "" when the table exists and is used as it is
    copy_columns: list  # target columns in the order the query produces them
    select_sql: str  # SQLite query: SQL-formatted fields first, then (typeof, value) pairs for Python
    parameters: tuple
    python_types: list  # TargetType of each Python-formatted column, in order
    source_rows: int
    expected_rows: int  # source rows minus rejected ones
    key_sql: str  # SQLite expression list naming a row (for messages)
    key_columns: list
    table_sql: str  # the quoted SQLite table name
    where_sql: str  # the query's WHERE (also used to name a row from a COPY line number)
    source_timezone: str
    source_id: str


def become_worker():
    """Worker initializer: die with the parent, so a killed run never commits anything afterwards."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: CopyStream.read() checks the parent instead
        pass


class ParentGone(Exception):
    pass


class CopyStream:
    """The file-like object copy_expert reads: each read() returns about CHUNK_BYTES of COPY text."""

    def __init__(self, cursor, plan):
        self.cursor = cursor
        self.plan = plan
        self.rows = 0
        self.parent = os.getppid()
        self.width = len(plan.copy_columns) - len(plan.python_types)
        self.rules = [rule_for(t, plan.source_timezone) for t in plan.python_types]
        self.format = self._format_python if self.rules else self._format_sql
        self.batch = FIRST_FETCH_ROWS  # adapted to the row size, so wide rows never pile up in memory

    def _format_sql(self, rows):
        return b"\n".join(map(b"\t".join, rows)) + b"\n"

    def _format_python(self, rows):
        width, rules = self.width, self.rules
        lines = []
        for row in rows:
            fields = list(row[:width])
            position = width
            for rule in rules:
                value = row[position + 1]
                fields.append(b"\\N" if value is None else rule.convert(STORAGE_CLASS[row[position]], value))
                position += 2
            lines.append(b"\t".join(fields))
        return b"\n".join(lines) + b"\n"

    def read(self, size=-1):
        if os.getppid() != self.parent:
            raise ParentGone()
        parts, total = [], 0
        while total < CHUNK_BYTES:
            rows = self.cursor.fetchmany(self.batch)
            if not rows:
                break
            try:
                data = self.format(rows)
            except TypeError:
                raise MigrationError(self._unexpected(rows)) from None
            parts.append(data)
            total += len(data)
            self.rows += len(rows)
            self.batch = max(1, min(FETCH_ROWS, CHUNK_BYTES * len(rows) // (4 * len(data))))
        if progress_counters is not None:
            progress_counters[self.plan.index] = self.rows
        return b"".join(parts)

    def _unexpected(self, rows):
        for row in rows:
            for position, value in enumerate(row[: self.width]):
                if value is None:
                    return (f"table {self.plan.source_table}, column {self.plan.copy_columns[position]}: "
                            "a value passed the profile but has no conversion; nothing of this table was written")
        return f"table {self.plan.source_table}: a row could not be formatted; nothing of this table was written"


def load_table(source, conninfo, plan, fingerprint):
    """Create (if planned) and fill one table, and record it in the state table, in one transaction.

    Returns dict(rows, seconds). Raises MigrationError; the transaction is then rolled back.
    """
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.timezone.utc)
    lite = source.connect(text_as_bytes=True)
    pg = connect(conninfo)
    target = sql.Identifier(plan.schema, plan.target_table)
    try:
        with pg.cursor() as cursor:
            # Local to this transaction: naive timestamps are in the source's zone.
            cursor.execute("SELECT set_config('TimeZone', %s, true), set_config('DateStyle', 'ISO, YMD', true)",
                           (plan.source_timezone,))
            if plan.create_sql:
                cursor.execute(plan.create_sql)
            else:
                # Nobody else may write the table while it loads; readers still can.
                cursor.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(target))
                if has_rows(cursor, plan.schema, plan.target_table):
                    raise MigrationError(
                        f"table {plan.schema}.{plan.target_table} received rows from elsewhere while this run "
                        "was starting; nothing of this table was written")
            copy = sql.SQL("COPY {} ({}) FROM STDIN{}").format(
                target, sql.SQL(", ").join(map(sql.Identifier, plan.copy_columns)),
                sql.SQL(" WITH (FREEZE)" if plan.create_sql else ""))
            try:
                rows = lite.execute(plan.select_sql, plan.parameters)
            except sqlite3.DatabaseError as error:
                raise MigrationError(f"source table {plan.source_table} cannot be read: {error}") from None
            stream = CopyStream(rows, plan)
            try:
                cursor.copy_expert(copy.as_string(cursor), stream, size=CHUNK_BYTES)
            except psycopg2.Error as error:
                raise MigrationError(_refused(lite, plan, error, conninfo)) from None
            except Invalid as error:
                raise MigrationError(
                    f"table {plan.source_table}: a value {error}; nothing of this table was written") from None
            except sqlite3.DatabaseError as error:
                raise MigrationError(f"source table {plan.source_table} cannot be read: {error}") from None
            copied = cursor.rowcount
            if copied != stream.rows or copied != plan.expected_rows:
                raise MigrationError(
                    f"table {plan.source_table}: PostgreSQL stored {copied} rows, {stream.rows} were sent and "
                    f"{plan.expected_rows} expected; nothing of this table was written")
            if source.fingerprint() != fingerprint:
                raise MigrationError(
                    f"source {source.path} changed while it was being read (another process wrote to it): "
                    f"stop the application and run again; nothing of table {plan.source_table} was written")
            seconds = time.monotonic() - started
            record_load(cursor, plan.schema, plan.source_id, plan.target_table, plan.source_table, source.path,
                        copied, plan.source_rows - copied, started_at, seconds)
        pg.commit()
    except BaseException:
        pg.rollback()
        raise
    finally:
        pg.close()
        lite.close()
    return {"rows": copied, "seconds": time.monotonic() - started}


def _refused(lite, plan, error, conninfo):
    """PostgreSQL's refusal as one line naming the table, column, row and value."""
    diag = getattr(error, "diag", None)
    context = " ".join((getattr(diag, "context", None) or "").split())
    message = getattr(diag, "message_primary", None) or first_line(error, conninfo)
    where = ""
    if context.startswith("COPY"):
        # "COPY files, line 17, column created_at: "..."": line N is the query's Nth row.
        try:
            line = int(context.split(", line ")[1].split(",")[0].split(":")[0])
            key_query = (f"SELECT {plan.key_sql} FROM {plan.table_sql} WHERE {plan.where_sql} "  # noqa: S608
                         f"LIMIT 1 OFFSET ?")
            key = lite.execute(key_query, plan.parameters + (line - 1,)).fetchone()
            if key:
                where = f", {describe_key(plan.key_columns, list(key))}"
        except (IndexError, ValueError, sqlite3.DatabaseError):
            pass
        column = context.split(", column ")[1].split(":")[0] if ", column " in context else ""
        if column:
            where = f", column {column}{where}"
    return (f"table {plan.source_table}{where}: PostgreSQL refused the data: {message}"
            f"{' (' + context + ')' if context else ''}; nothing of this table was written")

