"""The progress file the runbook polls while a long load runs."""

import datetime
import json
import os
import tempfile
import time


class Progress:
    """Per-table progress; ``write()`` replaces the file atomically, at most about once a second."""

    def __init__(self, path, tables, interval=1.0):
        self.path = path
        self.interval = interval
        self.phase = "profile"
        self.tables = {name: {"rows_done": 0, "rows_total": total, "status": "pending", "started": None,
                              "finished": None}
                       for name, total in tables.items()}
        self.last_write = 0.0

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

    def write(self, force=False):
        if not self.path:
            return
        now = time.monotonic()
        if not force and now - self.last_write < self.interval:
            return
        self.last_write = now
        directory = os.path.dirname(os.path.abspath(self.path))
        handle, temporary = tempfile.mkstemp(prefix=".progress-", dir=directory)
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(self.snapshot(), stream)
            os.replace(temporary, self.path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
