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
from .names import sqlite_ident
from .profile import describe_key, display
from .rules import Invalid, rule_for
from .source import mixed_dates
from .target import connect, first_line, has_rows, record_load, server_address

CHUNK_BYTES = 1 << 20  # what each read() hands to COPY: large writes, flat memory
FETCH_ROWS = 2000  # most rows per fetch; fewer when rows are wide (a quarter chunk per fetch)
FIRST_FETCH_ROWS = 8
STORAGE_CLASS = {b"integer": "integer", b"real": "real", b"text": "text", b"blob": "blob", b"null": "null"}
PR_SET_PDEATHSIG = 1
# What a SQL-formatted field becomes when its conversion gives NULL (a value that escaped the
# profile): no conversion produces this byte, so a chunk holding it is checked row by row.
UNCONVERTED = b"\x01"
PRINTF_ARGUMENTS = 100  # SQLite functions take at most 127 arguments
TRUNCATE_LOCK_WAIT = "1s"
# What an operator needs to know after a lost connection: the likely causes.
LOST_CAUSES = "server restart, failover or network"
# What PostgreSQL says when a value is over its limit of 1 GB per field (or the row does not fit in memory).
TOO_LARGE = ("invalid memory alloc request size", "out of memory")

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
    copy_sources: list  # the source column of each
    sql_fields: list  # SQLite expression of each SQL-formatted column (the first len() of copy_columns)
    field_types: list  # TargetType of each SQL-formatted column
    raw_types: list  # streamed plans: (field position, TargetType) of fields Python formats for some rows
    select_sql: str  # SQLite query: the SQL-formatted fields joined by tabs, then (typeof, value) pairs for Python
    parameters: tuple
    python_types: list  # TargetType of each Python-formatted column, in order
    datetime_formats: dict  # {source column: how a date column reads numbers} (rules.DATETIME_FORMATS)
    source_rows: int
    expected_rows: object  # source rows minus rejected ones; None when streamed (no count came first)
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


def copy_line_sql(fields):
    """SQLite expression joining a row's SQL-formatted fields with tabs, so one value per row reaches Python.

    printf builds the line in one buffer; joining with || would copy the growing
    line once per field (measured: 1.9 s against 3.0 s for the 18 columns of a
    million-row table).
    """
    guarded = [f"coalesce({field}, char(1))" for field in fields]
    groups = [guarded[start:start + PRINTF_ARGUMENTS] for start in range(0, len(guarded), PRINTF_ARGUMENTS)]
    return " || char(9) || ".join(
        "printf('{}', {})".format("\t".join(["%s"] * len(group)), ", ".join(group)) for group in groups)


class ParentGone(Exception):
    pass


class CopyStream:
    """The file-like object copy_expert reads: each read() returns about CHUNK_BYTES of COPY text."""

    def __init__(self, cursor, plan):
        self.cursor = cursor
        self.plan = plan
        self.rows = 0
        self.parent = os.getppid()
        self.width = 1 if plan.sql_fields else 0  # the SQL-formatted fields arrive as one value
        self.all_converted = False
        python_sources = plan.copy_sources[len(plan.sql_fields):]
        self.rules = [self._rule(t, c) for t, c in zip(plan.python_types, python_sources)]
        self.raw_rules = {position: (index, self._rule(t, plan.copy_sources[position], watch=True))
                          for index, (position, t) in enumerate(plan.raw_types)}
        self.format = self._format_python if self.rules else self._format_sql
        self.streamed = plan.expected_rows is None
        self.failure = None  # what read() raised
        self.batch = FIRST_FETCH_ROWS  # adapted to the row size, so wide rows never pile up in memory

    def _rule(self, target, column, watch=False):
        plan = self.plan
        return rule_for(target, plan.source_timezone, plan.datetime_formats.get(column, "auto"),
                        stream_label=(plan.source_table, column) if watch else None)

    def _format_sql(self, rows):
        return b"\n".join([row[0] for row in rows]) + b"\n"

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
        # copy_expert turns an exception raised here into a PostgreSQL error carrying its class name;
        # keep the exception itself, so the load reports it as it is.
        try:
            return self._read()
        except BaseException as error:
            self.failure = error
            raise

    def _read(self):
        if os.getppid() != self.parent:
            raise ParentGone()
        parts, total = [], 0
        while total < CHUNK_BYTES:
            rows = self.cursor.fetchmany(self.batch)
            if not rows:
                break
            data = self.format(rows)
            if UNCONVERTED in data and self.streamed:
                data = self._complete(rows)
            elif UNCONVERTED in data and not self.all_converted:
                problem = self._unexpected()
                if problem:
                    raise MigrationError(problem)
                self.all_converted = True  # the check covered the whole table
            parts.append(data)
            total += len(data)
            self.rows += len(rows)
            self.batch = max(1, min(FETCH_ROWS, CHUNK_BYTES * len(rows) // (4 * len(data))))
        if progress_counters is not None:
            progress_counters[self.plan.index] = self.rows
        return b"".join(parts)

    def _complete(self, rows):
        """Streamed rows holding UNCONVERTED fields: Python formats what SQL left to it, or names the bad value."""
        lines = []
        for number, row in enumerate(rows, start=self.rows):
            line = row[0]
            if UNCONVERTED in line:
                fields = line.split(b"\t")
                for position, field in enumerate(fields):
                    if field != UNCONVERTED:
                        continue
                    index, rule = self.raw_rules.get(position, (None, None))
                    storage = row[1 + 2 * index] if rule else None
                    if storage is None:  # the rule's SQL refused the value (or the source's text is 0x01)
                        problem = self._mixed_dates() or self._refused_value(number, position)
                        if problem:
                            raise MigrationError(problem)
                        continue
                    try:
                        fields[position] = rule.convert(STORAGE_CLASS[storage], row[2 + 2 * index])
                    except Invalid as error:
                        raise MigrationError(
                            self._bad_value(number, position, row[2 + 2 * index], str(error))) from None
                line = b"\t".join(fields)
            lines.append(line)
        return b"\n".join(lines) + b"\n"

    def _row(self, number, columns):
        """The key and the given SQLite expressions of the query's row ``number`` (0-based)."""
        plan = self.plan
        query = (f"SELECT {plan.key_sql}, {', '.join(columns)} FROM {plan.table_sql} "  # noqa: S608
                 f"WHERE {plan.where_sql} LIMIT 1 OFFSET ?")
        return self.cursor.connection.execute(query, plan.parameters + (number,)).fetchone()

    def _bad_value(self, number, position, value, reason, key=None):
        plan = self.plan
        if key is None:
            key = self._row(number, ["1"])[: len(plan.key_columns)]
        return (f"table {plan.source_table}, column {plan.copy_sources[position]}, "
                f"{describe_key(plan.key_columns, list(key))}: value {display(value)} {reason}")

    def _refused_value(self, number, position):
        """The message for a value the field's SQL refused, or None when the field is the source's own 0x01."""
        plan = self.plan
        q = sqlite_ident(plan.copy_sources[position])
        found = self._row(number, [f"typeof({q})", q, f"({plan.sql_fields[position]}) IS NULL"])
        width = len(plan.key_columns)
        storage, value, refused = found[width], found[width + 1], found[width + 2]
        if not refused:
            return None
        rule = self._rule(plan.field_types[position], plan.copy_sources[position])
        if value is None:
            return (f"table {plan.source_table}, column {plan.copy_sources[position]}, "
                    f"{describe_key(plan.key_columns, list(found[:width]))}: is NULL but the target column is NOT NULL "
                    f"({rule.target.sql})")
        try:
            rule.convert(STORAGE_CLASS[storage], value)
            reason = f"cannot become {rule.target.sql}"
        except Invalid as error:
            reason = str(error)
        return self._bad_value(number, position, value, reason, key=found[:width])

    def _mixed_dates(self):
        """The message for a date column whose numbers this stream found mixing Julian days and Unix times."""
        mixed = mixed_dates(self.cursor.connection)
        return f"{mixed}; nothing of this table was written" if mixed else None

    def _unexpected(self):
        """Name the first column and row whose SQL formatting gave NULL, or None when there is none."""
        plan = self.plan
        mixed = self._mixed_dates()
        if mixed:
            return mixed
        fields = plan.sql_fields
        if fields:
            query = (f"SELECT {plan.key_sql}, {', '.join(f'({field}) IS NULL' for field in fields)} "  # noqa: S608
                     f"FROM {plan.table_sql} WHERE {plan.where_sql} AND ({' || '.join(fields)}) IS NULL LIMIT 1")
            found = self.cursor.connection.execute(query, plan.parameters).fetchone()
            if found:
                key, failed = found[: len(plan.key_columns)], found[len(plan.key_columns):]
                column = plan.copy_columns[list(failed).index(1)]
                return (f"table {plan.source_table}, column {column}, {describe_key(plan.key_columns, list(key))}: "
                        "a value passed the profile but has no conversion; nothing of this table was written")
        return None  # the byte was the source's own, in a text value


def load_table(source, conninfo, plan, fingerprint):
    """Create (if planned) and fill one table, and record it in the state table, in one transaction.

    Returns dict(rows, seconds). Raises MigrationError; the transaction is then rolled back.
    """
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.timezone.utc)
    lite = source.connect(text_as_bytes=True)
    pg = connect(conninfo)
    target = sql.Identifier(plan.schema, plan.target_table)
    committing = False
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
                        "was starting")
            freeze = bool(plan.create_sql) or _truncated(cursor, target)
            copy = sql.SQL("COPY {} ({}) FROM STDIN{}").format(
                target, sql.SQL(", ").join(map(sql.Identifier, plan.copy_columns)),
                sql.SQL(" WITH (FREEZE)" if freeze else ""))
            try:
                rows = lite.execute(plan.select_sql, plan.parameters)
            except sqlite3.DatabaseError as error:
                raise MigrationError(f"source table {plan.source_table} cannot be read: {error}") from None
            stream = CopyStream(rows, plan)
            try:
                try:
                    cursor.copy_expert(copy.as_string(cursor), stream, size=CHUNK_BYTES)
                except psycopg2.Error as error:
                    if stream.failure is not None and not pg.closed:
                        raise stream.failure from None
                    if pg.closed:
                        raise  # a lost connection, not a refusal: told below
                    raise MigrationError(_refused(lite, plan, error, conninfo)) from None
            except Invalid as error:
                raise MigrationError(f"table {plan.source_table}: a value {error}") from None
            except sqlite3.DatabaseError as error:
                raise MigrationError(f"source table {plan.source_table} cannot be read: {error}") from None
            copied = cursor.rowcount
            if copied != stream.rows or copied != (plan.expected_rows if plan.expected_rows is not None else copied):
                raise MigrationError(
                    f"table {plan.source_table}: PostgreSQL stored {copied} rows, {stream.rows} were sent and "
                    f"{plan.expected_rows} expected")
            if source.fingerprint() != fingerprint:
                raise MigrationError(
                    f"source {source.path} changed while table {plan.source_table} was being read (another process "
                    "wrote to it): stop the application and run again")
            seconds = time.monotonic() - started
            record_load(cursor, plan.schema, plan.source_id, plan.target_table, plan.source_table, source.name,
                        copied, plan.source_rows - copied, started_at, seconds)
        committing = True
        pg.commit()
    except psycopg2.Error as error:
        _rollback(pg)
        raise MigrationError(_failed(plan, error, conninfo, pg.closed, committing)) from None
    except BaseException:
        _rollback(pg)
        raise
    finally:
        pg.close()
        lite.close()
    return {"rows": copied, "seconds": time.monotonic() - started}


def _rollback(pg):
    """Roll back what is left to roll back: a lost connection's transaction ended on the server already."""
    if pg.closed:
        return
    try:
        pg.rollback()
    except psycopg2.Error:
        pass


def _failed(plan, error, conninfo, lost, committing):
    """A PostgreSQL failure outside the rows themselves as one line: which table, what happened, what is left."""
    table = f"table {plan.source_table}"
    if lost and committing:
        return (f"{table}: the connection to {server_address(conninfo)} was lost while the table's load was "
                f"committing ({LOST_CAUSES})")
    if lost:
        return (f"{table}: the connection to {server_address(conninfo)} was lost while the table was loading "
                f"({LOST_CAUSES})")
    return f"{table}: PostgreSQL stopped the load: {first_line(error, conninfo)}"


def _truncated(cursor, target):
    """TRUNCATE the (empty, locked) table, so COPY may write its rows frozen; False when not allowed.

    Frozen rows need no hint bits later: the index builds and the first reads after
    the load then do not dirty and WAL-log every page of the table once more. A
    table that a foreign key references, one this role may not truncate, or one
    another session still reads after TRUNCATE_LOCK_WAIT (TRUNCATE needs the table
    to itself) is loaded without FREEZE.
    """
    cursor.execute("SELECT relkind = 'r', current_setting('lock_timeout') FROM pg_class WHERE oid = %s::regclass",
                   (target.as_string(cursor),))
    plain_table, lock_timeout = cursor.fetchone()
    if not plain_table:  # partitioned or foreign: COPY FREEZE does not apply
        return False
    cursor.execute("SAVEPOINT sqlite_to_postgres_truncate")
    try:
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", (TRUNCATE_LOCK_WAIT,))
        cursor.execute(sql.SQL("TRUNCATE ONLY {}").format(target))
    except psycopg2.Error:
        cursor.execute("ROLLBACK TO SAVEPOINT sqlite_to_postgres_truncate")
        return False
    cursor.execute("RELEASE SAVEPOINT sqlite_to_postgres_truncate")
    cursor.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
    return True


def _refused(lite, plan, error, conninfo):
    """PostgreSQL's refusal as one line naming the table, column, row and value (the COPY line mapped back)."""
    diag = getattr(error, "diag", None)
    context = " ".join((getattr(diag, "context", None) or "").split())
    message = getattr(diag, "message_primary", None) or first_line(error, conninfo)
    detail = " ".join((getattr(diag, "message_detail", None) or "").split())
    if detail:
        message += f" ({detail})"
    # "... COPY files, line 17, column created_at: "..."": line N is the query's Nth row. The COPY part
    # comes last (a JSON error puts its own "line 1" before it).
    copy_context = context[context.rfind("COPY "):] if "COPY " in context else ""
    line = copy_context.split(", line ")[1].split(",")[0].split(":")[0] if ", line " in copy_context else ""
    column = copy_context.split(", column ")[1].split(":")[0] if ", column " in copy_context else ""
    where, shown = "", ""
    if line.isdigit():
        try:
            found = lite.execute(
                f"SELECT {', '.join([plan.key_sql] + [sqlite_ident(c) for c in plan.copy_sources])} "  # noqa: S608
                f"FROM {plan.table_sql} WHERE {plan.where_sql} LIMIT 1 OFFSET ?",
                plan.parameters + (int(line) - 1,)).fetchone()
        except sqlite3.DatabaseError:
            found = None
        if found:
            width = len(plan.key_columns)
            values = dict(zip(plan.copy_sources, found[width:]))
            where = f", {describe_key(plan.key_columns, list(found[:width]))}"
            source_column = plan.copy_sources[plan.copy_columns.index(column)] if column in plan.copy_columns \
                else _undecodable(values)
            if source_column:
                where = f", column {source_column}{where}"
                shown = f"value {display(values[source_column])} "
    table = f"table {plan.source_table}{where}"
    if any(marker in message for marker in TOO_LARGE):
        return (f"{table}: a value is larger than PostgreSQL accepts (at most 1 GB per value, less for a whole row "
                "in one COPY line)")
    return f"{table}: {shown}was refused by PostgreSQL: {message}"


def _undecodable(values):
    """The first column holding text PostgreSQL cannot take (invalid UTF-8, NUL), for a refusal naming none."""
    for name, value in values.items():
        if isinstance(value, bytes):
            try:
                if "\x00" not in value.decode("utf-8"):
                    continue
            except UnicodeDecodeError:
                pass
            return name
    return ""
