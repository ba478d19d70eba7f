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
from .plan import FINDINGS_SHOWN
from .profile import foreign_key_findings, integrity_check, profile_table


class Checks:
    """The source's checks in the worker processes (a stage of engine.Run)."""

    def _profile(self):
        """The source id (sha256), the integrity check, and per table the profile or a streamed stand-in.

        Without preflight only the tables this run creates are profiled (their types come from their
        values); the integrity check and the foreign keys' check in SQLite then run beside the load.
        """
        if not self.preflight:
            return self._profile_for_stream()
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
        self.plan.profiles, self.integrity_problems = {}, []
        for kind, name, value in self._gather(futures):
            if kind == "identity":
                self.source_id = value
            elif kind == "integrity":
                self.integrity_problems = value
            else:
                self.plan.profiles[name] = value
                self.progress.set_total(name, value.rows)
        self.result["source_id"] = self.source_id
        self.result["profile"] = self._profile_summary()
        self.progress.write(force=True)

    def _submit_profiles(self, futures, names):
        """Profile ``names`` in the workers, largest first, into ``futures`` ({future: ("profile", table)})."""
        options = {"on_invalid": self.on_invalid, "max_rejects": self.max_rejects, "rowid_aliases": self.rowid_aliases,
                   "source_timezone": self.source_timezone}
        for name in sorted(names, key=lambda n: -self.plan.sizes[n]):
            table_options = dict(options, notnull=self.plan.notnull[name],
                                 datetime_formats=self.datetime_formats.get(name, {}))
            futures[self.pool.submit(_table_task, self.source, self.plan.tables[name], self.baseline, profile_table,
                                     self.plan.targets[name], table_options)] = ("profile", name)

    def _profile_for_stream(self):
        futures = {self.pool.submit(_identity_task, self.source, self.baseline): ("identity", None)}
        created = [n for n in self.plan.order if self.plan.existing[n] is None]
        self._submit_profiles(futures, created)
        # Beside the sha256, which the loads wait for: the other worker would be idle.
        self.background[self.pool.submit(_integrity_task, self.source, self.integrity == "quick",
                                         self.baseline)] = ("integrity", None)
        self.plan.profiles, self.integrity_problems = {}, []
        for kind, name, value in self._gather(futures):
            if kind == "identity":
                self.source_id = value
            else:
                self.plan.profiles[name] = value
        for name in self.plan.order:
            if name not in self.plan.profiles:
                self.plan.profiles[name] = streamed_profile(self.plan.tables[name], self.plan.targets[name],
                                                            self.plan.highest[name],
                                                            self.datetime_formats.get(name, {}))
            self.progress.set_total(name, self.plan.profiles[name].rows)
        self.result["source_id"] = self.source_id
        self.result["profile"] = self._profile_summary()
        self.progress.write(force=True)

    def _start_checks_beside_the_load(self):
        """Once, without a profile: SQLite's foreign-key check of the streamed tables whose keys PostgreSQL will
        not check, queued behind the loads so that it runs while the last loads and the sync's scan leave a
        worker idle (the workers take tasks in the order they come). A table the run syncs needs none: its
        target has its keys, checked at every commit."""
        if self.preflight or self.checks_started:
            return
        self.checks_started = True
        for name in self.plan.order:
            if self.plan.actions[name] == "load" and self._checks_foreign_keys_in_sqlite(name):
                storage = {c.name: STORAGE_CLASSES for c in self.plan.tables[name].columns}
                self.background[self.pool.submit(_table_task, self.source, self.plan.tables[name], self.baseline,
                                                 foreign_key_findings, storage, self.rowid_aliases)] = (
                    "foreign keys", name)

    def _checks_foreign_keys_in_sqlite(self, name):
        """Whether a streamed table's foreign keys need SQLite's check: PostgreSQL checks them only when
        post-data builds them, which needs the parent migrated by this run."""
        migrated = {n.lower() for n in self.plan.order}
        return any(not self.post_data or fk.parent.lower() not in migrated
                   for fk in self.plan.tables[name].foreign_keys)

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
            "tables": {name: self.plan.profiles[name].summary() for name in self.plan.order
                       if name in self.plan.profiles},
            "notes": self.notes + [n for p in self.plan.profiles.values() for n in p.notes],
        }


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
