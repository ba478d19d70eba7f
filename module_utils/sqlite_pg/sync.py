"""sync(): bring a target that holds an earlier migration of the same SQLite database up to date.

What changed is found from the source's page structure (pages.py), not by
reading rows: the state table keeps, per table and per span of ``range_keys``
rowids, the checksums of the leaf pages that span held at the last sync. A
span whose pages are all the same is done; in any other span, the key
intervals not covered by an unchanged page ("dirty") are read from SQLite,
formatted by the migration's own rules, and applied. Within a changed page,
the digests of its cells, kept from the last sync too, narrow the dirty
intervals down to the rows inserted, updated or deleted (pages.Cells), so a
change of 1 % of the rows sends about 1 % of them. A table without an integer
rowid key is compared as a whole: when any of its pages changed, all its rows
are sent and matched by its primary key (by their content without one).

The whole sync is one transaction, so a sync that fails or is killed leaves
the target exactly as it was. The changed rows are staged first (COPY into
temporary tables), then applied set-wise so that every constraint holds at
every statement or, where the source moved values between rows, at the
commit (docs/sync.md, "Applying the changes"):

1. rows whose key the source no longer has, and rows whose unique values
   changed, are found; a table where such a value re-appears in another row
   is "in conflict": its removals go first, and the foreign keys that
   reference it are checked at the end of the transaction;
2. inserts, tables parents first; 3. updates; 4. deletes, children first.
"""

import bisect
import collections
import datetime
import io
import json
import math
import queue
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg2
from psycopg2 import errors as pgerrors
from psycopg2 import sql

from .errors import MigrationError
from .loader import STORAGE_CLASS, UNCONVERTED, copy_line_sql
from .names import intervals_from_text, intervals_text, key_intervals_join, pg_name, sqlite_ident
from .pages import (
    Cells,
    PageReader,
    decode_cells,
    encode_cells,
    pack_pages,
    table_bounds,
    table_digest,
    table_pages,
    unpack_pages,
)
from .profile import display
from .rules import Invalid, check_timezone, rule_for
from .source import Source, foreign_key_order, read_schema
from .target import (
    DDL_LOCK_TIMEOUT,
    SPANS_TABLE,
    STATE_TABLE,
    close_releasing_locks,
    connect,
    copy_in,
    count_rows,
    dropped_tables,
    first_line,
    foreign_keys_touching,
    has_rows,
    lock_schema,
    read_table,
    record_load,
    sequence_steps,
    spans_table_ddl,
    state_has_column,
    state_rows,
    unique_column_sets,
)
from .typemap import declaration

RANGE_KEYS = 65536  # rowids per span: one set of stored page checksums each
MAX_RANGES = 1024  # a table's spans are widened (once, from its key bounds) to stay within this many
FORMAT = 2  # of key_range_checksums and the span rows; another one is read as "no checksums"
ALL_CLASSES = frozenset({"integer", "real", "text", "blob"})
ALL_KEYS = [-(1 << 63), (1 << 63) - 1]
SPECIALS_GLOB = "*[\t\n\r\\]*"  # text holding what COPY must escape (real tab, newline, CR, backslash)
# Below this share of the rows recorded at the last sync left unchanged, the result says the file may be
# another database: half the rows updated is an everyday change, none of them kept is not.
KEPT_SHARE = 0.1
KEPT_SHARE_MIN_ROWS = 100


@dataclass
class TablePlan:
    name: str  # in SQLite
    target: str  # in PostgreSQL
    key: str  # the rowid alias column in SQLite, "" for a table compared as a whole
    columns: list  # [(SQLite column, target column, TargetType)]
    state_id: str  # source_id of its state row ("" for a table loaded by this sync)
    since: str = ""  # state_id when the sync began: the snapshot its changed keys are relative to
    match: list = field(default_factory=list)  # target columns rows are matched by; [] for their whole content
    new: bool = False  # no state row: its empty target table is loaded by this sync
    rows_before: int = 0  # rows in the target at the last sync (its state row)
    relation: int = 0  # the target table's oid
    records: dict = field(default_factory=dict)  # the stored key_range_checksums, {} when not usable
    older_format: bool = False  # the stored checksums are of an earlier version's format
    declared: dict = None  # {SQLite column: its declared type} when the table was loaded, kept by every sync
    digest: int = 0  # tables compared as a whole: crc of all pages
    width: int = RANGE_KEYS
    # span -> its changed key intervals as intervals_text() writes them (a string: a tenth of a list's memory):
    # grows with the changes, not the table
    dirty: dict = field(default_factory=dict)
    spans_checked: int = 0  # spans holding leaf pages now
    baseline: bool = False  # checksums to store although no row changes
    fresh: bool = False  # no usable stored checksums (none, other columns, another span width): all spans compared
    rowid: str = ""  # how SQLite addresses the rowid, "" for WITHOUT ROWID tables
    spill: "SpanRows" = None  # the span rows to store (of the dirty spans), as they were found
    conflict: bool = False  # a unique value leaves one row for another: removals first, foreign keys deferred
    removed: int = 0  # rows of the target to remove: deleted ones and those rewritten
    rewritten: int = 0  # of those, rows the source still has, whose unique values changed
    total_rows: int = 0
    counts: dict = field(default_factory=lambda: {"inserted": 0, "updated": 0, "deleted": 0, "rows_sent": 0})


def sync(src, conninfo, schema="public", tables=None, jobs=2, source_timezone="UTC", range_keys=RANGE_KEYS,
         hold_lock=True, source_id=None, source_name=None, before_writes=None, keep_dropped_tables=False):
    """Bring ``schema`` (which holds an earlier migration of ``src``) up to date with ``src``.

    ``hold_lock``: take migrate()'s advisory lock for the schema (False when the
    caller's session holds it already). ``source_id``: the source's sha256 when the
    caller has hashed it already (migrate() has). ``source_name``: as for migrate(). ``before_writes``: called
    once the changes are found, before the first write (migrate() waits there for the source's checks that ran
    beside the scan); what it raises fails the sync with nothing written. ``keep_dropped_tables``: tables
    migrated from this source that it no longer has stay in the target as they are (else the sync refuses
    them before it writes). Returns dict(status, changed, msg, tables={name: inserted, updated, deleted,
    total_rows, ...}, notes, sequences, seconds, source_id); raises MigrationError, whose ``result`` is
    the same dict with status 'failed'.
    """
    return Sync(src, conninfo, schema, tables, jobs, source_timezone, range_keys, hold_lock, source_id,
                source_name, before_writes, keep_dropped_tables).execute()


def dropped_refusal(schema, source_path, dropped):
    """The one-line refusal of tables the source no longer has ([(table, rows)]), with what the operator can do."""
    named = ", ".join(f"{schema}.{table} ({rows} rows)" for table, rows in dropped)
    them = "them" if len(dropped) > 1 else "it"
    return (f"source {source_path} no longer has table{'s' * (len(dropped) > 1)} {', '.join(t for t, _ in dropped)}, "
            f"migrated from it before: the target still holds {named}; drop {them} in the target (DROP TABLE), "
            f"or keep {them} as {'they are' if len(dropped) > 1 else 'it is'}, no longer synced, with "
            "keep_dropped_tables; nothing was written")


def dropped_note(schema, table, rows):
    return (f"table {table} was dropped from the source: kept in the target as it is ({schema}.{table}, {rows} rows), "
            "no longer synced (keep_dropped_tables)")


class Sync:
    def __init__(self, src, conninfo, schema, tables, jobs, source_timezone, range_keys, hold_lock, source_id=None,
                 source_name=None, before_writes=None, keep_dropped_tables=False):
        self.src, self.conninfo, self.schema = src, dict(conninfo), schema
        self.requested, self.jobs, self.timezone = tables, jobs, source_timezone
        self.range_keys, self.hold_lock = range_keys, hold_lock
        self.source_id, self.source_name = source_id or "", source_name
        self.before_writes, self.keep_dropped = before_writes, keep_dropped_tables
        self.kept = {}  # target tables dropped from the source and kept: {table: rows}
        self.committed = False
        self._step = None  # (what the write is doing, its TablePlan or None): what a refusal names
        self.started = time.monotonic()
        self.started_at = datetime.datetime.now(datetime.timezone.utc)
        self.result = {"status": "failed", "changed": False, "msg": "", "tables": {}, "notes": [], "sequences": [],
                       "seconds": 0.0, "source_id": ""}

    def execute(self):
        try:
            self._check_options()
            self.source = Source(self.src, self.source_name)
            self.fingerprint = self.source.fingerprint()
            with ThreadPoolExecutor(max_workers=1) as identity:
                hashing = None if self.source_id else identity.submit(self.source.content_id)
                self._read_source_schema()
                self.pg = connect(self.conninfo)
                try:
                    if self.hold_lock:
                        lock_schema(self.pg, self.schema)
                    self._read_target()
                    self.source_id = self.source_id or hashing.result()
                    self.result["source_id"] = self.source_id
                    self._scan()
                    if self.before_writes:
                        self.before_writes()
                    self._write()
                    self._sequences()
                finally:
                    close_releasing_locks(self.pg)
                    for plan in getattr(self, "plans", {}).values():
                        if plan.spill:
                            plan.spill.close()
            return self._finish()
        except MigrationError as error:
            self.result.update(status="failed", msg=str(error))
            raise MigrationError(str(error), self.result) from None
        except psycopg2.Error as error:
            message = f"PostgreSQL failed during the sync: {first_line(error, self.conninfo)}; " + (
                "the rows were synced before, only the sequences were not set: a rerun sets them"
                if self.committed else _NOTHING)
            self.result.update(status="failed", msg=message)
            raise MigrationError(message, self.result) from None

    def _check_options(self):
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise MigrationError(f"jobs must be a whole number of at least 1, not {self.jobs!r}")
        if not isinstance(self.range_keys, int) or self.range_keys < 1:
            raise MigrationError(f"range_keys must be a whole number of at least 1, not {self.range_keys!r}")
        try:
            check_timezone(self.timezone)
        except ValueError as error:
            raise MigrationError(f"source_timezone: {error}") from None

    def _read_source_schema(self):
        connection = self.source.connect()
        try:
            found, _notes = read_schema(connection)
        finally:
            connection.close()
        self.source_targets = {pg_name(t.name) for t in found}
        by_name = {t.name: t for t in found}
        self.missing = [n for n in self.requested or [] if n not in by_name]
        if self.requested:
            found = [by_name[n] for n in self.requested if n in by_name]
        self.order, _notes = foreign_key_order(found)
        self.tables = {t.name: t for t in found}

    def _read_target(self):
        self.plans = {}
        with self.pg.cursor() as cursor:
            recorded = state_rows(cursor, self.schema)
            self.cells_column = state_has_column(cursor, self.schema, "cell_checksums")
            self._dropped(cursor)
            for name in self.order:
                self.plans[name] = self._plan(cursor, name, recorded)
        self.pg.commit()

    def _dropped(self, cursor):
        """Tables migrated from this source that it no longer has: refused before any write, or kept as they are.

        A caller that names its tables answers for the others (migrate() has): then only the named tables the
        source no longer has count, and it names those it keeps."""
        dropped = dropped_tables(cursor, self.schema, self.source.name, self.source_targets)
        if self.requested is not None:
            named = {pg_name(n) for n in self.missing}
            dropped = [(table, rows) for table, rows in dropped if table in named]
            unknown = sorted(named - {table for table, _rows in dropped})
            if unknown:
                raise MigrationError(f"table {unknown[0]} does not exist in source {self.source.path}")
        if dropped and not self.keep_dropped:
            raise MigrationError(dropped_refusal(self.schema, self.source.path, dropped))
        self.kept = dict(dropped)
        self.result["notes"] += [dropped_note(self.schema, table, rows) for table, rows in dropped]

    def _plan(self, cursor, name, recorded):
        source, target = self.tables[name], pg_name(name)
        existing = read_table(cursor, self.schema, target)
        if existing is None:
            raise MigrationError(f"target table {self.schema}.{target} does not exist: "
                                 "run the migration first, a sync only brings a migrated target up to date")
        rows = [r for r in recorded.get(target, []) if r[1] == self.source.name]
        empty = not has_rows(cursor, self.schema, target)
        if not rows and not empty:
            raise MigrationError(f"target table {self.schema}.{target} holds no migration of source "
                                 f"{self.source.path}: run the migration first")
        columns = []
        for column in source.columns:
            match = existing.column(column.name)
            if match is None:
                raise MigrationError(f"table {name}: column {column.name} has no column in target table "
                                     f"{self.schema}.{target}")
            columns.append((column.name, match.name, match.type))
        by_source = {s: t for s, t, _type in columns}
        state_id = rows[-1][0] if rows else ""
        plan = TablePlan(name, target, source.rowid_alias, columns, state_id, state_id, rowid=source.rowid,
                         new=not rows, rows_before=rows[-1][2] if rows else 0)
        plan.match = ([by_source[source.rowid_alias]] if source.rowid_alias
                      else [by_source[c] for c in source.primary_key])
        cursor.execute("SELECT %s::regclass::oid", (sql.Identifier(self.schema, target).as_string(cursor),))
        plan.relation = cursor.fetchone()[0]
        if rows and not empty:  # an emptied table is loaded again: its checksums describe rows it lost
            cursor.execute(sql.SQL("SELECT key_range_checksums FROM {} WHERE source_id = %s AND table_name = %s")
                           .format(sql.Identifier(self.schema, STATE_TABLE)), (plan.state_id, target))
            stored = cursor.fetchone()[0] or {}
            same_target = stored.get("signature") == self._signature(plan)
            plan.declared = stored.get("declared") if same_target else None  # else the target's types were changed
            if stored.get("format") == FORMAT and same_target:
                plan.records = stored
            plan.older_format = bool(stored) and stored.get("format") != FORMAT
        return plan

    def _declared(self, plan):
        """The table's columns as the source declares them now (SQLite changes a type only by re-creating it)."""
        return {c.name: declaration(c) for c in self.tables[plan.name].columns}

    def _signature(self, plan):
        """What the stored checksums assume: the columns, their target types and the source's time zone."""
        return [self.timezone] + [[s, t, kind.sql] for s, t, kind in plan.columns]

    def _identity(self):
        """What names the database beside its content: a page size or application id that changes says the file
        was rebuilt or is another database (fileformat2.html: header offsets 16, 56 and 68)."""
        header = self.source.header
        return {"page_size": self.source.page_size, "text_encoding": int.from_bytes(header[56:60], "big"),
                "application_id": int.from_bytes(header[68:72], "big", signed=True)}

    # Finding what changed ------------------------------------------------------------

    def _scan(self):
        """Compare every table's leaf pages (tables in parallel, each a span at a time) with the stored ones, and
        decide which key intervals are dirty."""
        if all(self._finished(plan) for plan in self.plans.values()):
            return  # the last sync finished on this very snapshot: nothing can differ
        for name in self.order:
            if self.plans[name].key:
                self._choose_spans(self.plans[name])
        with ThreadPoolExecutor(max_workers=self.jobs) as threads:
            list(threads.map(self._scan_table, [self.plans[n] for n in self.order]))
        self._verify_unchanged()
        for name in self.order:
            plan = self.plans[name]
            if not plan.key and plan.records.get("whole") != plan.digest:
                same_snapshot = plan.state_id == self.source_id
                plan.baseline = same_snapshot  # loaded from this very snapshot: only the digest is missing
                if not same_snapshot:
                    plan.dirty = {0: intervals_text([ALL_KEYS])}

    def _finished(self, plan):
        """Its state row names this snapshot and holds complete checksums (before syncs were one transaction, a
        killed sync left them incomplete: the spans it had taken out of them are compared in full)."""
        return plan.state_id == self.source_id and plan.records.get("complete", False)

    def _choose_spans(self, plan):
        """The span width, fixed before the pages are read (from the stored checksums, else from the keys'
        bounds on both sides), and whether stored checksums are compared at all."""
        connection, reader = self.source.connect(), PageReader(self.source)
        try:
            root = connection.execute("SELECT rootpage FROM sqlite_schema WHERE type = 'table' AND name = ?",
                                      (plan.name,)).fetchone()[0]
            low, high = table_bounds(reader, root)
        finally:
            reader.close()
            connection.close()
        width = plan.records.get("range_keys") or self._width(plan, low, high)
        if low is not None and high // width - low // width >= 4 * MAX_RANGES:
            plan.records = {}  # keys spread far wider than when the spans were chosen
            width = self._width(plan, low, high)
        plan.width = width
        if not plan.records and plan.state_id == self.source_id:
            plan.baseline = True  # the target holds exactly this snapshot: store its checksums, change nothing
        elif not plan.records:
            # No usable checksums: every span either side holds rows in is compared in full.
            plan.fresh = True
            plan.dirty = {span: intervals_text([[span * width, span * width + width - 1]])
                          for span in self._target_spans(plan, width)}

    def _scan_table(self, plan):
        connection = self.source.connect()
        reader = PageReader(self.source)
        stored = connect(self.conninfo) if plan.key and not (plan.fresh or plan.baseline) else None
        try:
            if not plan.key:
                plan.digest = table_digest(connection, reader, plan.name)
                return
            pages = _spans(table_pages(connection, reader, plan.name), plan.width)
            for span, current, recorded in _merged(pages, self._stored_spans(stored, plan) if stored else ()):
                self._scan_span(plan, reader, stored, span, current, recorded)
        finally:
            reader.close()
            connection.close()
            if stored:
                stored.close()

    def _scan_span(self, plan, reader, stored, span, pages, recorded):
        """One span: its dirty intervals from its pages, narrowed by its cells to the keys whose cells differ
        from the stored ones; its new page records and cells are spilled for the write when it is dirty.

        ``recorded``: the span's stored page records, packed, or None. Its stored cells are used only where they
        belong to those records; a span without them stays dirty as its pages say, and its cells are read afresh.
        """
        low, high = span * plan.width, span * plan.width + plan.width - 1
        plan.spans_checked += bool(pages)
        if plan.baseline:
            intervals = []
        else:
            intervals = dirty_intervals(low, high, pages, unpack_pages(recorded) if recorded is not None else [])
            if recorded is not None and not intervals:
                return  # clean: its stored row stays as it is
        previous = self._stored_cells(stored, plan, span, recorded) if recorded is not None else None
        if previous is None:
            if intervals:
                plan.dirty[span] = intervals_text(intervals)
            cells = Cells.of(*_read_cells(reader, pages, low, high))
        else:
            lasts = [page.last for page in pages]
            cells, changed = previous.replace(intervals, lambda first, last: _read_cells(
                reader, pages, first, last, lasts=lasts))
            plan.dirty[span] = intervals_text(changed)
        if pages:
            if plan.spill is None:
                plan.spill = SpanRows(self.source_id, plan.target, plan.width)
            plan.spill.add(span, pages, cells)

    def _stored_spans(self, connection, plan):
        """(span, packed page records) of the stored spans, in span order, read by a server-side cursor."""
        with connection.cursor(name="stored_spans") as cursor:
            # A span's page records are about 170 KB for a table like files (7,000 leaf pages): fetching 64
            # at once held a whole 1M-row table's and grew with the data until 64 spans; two stay flat.
            cursor.itersize = 2
            cursor.execute(sql.SQL("SELECT span, pages FROM {} WHERE source_id = %s AND table_name = %s "
                                   "AND width = %s ORDER BY span").format(sql.Identifier(self.schema, SPANS_TABLE)),
                           (plan.state_id, plan.target, plan.width))
            for span, pages in cursor:
                yield span, bytes(pages)

    def _stored_cells(self, connection, plan, span, recorded):
        """The Cells the last sync kept for ``span``, None without (or when they belong to other page records)."""
        with connection.cursor() as cursor:
            cursor.execute(sql.SQL("SELECT cells FROM {} WHERE source_id = %s AND table_name = %s AND span = %s")
                           .format(sql.Identifier(self.schema, SPANS_TABLE)), (plan.state_id, plan.target, span))
            found = cursor.fetchone()
        return decode_cells(recorded, bytes(found[0])) if found else None

    def _width(self, plan, low, high):
        """Span width for a table: RANGE_KEYS, or wider so that its keys (both sides; ``low`` and ``high``: the
        source's) fit MAX_RANGES spans."""
        target_low, target_high = self._target_bounds(plan)
        if target_low is not None:
            low = target_low if low is None else min(low, target_low)
            high = target_high if high is None else max(high, target_high)
        if low is None:
            return self.range_keys
        return max(self.range_keys, math.ceil((high - low + 1) / MAX_RANGES))

    def _target_bounds(self, plan):
        with self.pg.cursor() as cursor:
            key = sql.Identifier(plan.match[0])
            cursor.execute(sql.SQL("SELECT min({}), max({}) FROM {}").format(
                key, key, sql.Identifier(self.schema, plan.target)))
            bounds = cursor.fetchone()
        self.pg.commit()
        return bounds

    def _target_spans(self, plan, width):
        low, high = self._target_bounds(plan)
        return set() if low is None else set(range(low // width, high // width + 1))

    def _verify_unchanged(self):
        if self.source.fingerprint() != self.fingerprint:
            raise MigrationError(f"source {self.source.path} changed while it was being read (another process wrote "
                                 f"to it): run the sync again; {_NOTHING}")

    # Applying the changes ------------------------------------------------------------

    def _write(self):
        """The rows and the state rows, in one transaction: a sync that stops anywhere wrote nothing."""
        changed = [self.plans[n] for n in self.order if any(self.plans[n].dirty.values())]
        recording = any(plan.dirty or plan.baseline or plan.state_id != self.source_id
                        for plan in self.plans.values())
        if not recording:
            return
        pg = connect(self.conninfo)
        try:
            with pg.cursor() as cursor:
                # Naive timestamps are in the source's zone, as in the load. Each statement touches few rows:
                # compiling it (JIT, which PostgreSQL's estimates of the key intervals would set off) costs more.
                cursor.execute("SELECT set_config('TimeZone', %s, false), set_config('DateStyle', 'ISO, YMD', false), "
                               "set_config('jit', 'off', false)", (self.timezone,))
                if changed:
                    self._stage(cursor, changed)
                    for plan in changed:
                        self._find_removals(cursor, plan)
                    held = self._hold_foreign_keys(cursor, changed)
                    self._apply(cursor, changed)
                    self._release_foreign_keys(cursor, held)
                self._close_state(cursor)
            self._verify_unchanged()  # the rows sent and the checksums stored are of the snapshot scanned
            pg.commit()
            self.committed = self.result["changed"] = True
        except psycopg2.Error as error:
            raise MigrationError(self._refusal(error)) from None
        finally:
            pg.close()

    def _apply(self, cursor, changed):
        """Removals of tables in conflict, then inserts, parents first; updates; the other removals, children
        first. Outside the tables in conflict, each statement leaves every foreign key satisfied: a child's new
        parent is there before the child points to it, a parent goes only after its children went or moved."""
        for plan in changed:
            self._step = ("insert", plan)
            if plan.conflict:
                self._remove(cursor, plan)
            self._insert(cursor, plan)
        for plan in changed:
            self._step = ("update", plan)
            self._update(cursor, plan)
        for plan in reversed(changed):
            self._step = ("delete", plan)
            if not plan.conflict:
                self._remove(cursor, plan)
        self._step = None

    def _stage(self, cursor, changed):
        """COPY the source rows of every dirty interval into a temporary table per table, formatted as the load
        formats them (read from SQLite by ``jobs`` threads, in order, a few intervals ahead)."""
        units = [(plan, span) for plan in changed for span in sorted(plan.dirty) if plan.dirty[span]]
        for plan in changed:
            cursor.execute(sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
                self._staging(plan), sql.SQL(", ").join(sql.Identifier(t) for _s, t, _k in plan.columns),
                sql.Identifier(self.schema, plan.target)))
        readers = queue.SimpleQueue()
        opened = []
        try:
            for _ in range(min(self.jobs, len(units)) or 1):
                opened.append(self.source.connect(text_as_bytes=True))
                readers.put(opened[-1])

            def read(unit):
                plan, span = unit
                lite = readers.get()
                try:
                    return self._copy_text(lite, plan, intervals_from_text(plan.dirty[span]))
                finally:
                    readers.put(lite)

            with ThreadPoolExecutor(max_workers=len(opened)) as threads:
                for (plan, span), (data, sent, copy_columns) in zip(units, _in_order(threads, read, units,
                                                                                     len(opened) + 1)):
                    if not sent:
                        continue
                    try:
                        copy_in(cursor, sql.SQL("COPY {} ({}) FROM STDIN").format(
                            self._staging(plan), sql.SQL(", ").join(map(sql.Identifier, copy_columns)))
                            .as_string(cursor), io.BytesIO(data))
                    except psycopg2.DataError as error:
                        cursor.connection.rollback()
                        lite = self.source.connect(text_as_bytes=True)  # the readers may still be busy
                        try:
                            problem = self._first_invalid(plan, lite, intervals_from_text(plan.dirty[span]))
                        finally:
                            lite.close()
                        raise MigrationError((problem or f"table {plan.name}: PostgreSQL refused a changed row: "
                                              f"{first_line(error, self.conninfo)}") + f"; {_NOTHING}") from None
                    plan.counts["rows_sent"] += sent
        finally:
            for lite in opened:
                lite.close()

    def _staging(self, plan):
        return sql.Identifier(f"sqlite_to_postgres_stage_{self.order.index(plan.name)}")

    def _removal(self, plan):
        return sql.Identifier(f"sqlite_to_postgres_remove_{self.order.index(plan.name)}")

    def _find_removals(self, cursor, plan):
        """The target rows to remove: those the source no longer has (in the dirty intervals), and those whose
        unique values changed (they are inserted again, so that no unique value is held twice at any moment).
        The table is in conflict when it has such rows, or when a unique value of a row gone is held by a
        staged row (found on the same pass over the rows gone: a staged row that keeps its key keeps its
        unique values, so only an inserted one can hold it). The sync's own columns are named NAMES."""
        target, staging, removal = sql.Identifier(self.schema, plan.target), self._staging(plan), self._removal(plan)
        sets, opaque = unique_column_sets(cursor, plan.relation)
        sets = [columns for columns in sets if set(columns) != set(plan.match)]
        everything = [t for _s, t, _k in plan.columns]
        if opaque:  # a unique index on expressions or partial: any changed column may change what it holds
            sets = [tuple(everything)]
        differs = sql.SQL(" OR ").join(
            sql.SQL("ROW({})::text IS DISTINCT FROM ROW({})::text").format(_columns("t", c), _columns("s", c))
            for c in sets) if sets else sql.SQL("false")
        # A NULL in the list is never equal: NULLs are distinct in unique indexes too.
        taken = sql.SQL(" OR ").join(
            sql.SQL("({}) IN (SELECT {} FROM {} s)").format(_columns("t", c), _columns("s", c), staging)
            for c in sets) if sets else sql.SQL("false")
        formats = dict(NAMES, removal=removal, target=target, staging=staging, differs=differs, taken=taken)
        if plan.key:
            key = sql.Identifier(plan.match[0])
            # One index range scan per interval for the rows gone (PostgreSQL cannot know how few rows each
            # interval holds: a join of both sides would hash the target's side), one lookup per staged row
            # for the rows rewritten. The intervals go as their text: the server splits it.
            cursor.execute(sql.SQL(
                "CREATE TEMPORARY TABLE {removal} ON COMMIT DROP AS "
                "SELECT t.{key}, true AS {gone}, {taken} AS {held} "
                "FROM (SELECT split_part(part, ':', 1)::bigint AS low, "
                "coalesce(nullif(split_part(part, ':', 2), ''), split_part(part, ':', 1))::bigint AS high "
                "FROM unnest(string_to_array(%s, ',')) AS part) AS span "
                "JOIN {target} t ON t.{key} BETWEEN span.low AND span.high "
                "WHERE NOT EXISTS (SELECT FROM {staging} s WHERE s.{key} = t.{key}) "
                "UNION ALL SELECT t.{key}, false, false FROM {staging} s JOIN {target} t ON t.{key} = s.{key} "
                "WHERE {differs}").format(key=key, **formats),
                (self._changed_keys(plan)["keys"],))
        elif plan.match:
            cursor.execute(sql.SQL(
                "CREATE TEMPORARY TABLE {removal} ON COMMIT DROP AS SELECT {keys}, s.{present} IS NULL AS {gone}, "
                "s.{present} IS NULL AND ({taken}) AS {held} "
                "FROM {target} t LEFT JOIN (SELECT *, true AS {present} FROM {staging}) s ON {joined} "
                "WHERE s.{present} IS NULL OR {differs}").format(
                keys=_columns("t", plan.match), joined=_joined(plan.match), **formats))
        else:
            # No key: rows are matched by their content, each copy of a row once (row_number among its equals).
            def numbered(table, extra):
                return sql.SQL("SELECT {extra}ROW({all})::text AS {content}, row_number() OVER "
                               "(PARTITION BY ROW({all})::text) AS {copy} FROM {table}").format(
                    extra=sql.SQL(extra), all=_columns("", everything), table=table, **NAMES)
            cursor.execute(sql.SQL(
                "CREATE TEMPORARY TABLE {removal} ON COMMIT DROP AS SELECT t.ctid AS {row}, true AS {gone}, "
                "{taken} AS {held} FROM ({t}) t WHERE NOT EXISTS "
                "(SELECT FROM ({s}) s WHERE s.{content} = t.{content} AND s.{copy} = t.{copy})").format(
                t=numbered(target, "ctid, *, "), s=numbered(staging, ""), **formats))
            # What is left in the staging table is what the target lacks.
            cursor.execute(sql.SQL(
                "DELETE FROM {staging} WHERE ctid IN "
                "(SELECT s.ctid FROM ({s}) s JOIN ({t}) t USING ({content}, {copy}))")
                .format(staging=staging, s=numbered(staging, "ctid, "), t=numbered(target, ""), **NAMES))
        cursor.execute(sql.SQL("SELECT count(*), count(*) FILTER (WHERE NOT {gone}), "
                               "coalesce(bool_or({held}), false) FROM {removal}").format(removal=removal, **NAMES))
        plan.removed, plan.rewritten, taken = cursor.fetchone()
        # An index on expressions may make two different rows collide: any removal goes first there.
        plan.conflict = bool(plan.rewritten or taken or (opaque and plan.removed))

    @staticmethod
    def _removed_row(plan):
        """Join condition of a removal (alias r) with its target row (alias t)."""
        if not plan.match:
            return sql.SQL("t.ctid = r.{}").format(NAMES["row"])
        return sql.SQL(" AND ").join(sql.SQL("t.{0} = r.{0}").format(sql.Identifier(c)) for c in plan.match)

    def _hold_foreign_keys(self, cursor, changed):
        """Set aside, for this transaction, the checks that cannot hold at every statement.

        A foreign key referencing a table in conflict is checked at the end of the transaction instead of
        after each statement (made DEFERRABLE INITIALLY DEFERRED, or SET DEFERRED when it is deferrable), so
        that a value that left one row for another is found again at the end. So is one the foreign-key
        order had to break (tables referencing each other). A referential action (CASCADE, SET NULL, SET
        DEFAULT, RESTRICT) fires at once whatever the deferral: such a key on a table in conflict is dropped
        for the transaction and added again, validated, before the commit. Returns (altered, dropped).
        """
        position = {plan.relation: index for index, plan in enumerate(self.plans[n] for n in self.order)}
        conflicted = {plan.relation for plan in changed if plan.conflict}
        written = {plan.relation for plan in changed}
        altered, dropped = [], []
        statements = []
        for key in foreign_keys_touching(cursor, written):
            back = (key.child != key.parent and key.child in position and key.parent in position
                    and position[key.child] < position[key.parent])
            if not (key.parent in conflicted or back):
                continue
            table = sql.SQL(key.child_table)  # the server's own quoting (regclass output)
            if not key.no_action:
                statements.append(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(table, sql.Identifier(key.name)))
                dropped.append(key)
            elif key.deferrable:
                statements.append(sql.SQL("SET CONSTRAINTS {} DEFERRED").format(
                    sql.Identifier(key.namespace, key.name)))
            else:
                statements.append(sql.SQL("ALTER TABLE {} ALTER CONSTRAINT {} DEFERRABLE INITIALLY DEFERRED").format(
                    table, sql.Identifier(key.name)))
                altered.append(key)
        if not statements:
            return [], []
        # These take the child tables' ACCESS EXCLUSIVE lock until the commit: fail soon rather than queue behind
        # a reader (and have every later one queue behind this sync).
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", (DDL_LOCK_TIMEOUT,))
        self._step = ("hold", None)
        for statement in statements:
            cursor.execute(statement)
        cursor.execute("SET LOCAL lock_timeout TO DEFAULT")
        self._step = None
        return altered, dropped

    def _release_foreign_keys(self, cursor, held):
        """Run the deferred checks, then put every foreign key back as it was declared."""
        altered, dropped = held
        self._step = ("check", None)
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        for key in dropped:
            cursor.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                sql.SQL(key.child_table), sql.Identifier(key.name), sql.SQL(key.definition)))
        for key in altered:
            cursor.execute(sql.SQL("ALTER TABLE {} ALTER CONSTRAINT {} NOT DEFERRABLE INITIALLY IMMEDIATE").format(
                sql.SQL(key.child_table), sql.Identifier(key.name)))
        self._step = None

    def _remove(self, cursor, plan):
        if not plan.removed:
            return
        target, removal = sql.Identifier(self.schema, plan.target), self._removal(plan)
        if plan.match:
            cursor.execute(sql.SQL("DELETE FROM {} t USING {} r WHERE {}").format(
                target, removal, self._removed_row(plan)))
        else:
            cursor.execute(sql.SQL("DELETE FROM {} WHERE ctid IN (SELECT {} FROM {})").format(
                target, NAMES["row"], removal))
        plan.counts["deleted"] += plan.removed - plan.rewritten

    def _insert(self, cursor, plan):
        names = sql.SQL(", ").join(sql.Identifier(t) for _s, t, _k in plan.columns)
        missing = sql.SQL("WHERE NOT EXISTS (SELECT FROM {} t WHERE {})").format(
            sql.Identifier(self.schema, plan.target), _joined(plan.match)) if plan.match else sql.SQL("")
        cursor.execute(sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} s {}").format(
            sql.Identifier(self.schema, plan.target), names, names, self._staging(plan), missing))
        plan.counts["inserted"] += cursor.rowcount - plan.rewritten
        plan.counts["updated"] += plan.rewritten

    def _update(self, cursor, plan):
        others = [t for _s, t, _k in plan.columns if t not in plan.match]
        if not plan.match or not others:
            return
        # Compared as text, which is exactly what a loaded row would be (numeric scale, -0, jsonb).
        cursor.execute(sql.SQL(
            "UPDATE {target} t SET {assignments} FROM {staging} s WHERE {joined} "
            "AND ROW({old})::text IS DISTINCT FROM ROW({new})::text").format(
            target=sql.Identifier(self.schema, plan.target), staging=self._staging(plan), joined=_joined(plan.match),
            assignments=sql.SQL(", ").join(sql.SQL("{0} = s.{0}").format(sql.Identifier(c)) for c in others),
            old=_columns("t", others), new=_columns("s", others)))
        plan.counts["updated"] += cursor.rowcount

    def _refusal(self, error):
        """What PostgreSQL refused, as one line naming where; the transaction is rolled back."""
        step, plan = self._step or (None, None)
        diag = error.diag
        detail = f" ({diag.message_detail})" if diag.message_detail else ""
        if isinstance(error, pgerrors.ForeignKeyViolation) and diag.table_name in self.kept:
            return (f"table {diag.table_name}, dropped from the source and kept (keep_dropped_tables), references "
                    f"rows the source no longer has{detail}: drop it in the target, or its foreign key "
                    f"{diag.constraint_name}, to sync; {_NOTHING}")
        if isinstance(error, pgerrors.LockNotAvailable) and step == "hold":
            return (f"a table of the sync is in use by another session: the sync must hold it alone (ACCESS "
                    f"EXCLUSIVE) to check some of its foreign keys at the commit "
                    f"({first_line(error, self.conninfo)}); {_NOTHING}; run it again when it is free")
        if isinstance(error, pgerrors.InsufficientPrivilege) and step == "hold":
            return (f"the sync must own the tables whose foreign keys it checks at the commit (values moved between "
                    f"rows): {first_line(error, self.conninfo)}; {_NOTHING}")
        where = f"table {plan.name}: " if plan is not None else ""
        what = {"insert": "inserting", "update": "updating", "delete": "deleting", "check": "checking"}.get(
            step, "writing")
        return (f"{where}PostgreSQL refused the sync while {what} the source's changes: "
                f"{first_line(error, self.conninfo)}{detail}; {_NOTHING}")

    def _copy_text(self, lite, plan, intervals):
        """COPY text of the source rows in ``intervals``, formatted as the load formats them.

        The storage classes and escaping needs of these rows are read first (the load has
        them from the profile), so each column gets the formatting the load would give it.
        Validity is left to the formatting (a value it cannot convert becomes UNCONVERTED)
        and to PostgreSQL; only then are the rules' validity tests run, to name the value.
        Returns (bytes, rows, the target columns in the order of the text's fields).
        """
        join, parameters = self._rows_from(plan, intervals)
        quoted = [f"src.{sqlite_ident(s)}" for s, _t, _type in plan.columns]
        column_rules = [rule_for(kind, self.timezone) for _s, _t, kind in plan.columns]
        # Looking for characters to escape costs a scan of each text value: only where the rule escapes.
        escapes = [rule.format_sql("v", {"text"}, specials=True) != rule.format_sql("v", {"text"}, specials=False)
                   for rule in column_rules]
        found = lite.execute("SELECT " + ", ".join(  # noqa: S608 - quoted names
            f"group_concat(DISTINCT typeof({q})), "
            + (f"max(typeof({q}) = 'text' AND {q} GLOB '{SPECIALS_GLOB}')" if escape else "0")
            for q, escape in zip(quoted, escapes)) + f" {join}", parameters).fetchone()
        sql_fields, python_fields, rules = [], [], []
        for index, (rule, q) in enumerate(zip(column_rules, quoted)):
            classes, specials = found[2 * index], found[2 * index + 1]
            present = set(classes.decode().split(",")) - {"null"} if classes else set()
            formatted = rule.format_sql(q, present & ALL_CLASSES, zoned_text=True, specials=bool(specials))
            if formatted is None:
                python_fields.append(f"typeof({q}), {q}")
                rules.append((index, rule))
            else:
                sql_fields.append(f"CASE WHEN {q} IS NULL THEN '\\N' ELSE {formatted} END")
        python_indexes = {index for index, _rule in rules}
        copy_columns = ([t for i, (_s, t, _k) in enumerate(plan.columns) if i not in python_indexes]
                        + [plan.columns[i][1] for i, _rule in rules])  # the order the query gives the fields in
        key = f"src.{sqlite_ident(plan.key or plan.rowid)}" if plan.key or plan.rowid else "NULL"
        select = ", ".join([key] + ([copy_line_sql(sql_fields)] if sql_fields else []) + python_fields)
        lines, checked = [], False
        for row in lite.execute(f"SELECT {select} {join}", parameters):  # noqa: S608
            fields = [row[1]] if sql_fields else []
            if sql_fields and UNCONVERTED in row[1] and not checked:
                problem = self._first_invalid(plan, lite, intervals)
                if problem:
                    raise MigrationError(problem)
                checked = True  # the byte is the source's own, in a text value
            position = 2 if sql_fields else 1
            for index, rule in rules:
                storage, value = row[position], row[position + 1]
                try:
                    fields.append(b"\\N" if value is None else rule.convert(STORAGE_CLASS[storage], value))
                except Invalid as error:
                    raise MigrationError(self._invalid(plan, lite, row[0], index, str(error))) from None
                position += 2
            lines.append(b"\t".join(fields))
        return (b"\n".join(lines) + b"\n" if lines else b""), len(lines), copy_columns

    @staticmethod
    def _rows_from(plan, intervals):
        """FROM clause and parameters of the source rows in ``intervals`` (of all rows for a keyless table)."""
        if not plan.key:
            return f"FROM {sqlite_ident(plan.name)} src", ()
        return key_intervals_join(plan.name, plan.key), (json.dumps(intervals),)

    def _first_invalid(self, plan, lite, intervals):
        """The message naming the first value in ``intervals`` the rules refuse or cannot format, or ""."""
        join, parameters = self._rows_from(plan, intervals)
        checks = []
        for index, (_source, _target, kind) in enumerate(plan.columns):
            q = f"src.{sqlite_ident(plan.columns[index][0])}"
            rule = rule_for(kind, self.timezone)
            valid = rule.valid_sql(q)
            if valid:
                checks.append(f"WHEN NOT ({valid}) THEN {index}")
            formatted = rule.format_sql(q, ALL_CLASSES, zoned_text=True)
            if formatted:
                checks.append(f"WHEN {q} IS NOT NULL AND ({formatted}) IS NULL THEN {index}")
        if not checks:
            return ""
        key = f"src.{sqlite_ident(plan.key or plan.rowid)}" if plan.key or plan.rowid else "NULL"
        found = lite.execute(f"SELECT row_key, failed FROM (SELECT {key} AS row_key, CASE {' '.join(checks)} "  # noqa: S608
                             f"ELSE -1 END AS failed {join}) WHERE failed >= 0 LIMIT 1", parameters).fetchone()
        return self._invalid(plan, lite, found[0], found[1]) if found else ""

    def _invalid(self, plan, lite, key, index, reason=""):
        source, _target, kind = plan.columns[index]
        if key is None:  # WITHOUT ROWID: no single key to look the row up by
            return (f"table {plan.name}, column {source}: a value cannot become {kind.sql}: {reason}; "
                    f"{_NOTHING}")
        storage, value = lite.execute(
            f"SELECT typeof({sqlite_ident(source)}), {sqlite_ident(source)} FROM {sqlite_ident(plan.name)} "  # noqa: S608
            f"WHERE {sqlite_ident(plan.key) if plan.key else plan.rowid} = ?", (key,)).fetchone()
        if not reason:
            try:
                rule_for(kind, self.timezone).convert(STORAGE_CLASS[storage], value)
                reason = f"has no conversion to {kind.sql}"
            except Invalid as error:
                reason = str(error)
        return (f"table {plan.name}, column {source}, {plan.key or plan.rowid} {key}: value {display(value)} {reason}; "
                f"{_NOTHING}")

    # The end -------------------------------------------------------------------------

    def _close_state(self, cursor):
        """Each table's state row now describes this snapshot: its source_id, row count and checksums."""
        state = sql.Identifier(self.schema, STATE_TABLE)
        cursor.execute("SELECT to_regclass(%s)", (sql.Identifier(self.schema, SPANS_TABLE).as_string(cursor),))
        if cursor.fetchone()[0] is None:  # a state table of a version before the span rows
            cursor.execute(spans_table_ddl(self.schema))
        for name in self.order:
            plan = self.plans[name]
            written = bool(plan.dirty or plan.baseline)
            # Only a table that was written to can hold another number of rows.
            plan.total_rows = count_rows(cursor, self.schema, plan.target) if written else plan.rows_before
            if plan.state_id == self.source_id and not written:
                continue
            seconds = time.monotonic() - self.started
            if plan.new:
                record_load(cursor, self.schema, self.source_id, plan.target, name, self.source.name,
                            plan.total_rows, 0, self.started_at, seconds)
            elif plan.state_id != self.source_id:
                cursor.execute(sql.SQL("DELETE FROM {} WHERE source_id = %s AND table_name = %s").format(state),
                               (self.source_id, plan.target))
            if plan.key:
                self._store_spans(cursor, plan)
            document = json.dumps(self._document(plan)) if written or not plan.key else None
            # A state table of an earlier version holds the cells in one value per table: no longer read.
            cells = sql.SQL(", cell_checksums = NULL" if self.cells_column else "")
            cursor.execute(sql.SQL(
                "UPDATE {} SET source_id = %s, rows_loaded = %s, rows_rejected = 0, started_at = %s, "
                "loaded_at = now(), seconds = %s, validated_at = NULL, "
                "key_range_checksums = coalesce(%s::jsonb, key_range_checksums || '{{\"complete\": true}}'){} "
                "WHERE source_id = %s AND table_name = %s").format(state, cells),
                (self.source_id, plan.total_rows, self.started_at, seconds, document,
                 self.source_id if plan.new else plan.state_id, plan.target))
            plan.state_id = self.source_id

    def _store_spans(self, cursor, plan):
        """The table's span rows now describe this snapshot: those of the dirty spans (all of them, for a table
        without usable checksums) are replaced by the ones spilled during the scan, the others move to its
        source_id as they are."""
        spans = sql.Identifier(self.schema, SPANS_TABLE)
        everything = plan.baseline or plan.fresh or plan.new
        cursor.execute(sql.SQL("DELETE FROM {} WHERE table_name = %s AND (source_id = %s AND source_id <> %s "
                               "OR source_id = %s AND (%s OR width <> %s OR span = ANY(%s)))").format(spans),
                       (plan.target, self.source_id, plan.state_id, plan.state_id, everything, plan.width,
                        sorted(plan.dirty)))
        if plan.state_id != self.source_id:
            cursor.execute(sql.SQL("UPDATE {} SET source_id = %s WHERE source_id = %s AND table_name = %s")
                           .format(spans), (self.source_id, plan.state_id, plan.target))
        if plan.spill is not None:
            plan.spill.copy_into(cursor, spans)

    def _document(self, plan):
        """What the stored checksums assume; the checksums themselves are the table's span rows."""
        document = {"format": FORMAT, "signature": self._signature(plan), "complete": True,
                    "source": self._identity(), "declared": plan.declared or self._declared(plan)}
        if not plan.key:
            return dict(document, whole=plan.digest)
        return dict(document, range_keys=plan.width)

    def _sequences(self):
        with self.pg.cursor() as cursor:
            steps = sequence_steps(cursor, self.schema, [self.plans[n].target for n in self.order])
            for step in steps:
                cursor.execute(step.statement)
                self.result["sequences"].append(step.name)
        self.pg.commit()
        if steps:
            self.result["changed"] = True

    @staticmethod
    def _changed_keys(plan):
        """The source keys that may differ from the snapshot ``since``: those of the dirty intervals (None, all
        of them, for a table compared as a whole that changed). What a validation after the sync needs."""
        if not plan.key:
            return {"since": plan.since, "keys": None if plan.dirty else ""}
        return {"since": plan.since, "keys": ",".join(filter(None, (plan.dirty[span] for span in sorted(plan.dirty))))}

    def _notes(self):
        """What the sync could not follow row by row, or what may not be the change meant, and what it did."""
        notes = []
        recorded = next((p.records["source"] for p in self.plans.values() if p.records.get("source")), None)
        now = self._identity()
        if recorded and recorded["page_size"] != now["page_size"]:
            notes.append(f"the source's page size changed from {recorded['page_size']} to {now['page_size']} bytes "
                         "since the last sync (the file was rebuilt, or another database put at its path): no page "
                         "matched, every row was compared by its cell digest and only differing rows were written")
        for field_name, what in (("application_id", "application id"), ("text_encoding", "text encoding")):
            if recorded and recorded.get(field_name) != now[field_name]:
                notes.append(f"the source's {what} changed from {recorded.get(field_name)} to {now[field_name]} "
                             "since the last sync: it may be another database put at its path; the target now "
                             "holds its rows")
        for name in self.order:
            plan = self.plans[name]
            now = self._declared(plan)
            for column, target, kind in plan.columns:
                loaded = (plan.declared or {}).get(column)
                if loaded is not None and loaded != now[column]:
                    notes.append(f"table {name}: column {column} is declared {now[column] or 'without a type'} in "
                                 f"the source now, {loaded or 'without a type'} when the table was loaded: the "
                                 f"sync writes its values into {self.schema}.{plan.target}.{target} as it is "
                                 f"({kind.sql}); to follow the source, change that column's type, or drop the "
                                 "table in the target and rerun to load it anew")
            if plan.older_format and plan.fresh:
                notes.append(f"table {name}: its page checksums were stored by an earlier version, in a format this "
                             "one does not read: its rows were compared in full once, and the checksums stored anew")
            if not plan.match and plan.dirty and not plan.new:
                counts = plan.counts
                notes.append(f"table {name} has no primary key: its rows cannot be followed one by one, so the "
                             f"whole table was compared by content ({counts['rows_sent']} rows sent) and a changed "
                             f"row counts as deleted and inserted ({counts['deleted']} deleted, {counts['inserted']} "
                             "inserted)")
        before = sum(p.rows_before for p in self.plans.values() if not p.new)
        lost = sum(p.counts["updated"] + p.counts["deleted"] for p in self.plans.values() if not p.new)
        if before >= KEPT_SHARE_MIN_ROWS and before - lost < KEPT_SHARE * before:
            notes.append(f"{before - lost} of the {before} rows of the last sync are unchanged in "
                         f"{self.source.path}: if another database was put at its path, the target now holds its "
                         "rows (restore the backup to go back)")
        return notes

    def _finish(self):
        totals = {"inserted": 0, "updated": 0, "deleted": 0}
        checked = changed = 0
        for name in self.order:
            plan = self.plans[name]
            spans = plan.spans_checked if plan.key else 1
            entry = dict(plan.counts, total_rows=plan.total_rows, ranges_checked=spans, ranges_changed=len(plan.dirty),
                         changed_keys=self._changed_keys(plan))
            self.result["tables"][name] = entry
            checked, changed = checked + spans, changed + len(plan.dirty)
            for key in totals:
                totals[key] += plan.counts[key]
        self.result["notes"] += self._notes()
        self.result["seconds"] = round(time.monotonic() - self.started, 3)
        self.result["status"] = "completed"
        if any(totals.values()):
            self.result["msg"] = (f"synced {len(self.order)} tables from {self.source.path}: {totals['inserted']} "
                                  f"inserted, {totals['updated']} updated, {totals['deleted']} deleted "
                                  f"({changed} of {checked} key ranges changed)")
        elif self.result["changed"]:
            self.result["msg"] = (f"no row differed from {self.source.path}; the page checksums of "
                                  f"{changed or checked} key ranges were recorded")
        else:
            self.result["msg"] = f"the target is up to date with {self.source.path}; nothing to do"
        return self.result


_NOTHING = "nothing was written: the target is as it was before the sync"
# Columns of the sync's own in temporary tables and subqueries beside the table's: names no table has.
NAMES = {name: sql.Identifier(f"sqlite_to_postgres_{name}") for name in ("gone", "held", "present", "content", "copy",
                                                                       "row")}


def _columns(alias, columns):
    """``alias.a, alias.b`` (or ``a, b`` without an alias) for target column names."""
    if not alias:
        return sql.SQL(", ").join(map(sql.Identifier, columns))
    return sql.SQL(", ").join(sql.Identifier(alias, c) for c in columns)


def _joined(columns):
    """t.a = s.a AND t.b = s.b: a target row (alias t) and a staged one (alias s) with the same key."""
    return sql.SQL(" AND ").join(sql.SQL("t.{0} = s.{0}").format(sql.Identifier(c)) for c in columns)


def _in_order(threads, function, items, ahead):
    """``function`` of each item, in order, computed by ``threads`` at most ``ahead`` items in advance."""
    pending = collections.deque()
    try:
        for item in items:
            pending.append(threads.submit(function, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _spans(pages, width):
    """(span, [Page, ...]) of each span the pages (in key order) overlap, in span order: a span's pages at a time."""
    span, held = None, []
    for page in pages:
        first = page.first // width
        while held and span < first:
            yield span, held
            span += 1
            held = [p for p in held if p.last // width >= span]
        if not held:
            span = first
        held.append(page)
    while held:
        yield span, held
        span += 1
        held = [p for p in held if p.last // width >= span]


def _merged(current, stored):
    """(span, [Page, ...] now, stored packed page records or None) for each span of either side, in span order:
    ``current`` as _spans() yields it, ``stored``: (span, packed page records) in span order."""
    current, stored = iter(current), iter(stored)
    now, kept = next(current, None), next(stored, None)
    while now is not None or kept is not None:
        if kept is None or (now is not None and now[0] < kept[0]):
            yield now[0], now[1], None
            now = next(current, None)
        elif now is None or kept[0] < now[0]:
            yield kept[0], [], kept[1]
            kept = next(stored, None)
        else:
            yield now[0], now[1], kept[1]
            now, kept = next(current, None), next(stored, None)


class SpanRows:
    """The span rows a sync stores for one table, spilled to a temporary file in COPY's binary format as the scan
    finds them, and copied into the state's span rows in the sync's write transaction: one span in memory."""

    HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)

    def __init__(self, source_id, table, width):
        self.file = tempfile.TemporaryFile()
        self.file.write(self.HEADER)
        self.prefix = struct.pack(">h", 6) + _field(source_id.encode()) + _field(table.encode())
        self.width = _field(struct.pack(">q", width))

    def add(self, span, pages, cells):
        packed = pack_pages(pages)
        self.file.write(self.prefix + _field(struct.pack(">q", span)) + self.width + _field(packed)
                        + _field(encode_cells(packed, cells)))

    def copy_into(self, cursor, table):
        self.file.write(struct.pack(">h", -1))
        self.file.seek(0)
        copy_in(cursor, sql.SQL("COPY {} (source_id, table_name, span, width, pages, cells) FROM STDIN "
                                "(FORMAT binary)").format(table).as_string(cursor), self.file)

    def close(self):
        self.file.close()


def _field(data):
    """One field of a row of COPY's binary format: its length, then its bytes."""
    return struct.pack(">i", len(data)) + data


def _read_cells(reader, pages, low, high, lasts=None):
    """(rowids, digests) of the cells of ``pages`` (a span's, in key order; ``lasts``: their last rowids) whose
    rowids lie in [low, high]."""
    rowids, digests = [], []
    start = bisect.bisect_left(lasts or [page.last for page in pages], low)
    for page in pages[start:]:
        if page.first > high:
            break
        page_rowids, page_digests = reader.cells(page, low, high)
        rowids += page_rowids
        digests.append(page_digests)
    return rowids, b"".join(digests)


def dirty_intervals(low, high, current, recorded):
    """Key intervals of [low, high] whose rows may differ from the recorded snapshot, as [[low, high], ...].

    ``current`` and ``recorded``: the leaf pages overlapping the span now and at the
    last sync, in key order. A page equal to a recorded one holds the same rows for
    its keys; the keys between two such pages are clean only if the recorded ones
    were neighbours too (else rows between them were deleted), and the keys before
    the first (after the last) page only if it was the first (last) one before.
    """
    current = [tuple(p.record()) if hasattr(p, "record") else tuple(p) for p in current]
    recorded = [tuple(p) for p in recorded]
    if current == recorded:
        return []
    position = {page: index for index, page in enumerate(recorded)}
    matches = [position.get(page) for page in current]
    clean = []
    for index, (page, match) in enumerate(zip(current, matches)):
        if match is None:
            continue
        start, end = page[0], page[1]
        if index == 0 and match == 0:
            start = low
        elif index > 0 and matches[index - 1] is not None and matches[index - 1] + 1 == match:
            start = current[index - 1][1] + 1
        if index == len(current) - 1 and match == len(recorded) - 1:
            end = high
        clean.append((max(start, low), min(end, high)))
    dirty, cursor = [], low
    for start, end in clean:
        if start > cursor:
            dirty.append([cursor, start - 1])
        cursor = max(cursor, end + 1)
    if cursor <= high:
        dirty.append([cursor, high])
    return dirty
