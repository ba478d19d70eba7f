"""migrate(): the run read top to bottom as its stages, each in a module of its own.

plan.py reads the source and the target and decides per table; checks.py
runs the source's checks (its identity, integrity, the profile where one is
due, foreign keys); load.py streams the tables (copyplan.py: the query that
formats and checks each COPY line; loader.py: one table's transaction);
keys.py builds keys, indexes and sequences. A failure after the first write
ends in undo.py, which puts back everything the run wrote; each table still
commits with its state row, so a killed run leaves every table loaded or as
it was, and a rerun completes it.
"""

import gc
import multiprocessing
import secrets
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import psycopg2
from psycopg2 import sql

from . import keys, load, loader
from .checks import Checks, gather
from .errors import MigrationError
from .lease import Lease
from .loader import LOST_CAUSES, become_worker
from .plan import FINDINGS_SHOWN, Planner, more, pragma_name, validate_options
from .progress import Progress
from .source import Source
from .sync import sync
from .target import (
    APPLICATION_NAME,
    close_releasing_locks,
    connect,
    first_line,
    lock_schema,
    sequence_steps,
    server_address,
)
from .undo import Journal

DEFAULT_JOBS = 2


def migrate(src, conninfo, schema="public", tables=None, create_tables=True, jobs=DEFAULT_JOBS, on_invalid="fail",
            max_rejects=0, reject_file=None, source_timezone="UTC", progress_file=None, post_data=True,
            integrity="quick", check_mode=False, lease=None, target_ddl=None, preflight=False,
            datetime_formats=None, source_name=None, keep_dropped_tables=False):
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
    ``datetime_formats``: {"table.column": representation} for date columns whose
    numbers are not to be read by SQLite's 'auto' rule (rules.DATETIME_FORMATS).
    ``source_name``: the path the state table records for the source (default: ``src``'s);
    the live database's when ``src`` is a copy of it, so that a run from a later copy
    syncs the tables an earlier copy loaded (sync.py). ``keep_dropped_tables``: tables migrated from this
    source that it no longer has stay in the target as they are, no longer synced; without it the run refuses
    them before it writes anything.

    Returns the result dict (status, changed, msg, total_tables, total_rows,
    tables, profile, post_data, source_id, sync_notes, dropped_tables). Raises MigrationError, whose
    ``result`` holds the same dict with status 'failed'.
    """
    run = Run(src, conninfo, schema, tables, create_tables, jobs, on_invalid, max_rejects, reject_file,
              source_timezone, progress_file, post_data, integrity, check_mode, lease, target_ddl, preflight,
              datetime_formats or {}, source_name, keep_dropped_tables)
    return run.execute()


class Run:
    """One run, its stages in the order execute() calls them: plan, checks, load, keys; finish or undo.

    Each stage is handed what it needs as arguments and returns what it produced. What the plan (plan.Planner)
    decides per table is one object, ``self.plan`` (plan.TablesPlan), which the checks (checks.Checks), the load
    (load.Load) and the keys (keys.plan, keys.build) are handed."""

    def __init__(self, src, conninfo, schema, tables, create_tables, jobs, on_invalid, max_rejects, reject_file,
                 source_timezone, progress_file, post_data, integrity, check_mode, lease=None, target_ddl=None,
                 preflight=False, datetime_formats=None, source_name=None, keep_dropped_tables=False):
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
        self.source_name, self.keep_dropped = source_name, keep_dropped_tables
        # The full profile before any write: what check mode predicts, and what reject mode needs to leave
        # rows out. Otherwise each table is read once, by its load, which checks every value it streams.
        self.preflight = check_mode or on_invalid == "reject" or bool(preflight)
        self.journal = None  # what this run wrote (undo.py), from the first write on
        self.synced = None  # sync()'s result once it ran, or its failure's
        self.planner = None  # plan.Planner, once the options passed
        self.plan = None  # plan.TablesPlan: what the planner decided per table
        self.checks = None  # checks.Checks, once the workers exist
        self.integrity_problems = []  # what the source's PRAGMA quick_check or integrity_check found
        self.progress = Progress(None if check_mode else progress_file, {})
        self.result = {"changed": False, "status": "failed", "msg": "", "total_tables": 0, "total_rows": 0,
                       "tables": {}, "profile": {}, "post_data": [], "source_id": "", "findings": [],
                       "sync_notes": [], "dropped_tables": []}
        self.notes = []  # the run's own notes; the planner's come first

    # The run ---------------------------------------------------------------------------

    def execute(self):
        try:
            validate_options(on_invalid=self.on_invalid, reject_file=self.reject_file, jobs=self.jobs,
                             max_rejects=self.max_rejects, integrity=self.integrity,
                             source_timezone=self.source_timezone, progress_file=self.progress.path)
            self.source = Source(self.src, self.source_name)
            self.baseline = self.source.fingerprint()
            self.planner = Planner(
                source=self.source, schema=self.schema, requested=self.requested, create_tables=self.create_tables,
                check_mode=self.check_mode, target_ddl=self.target_ddl, keep_dropped=self.keep_dropped,
                datetime_option=self.datetime_option, source_timezone=self.source_timezone, integrity=self.integrity,
                on_invalid=self.on_invalid, max_rejects=self.max_rejects, reject_file=self.reject_file,
                progress=self.progress, result=self.result)
            self.plan = self.planner.read_source()
            self.pg = connect(self.conninfo, read_only=self.check_mode)
            try:
                if self.lease:
                    self.lease.start()
                    if self.lease.lost:
                        raise MigrationError(self.lease.lost)
                lock_schema(self.pg, self.schema)
                self.notes += load.resolve_interrupted(self.pg, self.schema, self.check_mode)
                self.planner.read_target(self.pg)
                # One slot per table, then one per range of a table loaded in ranges (load.py).
                slots = loader.ProgressSlots.create(len(self.plan.order) * (1 + self.jobs))
                loader.progress_slots = slots
                self.progress.add_tables(self.plan.order)
                # Objects the workers inherit stay untouched by their garbage collector, so the pages
                # holding them stay shared with this process instead of being copied into each worker.
                gc.freeze()
                with ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("fork"),
                                         initializer=become_worker) as pool:
                    self.pool = pool
                    self._check_source()
                    self.planner.decide(self.pg, self.source_id, self.integrity_problems)
                    if self.check_mode:
                        return self._finish_check()
                    self.journal = Journal(self.conninfo, self.schema, self.source_id)
                    loaded = self._load(slots)
                    self.checks.start_beside_the_load()  # when no table loaded (the load starts them)
                    # The checks beside the load go on beside the sync, post-data and the records: each waits for
                    # them before its first write, and the run does not end before they passed. The sync comes
                    # first: a new table's foreign keys are validated against parents already synced.
                    self._sync()
                    self._post_data()
                    self._record_loaded(loaded)
                    self._await_background()
            finally:
                gc.unfreeze()  # a caller that runs several migrations collects their garbage again
                if self.lease:
                    self.lease.stop()
                self.session_lost = bool(self.pg.closed)  # before close(): did the server end the session?
                close_releasing_locks(self.pg)
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
        # A sync is one transaction: one that failed wrote nothing, one that committed stays (consistent).
        synced = [n for n in self.plan.order if self.plan.actions.get(n) == "sync"] if self.synced is not None else []
        kept = (f"; the sync of {', '.join(synced)} committed before stays (it holds the source's snapshot)"
                if synced and self.synced["changed"] else "")
        if self.journal.empty:
            problem = self.journal.resolve_prepared()  # ranges of a table that failed before anything committed
            if problem:
                return (f"{message}; the prepared transactions of its ranges could not be rolled back ({problem}): "
                        "they hold locks until the next run, which resolves them first")
            if kept:
                return message + kept
            return message if message.endswith(("nothing was written", "as it was before the sync")) \
                else message + "; nothing was written"
        what = self.journal.what()
        problem = self.journal.undo()
        if not problem:
            self.result["changed"] = bool(kept)
            for entry in self.result["tables"].values():
                if entry.get("action") == "loaded":
                    entry.update(status="pending", action="undone", migrated=0)
            if kept:
                return f"{message}; what this run loaded was undone ({what}){kept}; a rerun loads it again"
            return (f"{message}; everything this run wrote was undone ({what}): the target is as it was before the "
                    "run, and a rerun starts again cleanly")
        return (f"{message}; what this run wrote could not be undone ({problem}): {what} are left as loaded "
                "(each table complete, with its state row); the runbook's rollback restores the backup, and a "
                f"rerun continues with what is missing{kept}")

    def _fail(self, message):
        """Record the failure and raise it (one line; the result dict rides along)."""
        self.result.update(status="failed", msg=message)
        self.progress.phase = "failed"
        try:
            self.progress.write(force=True)
        except OSError:
            pass
        raise MigrationError(message, self.result) from None

    def _check_source(self):
        """Stage 2 (checks.py): the source's id, the profiles, and the checks due before the first write."""
        self.checks = Checks(pool=self.pool, source=self.source, baseline=self.baseline, plan=self.plan,
                             preflight=self.preflight, integrity=self.integrity, post_data=self.post_data,
                             on_invalid=self.on_invalid, max_rejects=self.max_rejects,
                             source_timezone=self.source_timezone, progress=self.progress)
        self.source_id, self.plan.profiles, self.integrity_problems = self.checks.run()
        self.result["source_id"] = self.source_id
        self.result["profile"] = self._profile_summary()
        self.progress.write(force=True)

    def _await_background(self):
        """The checks that ran beside the load (integrity, foreign keys in SQLite): any finding fails the run."""
        integrity, problems = self.checks.findings_beside_the_load()
        if integrity:
            self.integrity_problems = integrity
            self.result["profile"]["source"]["integrity_check"] = "; ".join(integrity)
            problems = [f"source {self.source.path} fails PRAGMA {pragma_name(self.integrity)}: {integrity[0]}"
                        + more(len(integrity) - 1, "problem"), *problems]
        if problems:
            self.result["findings"] = problems[:FINDINGS_SHOWN]
            raise MigrationError(problems[0] + more(len(problems) - 1, "problem"))

    def _sync(self):
        """Tables holding an earlier snapshot of this file are brought up to date (sync.py), and the empty ones
        tied to them by foreign keys loaded with them."""
        to_sync = [n for n in self.plan.order if self.plan.actions[n] == "sync"]
        if not to_sync and not self.plan.kept_dropped:
            return
        self.progress.phase = "sync"
        self.progress.write(force=True)
        try:
            # The tables it keeps although the source dropped them are named too: the sync says so, and names them
            # when one of their foreign keys stops it.
            self.synced = sync(self.src, self.conninfo, self.schema, to_sync + self.plan.kept_dropped, self.jobs,
                               self.source_timezone, hold_lock=False, source_id=self.source_id,
                               source_name=self.source_name, before_writes=self._await_background,
                               keep_dropped_tables=self.keep_dropped)
        except MigrationError as error:
            self.result["sync_notes"] = error.result["notes"]
            raise
        self.result["sync_notes"] = self.synced["notes"]
        for name in to_sync:
            counts = self.synced["tables"][name]
            # Like a loaded or skipped table's: migrated and total_rows count the rows now in the target.
            self.result["tables"][name].update(
                {key: counts[key] for key in ("inserted", "updated", "deleted", "changed_keys")},
                status="completed", action="synced", migrated=counts["total_rows"], total_rows=counts["total_rows"])
            self.progress.finish(name, "synced", counts["total_rows"])

    def _load(self, slots):
        """Stage 3 (load.py): the target made ready, then the tables to load streamed; returns those loaded."""
        self.progress.phase = "load"
        self.progress.write(force=True)
        to_load = [name for name in self.plan.order if self.plan.actions[name] in ("load", "create")]
        if not to_load:
            return []
        load.prepare_target(self.pg, self.schema, self.plan.schema_present, self.source_id,
                            [self.plan.target_names[n] for n in to_load], self.journal)
        self.result["changed"] = True
        created_columns = {}
        for name in to_load:
            if self.plan.actions[name] == "create":
                created_columns[name], notes = self.planner.column_definitions(name)
                self._note(*notes)
        stage = load.Load(
            plan=self.plan, created_columns=created_columns,
            pool=self.pool, pg=self.pg, conninfo=self.conninfo, schema=self.schema, jobs=self.jobs,
            source=self.source, baseline=self.baseline, source_id=self.source_id,
            source_timezone=self.source_timezone, journal=self.journal, entries=self.result["tables"],
            progress=self.progress, slots=slots, note=self._note,
            start_checks=self.checks.start_beside_the_load, lease=self.lease)
        return stage.run(to_load)

    def _post_data_plan(self):
        """The post-data steps and notes (keys.plan) for the tables in the target, or that the load creates."""
        present = [n for n in self.plan.order if self.plan.existing[n] is not None or not self.check_mode]
        tables = [{"source": self.plan.tables[n], "name": self.plan.target_names[n],
                   "columns": self.plan.column_names[n], "exists": n in present} for n in self.plan.order]
        return keys.plan(self.pg, self.schema, tables, [self.plan.target_names[n] for n in present])

    def _post_data(self):
        if not self.post_data:
            return
        self.progress.phase = "post_data"
        self.progress.write(force=True)
        steps, notes = self._post_data_plan()
        self._note(*notes)
        if not steps:
            return
        self._await_background()
        self.result["changed"] = True
        created = {self.plan.target_names[n] for n in self.plan.order if self.plan.actions[n] == "create"}
        keys.build(self.conninfo, self.schema, self.jobs, steps, self.journal, self.result["post_data"],
                   self.progress, created)

    def _record_loaded(self, names):
        """The tables this run loaded (``names``, the load's result), each synced from the very snapshot it loaded
        (no row differs, only its page and cell checksums and its sequences are written), one table per worker,
        largest first: the workers read their pages side by side, and each holds the records of one table only.
        The sequences those syncs move are journaled first, so that the undo sets them back too."""
        if not names:
            return
        self.progress.phase = "records"
        self.progress.write(force=True)
        with self.pg.cursor() as cursor:
            for step in sequence_steps(cursor, self.schema, [self.plan.target_names[n] for n in names]):
                cursor.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(sql.SQL(step.name)))
                self.journal.sequences.append((step.name, *cursor.fetchone()))
        self.pg.commit()
        futures = {self.pool.submit(_record_task, self.src, self.conninfo, self.schema, name, self.source_timezone,
                                    self.source_id, self.source_name): ("record", name)
                   for name in sorted(names, key=lambda n: -self.plan.sizes[n])}
        for _kind, _name, _changed in gather(futures, self.progress):
            pass

    def _note(self, *texts):
        """Notes found once the profile was summed up (the load's, the post-data plan's) follow its own."""
        self.result["profile"]["notes"].extend(texts)

    # Results --------------------------------------------------------------------------

    def _profile_summary(self):
        return {
            "source": {"path": self.source.path, "bytes": self.source.size, "sha256": self.source_id,
                       "journal": "wal" if self.source.wal_mode else "rollback", "open": self.source.open_mode,
                       "integrity_check": "; ".join(self.integrity_problems) or "ok",
                       "integrity_mode": self.integrity},
            "tables": {name: self.plan.profiles[name].summary() for name in self.plan.order
                       if name in self.plan.profiles},
            "notes": self.planner.notes + self.notes + [n for p in self.plan.profiles.values() for n in p.notes],
        }

    def _summarize(self):
        tables = self.result["tables"]
        done = [t for t in tables.values() if t["status"] == "completed"]
        self.result["total_tables"] = len(done)
        self.result["total_rows"] = sum(t["migrated"] for t in done)

    def _finish_check(self):
        steps, notes = self._post_data_plan() if self.post_data else ([], [])
        self._note(*notes)
        pending = [n for n in self.plan.order if self.plan.actions[n] in ("load", "create")]
        to_sync = [n for n in self.plan.order if self.plan.actions[n] == "sync"]
        self._summarize()
        self.result["changed"] = bool(pending or steps or to_sync)
        self.result["post_data"] = [{"table": s.table, "kind": s.kind, "name": s.name} for s in steps]
        self.result["status"] = "completed"
        rows = sum(self.plan.profiles[n].rows for n in pending)
        self.result["msg"] = (f"check mode: would load {len(pending)} of {len(self.plan.order)} tables ({rows} rows)"
                              + (f" and build {len(steps)} keys, indexes and sequences" if steps else "")
                              + (f", and sync {', '.join(to_sync)} (they hold an earlier snapshot of this source)"
                                 if to_sync else "")
                              + "; nothing was written")
        return self.result

    def _finish(self):
        self._summarize()
        self.result["status"] = "completed"
        loaded = [n for n in self.plan.order if self.result["tables"][n]["action"] == "loaded"]
        rows = sum(self.result["tables"][n]["migrated"] for n in loaded)
        rejected = sum(self.result["tables"][n]["rejected"] for n in self.plan.order)
        synced = [n for n in self.plan.order if self.result["tables"][n]["action"] == "synced"]
        parts = []
        if loaded or self.result["post_data"]:
            parts.append(f"loaded {len(loaded)} of {len(self.plan.order)} tables ({rows} rows)"
                         + (f", {rejected} rows rejected to {self.reject_file}" if rejected else "")
                         + (f"; built {len(self.result['post_data'])} keys, indexes and sequences"
                            if self.result["post_data"] else ""))
        if synced:
            counts = {key: sum(self.result["tables"][n][key] for n in synced)
                      for key in ("inserted", "updated", "deleted")}
            if any(counts.values()):
                parts.append(f"synced {len(synced)} tables with this source: {counts['inserted']} rows inserted, "
                             f"{counts['updated']} updated, {counts['deleted']} deleted")
            else:
                parts.append(f"{len(synced)} tables held an earlier snapshot of this source, and no row differed")
            self.result["changed"] = self.result["changed"] or self.synced["changed"]
        if parts:
            self.result["msg"] = "; ".join(parts)
        elif not self.plan.order:
            self.result["msg"] = f"source {self.source.path} has no tables to migrate; nothing to do"
        else:
            self.result["msg"] = (f"all {len(self.plan.order)} tables were already loaded from this source; "
                                  "nothing to do")
        self.progress.phase = "done"
        self.progress.write(force=True)
        return self.result


def _record_task(src, conninfo, schema, table, source_timezone, source_id, source_name):
    """In a worker: the sync of one table from the snapshot the run loaded it from (Run._record_loaded)."""
    return sync(src, conninfo, schema, [table], 1, source_timezone, hold_lock=False, source_id=source_id,
                source_name=source_name)["changed"]
