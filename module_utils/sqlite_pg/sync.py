"""sync(): bring a target that holds an earlier migration of the same SQLite database up to date.

What changed is found from the source's page structure (pages.py), not by
reading rows: the state table keeps, per table and per span of ``range_keys``
rowids, the checksums of the leaf pages that span held at the last sync. A
span whose pages are all the same is done; in any other span, the key
intervals not covered by an unchanged page ("dirty") are read from SQLite,
formatted by the migration's own rules, and applied. Within a changed page,
the digests of its cells, kept from the last sync too, narrow the dirty
intervals down to the rows inserted, updated or deleted (pages.Cells), so a
change of 1 % of the rows sends about 1 % of them:

1. upserts, tables parents first: the dirty rows are copied into a temporary
   table, rows whose text differs are updated, missing ones inserted;
2. deletes, tables children first: target rows in the dirty intervals that
   the source no longer has are deleted.

Each (table, span) step is one transaction and the foreign keys of the target
hold at every commit. Before the first of them, the dirty spans' checksums
leave the state table; the new ones (pages and cells) are stored in the sync's
last transaction. A sync killed at any moment leaves each span either
recorded and as the last sync left it, or unrecorded: the next sync compares
the unrecorded spans in full and finishes the job.
"""

import bisect
import datetime
import hashlib
import io
import json
import math
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg2
from psycopg2 import sql

from .errors import MigrationError
from .loader import STORAGE_CLASS, UNCONVERTED, copy_line_sql
from .names import key_intervals_join, pg_name, sqlite_ident
from .pages import Cells, PageReader, decode_cells, encode_cells, span_link, table_digest, table_pages
from .profile import display
from .rules import Invalid, check_timezone, rule_for
from .source import Source, foreign_key_order, read_schema
from .target import (
    STATE_TABLE,
    cells_column_ddl,
    connect,
    count_rows,
    first_line,
    read_table,
    sequence_steps,
    state_has_column,
    state_rows,
)

RANGE_KEYS = 65536  # rowids per span: one transaction and one set of stored page checksums each
MAX_RANGES = 1024  # a table's spans are widened (once, from its key bounds) to stay within this many
FORMAT = 1  # of key_range_checksums; another one is read as "no checksums"
LOCK_NAMESPACE = "sqlite_to_postgres:"  # migrate()'s: one run per target schema, whichever it is
ALL_CLASSES = frozenset({"integer", "real", "text", "blob"})
ALL_KEYS = [-(1 << 63), (1 << 63) - 1]
SPECIALS_GLOB = "*[\t\n\r\\]*"  # text holding what COPY must escape (real tab, newline, CR, backslash)


@dataclass
class TablePlan:
    name: str  # in SQLite
    target: str  # in PostgreSQL
    key: str  # the rowid alias column in SQLite, "" for a table compared as a whole
    columns: list  # [(SQLite column, target column, TargetType)]
    state_id: str  # source_id of its state row
    since: str = ""  # state_id when the sync began: the snapshot its changed keys are relative to
    records: dict = field(default_factory=dict)
    pages: list = field(default_factory=list)  # Page records of the source, in key order
    digest: int = 0  # keyless tables: crc of all pages
    width: int = RANGE_KEYS
    dirty: dict = field(default_factory=dict)  # span -> [[low, high], ...]
    current: dict = field(default_factory=dict)  # span -> [page record, ...]
    baseline: bool = False  # checksums to store although no row changes
    fresh: bool = False  # no usable stored checksums (none, other columns, another span width): all spans compared
    rowid: str = ""  # how SQLite addresses the rowid, "" for WITHOUT ROWID tables
    cells: dict = None  # span -> Cells of this snapshot, to store; None: the stored ones stay
    counts: dict = field(default_factory=lambda: {"inserted": 0, "updated": 0, "deleted": 0, "rows_sent": 0})


def sync(src, conninfo, schema="public", tables=None, jobs=2, source_timezone="UTC", range_keys=RANGE_KEYS,
         hold_lock=True, source_id=None, source_name=None, before_writes=None):
    """Bring ``schema`` (which holds an earlier migration of ``src``) up to date with ``src``.

    ``hold_lock``: take migrate()'s advisory lock for the schema (False when the
    caller's session holds it already). ``source_id``: the source's sha256 when the
    caller has hashed it already (migrate() has). ``source_name``: as for migrate(). ``before_writes``: called
    once the changes are found, before the first write (migrate() waits there for the source's checks that ran
    beside the scan); what it raises fails the sync with nothing written. Returns dict(status, changed, msg,
    tables={name: inserted, updated, deleted, ranges_checked, ranges_changed},
    sequences, seconds, source_id); raises MigrationError, whose ``result`` is
    the same dict with status 'failed'.
    """
    return Sync(src, conninfo, schema, tables, jobs, source_timezone, range_keys, hold_lock, source_id,
                source_name, before_writes).execute()


class Sync:
    def __init__(self, src, conninfo, schema, tables, jobs, source_timezone, range_keys, hold_lock, source_id=None,
                 source_name=None, before_writes=None):
        self.src, self.conninfo, self.schema = src, dict(conninfo), schema
        self.requested, self.jobs, self.timezone = tables, jobs, source_timezone
        self.range_keys, self.hold_lock = range_keys, hold_lock
        self.source_id, self.source_name = source_id or "", source_name
        self.before_writes = before_writes
        self.started = time.monotonic()
        self.started_at = datetime.datetime.now(datetime.timezone.utc)
        self.result = {"status": "failed", "changed": False, "msg": "", "tables": {}, "sequences": [],
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
                    self._lock()
                    self._read_target()
                    self.source_id = self.source_id or hashing.result()
                    self.result["source_id"] = self.source_id
                    self._scan()
                    if self.before_writes:
                        self.before_writes()
                    self._apply()
                    self._sequences()
                finally:
                    self.pg.close()
            return self._finish()
        except MigrationError as error:
            self.result.update(status="failed", msg=str(error))
            raise MigrationError(str(error), self.result) from None
        except psycopg2.Error as error:
            message = f"PostgreSQL failed during the sync: {first_line(error, self.conninfo)}; {_LEFT}"
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
        by_name = {t.name: t for t in found}
        if self.requested:
            missing = [n for n in self.requested if n not in by_name]
            if missing:
                raise MigrationError(f"table {missing[0]} does not exist in source {self.source.path}")
            found = [by_name[n] for n in self.requested]
        self.order, _notes = foreign_key_order(found)
        self.tables = {t.name: t for t in found}

    def _lock(self):
        if not self.hold_lock:
            return
        digest = hashlib.sha256((LOCK_NAMESPACE + self.schema).encode()).digest()
        with self.pg.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", (int.from_bytes(digest[:8], "big", signed=True),))
            if not cursor.fetchone()[0]:
                raise MigrationError(f"another sqlite_to_postgres run is loading schema {self.schema} "
                                     "of this database; wait for it to finish")
        self.pg.commit()

    def _read_target(self):
        self.plans = {}
        with self.pg.cursor() as cursor:
            recorded = state_rows(cursor, self.schema)
            self.cells_column = state_has_column(cursor, self.schema, "cell_checksums")
            for name in self.order:
                source, target = self.tables[name], pg_name(name)
                existing = read_table(cursor, self.schema, target)
                if existing is None:
                    raise MigrationError(f"target table {self.schema}.{target} does not exist: "
                                         "run the migration first, a sync only brings a migrated target up to date")
                rows = [r for r in recorded.get(target, []) if r[1] == self.source.name]
                if not rows:
                    raise MigrationError(f"target table {self.schema}.{target} holds no migration of source "
                                         f"{self.source.path}: run the migration first")
                columns = []
                for column in source.columns:
                    match = existing.column(column.name)
                    if match is None:
                        raise MigrationError(f"table {name}: column {column.name} has no column in target table "
                                             f"{self.schema}.{target}")
                    columns.append((column.name, match.name, match.type))
                plan = TablePlan(name, target, source.rowid_alias, columns, rows[-1][0], rows[-1][0],
                                 rowid=source.rowid)
                cursor.execute(sql.SQL("SELECT key_range_checksums FROM {} WHERE source_id = %s AND table_name = %s")
                               .format(sql.Identifier(self.schema, STATE_TABLE)), (plan.state_id, target))
                stored = cursor.fetchone()[0] or {}
                if stored.get("format") == FORMAT and stored.get("signature") == self._signature(plan):
                    plan.records = stored
                self.plans[name] = plan
        self.pg.commit()

    def _signature(self, plan):
        """What the stored checksums assume: the columns, their target types and the source's time zone."""
        return [self.timezone] + [[s, t, kind.sql] for s, t, kind in plan.columns]

    # Finding what changed ------------------------------------------------------------

    def _scan(self):
        """Read every table's leaf pages (in parallel), then decide which key intervals are dirty."""
        if all(self._finished(plan) for plan in self.plans.values()):
            return  # the last sync finished on this very snapshot: nothing can differ
        with ThreadPoolExecutor(max_workers=self.jobs) as threads:
            list(threads.map(self._scan_table, [self.plans[n] for n in self.order]))
        self._verify_unchanged()
        for name in self.order:
            plan = self.plans[name]
            same_snapshot = plan.state_id == self.source_id
            if not plan.key:
                if plan.records.get("whole") != plan.digest:
                    plan.baseline = same_snapshot  # loaded from this very snapshot: only the digest is missing
                    if not same_snapshot:
                        plan.dirty = {0: [ALL_KEYS]}
                continue
            self._decide(plan, same_snapshot)
        reader = PageReader(self.source)
        try:
            for name in self.order:
                plan = self.plans[name]
                if plan.key and (plan.dirty or plan.baseline):
                    self._narrow_to_cells(plan, reader)
        finally:
            reader.close()
        self._verify_unchanged()

    def _finished(self, plan):
        """Its state row names this snapshot and holds complete checksums (a killed sync leaves them incomplete)."""
        return plan.state_id == self.source_id and plan.records.get("complete", False)

    def _scan_table(self, plan):
        connection = self.source.connect()
        reader = PageReader(self.source)
        try:
            if plan.key:
                plan.pages = table_pages(connection, reader, plan.name)
            else:
                plan.digest = table_digest(connection, reader, plan.name)
        finally:
            reader.close()
            connection.close()

    def _decide(self, plan, same_snapshot):
        records = plan.records
        width = records.get("range_keys") or self._width(plan)
        current = _by_span(plan.pages, width)
        if current is None:  # keys spread far wider than when the spans were chosen
            records, width = {}, self._width(plan)
            current = _by_span(plan.pages, width)
        plan.width, plan.current = width, current
        if not records and same_snapshot:
            plan.baseline = True  # the target holds exactly this snapshot: store its checksums, change nothing
            return
        plan.fresh = not records
        complete = records.get("complete", False)
        stored = records.get("ranges", {})
        spans = set(current) | {int(s) for s in stored}
        if not complete:
            spans |= self._target_spans(plan, width)
        for span in sorted(spans):
            low, high = span * width, span * width + width - 1
            if str(span) not in stored and not complete:
                plan.dirty[span] = [[low, high]]
                continue
            intervals = dirty_intervals(low, high, current.get(span, []), stored.get(str(span), []))
            if intervals:
                plan.dirty[span] = intervals

    def _narrow_to_cells(self, plan, reader):
        """Narrow each dirty span to the keys whose cells differ from the stored ones, and find every span's cells.

        A span's stored cells are used only where they belong to its stored page records;
        a span without them stays dirty as its pages say, and its cells are read afresh.
        """
        width, stored_cells = self._stored_cells(plan)
        if width != plan.width:
            stored_cells = {}
        stored = plan.records.get("ranges", {})
        plan.cells = {}
        for span in sorted(set(plan.current) | set(plan.dirty)):
            low, high = span * plan.width, span * plan.width + plan.width - 1
            pages = plan.current.get(span, [])
            link, previous = stored_cells.get(span, (None, None))
            if previous is None or str(span) not in stored or link != span_link(stored[str(span)]):
                if pages:
                    plan.cells[span] = Cells.of(*_read_cells(reader, pages, low, high))
                continue
            if span not in plan.dirty:
                plan.cells[span] = previous
                continue
            lasts = [page.last for page in pages]
            cells, plan.dirty[span] = previous.replace(plan.dirty[span], lambda first, last, pages=pages, lasts=lasts:
                                                       _read_cells(reader, pages, first, last, lasts=lasts))
            if cells.rowids:
                plan.cells[span] = cells

    def _stored_cells(self, plan):
        """(width, {span: (link, Cells)}) kept by the last sync, (0, {}) without."""
        if not self.cells_column or plan.fresh or not plan.records:
            return 0, {}
        with self.pg.cursor() as cursor:
            cursor.execute(sql.SQL("SELECT cell_checksums FROM {} WHERE source_id = %s AND table_name = %s")
                           .format(sql.Identifier(self.schema, STATE_TABLE)), (plan.state_id, plan.target))
            blob = cursor.fetchone()[0]
        self.pg.commit()
        return decode_cells(bytes(blob)) if blob else (0, {})

    def _width(self, plan):
        """Span width for a table: RANGE_KEYS, or wider so that its keys (both sides) fit MAX_RANGES spans."""
        low, high = self._target_bounds(plan)
        if plan.pages:
            low = min(low, plan.pages[0].first) if low is not None else plan.pages[0].first
            high = max(high, plan.pages[-1].last) if high is not None else plan.pages[-1].last
        if low is None:
            return self.range_keys
        return max(self.range_keys, math.ceil((high - low + 1) / MAX_RANGES))

    def _target_bounds(self, plan):
        with self.pg.cursor() as cursor:
            key = sql.Identifier(self._target_key(plan))
            cursor.execute(sql.SQL("SELECT min({}), max({}) FROM {}").format(
                key, key, sql.Identifier(self.schema, plan.target)))
            bounds = cursor.fetchone()
        self.pg.commit()
        return bounds

    def _target_spans(self, plan, width):
        low, high = self._target_bounds(plan)
        return set() if low is None else set(range(low // width, high // width + 1))

    @staticmethod
    def _target_key(plan):
        return next(target for source, target, _type in plan.columns if source == plan.key)

    def _verify_unchanged(self):
        if self.source.fingerprint() != self.fingerprint:
            raise MigrationError(f"source {self.source.path} changed while it was being read (another process wrote "
                                 f"to it): run the sync again; {_LEFT}")

    # Applying the changes ------------------------------------------------------------

    def _apply(self):
        work = [(name, span) for name in self.order for span in sorted(self.plans[name].dirty)]
        if not work:
            return
        sessions, opened = queue.SimpleQueue(), []
        try:
            for _ in range(min(self.jobs, len(work))):
                session = Session(self.source, self.conninfo, self.timezone)
                opened.append(session)
                sessions.put(session)
            self._start_documents()
            # Upserts parents first: a child's new parent is there before the child points to it.
            for name in self.order:
                self._run(sessions, self._upsert, self.plans[name])
            # Deletes children first: no parent goes while a child still points to it.
            for name in reversed(self.order):
                self._run(sessions, self._delete, self.plans[name])
        finally:
            for session in opened:
                session.close()

    def _start_documents(self):
        """Before any row is written: the dirty spans' records leave the checksum document, which is marked
        incomplete. A span it does not name is one whose target rows are not known to match any snapshot (a sync
        killed from here on may have written some of its rows): the next sync compares it in full."""
        with self.pg.cursor() as cursor:
            for plan in self.plans.values():
                if plan.key and plan.dirty:
                    kept = {} if plan.fresh else {span: records for span, records in plan.records["ranges"].items()
                                                  if int(span) not in plan.dirty}
                    cursor.execute(sql.SQL("UPDATE {} SET key_range_checksums = %s WHERE source_id = %s "
                                           "AND table_name = %s").format(sql.Identifier(self.schema, STATE_TABLE)),
                                   (json.dumps(dict(self._document(plan, complete=False), ranges=kept)),
                                    plan.state_id, plan.target))
                    self.result["changed"] = True
        self.pg.commit()

    def _run(self, sessions, step, plan):
        def one(span):
            session = sessions.get()
            try:
                return step(session, plan, span)
            except BaseException:
                if not session.pg.closed:
                    session.pg.rollback()
                raise
            finally:
                sessions.put(session)

        with ThreadPoolExecutor(max_workers=self.jobs) as threads:
            for counts in threads.map(one, sorted(plan.dirty)):
                for key, value in counts.items():
                    plan.counts[key] += value

    def _upsert(self, session, plan, span):
        try:
            return self._write_rows(session, plan, span)
        except (psycopg2.DataError, psycopg2.IntegrityError) as error:
            session.pg.rollback()
            problem = self._first_invalid(plan, session.lite, plan.dirty[span])
            raise MigrationError(problem or f"table {plan.name}: PostgreSQL refused the changed rows of key range "
                                 f"{span}: {first_line(error, self.conninfo)}; {_LEFT}") from None

    def _write_rows(self, session, plan, span):
        intervals = plan.dirty[span]
        if not intervals:
            return {}  # pages changed, no row did
        data, sent, copy_columns = self._copy_text(session, plan, intervals)
        columns = [target for _source, target, _type in plan.columns]
        target = sql.Identifier(self.schema, plan.target)
        temporary = sql.Identifier(f"sqlite_to_postgres_sync_{self.order.index(plan.name)}")
        names = sql.SQL(", ").join(map(sql.Identifier, columns))
        copied = sql.SQL(", ").join(map(sql.Identifier, copy_columns))
        with session.pg.cursor() as cursor:
            if not plan.key:
                # No key to match rows by: the table is replaced as a whole, with its digest.
                cursor.execute(sql.SQL("DELETE FROM {}").format(target))
                deleted = cursor.rowcount
                cursor.copy_expert(sql.SQL("COPY {} ({}) FROM STDIN").format(target, copied).as_string(cursor),
                                   io.BytesIO(data))
                self._record(cursor, plan)
                self._commit(session)
                return {"inserted": sent, "deleted": deleted, "rows_sent": sent}
            if not sent:
                return {}
            counts = {"rows_sent": sent}
            cursor.execute(sql.SQL("CREATE TEMPORARY TABLE IF NOT EXISTS {} AS SELECT {} FROM {} WITH NO DATA").format(
                temporary, names, target))
            cursor.execute(sql.SQL("TRUNCATE {}").format(temporary))
            cursor.copy_expert(sql.SQL("COPY {} ({}) FROM STDIN").format(temporary, copied).as_string(cursor),
                               io.BytesIO(data))
            key = sql.Identifier(self._target_key(plan))
            others = [c for c in columns if c != self._target_key(plan)]
            updated = 0
            if others:
                # Compared as text, which is exactly what a loaded row would be (numeric scale, -0, jsonb).
                cursor.execute(sql.SQL(
                    "UPDATE {target} t SET {assignments} FROM {temporary} s WHERE t.{key} = s.{key} "
                    "AND ROW({old})::text IS DISTINCT FROM ROW({new})::text").format(
                    target=target, temporary=temporary, key=key,
                    assignments=sql.SQL(", ").join(sql.SQL("{} = s.{}").format(sql.Identifier(c), sql.Identifier(c))
                                                   for c in others),
                    old=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in others),
                    new=sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in others)))
                updated = cursor.rowcount
            cursor.execute(sql.SQL(
                "INSERT INTO {target} ({names}) OVERRIDING SYSTEM VALUE SELECT {names} FROM {temporary} s "
                "WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE t.{key} = s.{key})").format(
                target=target, names=names, temporary=temporary, key=key))
            inserted = cursor.rowcount
        if updated or inserted:
            self._commit(session)
        else:
            session.pg.rollback()  # nothing differed: leave no transaction behind
        return dict(counts, inserted=inserted, updated=updated)

    def _delete(self, session, plan, span):
        if not plan.key:
            return {}
        intervals = plan.dirty[span]
        if not intervals:
            return {}
        keys = [row[0] for row in session.lite.execute(
            f"SELECT src.{sqlite_ident(plan.key)} {key_intervals_join(plan.name, plan.key)}", (json.dumps(intervals),))]  # noqa: S608
        key = sql.Identifier(self._target_key(plan))
        with session.pg.cursor() as cursor:
            # One index range scan per interval (an OR of BETWEENs is tested row by row), and NOT IN a
            # subquery, which is hashed (NOT (key = ANY(array)) scans the array once per row).
            cursor.execute(sql.SQL(
                "DELETE FROM {table} t USING unnest(%s::bigint[], %s::bigint[]) AS span(low, high) "
                "WHERE t.{key} BETWEEN span.low AND span.high AND t.{key} NOT IN (SELECT unnest(%s::bigint[]))").format(
                table=sql.Identifier(self.schema, plan.target), key=key),
                ([low for low, _high in intervals], [high for _low, high in intervals], keys))
            deleted = cursor.rowcount
        self._commit(session)
        return {"deleted": deleted}

    def _record(self, cursor, plan):
        """Store a keyless table's digest in its state row, in the transaction that replaced the table."""
        cursor.execute(sql.SQL("UPDATE {} SET key_range_checksums = %s WHERE source_id = %s AND table_name = %s")
                       .format(sql.Identifier(self.schema, STATE_TABLE)),
                       (json.dumps(self._document(plan)), plan.state_id, plan.target))

    def _document(self, plan, complete=True):
        document = {"format": FORMAT, "signature": self._signature(plan), "complete": complete}
        if not plan.key:
            return dict(document, whole=plan.digest)
        ranges = {str(span): [p.record() for p in pages] for span, pages in plan.current.items()} if complete else {}
        return dict(document, range_keys=plan.width, ranges=ranges)

    def _commit(self, session):
        self._verify_unchanged()  # the rows sent and the checksums stored are of the snapshot scanned
        session.pg.commit()
        self.result["changed"] = True

    def _copy_text(self, session, plan, intervals):
        """COPY text of the source rows in ``intervals``, formatted as the load formats them.

        The storage classes and escaping needs of these rows are read first (the load has
        them from the profile), so each column gets the formatting the load would give it.
        Validity is left to the formatting (a value it cannot convert becomes UNCONVERTED)
        and to PostgreSQL; only then are the rules' validity tests run, to name the value.
        Returns (bytes, rows, the target columns in the order of the text's fields).
        """
        join, parameters = self._rows_from(plan, intervals)
        lite = session.lite
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
                    f"nothing of this table was written, {_LEFT}")
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
                f"nothing of this key range was written, {_LEFT}")

    # The end -------------------------------------------------------------------------

    def _sequences(self):
        with self.pg.cursor() as cursor:
            self._close_state(cursor)
            steps = sequence_steps(cursor, self.schema, [self.plans[n].target for n in self.order])
            for step in steps:
                cursor.execute(step.statement)
                self.result["sequences"].append(step.name)
        self._verify_unchanged()
        self.pg.commit()
        if steps:
            self.result["changed"] = True

    def _close_state(self, cursor):
        """Each table's state row now describes this snapshot: its source_id, row count and complete checksums."""
        state = sql.Identifier(self.schema, STATE_TABLE)
        if not self.cells_column and any(plan.cells is not None for plan in self.plans.values()):
            cursor.execute(cells_column_ddl(self.schema))
            self.cells_column = True
        for name in self.order:
            plan = self.plans[name]
            if plan.state_id == self.source_id and not plan.baseline and not plan.dirty:
                continue
            # Only a table that was written to can hold another number of rows.
            rows = count_rows(cursor, self.schema, plan.target) if plan.dirty or plan.baseline else None
            if plan.state_id != self.source_id:
                cursor.execute(sql.SQL("DELETE FROM {} WHERE source_id = %s AND table_name = %s").format(state),
                               (self.source_id, plan.target))
            seconds = time.monotonic() - self.started
            document = json.dumps(self._document(plan)) if plan.baseline or plan.dirty or not plan.key else None
            cells = sql.SQL(", cell_checksums = %s" if plan.cells is not None else "")
            cursor.execute(sql.SQL(
                "UPDATE {} SET source_id = %s, rows_loaded = coalesce(%s, rows_loaded), rows_rejected = 0, "
                "started_at = %s, "
                "loaded_at = now(), seconds = %s, validated_at = NULL, "
                "key_range_checksums = coalesce(%s::jsonb, key_range_checksums || '{{\"complete\": true}}'){} "
                "WHERE source_id = %s AND table_name = %s").format(state, cells),
                (self.source_id, rows, self.started_at, seconds, document)
                + ((self._cells_blob(plan),) if plan.cells is not None else ()) + (plan.state_id, plan.target))
            plan.state_id = self.source_id
            self.result["changed"] = True

    @staticmethod
    def _cells_blob(plan):
        return psycopg2.Binary(encode_cells(plan.width, {
            span: (span_link([p.record() for p in plan.current.get(span, [])]), cells)
            for span, cells in plan.cells.items()}))

    @staticmethod
    def _changed_keys(plan):
        """The source keys that may differ from the snapshot ``since``: those of the dirty intervals (None, all
        of them, for a keyless table that changed). What a validation after the sync needs to compare."""
        if not plan.key:
            return {"since": plan.since, "keys": None if plan.dirty else []}
        return {"since": plan.since, "keys": [list(i) for span in sorted(plan.dirty) for i in plan.dirty[span]]}

    def _finish(self):
        totals = {"inserted": 0, "updated": 0, "deleted": 0}
        checked = changed = 0
        for name in self.order:
            plan = self.plans[name]
            spans = len(plan.current) if plan.key else 1
            entry = dict(plan.counts, ranges_checked=spans, ranges_changed=len(plan.dirty),
                         changed_keys=self._changed_keys(plan))
            self.result["tables"][name] = entry
            checked, changed = checked + spans, changed + len(plan.dirty)
            for key in totals:
                totals[key] += plan.counts[key]
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


_LEFT = "a rerun of the sync compares again the key ranges committed before this error and finishes the rest"


class Session:
    """One parallel worker: a PostgreSQL session and a read-only SQLite connection of its own."""

    def __init__(self, source, conninfo, timezone):
        self.lite = source.connect(text_as_bytes=True)
        try:
            self.pg = connect(conninfo)
            with self.pg.cursor() as cursor:
                # Naive timestamps are in the source's zone, as in the load.
                cursor.execute("SELECT set_config('TimeZone', %s, false), set_config('DateStyle', 'ISO, YMD', false)",
                               (timezone,))
            self.pg.commit()
        except BaseException:
            self.lite.close()
            raise

    def close(self):
        self.pg.close()
        self.lite.close()


def _by_span(pages, width):
    """{span: [Page, ...]} of the pages that overlap each span, or None when that would be too many spans."""
    spans = {}
    for page in pages:
        first, last = page.first // width, page.last // width
        if last - first > MAX_RANGES:
            return None
        for span in range(first, last + 1):
            spans.setdefault(span, []).append(page)
    return None if len(spans) > 4 * MAX_RANGES else spans


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
