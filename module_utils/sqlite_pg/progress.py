"""The progress files the runbook polls while a long load or validation runs."""

import datetime
import json
import os
import tempfile
import time


class ProgressFile:
    """A JSON file ``write()`` replaces atomically with ``snapshot()``, at most about once a second unless forced."""

    def __init__(self, path, interval=1.0):
        self.path = path
        self.interval = interval
        self.last_write = 0.0

    def snapshot(self):
        raise NotImplementedError

    def write(self, force=False):
        if not self.path:
            return
        now = time.monotonic()
        if not force and now - self.last_write < self.interval:
            return
        self.last_write = now
        write_atomically(self.path, self.snapshot())


class Progress(ProgressFile):
    """The load's progress: its phase and per table the rows loaded."""

    def __init__(self, path, tables, interval=1.0):
        super().__init__(path, interval)
        self.phase = "profile"
        self.tables = {name: {"rows_done": 0, "rows_total": total, "status": "pending", "started": None,
                              "finished": None}
                       for name, total in tables.items()}

    def add_tables(self, names):
        for name in names:
            self.tables.setdefault(name, {"rows_done": 0, "rows_total": 0, "status": "pending", "started": None,
                                          "finished": None})

    def set_total(self, table, total):
        self.tables[table]["rows_total"] = total

    def queue(self, table):
        """Handed to the workers; it waits until one takes it."""
        self.tables[table]["status"] = "queued"

    def start(self, table, at):
        """A worker took the queued ``table`` at ``at`` (time.monotonic()): its rate and ETA count from then."""
        entry = self.tables[table]
        if entry["status"] == "queued":
            entry["status"], entry["started"] = "loading", at

    def finish(self, table, status, rows=None):
        entry = self.tables[table]
        entry["status"], entry["finished"] = status, time.monotonic()
        if rows is not None:
            entry["rows_done"] = rows

    def update(self, table, rows_done):
        entry = self.tables[table]
        if entry["status"] == "loading":
            entry["rows_done"] = rows_done

    def snapshot(self):
        now = time.monotonic()
        tables, done, total = {}, 0, 0
        for name, entry in self.tables.items():
            elapsed = ((entry["finished"] or now) - entry["started"]) if entry["started"] else 0.0
            rate = entry["rows_done"] / elapsed if elapsed > 0 else 0.0
            remaining = max(entry["rows_total"] - entry["rows_done"], 0)
            eta = None
            if entry["status"] == "loading" and rate > 0:
                eta = round(remaining / rate, 1)
            elif entry["status"] in ("completed", "skipped"):
                eta = 0.0
            tables[name] = {"rows_done": entry["rows_done"], "rows_total": entry["rows_total"],
                            "rows_per_second": round(rate, 1), "eta_seconds": eta, "status": entry["status"]}
            done += entry["rows_done"]
            total += entry["rows_total"]
        return {
            "updated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "phase": self.phase, "tables": tables, "rows_done": done, "rows_total": total,
        }

class HashProgress(ProgressFile):
    """Validation's progress: its step and, while the tables are hashed, per table the rows hashed on the side
    that is behind (both sides hash the same key ranges in the same order, largest tables first)."""

    def __init__(self, path, interval=1.0):
        super().__init__(path, interval)
        self.phase, self.tables, self.started = "reading the catalog", {}, None

    def hashing(self, totals):
        """``totals``: {table: (rows to hash, units of work)}; a table hashed again (its counts differed) starts
        from 0; one without units (empty, or nothing changed in it) is done at once."""
        self.phase = "hashing the tables"
        self.started = self.started or time.monotonic()
        for name, (rows, units) in totals.items():
            self.tables[name] = {"rows_total": rows, "sqlite": 0, "postgresql": 0,
                                 "status": "pending" if units else "completed"}
        self.write(force=True)

    def enter(self, phase):
        self.phase = phase
        self.write(force=True)

    def hashed(self, table, side, rows, last):
        """One unit of ``table`` hashed on ``side`` (sqlite or postgresql); ``last``: the table's last one."""
        entry = self.tables[table]
        entry[side] += rows
        entry["status"] = "completed" if last else "hashing"
        self.write(force=last)

    def snapshot(self):
        tables = {name: {"rows_done": min(entry["sqlite"], entry["postgresql"]), "rows_total": entry["rows_total"],
                         "status": entry["status"]} for name, entry in self.tables.items()}
        done = sum(entry["rows_done"] for entry in tables.values())
        total = sum(entry["rows_total"] for entry in tables.values())
        elapsed = time.monotonic() - self.started if self.started else 0.0
        rate = done / elapsed if elapsed > 0 else 0.0
        hashing = self.phase == "hashing the tables"
        return {
            "updated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "phase": self.phase, "tables": tables, "rows_done": done, "rows_total": total,
            "rows_per_second": round(rate, 1),
            "eta_seconds": round(max(total - done, 0) / rate, 1) if hashing and rate > 0 else None,
        }


def write_atomically(path, document):
    """Replace ``path`` with ``document`` as JSON: a reader sees the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".progress-", dir=directory)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(document, stream)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
