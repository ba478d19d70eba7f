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
import secrets
import sqlite3
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import psycopg2
from psycopg2 import sql

from . import keys, loader
from .errors import MigrationError
from .lease import Lease
from .loader import LOST_CAUSES, become_worker, load_table
from .names import pg_name, sqlite_ident
from .plan import STORAGE_CLASSES, load_plan, streamed_profile
from .profile import describe_key, display, foreign_key_findings, integrity_check, profile_table
from .progress import Progress
from .rules import Invalid, check_timezone, rule_for, storage_class_of
from .source import Source, foreign_key_order, read_schema
from .target import (
    APPLICATION_NAME,
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
from .undo import Journal

DEFAULT_JOBS = 2
MAX_COLUMNS = 1600  # PostgreSQL's limit per table
FINDINGS_SHOWN = 5  # a failed profile lists this many of its findings, one line each
LOCK_NAMESPACE = "sqlite_to_postgres:"


def migrate(src, conninfo, schema="public", tables=None, create_tables=True, jobs=DEFAULT_JOBS, on_invalid="fail",
            max_rejects=0, reject_file=None, source_timezone="UTC", progress_file=None, post_data=True,
            integrity="quick", check_mode=False, lease=None, target_ddl=None, preflight=False):
    """Migrate the SQLite database ``src`` into ``schema`` of the PostgreSQL database ``conninfo`` describes.

    ``conninfo``: libpq keywords for psycopg2.connect (host, port, user, dbname,
    password, sslmode, sslrootcert, ...); without a password libpq's pgpass
    file (PGPASSFILE) is used. ``integrity``: 'quick' (PRAGMA quick_check) or 'full'
    (PRAGMA integrity_check, which also cross-checks every index against its table,
    about 8 times slower). ``preflight``: profile every value before the first write
    (as check mode and on_invalid 'reject' always do); without it each table is read
    once, by its load, which checks the values as it streams. ``check_mode``: profile and plan only; nothing is written,
    the PostgreSQL session itself is read-only. ``lease``: dict(key, backend_pid) of
    the advisory lock the calling run holds; the load stops, and rolls back what
    is streaming, as soon as that backend no longer holds it (lease.py). ``target_ddl``: SQL that creates
    the target tables (run unqualified, with ``schema`` as search_path); in check
    mode, target tables that do not exist yet are created from it in one
    transaction that is always rolled back, and the source is profiled against
    their types (without it, against the types the engine would choose).

    Returns the result dict (status, changed, msg, total_tables, total_rows,
    tables, profile, post_data, source_id). Raises MigrationError, whose
    ``result`` holds the same dict with status 'failed'.
    """
    run = Run(src, conninfo, schema, tables, create_tables, jobs, on_invalid, max_rejects, reject_file,
              source_timezone, progress_file, post_data, integrity, check_mode, lease, target_ddl, preflight)
    return run.execute()


class Run:
    def __init__(self, src, conninfo, schema, tables, create_tables, jobs, on_invalid, max_rejects, reject_file,
                 source_timezone, progress_file, post_data, integrity, check_mode, lease=None, target_ddl=None,
                 preflight=False):
        self.src, self.conninfo, self.schema = src, dict(conninfo), schema
        # Every session of this run carries one name, so that exactly these can be ended (lease.py).
        self.conninfo.setdefault("application_name", f"{APPLICATION_NAME} {secrets.token_hex(4)}")
        self.lease = None if check_mode or not lease else Lease(
            self.conninfo, lease["key"], lease["backend_pid"], self.conninfo["application_name"])
        self.requested, self.create_tables, self.jobs = tables, create_tables, jobs
        self.on_invalid, self.max_rejects, self.reject_file = on_invalid, max_rejects, reject_file
        self.source_timezone, self.post_data, self.integrity = source_timezone, post_data, integrity
        self.check_mode, self.target_ddl = check_mode, target_ddl
        # The full profile before any write: what check mode predicts, and what reject mode needs to leave
        # rows out. Otherwise each table is read once, by its load, which checks every value it streams.
        self.preflight = check_mode or on_invalid == "reject" or bool(preflight)
        self.journal = None  # what this run wrote (undo.py), from the first write on
        self.background = {}  # checks that run beside the load: {future: (kind, table)}
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
                    self.journal = Journal(self.conninfo, self.schema, self.source_id)
                    self._load(counters)
                    self._await_background()
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
            self._fail(self._put_back(message))
        except BrokenProcessPool:
            self._fail(self._put_back("a worker process died (killed, or out of memory)"))
        except psycopg2.Error as error:
            message = self._stopped_message() if self.lease and self.lease.lost else self._database_failure(error)
            self._fail(self._put_back(message))

    def _database_failure(self, error):
        """A failure of this run's own session as one line: where it was."""
        during = {"load": "during the load", "post_data": "while keys and indexes were built"}.get(
            self.progress.phase, "while the target was read")
        if self.session_lost:
            return f"the connection to {server_address(self.conninfo)} was lost {during} ({LOST_CAUSES})"
        return f"PostgreSQL failed {during}: {first_line(error, self.conninfo)}"

    def _stopped_message(self):
        """The load stopped because its run is gone (the lease)."""
        return f"load stopped: {self.lease.lost}" + ("; nothing was written" if self.journal is None else "")

    def _put_back(self, message):
        """Undo everything this run wrote; the message then says what was undone, or what is left and why."""
        if self.journal is None:
            return message  # failed before the first write
        if self.journal.empty:
            return message if message.endswith("nothing was written") else message + "; nothing was written"
        what = self.journal.what()
        problem = self.journal.undo()
        if not problem:
            self.result["changed"] = False
            for entry in self.result["tables"].values():
                if entry.get("action") == "loaded":
                    entry.update(status="pending", action="undone", migrated=0)
            return (f"{message}; everything this run wrote was undone ({what}): the target is as it was before "
                    "the run, and a rerun starts again cleanly")
        return (f"{message}; what this run wrote could not be undone ({problem}): {what} are left as loaded "
                "(each table complete, with its state row); the runbook's rollback restores the backup, and a "
                "rerun continues with what is missing")

    def _fail(self, message):
        """Record the failure and raise it (one line; the result dict rides along)."""
        self.result.update(status="failed", msg=message)
        self.progress.phase = "failed"
        try:
            self.progress.write(force=True)
        except OSError:
            pass
        raise MigrationError(message, self.result) from None

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
            # Row totals for progress and the dispatch order, without reading the tables.
            self.highest = {t.name: _highest_rowid(connection, t) for t in tables}
            self.sizes = {t.name: self.highest[t.name] * len(t.columns) for t in tables}
        except Exception as error:  # sqlite3 raises DatabaseError and friends for corrupt schemas
            raise MigrationError(f"source {self.source.path} cannot be read: {error}") from None
        finally:
            connection.close()
        self.notes += notes
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
            if target != name:
                self.notes.append(f"table {name} becomes {target} in PostgreSQL (names are cut to 63 bytes)")
            if len(self.tables[name].columns) > MAX_COLUMNS:
                raise MigrationError(f"table {name} has {len(self.tables[name].columns)} columns; PostgreSQL allows "
                                     f"at most {MAX_COLUMNS:,} per table: split it before migrating; nothing was "
                                     "written")

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
                if target_name != column.name:
                    self.notes.append(f"table {source.name}: column {column.name} becomes {target_name} in "
                                      "PostgreSQL (names are cut to 63 bytes)")
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
        """The source id (sha256), the integrity check, and per table the profile or a streamed stand-in.

        Without preflight only the tables this run creates are profiled (their types come from their
        values); the integrity check and the foreign keys' check in SQLite then run beside the load.
        """
        if not self.preflight:
            return self._profile_for_stream()
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
            table_options = dict(options, notnull=self.notnull[name])
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

    def _profile_for_stream(self):
        options = {"on_invalid": self.on_invalid, "max_rejects": self.max_rejects, "rowid_aliases": self.rowid_aliases,
                   "source_timezone": self.source_timezone}
        futures = {self.pool.submit(_identity_task, self.source, self.baseline): ("identity", None)}
        created = [n for n in self.order if self.existing[n] is None]
        for name in sorted(created, key=lambda n: -self.sizes[n]):
            table_options = dict(options, notnull=self.notnull[name])
            futures[self.pool.submit(_profile_task, self.source, self.tables[name], self.targets[name],
                                     table_options, self.baseline)] = ("profile", name)
        self.background[self.pool.submit(_integrity_task, self.source, self.integrity == "quick",
                                         self.baseline)] = ("integrity", None)
        self.profiles, self.integrity_problems = {}, []
        for kind, name, value in self._gather(futures):
            if kind == "identity":
                self.source_id = value
            else:
                self.profiles[name] = value
        for name in self.order:
            if name not in self.profiles:
                self.profiles[name] = streamed_profile(self.tables[name], self.targets[name], self.highest[name])
            self.progress.set_total(name, self.profiles[name].rows)
            if name not in created and self._checks_foreign_keys_in_sqlite(name):
                storage = {c.name: STORAGE_CLASSES for c in self.tables[name].columns}
                self.background[self.pool.submit(_foreign_key_task, self.source, self.tables[name], storage,
                                                 self.rowid_aliases, self.baseline)] = ("foreign keys", name)
        self.result["source_id"] = self.source_id
        self.result["profile"] = self._profile_summary()
        self.progress.write(force=True)

    def _checks_foreign_keys_in_sqlite(self, name):
        """Whether a streamed table's foreign keys need SQLite's check: PostgreSQL checks them only when
        post-data builds them, which needs the parent migrated by this run."""
        migrated = {n.lower() for n in self.order}
        return any(not self.post_data or fk.parent.lower() not in migrated for fk in self.tables[name].foreign_keys)

    def _await_background(self):
        """The checks that ran beside the load (integrity, foreign keys in SQLite): any finding fails the run."""
        problems = []
        for kind, _table, value in self._gather(self.background):
            if kind == "integrity" and value:
                self.integrity_problems = value
                self.result["profile"]["source"]["integrity_check"] = "; ".join(value)
                problems.append(f"source {self.source.path} fails PRAGMA {self._pragma()}: {value[0]}"
                                + self._more(len(value) - 1, "problem"))
            elif kind == "foreign keys":
                problems += value
        self.background = {}
        if problems:
            self.result["findings"] = problems[:FINDINGS_SHOWN]
            raise MigrationError(problems[0] + self._more(len(problems) - 1, "problem"))

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

    def _plan(self, name):
        create = ""
        if self.actions[name] == "create":
            create = create_table_sql(self.schema, self.target_names[name], self._column_ddl(name)).as_string(self.pg)
        profile = self.profiles[name]
        return load_plan(index=self.order.index(name), name=name, target_table=self.target_names[name],
                         schema=self.schema, source=self.tables[name], profile=profile,
                         column_names=self.column_names[name], create_sql=create,
                         source_timezone=self.source_timezone, source_id=self.source_id,
                         streamed=profile.columns[0].conversion == "streamed" if profile.columns else False,
                         notnull=self.notnull[name])

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
            text = rule_for(target, self.source_timezone).convert(storage_class_of(value), value)
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
        state = sql.Identifier(self.schema, STATE_TABLE)
        with self.pg.cursor() as cursor:
            cursor.execute("SELECT to_regclass(%s)", (state.as_string(cursor),))
            state_existed = cursor.fetchone()[0] is not None
            if state_existed:
                # A table loaded again replaces its state row: the undo puts the old one back.
                cursor.execute(sql.SQL("SELECT to_jsonb(s) FROM {} s WHERE source_id = %s AND table_name = ANY(%s)")
                               .format(state), (self.source_id, [self.target_names[n] for n in to_load]))
                self.journal.replaced_state = [row[0] for row in cursor.fetchall()]
            if not self.schema_present:
                cursor.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            cursor.execute(state_table_ddl(self.schema))
        self.pg.commit()
        self.journal.created_schema = not self.schema_present
        self.journal.created_state_table = not state_existed
        self.result["changed"] = True
        self._stream(to_load, counters)

    def _stream(self, to_load, counters):
        plans = {name: self._plan(name) for name in to_load}
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
                self.journal.loaded(self.target_names[name], created=self.actions[name] == "create")
                seconds = outcome["seconds"]
                streamed = plans[name].expected_rows is None
                entry.update(migrated=outcome["rows"], total_rows=outcome["rows"] if streamed else entry["total_rows"],
                             rejected=0 if streamed else self.profiles[name].rows - outcome["rows"],
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
        created = {self.target_names[n] for n in self.order if self.actions[n] == "create"}
        keys.build(self.conninfo, self.schema, self.jobs, steps, self.journal, self.result["post_data"],
                   self.progress, created)

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


def _highest_rowid(connection, table):
    """max(rowid): the row count, roughly, without reading the table (a b-tree descent); 0 without rowids."""
    if not table.rowid:
        return 0
    highest = connection.execute(f"SELECT max({table.rowid}) FROM {sqlite_ident(table.name)}").fetchone()[0]  # noqa: S608
    return max(highest or 0, 0)


def _foreign_key_task(source, table, storage, rowid_aliases, baseline):
    connection = source.connect(text_as_bytes=True)
    try:
        findings = foreign_key_findings(connection, table, storage, rowid_aliases)
    except sqlite3.DatabaseError as error:
        raise MigrationError(f"source table {table.name} cannot be read: {error}") from None
    finally:
        connection.close()
    _verify_unchanged(source, baseline)
    return findings


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
