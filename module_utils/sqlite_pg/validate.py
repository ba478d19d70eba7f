"""Validation of a migrated database: the SQLite source against PostgreSQL.

``validate()`` compares every table (row counts and content checksums, see
checksum.py), locates the first differing primary keys of a table whose
checksums differ, checks foreign keys and identity sequences, runs the
operator's read-only queries and waits until every standby has replayed the
migration. It only reads. Problems in the data are reported in the result
(``status: failed`` and a one-line ``msg``); problems that stop validation
itself (no source file, no connection) raise MigrationError with one line.

Speed: key ranges of every table are hashed in parallel, ``jobs`` processes
on the SQLite side and ``jobs`` connections on the PostgreSQL side, all of
them in one exported snapshot so the server side is one consistent view.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import math
import multiprocessing
import sqlite3
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import psycopg2
from psycopg2 import sql

from .checksum import Checksum, Column, PostgresTable, SqliteTable, TableSpec, comparable_kind
from .errors import MigrationError, shorten
from .loader import become_worker
from .names import intervals_from_text, pg_name, sqlite_ident
from .progress import HashProgress
from .rules import check_timezone
from .source import Source, read_schema
from .target import connect, first_line
from .typemap import from_catalog

# Keys per bucket aim at this many buckets per table: a differing bucket is
# re-read row by row, so buckets stay small (about a thousand rows of a
# million-row table).
BUCKETS_PER_TABLE = 1024
# Rows per unit of parallel work: small enough to balance `jobs` workers,
# large enough that per-query overhead does not matter.
ROWS_PER_UNIT = 25_000
SHOWN_VALUE_LENGTH = 60
MSG_PROBLEMS = 3
MAX_RANGES_SHOWN = 100  # differing key ranges listed per table; the count says how many there are
MAX_WRITTEN_KEYS = 100_000  # target rows written since the baseline beyond which every row is compared
INTEGER_TYPES = ("int2", "int4", "int8")


def _fetch(connection, query, parameters=None) -> list:
    with connection.cursor() as cursor:
        cursor.execute(query, parameters)
        return cursor.fetchall() if cursor.description else []


# --- What is compared ------------------------------------------------------------------

_COLUMNS_QUERY = """
SELECT a.attname, base.typname, CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END,
       format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type base ON base.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE n.nspname = %(schema)s AND c.relname = %(table)s AND c.relkind IN ('r', 'p')
  AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_PRIMARY_KEY_QUERY = """
SELECT a.attname, t.typname
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
JOIN pg_type t ON t.oid = a.atttypid
WHERE n.nspname = %(schema)s AND c.relname = %(table)s AND i.indisprimary
"""


def describe_table(source_table, connection, schema: str) -> tuple:
    """(TableSpec, None) for a SQLite table (source.SourceTable), or (None, why it cannot be compared)."""
    table = source_table.name
    for target_name in dict.fromkeys((table, pg_name(table), pg_name(table).lower())):
        target = _fetch(connection, _COLUMNS_QUERY, {"schema": schema, "table": target_name})
        if target:
            break
    else:
        return None, f"table {table} is missing in PostgreSQL schema {schema}"
    by_name = {name.lower(): name for name, *_ in target}
    missing = [column.name for column in source_table.columns if column.name.lower() not in by_name]
    if missing:
        return None, f"table {table}: column {', '.join(missing)} missing in PostgreSQL"
    compared = {column.name.lower() for column in source_table.columns}
    columns = []
    for name, type_name, typmod, formatted in target:
        if name.lower() not in compared:
            continue  # a column only PostgreSQL has holds its default: nothing to compare
        target_type = from_catalog(type_name, typmod, formatted)
        kind = comparable_kind(type_name, target_type.category)
        if kind is None:
            return None, f"table {table}: column {name} has type {formatted}, which validation cannot compare"
        columns.append(Column(name, type_name, kind, target_type))
    primary_key = _fetch(connection, _PRIMARY_KEY_QUERY, {"schema": schema, "table": target_name})
    key = primary_key[0][0] if len(primary_key) == 1 and primary_key[0][1] in INTEGER_TYPES else None
    return TableSpec(target_name, tuple(columns), key, sqlite_name=table, rowid=source_table.rowid or "rowid"), None


def read_rejects(reject_file: str) -> dict:
    """{SQLite table: sorted rowids} of the rows a migration with on_invalid=reject left out (its reject_file)."""
    rejected = {}
    try:
        with open(reject_file, encoding="utf-8") as stream:
            for number, line in enumerate(stream, start=1):
                try:
                    record = json.loads(line)
                    table, rowid = record["table"], record["rowid"]
                except (ValueError, KeyError, TypeError):
                    raise MigrationError(f"reject_file {reject_file} line {number} is not a reject record") from None
                if rowid is None:
                    raise MigrationError(f"reject_file {reject_file} line {number}: table {table} has no rowid "
                                         "(WITHOUT ROWID); validation cannot leave its rejected rows out")
                rejected.setdefault(table, set()).add(rowid)
    except OSError as error:
        raise MigrationError(f"reject_file {reject_file} cannot be read: {error.strerror}") from None
    return {table: sorted(rowids) for table, rowids in rejected.items()}


def _choose_tables(source_tables: list, src: str, tables) -> list:
    if not tables:
        if not source_tables:
            raise MigrationError(f"source {src} has no tables")
        return source_tables
    by_lower = {table.name.lower(): table for table in source_tables}
    missing = [name for name in tables if name.lower() not in by_lower]
    if missing:
        raise MigrationError(f"source {src} has no table {', '.join(missing)}")
    return [by_lower[name.lower()] for name in tables]


# --- Parallel units of work -----------------------------------------------------------------

def _sqlite_unit(src: str, spec: TableSpec, source_timezone: str, origin, width, key_range) -> dict:
    """Checksums of a key range (a tuple) or of some key intervals (a list), per bucket; or of the
    whole table when it has no key."""
    connection = Source(src).connect()
    try:
        table = SqliteTable(connection, spec, source_timezone)
        if spec.key is None:
            return {0: table.checksum()}
        if isinstance(key_range, list):
            return table.bucket_checksums(origin, width, intervals=key_range)
        return table.bucket_checksums(origin, width, key_range)
    finally:
        connection.close()


def _postgres_unit(connection, schema: str, spec: TableSpec, origin, width, key_range) -> dict:
    table = PostgresTable(connection, schema, spec)
    if spec.key is None:
        return {0: table.checksum()}
    if isinstance(key_range, list):
        return table.bucket_checksums(origin, width, intervals=key_range)
    return table.bucket_checksums(origin, width, key_range)


class _PostgresWorkers:
    """Connections of the PostgreSQL side, one per thread, all in the snapshot of the main one."""

    def __init__(self, conninfo: dict, snapshot: str, schema: str):
        self._conninfo = conninfo
        self._snapshot = snapshot
        self._schema = schema
        self._local = threading.local()
        self._connections = []
        self._lock = threading.Lock()

    def _connection(self):
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = connect(self._conninfo)
            with self._lock:
                self._connections.append(connection)
            connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
            _fetch(connection, "SET TRANSACTION SNAPSHOT %s", (self._snapshot,))
            self._local.connection = connection
        return connection

    def unit(self, spec: TableSpec, origin, width, key_range) -> dict:
        return _postgres_unit(self._connection(), self._schema, spec, origin, width, key_range)

    def close(self):
        for connection in self._connections:
            connection.close()


class _Plan:
    """How one table is compared: its bucket grid, its units of work and their results."""

    def __init__(self, spec, sqlite_rows, origin=0, width=1, units=(None,), odd_keys=0):
        self.spec = spec
        self.sqlite_rows = sqlite_rows  # counted when planning; a live source may have more by now
        self.odd_keys = odd_keys  # SQLite rows whose key is not an integer: in no bucket
        self.origin = origin
        self.width = width
        self.units = units  # inclusive key ranges; (None,) is the whole table at once; a list: key intervals
        self.all_units = units
        self.source_buckets = {}
        self.target_buckets = {}
        self.finished = 0.0  # seconds from the start of validation until both sides were hashed
        self.narrowed = None  # {target_rows, intervals} when only changed keys are compared
        self.rows_to_hash = sqlite_rows  # on the SQLite side, for the progress file; estimated when narrowed
        self.bounds = (None, None)  # lowest and highest key of both sides

    def compare_all(self):
        """Back to comparing every row (the changed keys alone cannot tell where the difference is)."""
        self.units, self.narrowed, self.rows_to_hash = self.all_units, None, self.sqlite_rows
        self.source_buckets, self.target_buckets = {}, {}


def _plan_table(spec, source, connection, schema) -> _Plan:
    sqlite_table = SqliteTable(source, spec)
    sqlite_rows = sqlite_table.row_count()
    if spec.key is None:
        return _Plan(spec, sqlite_rows)
    bounds = [bound for bound in sqlite_table.key_bounds() + PostgresTable(connection, schema, spec).key_bounds()
              if bound is not None]
    if not bounds:
        return _Plan(spec, sqlite_rows, units=())
    odd_keys = sqlite_table.odd_key_count()
    origin, highest = min(bounds), max(bounds)
    span = highest - origin + 1
    width = max(1, math.ceil(span / BUCKETS_PER_TABLE))
    buckets = math.ceil(span / width)
    rows_per_bucket = max(1, sqlite_rows) / buckets
    buckets_per_unit = max(1, int(ROWS_PER_UNIT / rows_per_bucket))
    units = tuple((origin + first * width, origin + min(first + buckets_per_unit, buckets) * width - 1)
                  for first in range(0, buckets, buckets_per_unit))
    plan = _Plan(spec, sqlite_rows, origin, width, units, odd_keys)
    plan.bounds = (origin, highest)
    return plan


def changed_since(baseline, changed_keys) -> dict:
    """{table: key intervals} of the tables whose changes since ``baseline`` (a completed validation's
    ``baseline``) are known: the sync that followed it names them relative to the snapshot it validated."""
    if not baseline or not baseline.get("snapshot") or not baseline.get("source_id"):
        return {}
    known = {table: entry.get("changed_keys") or {} for table, entry in (changed_keys or {}).items()}
    return {table: intervals_from_text(keys["keys"]) for table, keys in known.items()
            if keys.get("since") == baseline["source_id"] and keys.get("keys") is not None}


def _narrow(plan: _Plan, keys: list, target: PostgresTable, snapshot: str):
    """Compare only ``keys`` (changed in the source since the baseline) and the keys of target rows written
    since the baseline's snapshot. Both sides were equal at the baseline; the source outside ``keys`` is
    byte for byte what it was (its pages are), the target outside them has no newer row version. A row
    deleted from the target outside them leaves the counts unequal, and then every row is compared."""
    target_rows, written = target.written_since(snapshot, MAX_WRITTEN_KEYS)
    if written is None:
        return
    if plan.spec.key is None:
        if not keys and not written:
            plan.units, plan.narrowed, plan.rows_to_hash = (), {"target_rows": target_rows, "intervals": 0}, 0
        return
    low, high = plan.bounds
    intervals = _merged([[max(a, low), min(b, high)] for a, b in keys + [[k, k] for k in written]
                         if a <= high and b >= low]) if low is not None else []
    density = max(1, plan.sqlite_rows) / max(1, high - low + 1) if low is not None else 0
    units, unit, rows = [], [], 0.0
    for interval in intervals:
        unit.append(interval)
        rows += (interval[1] - interval[0] + 1) * density
        if rows >= ROWS_PER_UNIT:
            units.append(unit)
            unit, rows = [], 0.0
    plan.units = tuple(units + ([unit] if unit else []))
    plan.rows_to_hash = round(sum((high - low + 1) * density for low, high in intervals))
    plan.narrowed = {"target_rows": target_rows, "intervals": len(intervals)}


def _counts_differ(plan: _Plan) -> bool:
    source = sum(plan.source_buckets.values(), Checksum())
    target = sum(plan.target_buckets.values(), Checksum())
    return source == target and plan.sqlite_rows != plan.narrowed["target_rows"]


def _merged(intervals: list) -> list:
    """Sorted, disjoint intervals covering the given ones (touching ones joined)."""
    merged = []
    for low, high in sorted(intervals):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return merged


def _run_units(plans, src, source_timezone, connection, schema, workers: _PostgresWorkers, jobs: int, started: float,
               progress: HashProgress):
    """Fill every plan's bucket checksums, both sides; in parallel unless jobs is 1. Each unit's rows go to
    ``progress`` as the unit ends."""
    work = sorted(((plan, key_range) for plan in plans for key_range in plan.units),
                  key=lambda item: -item[0].sqlite_rows)
    remaining = {id(plan): 2 * len(plan.units) for plan in plans}
    progress.hashing({plan.spec.source_name: (plan.rows_to_hash, len(plan.units)) for plan in plans})

    def finished(plan, buckets, side):
        (plan.source_buckets if side == "sqlite" else plan.target_buckets).update(buckets)
        remaining[id(plan)] -= 1
        if not remaining[id(plan)]:
            plan.finished = time.monotonic() - started
        progress.hashed(plan.spec.source_name, side, sum(bucket.rows for bucket in buckets.values()),
                        last=not remaining[id(plan)])

    if jobs == 1:
        for plan, key_range in work:
            finished(plan, _sqlite_unit(src, plan.spec, source_timezone, plan.origin, plan.width, key_range), "sqlite")
            finished(plan, _postgres_unit(connection, schema, plan.spec, plan.origin, plan.width, key_range),
                     "postgresql")
        return
    # The SQLite workers are forked at the first submit, before any thread
    # exists: forking a process that runs threads is unsafe.
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(jobs, mp_context=fork, initializer=become_worker) as processes:
        pending = {processes.submit(_sqlite_unit, src, plan.spec, source_timezone, plan.origin, plan.width,
                                    key_range): (plan, "sqlite") for plan, key_range in work}
        with ThreadPoolExecutor(jobs) as threads:
            pending.update({threads.submit(workers.unit, plan.spec, plan.origin, plan.width, key_range):
                            (plan, "postgresql") for plan, key_range in work})
            # As they end, whichever side: the progress file follows both.
            while pending:
                done, _ = wait(pending, timeout=progress.interval, return_when=FIRST_COMPLETED)
                for future in done:
                    plan, side = pending.pop(future)
                    finished(plan, future.result(), side)
                progress.write()


# --- Differences -------------------------------------------------------------------------------

def _shown(value):
    """A value as the result shows it: text cut short, bytes as hex."""
    if isinstance(value, (bytes, memoryview)):
        value = "\\x" + bytes(value).hex()
    if isinstance(value, str) and len(value) > SHOWN_VALUE_LENGTH:
        return value[:SHOWN_VALUE_LENGTH - 1] + "…"
    return value


def locate_differences(sqlite_table: SqliteTable, postgres_table: PostgresTable, origin: int, width: int,
                       buckets, limit: int) -> list:
    """The first differing keys (up to limit) in the given buckets, in key order.

    Each is ``{key, problem}``, problem being ``missing in PostgreSQL``, ``not in
    SQLite`` or ``values differ``; the latter with ``columns``: name ->
    ``{sqlite, postgres}`` (the source value and PostgreSQL's text, shortened).
    """
    columns = sqlite_table.spec.columns
    found, changed = [], {}
    for bucket in sorted(buckets):
        low = origin + bucket * width
        source = sqlite_table.canonical_rows((low, low + width - 1))
        target = postgres_table.canonical_rows((low, low + width - 1))
        for key in sorted(set(source) | set(target), key=lambda key: (type(key) is not int, str(key))):
            if key not in target:
                found.append({"key": key, "problem": "missing in PostgreSQL"})
            elif key not in source:
                found.append({"key": key, "problem": "not in SQLite"})
            elif source[key][0] != target[key]:
                changed[key] = (source[key], target[key])
                found.append({"key": key, "problem": "values differ"})
            if len(found) >= limit:
                break
        if len(found) >= limit:
            break
    shown = postgres_table.display_values(list(changed)) if changed else {}
    for difference in found:
        if difference["key"] in changed:
            (canonical, source_row), target_canonical = changed[difference["key"]]
            target_row = shown.get(difference["key"], (None,) * len(columns))
            difference["columns"] = {
                column.name: {"sqlite": _shown(source_row[index]), "postgres": _shown(target_row[index])}
                for index, column in enumerate(columns) if canonical[index] != target_canonical[index]}
    return found


def _describe_difference(key_name: str, difference: dict) -> str:
    text = f"{key_name} {difference['key']} {difference['problem']}"
    if "columns" in difference:
        text += " (" + ", ".join(
            f"{name}: SQLite {shorten(values['sqlite'], 30)}, PostgreSQL {shorten(values['postgres'], 30)}"
            for name, values in difference["columns"].items()) + ")"
    return text


def _uncompared_table(source, source_table, problem: str) -> dict:
    """The result of a table that cannot be compared: the same keys as a compared one, and the problem."""
    (rows,) = source.execute(f"SELECT count(*) FROM {sqlite_ident(source_table.name)}").fetchone()  # noqa: S608
    return {"sqlite_rows": rows, "postgres_rows": None, "sqlite_checksum": None, "postgres_checksum": None,
            "match": False, "key": None, "rejected_rows": 0, "seconds": 0.0, "differences": [],
            "differing_ranges": [], "compared": None, "problem": problem}


def _compare_table(plan: _Plan, source, connection, schema, limit) -> tuple:
    """(result, problem or None) of one table whose buckets are filled."""
    spec = plan.spec
    source_total = sum(plan.source_buckets.values(), Checksum())
    target_total = sum(plan.target_buckets.values(), Checksum())
    # Rows as the hashing read them: a live source (a drift run) may have
    # changed since the tables were planned.
    sqlite_rows = source_total.rows + plan.odd_keys if spec.key is not None else source_total.rows
    target_rows = target_total.rows
    if plan.narrowed:  # the sums are of the changed keys; the counts are of the whole tables
        sqlite_rows, target_rows = plan.sqlite_rows, plan.narrowed["target_rows"]
    match = source_total == target_total and sqlite_rows == target_rows and not plan.odd_keys
    result = {
        "sqlite_rows": sqlite_rows, "postgres_rows": target_rows,
        "sqlite_checksum": source_total.digest, "postgres_checksum": target_total.digest,
        "match": match, "key": spec.key, "rejected_rows": len(spec.rejected), "differences": [],
        "differing_ranges": [],
        "compared": dict(plan.narrowed, rows=source_total.rows, keys="changed since the baseline")
        if plan.narrowed else {"keys": "all", "rows": source_total.rows},
    }
    started = time.monotonic()
    problems = []
    if sqlite_rows != target_rows:
        problems.append(f"{sqlite_rows} rows in SQLite, {target_rows} in PostgreSQL")
    elif not match:
        problems.append("content checksums differ")
    if plan.odd_keys:
        problems.append(f"{plan.odd_keys} SQLite rows have a {spec.key} that is not an integer")
    if source_total != target_total and spec.key is not None:
        differing = sorted(bucket for bucket in set(plan.source_buckets) | set(plan.target_buckets)
                           if plan.source_buckets.get(bucket) != plan.target_buckets.get(bucket))
        result["differing_ranges"] = differing_ranges(plan.origin, plan.width, differing)
        result["differences"] = locate_differences(SqliteTable(source, spec), PostgresTable(connection, schema, spec),
                                                   plan.origin, plan.width, differing, limit)
        problems += [_describe_difference(spec.key, d) for d in result["differences"][:MSG_PROBLEMS]]
    elif not match and spec.key is None:
        problems.append("the table has no single-column integer primary key to locate the differing rows by")
    result["seconds"] = round(plan.finished + time.monotonic() - started, 3)
    return result, (f"table {spec.source_name}: " + "; ".join(problems)) if problems else None


def differing_ranges(origin: int, width: int, buckets: list) -> list:
    """Inclusive key ranges [low, high] covering the given sorted buckets, adjacent buckets merged."""
    ranges = []
    for bucket in buckets:
        low, high = origin + bucket * width, origin + (bucket + 1) * width - 1
        if ranges and ranges[-1][1] + 1 == low:
            ranges[-1][1] = high
        else:
            ranges.append([low, high])
    return ranges


def drift_of(table_result: dict, limit: int = MAX_RANGES_SHOWN) -> dict:
    """What a scheduler reads of one table: status ok, drift or not compared, counts, ranges, first keys."""
    if table_result.get("problem"):
        status = "not compared"
    else:
        status = "ok" if table_result["match"] else "drift"
    key = table_result.get("key")
    ranges = table_result.get("differing_ranges", [])
    return {
        "status": status,
        "source_rows": table_result["sqlite_rows"],
        "target_rows": table_result["postgres_rows"],
        "differing_ranges": ranges[:limit],
        "differing_range_count": len(ranges),
        "first_differing_keys": [
            {"key": {key: difference["key"]}, "problem": difference["problem"],
             "columns": sorted(difference.get("columns", {}))}
            for difference in table_result.get("differences", [])],
        "problem": table_result.get("problem"),
    }


# --- Foreign keys and sequences ----------------------------------------------------------

_FOREIGN_KEYS_QUERY = """
SELECT con.conname, child.relname, parent_ns.nspname, parent.relname, con.convalidated,
       ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, position)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.position),
       ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, position)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.position)
FROM pg_constraint con
JOIN pg_class child ON child.oid = con.conrelid
JOIN pg_namespace child_ns ON child_ns.oid = child.relnamespace
JOIN pg_class parent ON parent.oid = con.confrelid
JOIN pg_namespace parent_ns ON parent_ns.oid = parent.relnamespace
WHERE con.contype = 'f' AND child_ns.nspname = %(schema)s AND child.relname = ANY(%(tables)s)
ORDER BY child.relname, con.conname
"""


def _orphans(connection, child, columns, parent, parent_columns, key, limit) -> tuple:
    """(count, first rows) of child rows whose foreign key finds no parent row.

    child and parent are sql.Identifier of the tables; rows show the child's key and the key's columns.
    """
    condition = sql.SQL(" AND ").join(
        [sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(column)) for column in columns]
        + [sql.SQL("NOT EXISTS (SELECT 1 FROM {} p WHERE {})").format(parent, sql.SQL(" AND ").join(
            sql.SQL("p.{} = c.{}").format(sql.Identifier(theirs), sql.Identifier(ours))
            for ours, theirs in zip(columns, parent_columns)))])
    count = _fetch(connection, sql.SQL("SELECT count(*) FROM {} c WHERE {}").format(child, condition))[0][0]
    if not count:
        return 0, []
    shown = ([key] if key and key not in columns else []) + list(columns)
    order = sql.SQL(" ORDER BY c.{}").format(sql.Identifier(key)) if key else sql.SQL("")
    rows = _fetch(connection, sql.SQL("SELECT {} FROM {} c WHERE {}{} LIMIT %(limit)s").format(
        sql.SQL(", ").join(sql.SQL("c.{}").format(sql.Identifier(name)) for name in shown),
        child, condition, order), {"limit": limit})
    return count, [dict(zip(shown, map(_json_safe, row))) for row in rows]


def check_foreign_keys(connection, schema: str, compared: list, limit: int) -> list:
    """Every foreign key of the compared tables, given as (SourceTable, TableSpec) pairs.

    A PostgreSQL constraint must be validated (a NOT VALID one is a problem, and
    its orphan rows are counted). A key SQLite declares that PostgreSQL lacks is
    checked by query: it passes when no row is an orphan.
    """
    specs = {source_table.name.lower(): spec for source_table, spec in compared}
    results, declared = [], set()
    for name, child, parent_schema, parent, validated, columns, parent_columns in _fetch(
            connection, _FOREIGN_KEYS_QUERY, {"schema": schema, "tables": [spec.name for spec in specs.values()]}):
        declared.add((child, tuple(columns), parent, tuple(parent_columns)))
        entry = {"constraint": name, "table": child, "columns": columns,
                 "references": f"{parent}({', '.join(parent_columns)})", "validated": validated, "orphans": None}
        if not validated:
            child_spec = next(spec for spec in specs.values() if spec.name == child)
            entry["orphans"], entry["orphan_rows"] = _orphans(
                connection, sql.Identifier(schema, child), columns, sql.Identifier(parent_schema, parent),
                parent_columns, child_spec.key, limit)
        entry["ok"] = validated
        entry["problem"] = None if validated else (
            f"foreign key {name} on {child}({', '.join(columns)}) is NOT VALID ({entry['orphans']} orphan rows)")
        results.append(entry)
    for source_table, spec in compared:
        for foreign_key in source_table.foreign_keys:
            parent_spec = specs.get(foreign_key.parent.lower())
            if parent_spec is None:
                continue  # the parent is not compared here; nothing to check it against
            columns = [_column_name(spec, column) for column in foreign_key.columns]
            parent_columns = [_column_name(parent_spec, column) for column in foreign_key.parent_columns] or (
                [parent_spec.key] if parent_spec.key else [])
            if not parent_columns or (spec.name, tuple(columns), parent_spec.name, tuple(parent_columns)) in declared:
                continue
            orphans, rows = _orphans(connection, sql.Identifier(schema, spec.name), columns,
                                     sql.Identifier(schema, parent_spec.name), parent_columns, spec.key, limit)
            where = f"{spec.name}({', '.join(columns)}) -> {parent_spec.name}({', '.join(parent_columns)})"
            results.append({
                "constraint": None, "table": spec.name, "columns": columns,
                "references": f"{parent_spec.name}({', '.join(parent_columns)})", "validated": False,
                "orphans": orphans, "orphan_rows": rows, "ok": not orphans,
                "problem": f"foreign key {where} (declared in SQLite, no constraint in PostgreSQL): "
                           f"{orphans} orphan rows, first {_orphan_keys(rows)}" if orphans else None,
            })
    return results


def _column_name(spec: TableSpec, name: str) -> str:
    return next((column.name for column in spec.columns if column.name.lower() == name.lower()), name)


def _orphan_keys(rows: list) -> str:
    return ", ".join(" ".join(f"{name} {value}" for name, value in row.items()) for row in rows[:MSG_PROBLEMS])


_SEQUENCES_QUERY = """
SELECT c.relname, a.attname, seq_ns.nspname, seq.relname, s.seqincrement
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_depend d ON d.refobjid = c.oid AND d.refobjsubid = a.attnum
     AND d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
JOIN pg_class seq ON seq.oid = d.objid AND seq.relkind = 'S'
JOIN pg_namespace seq_ns ON seq_ns.oid = seq.relnamespace
JOIN pg_sequence s ON s.seqrelid = seq.oid
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s)
ORDER BY c.relname, a.attnum
"""


def check_sequences(connection, schema: str, tables: list) -> list:
    """Every identity or serial column of these tables: its next value is past the column's values."""
    results = []
    for table, column, sequence_schema, sequence, increment in _fetch(
            connection, _SEQUENCES_QUERY, {"schema": schema, "tables": tables}):
        last_value, is_called = _fetch(connection, sql.SQL("SELECT last_value, is_called FROM {}").format(
            sql.Identifier(sequence_schema, sequence)))[0]
        next_value = last_value + increment if is_called else last_value
        extreme = "max" if increment > 0 else "min"
        (bound,) = _fetch(connection, sql.SQL("SELECT {}({}) FROM {}").format(
            sql.SQL(extreme), sql.Identifier(column), sql.Identifier(schema, table)))[0]
        ok = bound is None or (next_value > bound if increment > 0 else next_value < bound)
        results.append({
            "table": table, "column": column, "sequence": f"{sequence_schema}.{sequence}",
            "next_value": next_value, f"{extreme}_value": bound, "ok": ok,
            "problem": None if ok else (f"sequence {sequence_schema}.{sequence} of {table}.{column} would give "
                                        f"{next_value} next, not past {extreme}({column}) = {bound}"),
        })
    return results


# --- Queries -------------------------------------------------------------------------------

def postgres_message(error, conninfo=None) -> str:
    """The server's own one-line message of an error (no ERROR: prefix, no LINE context), secrets masked."""
    diagnostics = getattr(error, "diag", None)
    primary = getattr(diagnostics, "message_primary", None)
    return first_line(primary, conninfo) if primary else first_line(error, conninfo)


def _json_safe(value):
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (datetime.timedelta, uuid.UUID)):
        return str(value)
    if isinstance(value, (bytes, memoryview)):
        return "\\x" + bytes(value).hex()
    return value


def run_queries(connection, queries: dict, conninfo=None) -> tuple:
    """(name -> rows as dicts, problems). The caller's transaction is READ ONLY; each query runs in a savepoint."""
    results, problems = {}, []
    for name, query in (queries or {}).items():
        _fetch(connection, "SAVEPOINT validation_query")
        try:
            with connection.cursor() as cursor:
                cursor.execute(query)
                names = [column.name for column in cursor.description or ()]
                results[name] = [dict(zip(names, map(_json_safe, row))) for row in cursor.fetchall()] if names else []
            _fetch(connection, "RELEASE SAVEPOINT validation_query")
        except psycopg2.Error as error:
            _fetch(connection, "ROLLBACK TO SAVEPOINT validation_query")
            problems.append(f"query {name} failed: {postgres_message(error, conninfo)}")
    return results, problems


# --- Standbys ------------------------------------------------------------------------------

_STANDBYS_QUERY = """
SELECT coalesce(nullif(application_name, ''), host(client_addr), 'pid ' || pid) AS name,
       host(client_addr), state, replay_lsn::text,
       replay_lsn IS NOT NULL AND replay_lsn >= %(lsn)s::pg_lsn,
       greatest(pg_wal_lsn_diff(%(lsn)s::pg_lsn, replay_lsn), 0)
FROM pg_stat_replication
WHERE state <> 'backup'
ORDER BY 1
"""


def wait_for_standbys(connection, expected_standbys: int, timeout: float, lsn: str | None = None,
                      poll_interval: float = 1.0) -> dict:
    """Wait until at least expected_standbys standbys are connected and every one has replayed lsn.

    lsn defaults to the leader's current WAL position. Returns the standbys with
    their lag in bytes; ``ok`` is false, and ``problem`` names the lagging
    standbys, when the timeout passed first.
    """
    connection.autocommit = True  # every poll sees the current state
    if _fetch(connection, "SELECT pg_is_in_recovery()")[0][0]:
        raise MigrationError("the PostgreSQL server validation connects to is a standby: connect it to the leader")
    lsn = lsn or _fetch(connection, "SELECT pg_current_wal_lsn()::text")[0][0]
    started = time.monotonic()
    while True:
        rows = _fetch(connection, _STANDBYS_QUERY, {"lsn": lsn})
        standbys = [{"name": name, "client_addr": address, "state": state, "replay_lsn": replay,
                     "caught_up": caught_up, "lag_bytes": None if replay is None else int(lag)}
                    for name, address, state, replay, caught_up, lag in rows]
        waited = time.monotonic() - started
        lagging = [standby for standby in standbys if not standby["caught_up"]]
        result = {"lsn": lsn, "expected_standbys": expected_standbys, "standbys": standbys,
                  "seconds": round(waited, 3), "ok": True, "problem": None}
        if expected_standbys == 0:
            return dict(result, message="no standbys were expected")
        if len(standbys) >= expected_standbys and not lagging:
            return dict(result, message=f"{len(standbys)} standbys have replayed {lsn}")
        if waited >= timeout:
            if lagging:
                names = ", ".join(f"{s['name']} (replayed {s['replay_lsn'] or 'nothing'}, "
                                  f"{s['lag_bytes']} bytes behind)" for s in lagging)
                problem = f"standby {names} had not replayed {lsn} after {timeout:g} s"
            else:
                problem = (f"{len(standbys)} of {expected_standbys} expected standbys connected to the leader "
                           f"after {timeout:g} s")
            return dict(result, ok=False, problem=problem, message=problem)
        time.sleep(min(poll_interval, max(0.0, timeout - waited)))


# --- Everything -----------------------------------------------------------------------------------

def validate(src: str, conninfo: dict, schema: str = "public", tables=None, source_timezone: str = "UTC",
             jobs: int = 2, queries=None, expected_standbys: int = 0, standby_timeout: float = 300,
             max_differences: int = 10, lsn: str | None = None, reject_file: str | None = None,
             poll_interval: float = 1.0, drift: bool = False, baseline=None, changed_keys=None,
             source_id: str | None = None, progress_file: str | None = None) -> dict:
    """Compare the SQLite file src with PostgreSQL; see the module docstring.

    conninfo: libpq keywords for psycopg2.connect (host, port, user, dbname,
    password, sslmode, sslrootcert, ...), as for migrate(). reject_file: the
    migration's reject file (on_invalid=reject); the rows it names are left
    out of the SQLite side. drift: a validate-only run against the live
    source: tables whose content differs make the status ``drift``, not
    ``failed`` (anything else that fails still fails).

    baseline and changed_keys: compare only what may have changed since an
    earlier completed validation (its result's ``baseline``): changed_keys
    is the migration's ``tables`` result, whose entries' ``changed_keys``
    ({since: source_id, keys: [[low, high], ...]}) are the source keys its
    sync found on changed pages since the snapshot ``since``. A table is compared in full when its
    ``since`` is not the baseline's ``source_id`` (the source_id given to
    the earlier validation), when its keys are unknown, or when its counts
    differ. source_id: the sha256 of src, recorded in the ``baseline``.
    progress_file: rewritten about once a second with the step and the rows hashed per table (HashProgress).

    Returns status (completed, drift or failed), msg, tables, drift (per
    table, see drift_of()), foreign_keys, sequences, queries, replication,
    baseline (None unless completed) and seconds; raises MigrationError
    when validation cannot run.
    """
    started = time.monotonic()
    try:
        check_timezone(source_timezone)
    except ValueError as error:
        raise MigrationError(f"source_timezone: {error}") from None
    if jobs < 1:
        raise MigrationError(f"jobs must be at least 1, got {jobs}")
    rejected = read_rejects(reject_file) if reject_file else {}
    source = Source(src).connect()
    connection = None
    progress = HashProgress(progress_file)
    progress.enter("reading the catalog")
    try:
        source_tables = _choose_tables(read_schema(source)[0], src, tables)
        connection = connect(conninfo)
        connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
        encoding = _fetch(connection, "SHOW server_encoding")[0][0]
        if encoding != "UTF8":
            raise MigrationError(f"database encoding is {encoding}: validation compares UTF8 databases only")
        snapshot, seen = _fetch(connection, "SELECT pg_export_snapshot(), pg_current_snapshot()::text")[0]
        problems, drifted, table_results, compared = [], [], {}, []
        for source_table in source_tables:
            spec, problem = describe_table(source_table, connection, schema)
            if problem:
                problems.append(problem)
                table_results[source_table.name] = _uncompared_table(source, source_table, problem)
            else:
                compared.append((source_table, dataclasses.replace(
                    spec, rejected=tuple(rejected.get(source_table.name, ())))))
        progress.enter("hashing the tables")
        plans = [_plan_table(spec, source, connection, schema) for _, spec in compared]
        changed = changed_since(baseline, changed_keys)
        for plan in plans:
            if plan.spec.source_name in changed:
                _narrow(plan, changed[plan.spec.source_name], PostgresTable(connection, schema, plan.spec),
                        baseline["snapshot"])
        workers = _PostgresWorkers(conninfo, snapshot, schema)
        try:
            _run_units(plans, src, source_timezone, connection, schema, workers, jobs, started, progress)
            # Equal changed keys but unequal counts: a row went outside them. Compare every row to say which.
            recount = [plan for plan in plans if plan.narrowed and _counts_differ(plan)]
            for plan in recount:
                plan.compare_all()
            if recount:
                _run_units(recount, src, source_timezone, connection, schema, workers, jobs, started, progress)
        except BrokenProcessPool:
            raise MigrationError("validation: a SQLite worker process died (out of memory?); try fewer jobs") from None
        finally:
            workers.close()
        progress.enter("locating differences")
        for plan in plans:
            result, problem = _compare_table(plan, source, connection, schema, max_differences)
            table_results[plan.spec.source_name] = result
            if problem:
                (drifted if drift else problems).append(problem)
        progress.enter("checking foreign keys")
        foreign_keys = check_foreign_keys(connection, schema, compared, max_differences)
        progress.enter("checking sequences")
        sequences = check_sequences(connection, schema, [spec.name for _, spec in compared])
        progress.enter("running the queries")
        query_results, query_problems = run_queries(connection, queries, conninfo)
        connection.rollback()
        problems += [item["problem"] for item in foreign_keys + sequences if item["problem"]] + query_problems
        progress.enter("waiting for the standbys")
        replication = wait_for_standbys(connection, expected_standbys, standby_timeout, lsn, poll_interval)
        if replication["problem"]:
            problems.append(replication["problem"])
    except psycopg2.Error as error:
        message = postgres_message(error, conninfo)
        raise MigrationError(f"validation stopped while {progress.phase}: PostgreSQL: {message}") from None
    except sqlite3.Error as error:
        raise MigrationError(f"validation stopped while {progress.phase}: source {src}: {error}") from None
    finally:
        source.close()
        if connection is not None:
            connection.close()
    progress.enter("done")
    seconds = time.monotonic() - started
    status = "failed" if problems else "drift" if drifted else "completed"
    return {
        "status": status,
        "msg": _summary(problems + drifted, table_results, seconds, drift=bool(drifted) and not problems),
        "tables": table_results,
        "drift": {table: drift_of(result) for table, result in table_results.items()},
        "foreign_keys": foreign_keys,
        "sequences": sequences,
        "queries": query_results,
        "replication": replication,
        # What a later validation may start from: the source and the server snapshot found equal here.
        "baseline": {"source_id": source_id, "snapshot": seen} if status == "completed" and source_id else None,
        "seconds": round(seconds, 3),
    }


def _summary(problems: list, table_results: dict, seconds: float, drift: bool = False) -> str:
    if not problems:
        rows = sum(result.get("sqlite_rows", 0) for result in table_results.values())
        narrowed = [r["compared"] for r in table_results.values()
                    if (r.get("compared") or {}).get("keys") not in (None, "all")]
        how = ""
        if narrowed:
            how = (f"; {len(narrowed)} of them compared on the {sum(c['rows'] for c in narrowed)} rows of the keys "
                   "changed since the last validation, unchanged elsewhere on both sides")
        return (f"validation completed: {len(table_results)} tables, {rows} rows identical in SQLite and "
                f"PostgreSQL{how} ({seconds:.1f} s)")
    more = f"; and {len(problems) - MSG_PROBLEMS} more problems" if len(problems) > MSG_PROBLEMS else ""
    outcome = f"drift found in {len(problems)} of {len(table_results)} tables" if drift else "validation failed"
    return f"{outcome}: " + "; ".join(problems[:MSG_PROBLEMS]) + more
