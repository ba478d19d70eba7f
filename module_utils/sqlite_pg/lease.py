"""The run's lease: a load goes on only while the run that started it is alive.

Ansible runs a long task under async_wrapper, which detaches it from the
controller (new session, parent pid 1): killing ansible-playbook, Ctrl-C or a
lost SSH session do not reach it. The runbook's lock is a session advisory
lock held by a helper that ends with ansible-playbook, so that session is the
run's heartbeat. While the lock is held by that backend the load goes on; once
it is not (the run is gone, or the leader restarted and took every session
with it), every session of this load is terminated, so PostgreSQL rolls back
whatever table was streaming, and keeps terminating new ones until the engine
has stopped. A table is therefore either fully loaded (committed with its
state row) or as it was.
"""

import threading

import psycopg2

from .target import connect, first_line

LEASE_APPLICATION_NAME = "sqlite_to_postgres lease"
HELD_QUERY = """
SELECT 1 FROM pg_locks
WHERE locktype = 'advisory' AND granted AND pid = %s AND classid = %s::oid AND objid = %s::oid AND objsubid = 1
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
TERMINATE_QUERY = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                   "WHERE application_name = %s AND pid <> pg_backend_pid()")
# A check that cannot reach the server this many times in a row counts as a lost lease: the
# lock session lives on the same server, so an unreachable server cannot vouch for the run.
UNREACHABLE_CHECKS = 3


def lock_parts(key):
    """pg_locks shows a bigint advisory key as classid (high half) and objid (low half)."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


class Lease:
    """Watches, once per ``interval`` seconds, that backend ``backend_pid`` holds advisory lock ``key``.

    ``sessions`` is the application_name of every session the load opens: the
    ones ended when the lease is lost. ``lost`` is None while the run is alive,
    else one line saying why the load stopped.
    """

    def __init__(self, conninfo, key, backend_pid, sessions, interval=1.0):
        self.conninfo = dict(conninfo, application_name=LEASE_APPLICATION_NAME)
        self.parts = lock_parts(key)
        self.key, self.backend_pid, self.sessions, self.interval = key, backend_pid, sessions, interval
        self.lost = None
        self.last_error = ""
        self._stopping = threading.Event()
        self._connection = None
        self._thread = None

    def start(self):
        """Check once now (a run already gone never starts loading), then keep watching in a thread."""
        self._check()
        if self.lost:
            return
        self._thread = threading.Thread(target=self._watch, name="lease", daemon=True)
        self._thread.start()

    def stop(self):
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        self._close()

    def _watch(self):
        unreachable = 0
        while not self._stopping.wait(self.interval):
            if self.lost:
                self._terminate()  # sessions opened since the last pass are ended too
                continue
            unreachable = 0 if self._check() else unreachable + 1
            if unreachable >= UNREACHABLE_CHECKS:
                self.lost = (f"the server no longer answers ({self.last_error}), so the run's lock "
                             f"(backend {self.backend_pid}) cannot be confirmed")
            if self.lost:
                self._terminate()

    def _check(self):
        """True when the server answered (self.lost set if the lock is gone), False when it did not."""
        try:
            with self._cursor() as cursor:
                cursor.execute(HELD_QUERY, (self.backend_pid, *self.parts))
                if cursor.fetchone() is None:
                    self.lost = (f"the run that started this load is gone: its lock session (backend "
                                 f"{self.backend_pid}, advisory lock {self.key}) no longer holds the lock")
            return True
        except Exception as error:  # any failure to ask is treated alike: reconnect on the next pass
            self._close()
            self.last_error = first_line(error, self.conninfo)
            return False

    def _terminate(self):
        try:
            with self._cursor() as cursor:
                cursor.execute(TERMINATE_QUERY, (self.sessions,))
        except Exception:  # the server is gone: its sessions are gone with it
            self._close()

    def _cursor(self):
        if self._connection is None:
            self._connection = connect(self.conninfo)
            self._connection.autocommit = True
        return self._connection.cursor()

    def _close(self):
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg2.Error:
                pass
            self._connection = None
