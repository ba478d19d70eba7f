"""migrate(): profile the source, check the target, load the tables, build keys and indexes.

The order is what makes a run safe: everything that can be found wrong is
found before the first write (the profile, the target's state); each table
then loads in its own transaction together with its state row; keys, indexes
and sequences come last and skip whatever already exists.
"""

import gc
import hashlib
import json
import multiprocessing
import os
import queue
import secrets
import sqlite3
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import psycopg2
from psycopg2 import sql

from . import loader
from .errors import MigrationError
from .lease import Lease
from .loader import COMMITTED_STAY, LOST_CAUSES, LoadPlan, become_worker, copy_line_sql, load_table
from .names import pg_name, sqlite_ident
from .profile import describe_key, display, integrity_check, profile_table, resolve_datetime_formats
from .progress import Progress
from .rules import Invalid, check_timezone, rule_for, storage_class_of
from .source import Source, foreign_key_order, read_schema
from .target import (
    APPLICATION_NAME,
    MAINTENANCE_WORK_MEM,
    STATE_TABLE,
    connect,
    count_rows,
    create_table_sql,
    default_literal,
    first_line,
    has_rows,
    plan_post_data,
    planned_tables,
    read_table,
    schema_exists,
    sequence_steps,
    server_address,
    state_rows,
    state_table_ddl,
)
from .typemap import clock_default, parse_default

DEFAULT_JOBS = 2
FINDINGS_SHOWN = 5  # a failed profile lists this many of its findings, one line each
LOCK_NAMESPACE = "sqlite_to_postgres:"


def migrate(src, conninfo, schema="public", tables=None, create_tables=True, jobs=DEFAULT_JOBS, on_invalid="fail",
            max_rejects=0, reject_file=None, source_timezone="UTC", progress_file=None, post_data=True,
            integrity="full", check_mode=False, lease=None, target_ddl=None, datetime_formats=None):
    """Migrate the SQLite database ``src`` into ``schema`` of the PostgreSQL database ``conninfo`` describes.

    ``conninfo``: libpq keywords for psycopg2.connect (host, port, user, dbname,
    password, sslmode, sslrootcert, ...); without a password libpq's pgpass
    file (PGPASSFILE) is used. ``integrity``: 'full' (PRAGMA integrity_check) or
    'quick' (PRAGMA quick_check: skips the index-against-table cross-check, about
    8 times faster). ``check_mode``: profile and plan only; nothing is written,
    the PostgreSQL session itself is read-only. ``lease``: dict(key, backend_pid) of
    the advisory lock the calling run holds; the load stops, and rolls back what
    is streaming, as soon as that backend no longer holds it (lease.py). ``target_ddl``: SQL that creates
    the target tables (run unqualified, with ``schema`` as search_path); in check
    mode, target tables that do not exist yet are created from it in one
    transaction that is always rolled back, and the source is profiled against
    their types (without it, against the types the engine would choose).
    ``datetime_formats``: {"table.column": representation} for date columns whose
    numbers are not to be read by SQLite's 'auto' rule (rules.DATETIME_FORMATS).

    Returns the result dict (status, changed, msg, total_tables, total_rows,
    tables, profile, post_data, source_id). Raises MigrationError, whose
    ``result`` holds the same dict with status 'failed'.
    """
    run = Run(src, conninfo, schema, tables, create_tables, jobs, on_invalid, max_rejects, reject_file,
              source_timezone, progress_file, post_data, integrity, check_mode, lease, target_ddl,
              datetime_formats or {})
    return run.execute()


class Run:
    def __init__(self, src, conninfo, schema, tables, create_tables, jobs, on_invalid, max_rejects, reject_file,
                 source_timezone, progress_file, post_data, integrity, check_mode, lease=None, target_ddl=None,
                 datetime_formats=None):
        self.src, self.conninfo, self.schema = src, dict(conninfo), schema
        # Every session of this run carries one name, so that exactly these can be ended (lease.py).
        self.conninfo.setdefault("application_name", f"{APPLICATION_NAME} {secrets.token_hex(4)}")
        self.lease = None if check_mode or not lease else Lease(
            self.conninfo, lease["key"], lease["backend_pid"], self.conninfo["application_name"])
        self.requested, self.create_tables, self.jobs = tables, create_tables, jobs
        self.on_invalid, self.max_rejects, self.reject_file = on_invalid, max_rejects, reject_file
        self.source_timezone, self.post_data, self.integrity = source_timezone, post_data, integrity
        self.check_mode, self.target_ddl = check_mode, target_ddl
        self.datetime_option = datetime_formats or {}
        self.progress = Progress(None if check_mode else progress_file, {})
        self.result = {"changed": False, "status": "failed", "msg": "", "total_tables": 0, "total_rows": 0,
                       "tables": {}, "profile": {}, "post_data": [], "source_id": "", "findings": []}
        self.notes = []

    # The run ---------------------------------------------------------------------------

    def execute(self):
        try:
            self._validate_options()
            self.source = Source(self.src)
            self.baseline = self.source.fingerprint()
            self._read_source_schema()
            self.pg = connect(self.conninfo, read_only=self.check_mode)
            try:
                if self.lease:
                    self.lease.start()
                    if self.lease.lost:
                        raise MigrationError(self.lease.lost)
                self._lock()
                self._read_target()
                counters = multiprocessing.get_context("fork").Array("q", len(self.order), lock=False)
                loader.progress_counters = counters
                self.progress.add_tables(self.order)
                # Objects the workers inherit stay untouched by their garbage collector, so the pages
                # holding them stay shared with this process instead of being copied into each worker.
                gc.freeze()
                with ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("fork"),
                                         initializer=become_worker) as pool:
                    self.pool = pool
                    self._profile()
                    self._decide()
                    if self.check_mode:
                        return self._finish_check()
                    self._load(counters)
                self._post_data()
            finally:
                gc.unfreeze()  # a caller that runs several migrations collects their garbage again
                if self.lease:
                    self.lease.stop()
                self.session_lost = bool(self.pg.closed)  # before close(): did the server end the session?
                self.pg.close()
            return self._finish()
        except MigrationError as error:
            message = self._stopped_message() if self.lease and self.lease.lost else str(error)
            self._fail(message)
            raise MigrationError(message, self.result) from None
        except BrokenProcessPool:
            message = "a worker process died (killed, or out of memory); every table it was loading was rolled back"
            self._fail(message)
            raise MigrationError(message, self.result) from None
        except psycopg2.Error as error:
            message = self._stopped_message() if self.lease and self.lease.lost else self._database_failure(error)
            self._fail(message)
            raise MigrationError(message, self.result) from None

    def _database_failure(self, error):
        """A failure of this run's own session as one line: where it was, and what is left of the run."""
        during, left = {
            "load": ("during the load", COMMITTED_STAY),
            "post_data": ("while keys and indexes were built", "the data is loaded: run again to finish"),
        }.get(self.progress.phase, ("while the target was read", "nothing was written"))
        if self.session_lost:
            return (f"the connection to {server_address(self.conninfo)} was lost {during} ({LOST_CAUSES}); "
                    f"{left}")
        return f"PostgreSQL failed {during}: {first_line(error, self.conninfo)}; {left}"

    def _stopped_message(self):
        """Why the load stopped when its run is gone, and what state each table is in."""
        tables = self.result["tables"]
        loaded = [n for n, t in tables.items() if t.get("action") == "loaded"]
        undone = [n for n, t in tables.items() if t.get("status") in ("loading", "failed")]
        waiting = [n for n, t in tables.items() if t.get("status") == "pending" and t.get("action") != "skipped"]
        parts = [f"loaded and recorded: {', '.join(loaded)}" if loaded else "no table was loaded",
                 f"rolled back: {', '.join(undone)}" if undone else "",
                 f"not started: {', '.join(waiting)}" if waiting else ""]
        return (f"load stopped: {self.lease.lost}; " + "; ".join(p for p in parts if p)
                + "; a rerun loads only what is missing")

    def _fail(self, message):
        self.result.update(status="failed", msg=message)
        self.progress.phase = "failed"
        try:
            self.progress.write(force=True)
        except OSError:
            pass

    def _validate_options(self):
        if self.on_invalid not in ("fail", "reject"):
            raise MigrationError(f"on_invalid must be 'fail' or 'reject', not {self.on_invalid!r}")
        if self.on_invalid == "reject" and not self.reject_file:
            raise MigrationError("on_invalid: reject needs reject_file (where rejected rows are written)")
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise MigrationError(f"jobs must be a whole number of at least 1, not {self.jobs!r}")
        if not isinstance(self.max_rejects, int) or self.max_rejects < 0:
            raise MigrationError(f"max_rejects must be 0 or more, not {self.max_rejects!r}")
        if self.integrity not in ("full", "quick"):
            raise MigrationError(f"integrity_check must be 'full' or 'quick', not {self.integrity!r}")
        try:
            check_timezone(self.source_timezone)
        except ValueError as error:
            raise MigrationError(f"source_timezone: {error}") from None
        for option, path in (("reject_file", self.reject_file), ("progress_file", self.progress.path)):
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise MigrationError(f"{option}: directory {os.path.dirname(os.path.abspath(path))} does not exist")

    def _read_source_schema(self):
        connection = self.source.connect()
        try:
            tables, notes = read_schema(connection)
            # Foreign keys of a selected table may reference any table of the source.
            self.rowid_aliases = {t.name: t.rowid_alias for t in tables if t.rowid and t.rowid_alias}
            self.sizes = {t.name: _estimated_size(connection, t) for t in tables}
        except Exception as error:  # sqlite3 raises DatabaseError and friends for corrupt schemas
            raise MigrationError(f"source {self.source.path} cannot be read: {error}") from None
        finally:
            connection.close()
        self.notes += notes
        self.datetime_formats = resolve_datetime_formats(self.datetime_option, tables)
        by_name = {t.name: t for t in tables}
        if self.requested:
            selected = []
            for name in self.requested:
                match = by_name.get(name) or next((t for t in tables if t.name.lower() == str(name).lower()), None)
                if match is None:
                    available = ", ".join(sorted(by_name)) or "none"
                    raise MigrationError(f"table {name} does not exist in source {self.source.path} "
                                         f"(its tables: {available})")
                if match not in selected:
                    selected.append(match)
        else:
            selected = tables
        self.tables = {t.name: t for t in selected}
        self.order, order_notes = foreign_key_order(selected)
        self.notes += order_notes
        self.target_names = {name: pg_name(name) for name in self.order}
        seen = {}
        for name, target in self.target_names.items():
            if target in seen:
                raise MigrationError(f"tables {seen[target]} and {name} both become {target} in PostgreSQL "
                                     "(names are cut to 63 bytes)")
            if target == STATE_TABLE:
                raise MigrationError(f"source table {name} has the name of this module's state table")
            seen[target] = name

    def _lock(self):
        # One run per target schema at a time (session-level advisory lock, released when the session ends).
        digest = hashlib.sha256((LOCK_NAMESPACE + self.schema).encode()).digest()
        key = int.from_bytes(digest[:8], "big", signed=True)
        with self.pg.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            if not cursor.fetchone()[0]:
                raise MigrationError(f"another sqlite_to_postgres run is loading schema {self.schema} "
                                     "of this database; wait for it to finish")
        self.pg.commit()

    def _read_target(self):
        self.existing, self.targets, self.notnull, self.column_names = {}, {}, {}, {}
        problems = []
        with self.pg.cursor() as cursor:
            self.schema_present = schema_exists(cursor, self.schema)
            if not self.schema_present and not self.create_tables and not self._uses_target_ddl():
                raise MigrationError(f"schema {self.schema} does not exist in the target database "
                                     "(and create_tables is false)")
            for name in self.order:
                found = read_table(cursor, self.schema, self.target_names[name]) if self.schema_present else None
                self.existing[name] = found
        self.pg.commit()
        planned = self._planned_tables()
        for name in self.order:
            existing = self.existing[name] or planned.get(name)
            if existing is None and not self.create_tables:
                raise MigrationError(f"target table {self.schema}.{self.target_names[name]} does not exist "
                                     "(and create_tables is false)")
            problems += self._match_columns(self.tables[name], existing)
        if problems:
            raise MigrationError(problems[0] + self._more(len(problems) - 1, "problem"))

    def _uses_target_ddl(self):
        return self.check_mode and bool(self.target_ddl)

    def _planned_tables(self):
        """Check mode: {source table: TargetTable} of the missing tables as target_ddl creates them.

        The real run loads into the tables the schema stage makes from that SQL, so the profile
        must check the values against those types, not the ones this engine would pick.
        """
        missing = [self.target_names[name] for name in self.order if self.existing[name] is None]
        if not (self._uses_target_ddl() and missing):
            return {}
        found = planned_tables(self.pg, self.schema, self.target_ddl, missing)
        return {name: found[self.target_names[name]] for name in self.order if self.target_names[name] in found}

    def _match_columns(self, source, existing):
        """Fill targets/notnull/column_names for one table; return problems (one line each)."""
        problems, targets, notnull, names = [], {}, set(), {}
        if existing is None:
            seen = {}
            for column in source.columns:
                target_name = pg_name(column.name)
                if target_name in seen:
                    problems.append(f"table {source.name}: columns {seen[target_name]} and {column.name} both "
                                    f"become {target_name} in PostgreSQL (names are cut to 63 bytes)")
                seen[target_name] = column.name
                names[column.name] = target_name
                targets[column.name] = None
                if column.notnull or column.pk_position:
                    notnull.add(column.name)
        else:
            for column in source.columns:
                match = existing.column(column.name)
                if match is None:
                    problems.append(
                        f"table {source.name}: column {column.name} has no column in target table "
                        f"{self.schema}.{existing.name} (it has {', '.join(c.name for c in existing.columns)})")
                    continue
                if match.generated:
                    problems.append(f"table {source.name}: target column {existing.name}.{match.name} is generated "
                                    "and cannot be loaded")
                    continue
                names[column.name] = match.name
                targets[column.name] = match.type
                if match.notnull:
                    notnull.add(column.name)
            loaded = set(names.values())
            for column in existing.columns:
                if column.name not in loaded and column.notnull and not column.has_default and not column.generated:
                    problems.append(f"table {source.name}: target column {existing.name}.{column.name} is NOT NULL "
                                    "without a default and has no source column")
        self.targets[source.name], self.notnull[source.name], self.column_names[source.name] = targets, notnull, names
        return problems

    # Profile -------------------------------------------------------------------------

    def _profile(self):
        options = {"on_invalid": self.on_invalid, "max_rejects": self.max_rejects, "rowid_aliases": self.rowid_aliases,
                   "source_timezone": self.source_timezone}
        futures = {}

        def integrity():
            futures[self.pool.submit(_integrity_task, self.source, self.integrity == "quick", self.baseline)] = (
                "integrity", None)

        # Largest tasks first, so the workers finish together: a full integrity check reads every page of
        # the file and is the longest; a quick one and the hash fill the gaps at the end.
        if self.integrity == "full":
            integrity()
        for name in sorted(self.order, key=lambda n: -self.sizes[n]):
            table_options = dict(options, notnull=self.notnull[name],
                                 datetime_formats=self.datetime_formats.get(name, {}))
            futures[self.pool.submit(_profile_task, self.source, self.tables[name], self.targets[name],
                                     table_options, self.baseline)] = ("profile", name)
        if self.integrity == "quick":
            integrity()
        futures[self.pool.submit(_identity_task, self.source, self.baseline)] = ("identity", None)
        self.profiles, self.integrity_problems = {}, []
        for kind, name, value in self._gather(futures):
            if kind == "identity":
                self.source_id = value
            elif kind == "integrity":
                self.integrity_problems = value
            else:
                self.profiles[name] = value
                self.progress.set_total(name, value.rows)
        self.result["source_id"] = self.source_id
        self.result["profile"] = self._profile_summary()
        self.progress.write(force=True)

    def _gather(self, futures):
        """Yield (kind, name, result) as tasks finish, writing the progress file meanwhile."""
        pending = set(futures)
        first_error = None
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                kind, name = futures[future]
                try:
                    value = future.result()
                except MigrationError as error:
                    first_error = first_error or error
                    continue
                yield kind, name, value
            self.progress.write()
        if first_error:
            raise first_error

    def _profile_summary(self):
        return {
            "source": {"path": self.source.path, "bytes": self.source.size, "sha256": self.source_id,
                       "journal": "wal" if self.source.wal_mode else "rollback", "open": self.source.open_mode,
                       "integrity_check": "; ".join(self.integrity_problems) or "ok",
                       "integrity_mode": self.integrity},
            "tables": {name: self.profiles[name].summary() for name in self.order if name in self.profiles},
            "notes": self.notes + [n for p in self.profiles.values() for n in p.notes],
        }

    # Decisions before any write ---------------------------------------------------

    def _decide(self):
        if self.integrity_problems:
            self.result["findings"] = self.integrity_problems[:FINDINGS_SHOWN]
            raise MigrationError(f"source {self.source.path} fails PRAGMA {self._pragma()}: "
                                 f"{self.integrity_problems[0]}" + self._more(len(self.integrity_problems) - 1,
                                                                             "problem"))
        problems = [p for name in self.order for p in self.profiles[name].problems]
        if problems:
            self.result["findings"] = problems[:FINDINGS_SHOWN]
            raise MigrationError(problems[0] + self._more(len(problems) - 1, "problem") + "; nothing was written")
        bad = [(name, b) for name in self.order for b in self.profiles[name].bad_values]
        rejected = sum(self.profiles[name].rejected_rows for name in self.order)
        if bad and (self.on_invalid == "fail" or rejected > self.max_rejects):
            self.result["findings"] = [self._bad_message(name, b) for name, b in bad[:FINDINGS_SHOWN]]
        if bad and self.on_invalid == "fail":
            name, first = bad[0]
            total_invalid = sum(c.invalid for p in self.profiles.values() for c in p.columns) or len(bad)
            raise MigrationError(self._bad_message(name, first) + self._more(total_invalid - 1, "invalid value")
                                 + "; nothing was written")
        if rejected > self.max_rejects:
            name, first = bad[0]
            raise MigrationError(f"{rejected} rows are invalid, more than max_rejects ({self.max_rejects}); "
                                 f"first: {self._bad_message(name, first)}; nothing was written")
        self.actions = {}
        problems = []
        with self.pg.cursor() as cursor:
            recorded = state_rows(cursor, self.schema) if self.schema_present else {}
            for name in self.order:
                problem = self._decide_table(cursor, name, recorded.get(self.target_names[name], []))
                if problem:
                    problems.append(problem)
        self.pg.commit()
        if problems:
            raise MigrationError(problems[0] + self._more(len(problems) - 1, "problem") + "; nothing was written")
        if rejected and not self.check_mode:
            self._write_rejects()

    def _decide_table(self, cursor, name, recorded):
        target = self.target_names[name]
        mine = [r for r in recorded if r[0] == self.source_id]
        entry = {"total_rows": self.profiles[name].rows, "migrated": 0, "rejected": 0, "status": "pending",
                 "seconds": 0.0, "rows_per_second": 0.0, "action": "load"}
        self.result["tables"][name] = entry
        if self.existing[name] is None:
            self.actions[name] = "create"
            return ""
        present = count_rows(cursor, self.schema, target) if mine else None
        if mine:
            _source_id, _path, loaded, rejected, _loaded_at, validated = mine[-1]
            if present == loaded:
                entry.update(migrated=present, rejected=rejected, status="completed", action="skipped",
                             validated=validated)
                self.actions[name] = "skip"
                self.progress.finish(name, "skipped", present)
                return ""
            if present:
                return (f"target table {self.schema}.{target} holds {present} rows but {loaded} were loaded from this "
                        "source: it was changed after the migration; empty it to load it again")
        elif has_rows(cursor, self.schema, target):
            other = recorded[-1] if recorded else None
            origin = (f"loaded from another source ({other[1]}, snapshot {other[0][:12]}, {other[4]:%Y-%m-%d %H:%M})"
                      if other else "not loaded by this module")
            return (f"target table {self.schema}.{target} already holds rows {origin}; "
                    "empty it or choose another schema")
        self.actions[name] = "load"
        return ""

    def _bad_message(self, name, bad):
        profile = self.profiles[name]
        where = f"table {name}"
        if bad.column:
            where += f", column {bad.column}"
        where += f", {describe_key(profile.key_columns, bad.key)}"
        shown = f"value {display(bad.value)} " if bad.value is not None else ""
        return f"{where}: {shown}{bad.reason}"

    @staticmethod
    def _more(count, what):
        return f" (and {count} more {what}{'s' if count != 1 else ''})" if count > 0 else ""

    def _pragma(self):
        return "quick_check" if self.integrity == "quick" else "integrity_check"

    def _write_rejects(self):
        temporary = self.reject_file + ".partial"
        with open(temporary, "w", encoding="utf-8") as stream:
            for name in self.order:
                profile = self.profiles[name]
                for bad in profile.bad_values:
                    stream.write(json.dumps(bad.record(name, profile.key_columns), ensure_ascii=False,
                                            default=repr) + "\n")
        os.replace(temporary, self.reject_file)

    # Load ---------------------------------------------------------------------------

    def _plan(self, name, index):
        source, profile = self.tables[name], self.profiles[name]
        names = self.column_names[name]
        table_sql = sqlite_ident(source.name)
        sql_fields, python_fields, sql_columns, python_columns, python_types = [], [], [], [], []
        python_formats = []
        for column in profile.columns:
            q = sqlite_ident(column.name)
            rule = rule_for(column.target, self.source_timezone, column.datetime_format)
            classes = set(column.storage) - {"null"}
            formatted = rule.format_sql(q, classes, zoned_text=bool(column.zoned_text), specials=column.specials)
            if formatted is None:
                python_fields.append(f"typeof({q}), {q}")
                python_columns.append(names[column.name])
                python_types.append(column.target)
                python_formats.append(column.datetime_format)
            else:
                # A NULL that is not a SQLite NULL means a value escaped the profile: the load stops on it.
                sql_fields.append(f"CASE WHEN {q} IS NULL THEN '\\N' ELSE {formatted} END")
                sql_columns.append(names[column.name])
        where, parameters = ["1"], []
        if profile.invalid_sql:
            where.append(f"NOT ({profile.invalid_sql})")
        if profile.python_excluded:
            key = source.key_columns
            if source.rowid:
                where.append(f"{source.rowid} NOT IN (SELECT value FROM json_each(?))")  # noqa: S608 - fixed alias
                parameters.append(json.dumps([k[0] for k in profile.python_excluded]))
            else:
                match = " AND ".join(f"{sqlite_ident(c)} IS json_extract(j.value, '$[{i}]')" for i, c in enumerate(key))
                where.append(f"NOT EXISTS (SELECT 1 FROM json_each(?) j WHERE {match})")  # noqa: S608 - quoted
                parameters.append(json.dumps([[_jsonable(v) for v in k] for k in profile.python_excluded]))
        where_sql = " AND ".join(where)
        row_sql = [copy_line_sql(sql_fields)] if sql_fields else []
        select_sql = f"SELECT {', '.join(row_sql + python_fields)} FROM {table_sql} WHERE {where_sql}"  # noqa: S608
        key_sql = ", ".join(c if c in ("rowid", "_rowid_", "oid") else sqlite_ident(c) for c in source.key_columns)
        create = ""
        if self.actions[name] == "create":
            create = create_table_sql(self.schema, self.target_names[name], self._column_ddl(name)).as_string(self.pg)
        return LoadPlan(
            index=index, source_table=name, target_table=self.target_names[name], schema=self.schema,
            create_sql=create, copy_columns=sql_columns + python_columns, sql_fields=sql_fields, select_sql=select_sql,
            parameters=tuple(parameters), python_types=python_types, python_formats=python_formats,
            source_rows=profile.rows,
            expected_rows=profile.rows - profile.rejected_rows, key_sql=key_sql, key_columns=source.key_columns,
            table_sql=table_sql, where_sql=where_sql, source_timezone=self.source_timezone, source_id=self.source_id,
        )

    def _column_ddl(self, name):
        source, profile = self.tables[name], self.profiles[name]
        columns = []
        for column, column_profile in zip(source.columns, profile.columns):
            target = column_profile.target
            default = None
            if column.default is not None and not target.identity:
                default = self._default(name, column, target)
            columns.append((self.column_names[name][column.name], target, column.name in self.notnull[name], default))
        return columns

    def _default(self, table, column, target):
        kind, value = parse_default(column.default)
        where = f"{table}.{column.name}"
        if kind == "clock":
            keyword = clock_default(value, target)
            if keyword:
                return sql.SQL(keyword)
            self._note(f"{where}: default {column.default} dropped (no equivalent for {target.sql})")
            return None
        if kind == "expression":
            self._note(f"{where}: default {column.default} is SQLite SQL and was dropped")
            return None
        if value is None:
            return None
        try:
            datetime_format = self.datetime_formats.get(table, {}).get(column.name, "auto")
            text = rule_for(target, self.source_timezone, datetime_format).convert(storage_class_of(value), value)
        except Invalid as error:
            self._note(f"{where}: default {column.default} dropped: it {error}")
            return None
        return default_literal(_unescape_copy(text), target)

    def _note(self, text):
        self.result["profile"].setdefault("notes", []).append(text)

    def _load(self, counters):
        self.progress.phase = "load"
        self.progress.write(force=True)
        to_load = [name for name in self.order if self.actions[name] in ("load", "create")]
        if not to_load:
            return
        with self.pg.cursor() as cursor:
            cursor.execute("SELECT to_regclass(%s)", (sql.Identifier(self.schema, STATE_TABLE).as_string(cursor),))
            state_existed = cursor.fetchone()[0] is not None
            if not self.schema_present:
                cursor.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            cursor.execute(state_table_ddl(self.schema))
        self.pg.commit()
        self.result["changed"] = True
        try:
            self._stream(to_load, counters)
        except MigrationError:
            if not any(self.result["tables"][n]["action"] == "loaded" for n in to_load):
                self._undo_setup(state_existed)
            raise

    def _undo_setup(self, state_existed):
        """Nothing was loaded: take back the (empty) state table and schema this run created."""
        try:
            with self.pg.cursor() as cursor:
                if not state_existed:
                    cursor.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(
                        sql.Identifier(self.schema, STATE_TABLE)))
                if not self.schema_present:
                    cursor.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(sql.Identifier(self.schema)))
            self.pg.commit()
            self.result["changed"] = False
        except psycopg2.Error:  # someone else put something there meanwhile, or the server is gone: leave it
            if not self.pg.closed:
                self.pg.rollback()

    def _stream(self, to_load, counters):
        plans = {name: self._plan(name, self.order.index(name)) for name in to_load}
        waits_for = self._existing_dependencies(to_load)
        parents = self._earlier_parents(to_load)
        futures, done, submitted, first_error = {}, set(), set(), None
        # Parents before children (FK order), larger tables first among those free to go.
        queue = sorted(to_load, key=lambda n: -self.sizes[n])
        while queue or futures:
            moved = True
            while moved and first_error is None:
                moved = False
                for name in list(queue):
                    if parents[name] <= submitted and waits_for[name] <= done:
                        queue.remove(name)
                        submitted.add(name)
                        futures[self.pool.submit(_load_task, self.source, self.conninfo, plans[name],
                                                 self.baseline)] = name
                        self.progress.start(name)
                        self.result["tables"][name]["status"] = "loading"
                        moved = True
            if first_error is not None:
                queue = []
            if not futures:
                if queue:
                    raise MigrationError(
                        f"tables {', '.join(queue)} wait for each other through foreign keys that already exist "
                        f"in {self.schema}: drop those constraints before loading (post_data rebuilds them)")
                break
            finished, _ = wait(set(futures), timeout=1.0, return_when=FIRST_COMPLETED)
            if self.lease and self.lease.lost and first_error is None:
                # The run is gone: start nothing more (the lease ends the sessions of running loads).
                first_error = MigrationError(self.lease.lost)
                for future in futures:
                    future.cancel()
            for future in finished:
                name = futures.pop(future)
                entry = self.result["tables"][name]
                if future.cancelled():
                    entry["status"] = "pending"
                    continue
                try:
                    outcome = future.result()
                except MigrationError as error:
                    first_error = first_error or error
                    entry["status"] = "failed"
                    self.progress.finish(name, "failed")
                    continue
                done.add(name)
                seconds = outcome["seconds"]
                entry.update(migrated=outcome["rows"], rejected=self.profiles[name].rows - outcome["rows"],
                             status="completed", action="loaded", seconds=round(seconds, 3),
                             rows_per_second=round(outcome["rows"] / seconds, 1) if seconds > 0 else 0.0)
                self.progress.finish(name, "completed", outcome["rows"])
            for name in futures.values():
                self.progress.update(name, counters[self.order.index(name)])
            self.progress.write(force=bool(finished))  # a table's end shows at once
        if first_error is not None:
            raise first_error

    def _earlier_parents(self, to_load):
        """{table: its foreign-key parents among to_load that come before it in FK order (cycles broken)}."""
        position = {name: index for index, name in enumerate(self.order)}
        by_lower = {name.lower(): name for name in to_load}
        parents = {}
        for name in to_load:
            found = {by_lower.get(fk.parent.lower()) for fk in self.tables[name].foreign_keys}
            parents[name] = {p for p in found if p and position[p] < position[name]}
        return parents

    def _existing_dependencies(self, to_load):
        """{table: parents it must wait for}: only where the target already has a foreign key between them,
        since COPY into the child would check it against the parent's committed rows."""
        waits = {name: set() for name in to_load}
        by_target = {self.target_names[n]: n for n in to_load}
        with self.pg.cursor() as cursor:
            cursor.execute(
                "SELECT c.relname, p.relname FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
                "JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE k.contype = 'f' AND n.nspname = %s AND c.oid <> p.oid", (self.schema,))
            for child, parent in cursor.fetchall():
                if child in by_target and parent in by_target:
                    waits[by_target[child]].add(by_target[parent])
        self.pg.commit()
        return waits

    # Post-data ------------------------------------------------------------------------

    def _post_data_entries(self):
        return [{"source": self.tables[name], "name": self.target_names[name], "columns": self.column_names[name],
                 "exists": self.existing[name] is not None or not self.check_mode} for name in self.order]

    def _post_data_steps(self):
        with self.pg.cursor() as cursor:
            steps, notes = plan_post_data(cursor, self.schema, self._post_data_entries())
            existing = [self.target_names[n] for n in self.order if self.existing[n] is not None or not self.check_mode]
            steps += sequence_steps(cursor, self.schema, existing)
        self.pg.commit()
        return steps, notes

    def _post_data(self):
        if not self.post_data:
            return
        self.progress.phase = "post_data"
        self.progress.write(force=True)
        steps, notes = self._post_data_steps()
        self.result["profile"]["notes"] += notes
        if not steps:
            return
        self.result["changed"] = True
        # One session per parallel builder, kept for every step (a connection costs more than a small index).
        sessions = queue.SimpleQueue()
        opened = []
        try:
            for _ in range(self.jobs):
                connection = connect(self.conninfo)
                opened.append(connection)
                connection.autocommit = True
                with connection.cursor() as cursor:
                    cursor.execute("SET maintenance_work_mem = %s", (MAINTENANCE_WORK_MEM,))
                sessions.put(connection)
            for phase in (1, 2, 3, 4):
                batch = [s for s in steps if s.phase == phase]
                parallel = self.jobs if phase in (1, 3) else 1
                with ThreadPoolExecutor(max_workers=parallel) as threads:
                    errors = [e for e in threads.map(lambda step: self._run_step(sessions, step), batch) if e]
                if errors:
                    raise MigrationError(errors[0] + self._more(len(errors) - 1, "error")
                                         + "; the data is loaded: fix this and run again to finish")
                self.progress.write()
        finally:
            for connection in opened:
                connection.close()

    def _run_step(self, sessions, step):
        connection = sessions.get()
        try:
            with connection.cursor() as cursor:
                cursor.execute(step.statement)
            self.result["post_data"].append({"table": step.table, "kind": step.kind, "name": step.name})
            return ""
        except psycopg2.Error as error:
            return f"post-data: {step.kind} {step.name} on {step.table} could not be built: {first_line(error)}"
        finally:
            sessions.put(connection)

    # Results --------------------------------------------------------------------------

    def _summarize(self):
        tables = self.result["tables"]
        done = [t for t in tables.values() if t["status"] == "completed"]
        self.result["total_tables"] = len(done)
        self.result["total_rows"] = sum(t["migrated"] for t in done)

    def _finish_check(self):
        steps, notes = self._post_data_steps() if self.post_data else ([], [])
        self.result["profile"]["notes"] += notes
        pending = [n for n in self.order if self.actions[n] in ("load", "create")]
        self._summarize()
        self.result["changed"] = bool(pending or steps)
        self.result["post_data"] = [{"table": s.table, "kind": s.kind, "name": s.name} for s in steps]
        self.result["status"] = "completed"
        rows = sum(self.profiles[n].rows for n in pending)
        self.result["msg"] = (f"check mode: would load {len(pending)} of {len(self.order)} tables ({rows} rows)"
                              + (f" and build {len(steps)} keys, indexes and sequences" if steps else "")
                              + "; nothing was written")
        return self.result

    def _finish(self):
        self._summarize()
        self.result["status"] = "completed"
        loaded = [n for n in self.order if self.result["tables"][n]["action"] == "loaded"]
        rows = sum(self.result["tables"][n]["migrated"] for n in loaded)
        rejected = sum(self.result["tables"][n]["rejected"] for n in self.order)
        if loaded or self.result["post_data"]:
            self.result["msg"] = (f"loaded {len(loaded)} of {len(self.order)} tables ({rows} rows)"
                                  + (f", {rejected} rows rejected to {self.reject_file}" if rejected else "")
                                  + (f"; built {len(self.result['post_data'])} keys, indexes and sequences"
                                     if self.result["post_data"] else ""))
        elif not self.order:
            self.result["msg"] = f"source {self.source.path} has no tables to migrate; nothing to do"
        else:
            self.result["msg"] = f"all {len(self.order)} tables were already loaded from this source; nothing to do"
        self.progress.phase = "done"
        self.progress.write(force=True)
        return self.result


# Worker-process tasks (module level, so they pickle) ----------------------------------

def _verify_unchanged(source, baseline):
    if source.fingerprint() != baseline:
        raise MigrationError(f"source {source.path} changed while it was being read (another process wrote to it): "
                             "stop the application and run again; nothing was written")


def _identity_task(source, baseline):
    try:
        identity = source.content_id()
    except OSError as error:
        raise MigrationError(f"source {source.path} cannot be read: {error.strerror}") from None
    _verify_unchanged(source, baseline)
    return identity


def _integrity_task(source, quick, baseline):
    connection = source.connect()
    try:
        problems = integrity_check(connection, quick)
    except Exception as error:  # a corrupt file makes the PRAGMA itself fail
        problems = [str(error)]
    finally:
        connection.close()
    _verify_unchanged(source, baseline)
    return problems


def _profile_task(source, table, targets, options, baseline):
    connection = source.connect(text_as_bytes=True)
    try:
        profile = profile_table(connection, table, targets, options)
    except sqlite3.DatabaseError as error:
        raise MigrationError(f"source table {table.name} cannot be read: {error}") from None
    finally:
        connection.close()
    _verify_unchanged(source, baseline)
    return profile


def _load_task(source, conninfo, plan, baseline):
    return load_table(source, conninfo, plan, baseline)


def _estimated_size(connection, table):
    """Rows times columns, roughly, without reading the table: max(rowid) is a b-tree descent."""
    if not table.rowid:
        return 0
    highest = connection.execute(f"SELECT max({table.rowid}) FROM {sqlite_ident(table.name)}").fetchone()[0]  # noqa: S608
    return max(highest or 0, 0) * len(table.columns)


def _jsonable(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _unescape_copy(field):
    """A COPY text field back to the plain text (for default literals)."""
    text = field.decode("utf-8")
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            out.append({"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}.get(text[index + 1], text[index + 1]))
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)
