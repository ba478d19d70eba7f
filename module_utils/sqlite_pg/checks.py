"""The checks that read the source apart from the load: identity, integrity, profile, foreign keys.

With a profile (check mode, ``on_invalid: reject``, ``preflight``) they all
finish before anything is written. In the default one-pass run only the
source's sha256 (and the profile of tables the run creates) comes first; the
integrity check and the foreign keys' check in SQLite run beside the load, and
a finding fails the run, which then puts back what it wrote (undo.py).
"""

import sqlite3
from concurrent.futures import FIRST_COMPLETED, wait

from .copyplan import STORAGE_CLASSES, streamed_profile
from .errors import MigrationError
from .profile import foreign_key_findings, integrity_check, profile_table


class Checks:
    """The source's checks in the worker processes (stage 2 of engine.Run).

    ``run()`` returns what the checks before the first write found: the source's id (its sha256), per table of
    ``plan`` its profile (or a streamed stand-in), and the integrity check's problems. Without preflight only the
    tables the run creates are profiled there (their types come from their values); the integrity check starts
    beside the load, and ``start_beside_the_load()`` queues the foreign keys' check in SQLite behind the loads;
    ``findings_beside_the_load()`` waits for both and returns what they found.
    """

    def __init__(self, *, pool, source, baseline, plan, preflight, integrity, post_data, on_invalid, max_rejects,
                 source_timezone, progress):
        self.pool, self.source, self.baseline, self.plan = pool, source, baseline, plan
        self.preflight, self.integrity, self.post_data = preflight, integrity, post_data
        self.profile_options = {"on_invalid": on_invalid, "max_rejects": max_rejects,
                                "source_timezone": source_timezone}
        self.progress = progress
        self._beside_the_load = {}  # {future: (kind, table)}
        self._started = False

    def run(self):
        """(source id, {table: profile}, integrity problems found before the first write)."""
        if not self.preflight:
            return self._for_stream()
        futures = {}

        def integrity():
            futures[self.pool.submit(_integrity_task, self.source, self.integrity == "quick", self.baseline)] = (
                "integrity", None)

        # Largest tasks first, so the workers finish together: a full integrity check reads every page of
        # the file and is the longest; a quick one and the hash fill the gaps at the end.
        if self.integrity == "full":
            integrity()
        self._submit_profiles(futures, self.plan.order)
        if self.integrity == "quick":
            integrity()
        futures[self.pool.submit(_identity_task, self.source, self.baseline)] = ("identity", None)
        source_id, profiles, problems = None, {}, []
        for kind, name, value in gather(futures, self.progress):
            if kind == "identity":
                source_id = value
            elif kind == "integrity":
                problems = value
            else:
                profiles[name] = value
                self.progress.set_total(name, value.rows)
        return source_id, profiles, problems

    def _submit_profiles(self, futures, names):
        """Profile ``names`` in the workers, largest first, into ``futures`` ({future: ("profile", table)})."""
        for name in sorted(names, key=lambda n: -self.plan.sizes[n]):
            table_options = dict(self.profile_options, rowid_aliases=self.plan.rowid_aliases,
                                 notnull=self.plan.notnull[name],
                                 datetime_formats=self.plan.datetime_formats.get(name, {}))
            futures[self.pool.submit(_table_task, self.source, self.plan.tables[name], self.baseline, profile_table,
                                     self.plan.targets[name], table_options)] = ("profile", name)

    def _for_stream(self):
        futures = {self.pool.submit(_identity_task, self.source, self.baseline): ("identity", None)}
        created = [n for n in self.plan.order if self.plan.existing[n] is None]
        self._submit_profiles(futures, created)
        # Beside the sha256, which the loads wait for: the other worker would be idle.
        self._beside_the_load[self.pool.submit(_integrity_task, self.source, self.integrity == "quick",
                                               self.baseline)] = ("integrity", None)
        source_id, profiles = None, {}
        for kind, name, value in gather(futures, self.progress):
            if kind == "identity":
                source_id = value
            else:
                profiles[name] = value
        for name in self.plan.order:
            if name not in profiles:
                profiles[name] = streamed_profile(self.plan.tables[name], self.plan.targets[name],
                                                  self.plan.highest[name], self.plan.datetime_formats.get(name, {}))
            self.progress.set_total(name, profiles[name].rows)
        return source_id, profiles, []

    def start_beside_the_load(self):
        """Once, without a profile: SQLite's foreign-key check of the streamed tables whose keys PostgreSQL will
        not check, queued behind the loads so that it runs while the last loads and the sync's scan leave a
        worker idle (the workers take tasks in the order they come). A table the run syncs needs none: its
        target has its keys, checked at every commit."""
        if self.preflight or self._started:
            return
        self._started = True
        for name in self.plan.order:
            if self.plan.actions[name] == "load" and self._checks_foreign_keys_in_sqlite(name):
                storage = {c.name: STORAGE_CLASSES for c in self.plan.tables[name].columns}
                self._beside_the_load[self.pool.submit(_table_task, self.source, self.plan.tables[name],
                                                       self.baseline, foreign_key_findings, storage,
                                                       self.plan.rowid_aliases)] = ("foreign keys", name)

    def _checks_foreign_keys_in_sqlite(self, name):
        """Whether a streamed table's foreign keys need SQLite's check: PostgreSQL checks them only when
        post-data builds them, which needs the parent migrated by this run."""
        migrated = {n.lower() for n in self.plan.order}
        return any(not self.post_data or fk.parent.lower() not in migrated
                   for fk in self.plan.tables[name].foreign_keys)

    def findings_beside_the_load(self):
        """Waits for the checks that ran beside the load: (the integrity check's problems, the foreign keys'
        findings); both empty when there were none, or when they were already returned."""
        integrity, foreign_keys = [], []
        for kind, _table, value in gather(self._beside_the_load, self.progress):
            if kind == "integrity":
                integrity = value
            else:
                foreign_keys += value
        self._beside_the_load = {}
        return integrity, foreign_keys


def gather(futures, progress):
    """Yield (kind, name, result) of ``futures`` ({future: (kind, name)}) as they finish, writing the progress
    file meanwhile; the first failure is raised once all ended."""
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
        progress.write()
    if first_error:
        raise first_error


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


def _table_task(source, table, baseline, read, *arguments):
    """``read(connection, table, *arguments)`` on a connection of its own, in a worker: a profile or a check."""
    connection = source.connect(text_as_bytes=True)
    try:
        found = read(connection, table, *arguments)
    except sqlite3.DatabaseError as error:
        raise MigrationError(f"source table {table.name} cannot be read: {error}") from None
    finally:
        connection.close()
    _verify_unchanged(source, baseline)
    return found
