"""Loading one table: a SQLite query streamed into COPY ... FROM STDIN in one transaction.

Runs in a worker process (one per table at a time, ``jobs`` at once): Python's
per-row work, not PostgreSQL, is what limits one stream, so tables go in
parallel on separate processes and connections.
"""

import ctypes
import datetime
import multiprocessing
import os
import signal
import sqlite3
import time
from dataclasses import dataclass, field

import psycopg2
from psycopg2 import sql

from . import ranges
from .errors import MigrationError
from .names import sqlite_ident
from .profile import describe_key, display
from .rules import Invalid, rule_for
from .source import mixed_dates
from .target import connect, copy_in, first_line, has_rows, record_load, server_address

# What PostgreSQL reports when a lock wait ran out: in a range (ranges.RANGE_LOCK_WAIT), a key another range holds.
LOCK_NOT_AVAILABLE = "55P03"

CHUNK_BYTES = 1 << 20  # what each read() hands to COPY: large writes, flat memory
FETCH_ROWS = 2000  # most rows per fetch; fewer when rows are wide (a quarter chunk per fetch)
FIRST_FETCH_ROWS = 8
STORAGE_CLASS = {b"integer": "integer", b"real": "real", b"text": "text", b"blob": "blob", b"null": "null"}
PYTHON_CLASS = {int: "integer", float: "real"}  # a raw value's storage class by its type (bytes: by the plan)
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
# The SQL function a streamed plan calls for numbers its SQL cannot format exactly (copyplan.streamed_field):
# sqlite_to_postgres_number(field position, value) is the COPY field the column's rule makes of the number in
# Python, NULL (the field then 0x01) when the rule refuses it. Registered by each load on its own connection.
NUMBER_FUNCTION = "sqlite_to_postgres_number"


@dataclass(frozen=True)
class ProgressSlots:
    """Shared with the parent, which writes the progress file: per slot (a table, or one range of it) the rows
    streamed, and when a worker took it (``time.monotonic()``, 0.0 until then: it waits in the pool's queue)."""

    rows: object
    started: object

    @classmethod
    def create(cls, count):
        fork = multiprocessing.get_context("fork")
        return cls(fork.Array("q", count, lock=False), fork.Array("d", count, lock=False))


# Set by the engine before the worker processes are forked.
progress_slots = None


@dataclass
class LoadPlan:
    index: int  # slot in progress_slots
    source_table: str
    target_table: str
    schema: str
    create_sql: str  # CREATE TABLE, or "" when the table exists and is used as it is
    copy_columns: list  # target columns in the order the query produces them
    copy_sources: list  # the source column of each
    sql_fields: list  # SQLite expression of each SQL-formatted column (the first len() of copy_columns)
    field_types: list  # TargetType of each SQL-formatted column
    raw_types: list  # streamed plans: (field position, TargetType, storage) of fields Python formats for some
    # rows; storage: the class of a raw value that arrives as bytes, None when a typeof() field precedes it
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
    # One rowid range of a table loaded in several sessions (ranges.py): its transaction ends PREPAREd under
    # this name, without a state row; the run commits them all once every range is prepared.
    gid: str = ""
    # Streamed plans: (field position, TargetType, storage classes Python formats) of columns that seldom hold
    # those classes; each row's rowid (rowid_sql) is then the query's last field, to read such a row again.
    seldom_types: list = field(default_factory=list)
    rowid_sql: str = ""


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


class NumberFormatter:
    """NUMBER_FUNCTION of one load: the rule of the field's column formats the number, from SQLite's C loop.

    A REAL has no exact SQL formatting (SQLite prints 15 digits); Python's repr is the
    shortest text that reads back as the same double. One call per value, no row object.
    """

    def __init__(self, plan):
        self.plan = plan
        self.rules = {}  # field position: its rule, made on first use

    def __call__(self, position, value):
        rule = self.rules.get(position)
        if rule is None:
            plan, column = self.plan, self.plan.copy_sources[position]
            rule = self.rules[position] = rule_for(plan.field_types[position], plan.source_timezone,
                                                   plan.datetime_formats.get(column, "auto"),
                                                   stream_label=(plan.source_table, column))
        try:
            return rule.convert(PYTHON_CLASS[type(value)], value).decode()
        except Invalid:
            return None  # the field becomes 0x01, and the load names the value with the rule's reason


class CopyStream:
    """The file-like object COPY reads: each read() returns about CHUNK_BYTES of COPY text."""

    def __init__(self, cursor, plan, numbers=None):
        self.cursor = cursor
        self.plan = plan
        self.numbers = numbers  # the load's NumberFormatter: its rules watch what they formatted
        self.rows = 0
        self.parent = os.getppid()
        self.width = 1 if plan.sql_fields else 0  # the SQL-formatted fields arrive as one value
        self.all_converted = False
        python_sources = plan.copy_sources[len(plan.sql_fields):]
        self.rules = [self._rule(t, c) for t, c in zip(plan.python_types, python_sources)]
        self.raw_rules = {}  # field position: (offset of its raw field(s) in a row, storage, rule)
        offset = self.width
        for position, target, storage in plan.raw_types:
            self.raw_rules[position] = (offset, storage, self._rule(target, plan.copy_sources[position], watch=True))
            offset += 1 if storage is not None else 2
        self.seldom = {position: (set(classes), self._rule(target, plan.copy_sources[position], watch=True))
                       for position, target, classes in plan.seldom_types}
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
        # psycopg2 turns an exception raised here into a PostgreSQL error carrying its class name;
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
        if progress_slots is not None:
            progress_slots.rows[self.plan.index] = self.rows
        return b"".join(parts)

    def _complete(self, rows):
        """Streamed rows holding UNCONVERTED fields: Python formats what SQL left to it, or names the bad value."""
        lines = []
        for number, row in enumerate(rows, start=self.rows):
            line = row[0]
            if UNCONVERTED in line:
                fields = line.split(b"\t")
                again = self._read_again(row[-1]) if self.seldom else {}
                for position, text in enumerate(fields):
                    if text != UNCONVERTED:
                        continue
                    offset, bytes_class, rule = self.raw_rules.get(position, (None, None, None))
                    storage = value = None
                    if rule and bytes_class is None:
                        storage, value = STORAGE_CLASS.get(row[offset]), row[offset + 1]
                    elif rule:
                        value = row[offset]
                        storage = PYTHON_CLASS.get(type(value), bytes_class)
                    elif position in again:
                        storage, value = again[position]
                        classes, rule = self.seldom[position]
                        if storage not in classes:
                            value = None
                    if value is None:  # the rule's SQL refused the value (or the source's text is 0x01)
                        problem = self._mixed_dates() or self._refused_value(number, position)
                        if problem:
                            raise MigrationError(problem)
                        continue
                    try:
                        fields[position] = rule.convert(storage, value)
                    except Invalid as error:
                        raise MigrationError(self._bad_value(number, position, value, str(error))) from None
                line = b"\t".join(fields)
            lines.append(line)
        return b"\n".join(lines) + b"\n"

    def _read_again(self, rowid):
        """{field position: (storage class, value)} of the seldom columns of the row ``rowid``."""
        plan = self.plan
        positions = list(self.seldom)
        columns = ", ".join(f"typeof({sqlite_ident(plan.copy_sources[p])}), {sqlite_ident(plan.copy_sources[p])}"
                            for p in positions)
        found = self.cursor.connection.execute(
            f"SELECT {columns} FROM {plan.table_sql} WHERE {plan.rowid_sql} = ?", (rowid,)).fetchone()  # noqa: S608
        if found is None:  # gone since (the source changed: the load says so at its end)
            return {}
        return {p: (STORAGE_CLASS.get(found[2 * i]), found[2 * i + 1]) for i, p in enumerate(positions)}

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
        rule = (self.numbers and self.numbers.rules.get(position)) or self._rule(plan.field_types[position],
                                                                                  plan.copy_sources[position])
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
    if progress_slots is not None:
        progress_slots.started[plan.index] = started
    started_at = datetime.datetime.now(datetime.timezone.utc)
    lite = source.connect(text_as_bytes=True)
    numbers = NumberFormatter(plan)
    lite.create_function(NUMBER_FUNCTION, 2, numbers)
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
                # Nobody else may write the table while it loads; readers still can. The ranges of one
                # table share it (ROW EXCLUSIVE does not conflict with itself).
                cursor.execute(sql.SQL("LOCK TABLE {} IN {} MODE").format(
                    target, sql.SQL("ROW EXCLUSIVE" if plan.gid else "EXCLUSIVE")))
                if has_rows(cursor, plan.schema, plan.target_table):
                    raise MigrationError(
                        f"table {plan.schema}.{plan.target_table} received rows from elsewhere while this run "
                        "was starting")
            if plan.gid:
                cursor.execute("SELECT set_config('lock_timeout', %s, true)", (ranges.RANGE_LOCK_WAIT,))
            freeze = not plan.gid and (bool(plan.create_sql) or _truncated(cursor, target))
            copy = sql.SQL("COPY {} ({}) FROM STDIN{}").format(
                target, sql.SQL(", ").join(map(sql.Identifier, plan.copy_columns)),
                sql.SQL(" WITH (FREEZE)" if freeze else ""))
            try:
                rows = lite.execute(plan.select_sql, plan.parameters)
            except sqlite3.DatabaseError as error:
                raise MigrationError(f"source table {plan.source_table} cannot be read: {error}") from None
            stream = CopyStream(rows, plan, numbers)
            try:
                try:
                    copy_in(cursor, copy.as_string(cursor), stream, size=CHUNK_BYTES)
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
            committing = True
            if plan.gid:
                cursor.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(plan.gid)))
            else:
                record_load(cursor, plan.schema, plan.source_id, plan.target_table, plan.source_table, source.name,
                            copied, plan.source_rows - copied, started_at, seconds)
        if not plan.gid:
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
    return {"rows": copied, "seconds": time.monotonic() - started, "started_at": started_at,
            "dates": _date_kinds(lite, stream, numbers)}


def _date_kinds(lite, stream, numbers):
    """{column label: {is_julian: a value}} the 'auto' date columns' numbers showed in this stream, so that
    the ranges of one table can be compared (each range's connection watches only its own rows)."""
    rules = ([rule for _, _, rule in stream.raw_rules.values()] + [rule for _, rule in stream.seldom.values()]
             + list(numbers.rules.values()))
    watches = [getattr(lite, "date_watch", None)] + [getattr(getattr(rule, "numbers", None), "watch", None)
                                                     for rule in rules]
    kinds = {}
    for watch in filter(None, watches):
        for label, (is_julian, value) in watch.first.items():
            kinds.setdefault(label, {}).setdefault(is_julian, value)
    return kinds


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
    """PostgreSQL's refusal as one line naming the table, column, row and value (the COPY line mapped back).

    The value is checked once more by its rule: when the rule refuses it too (a check the stream
    leaves to PostgreSQL), the line gives the rule's reason, then PostgreSQL's.
    """
    diag = getattr(error, "diag", None)
    context = " ".join((getattr(diag, "context", None) or "").split())
    message = getattr(diag, "message_primary", None) or first_line(error, conninfo)
    detail = " ".join((getattr(diag, "message_detail", None) or "").split())
    if detail:
        message += f" ({detail})"
    if plan.gid and getattr(error, "pgcode", None) == LOCK_NOT_AVAILABLE:
        message = (f"it waited {ranges.RANGE_LOCK_WAIT} for a row another session holds, most likely a row of another "
                   "range of this table with the same key (a duplicate in a unique column)")
    # "... COPY files, line 17, column created_at: "..."": line N is the query's Nth row. The COPY part
    # comes last (a JSON error puts its own "line 1" before it).
    copy_context = context[context.rfind("COPY "):] if "COPY " in context else ""
    line = copy_context.split(", line ")[1].split(",")[0].split(":")[0] if ", line " in copy_context else ""
    column = copy_context.split(", column ")[1].split(":")[0] if ", column " in copy_context else ""
    too_large = any(marker in message for marker in TOO_LARGE)
    where, shown, reason = "", "", None
    if line.isdigit():
        fields = [f"typeof({sqlite_ident(c)}), {sqlite_ident(c)}" for c in plan.copy_sources]
        try:
            found = lite.execute(
                f"SELECT {', '.join([plan.key_sql] + fields)} "  # noqa: S608
                f"FROM {plan.table_sql} WHERE {plan.where_sql} LIMIT 1 OFFSET ?",
                plan.parameters + (int(line) - 1,)).fetchone()
        except sqlite3.DatabaseError:
            found = None
        if found:
            width = len(plan.key_columns)
            values = {source: (found[width + 2 * i], found[width + 2 * i + 1])
                      for i, source in enumerate(plan.copy_sources)}
            where = f", {describe_key(plan.key_columns, list(found[:width]))}"
            reasons = {} if too_large else _rule_reasons(plan, values, column)
            source_column = plan.copy_sources[plan.copy_columns.index(column)] if column in plan.copy_columns \
                else next(iter(reasons), "")
            if source_column:
                where = f", column {source_column}{where}"
                shown = f"value {display(values[source_column][1])} "
                reason = reasons.get(source_column)
    table = f"table {plan.source_table}{where}"
    if too_large:
        return (f"{table}: a value is larger than PostgreSQL accepts (at most 1 GB per value, less for a whole row "
                "in one COPY line)")
    if reason:
        return f"{table}: {shown}{reason}; PostgreSQL refused it: {message}"
    return f"{table}: {shown}was refused by PostgreSQL: {message}"


def _rule_reasons(plan, values, column):
    """{source column: why its rule refuses the row's value}: PostgreSQL's ``column`` only, or, when it named
    none (an encoding error, a line break in a value), every column in order, the first refused first."""
    types = dict(zip(plan.copy_sources, plan.field_types + plan.python_types))
    named = plan.copy_sources[plan.copy_columns.index(column)] if column in plan.copy_columns else None
    reasons = {}
    for source, (storage, value) in values.items():
        if value is None or (named and source != named):
            continue
        rule = rule_for(types[source], plan.source_timezone, plan.datetime_formats.get(source, "auto"))
        try:
            rule.convert(STORAGE_CLASS[storage], value)
        except Invalid as error:
            reasons[source] = str(error)
    return reasons
