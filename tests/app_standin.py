"""A stand-in for FileShareSystem during a cutover: it writes as the application does, and obeys its hooks.

    python tests/app_standin.py run --state-dir DIR --sqlite FILE --pg-port PORT   the application
    python tests/app_standin.py maintenance on|off --state-dir DIR                 cutover_maintenance_*_command
    python tests/app_standin.py switch postgresql|sqlite --state-dir DIR           cutover_switch(_back)_command

`run` keeps inserting, updating and deleting rows of all four tables in the
SQLite file, one transaction at a time, until DIR/maintenance appears; it
then finishes its transaction, writes DIR/quiesced and waits. When
maintenance ends it writes to the backend DIR/backend names: SQLite, or
PostgreSQL through PgBouncer (PGPASSFILE supplies the password). It changes
only rows it inserted itself, so the rows the SQLite file started with stay
as they were. DIR/stats.json counts its writes per backend; DIR/stop ends it.

`maintenance on` returns once the writer has quiesced, as an application's
maintenance switch must. With --also-write-postgresql it then changes one row
of PostgreSQL directly, as a second instance already pointed at PostgreSQL
would: the cutover's validation must see that difference.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import psycopg2


def state_file(state_dir: Path, name: str) -> Path:
    return state_dir / name


def backend(state_dir: Path) -> str:
    path = state_file(state_dir, "backend")
    return path.read_text().strip() if path.exists() else "sqlite"


class SqliteWriter:
    """One transaction per step over storage_nodes, files, tasks and replication_logs."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA foreign_keys = ON")
        first = {table: self.db.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0]  # noqa: S608
                 for table in ("storage_nodes", "files", "tasks", "replication_logs")}
        self.first_max = first
        self.nodes = [row[0] for row in self.db.execute("SELECT node_id FROM storage_nodes WHERE id <= ?",
                                                         (first["storage_nodes"],))]
        self.steps = 0

    def own(self, table: str, where: str = "") -> int | None:
        """A random id of a row this stand-in inserted, or None."""
        row = self.db.execute(f"SELECT id FROM {table} WHERE id > ? {where} ORDER BY random() LIMIT 1",  # noqa: S608
                              (self.first_max[table],)).fetchone()
        return row[0] if row else None

    def step(self, counts: dict) -> None:
        self.steps += 1
        now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            file_uuid = str(uuid.uuid4())
            cursor = db.execute(
                "INSERT INTO files (file_uuid, filename, original_name, size_bytes, mime_type, owner_id, primary_node,"
                " replica_nodes, storage_path, metadata, created_at) VALUES (?, ?, ?, ?, 'text/plain', 'standin', ?,"
                " '[]', ?, '{}', ?)",
                (file_uuid, f"standin-{self.steps}.txt", f"standin {self.steps}", random.randint(1, 10**9),
                 random.choice(self.nodes), f"/data/{file_uuid}", now))
            file_id = cursor.lastrowid
            db.execute("INSERT INTO tasks (task_uuid, task_type, file_id, status, payload, created_at)"
                       " VALUES (?, 'replicate', ?, 'pending', '{}', ?)", (str(uuid.uuid4()), file_id, now))
            db.execute("INSERT INTO replication_logs (file_id, source_node, target_node, status, created_at)"
                       " VALUES (?, ?, ?, 'pending', ?)", (file_id, self.nodes[0], self.nodes[-1], now))
            counts["inserted"] += 3
            for table, change in (("files", "download_count = download_count + 1"),
                                  ("tasks", "status = 'completed', retries = retries + 1"),
                                  ("replication_logs", "bytes_transferred = bytes_transferred + 4096")):
                row = self.own(table)
                if row is not None:
                    db.execute(f"UPDATE {table} SET {change} WHERE id = ?", (row,))  # noqa: S608
                    counts["updated"] += 1
            if self.steps % 3 == 0:
                victim = self.own("files", f"AND id < {file_id}")
                if victim is not None:
                    for table in ("tasks", "replication_logs"):
                        counts["deleted"] += db.execute(f"DELETE FROM {table} WHERE file_id = ?",  # noqa: S608
                                                        (victim,)).rowcount
                    counts["deleted"] += db.execute("DELETE FROM files WHERE id = ?", (victim,)).rowcount
            if self.steps % 5 == 0:
                db.execute("INSERT INTO storage_nodes (node_id, hostname, capacity_bytes, created_at)"
                           " VALUES (?, ?, ?, ?)", (f"node-{uuid.uuid4().hex[:8]}", "standin.local", 10**12, now))
                counts["inserted"] += 1
                node = self.own("storage_nodes")
                db.execute("UPDATE storage_nodes SET used_bytes = used_bytes + 1 WHERE id = ?", (node,))
                counts["updated"] += 1
            if self.steps % 10 == 0:
                counts["deleted"] += db.execute(
                    "DELETE FROM storage_nodes WHERE id = (SELECT min(id) FROM storage_nodes WHERE id > ?)",
                    (self.first_max["storage_nodes"],)).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def pg_connect(args) -> psycopg2.extensions.connection:
    connection = psycopg2.connect(host=args.pg_host, port=args.pg_port, dbname=args.pg_db, user=args.pg_user,
                                  connect_timeout=10)
    connection.autocommit = True
    return connection


def pg_step(connection, steps: int, counts: dict) -> None:
    """What the application does on PostgreSQL: a new file with a task, an update of it."""
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO files (file_uuid, filename, owner_id, created_at) VALUES (%s, %s, 'standin', now())"
                       " RETURNING id", (str(uuid.uuid4()), f"standin-pg-{steps}.txt"))
        file_id = cursor.fetchone()[0]
        cursor.execute("INSERT INTO tasks (task_uuid, task_type, file_id, created_at)"
                       " VALUES (%s, 'replicate', %s, now())", (str(uuid.uuid4()), file_id))
        cursor.execute("UPDATE files SET download_count = download_count + 1 WHERE id = %s", (file_id,))
    counts["inserted"] += 2
    counts["updated"] += 1


def run(args) -> int:
    state_dir = Path(args.state_dir)
    writer = SqliteWriter(args.sqlite)
    stats = {"sqlite": {"inserted": 0, "updated": 0, "deleted": 0},
             "postgresql": {"inserted": 0, "updated": 0, "deleted": 0},
             "backend": "sqlite", "maintenance_seen": 0, "steps": 0}
    pg = None
    while not state_file(state_dir, "stop").exists():
        if state_file(state_dir, "maintenance").exists():
            if not state_file(state_dir, "quiesced").exists():
                stats["maintenance_seen"] += 1
                state_file(state_dir, "quiesced").write_text(str(time.time()))
            time.sleep(0.05)
            continue
        stats["backend"] = backend(state_dir)
        stats["steps"] += 1
        if stats["backend"] == "postgresql":
            pg = pg or pg_connect(args)
            pg_step(pg, stats["steps"], stats["postgresql"])
        else:
            writer.step(stats["sqlite"])
        stats["last_write"] = time.time()
        partial = state_file(state_dir, "stats.json.partial")
        partial.write_text(json.dumps(stats))
        partial.replace(state_file(state_dir, "stats.json"))
        time.sleep(args.interval)
    return 0


def maintenance(args) -> int:
    state_dir = Path(args.state_dir)
    flag, quiesced = state_file(state_dir, "maintenance"), state_file(state_dir, "quiesced")
    if args.state == "off":
        flag.unlink(missing_ok=True)
        quiesced.unlink(missing_ok=True)
        return 0
    flag.write_text(str(time.time()))
    deadline = time.monotonic() + args.wait
    while not quiesced.exists():
        if time.monotonic() > deadline:
            print(f"the application did not stop writing within {args.wait} s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    if args.also_write_postgresql:
        with pg_connect(args) as connection, connection.cursor() as cursor:
            cursor.execute("UPDATE files SET download_count = download_count + 1000"
                           " WHERE id = (SELECT min(id) FROM files)")
    return 0


def switch(args) -> int:
    state_file(Path(args.state_dir), "backend").write_text(args.backend + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=6432, help="PgBouncer's port")
    parser.add_argument("--pg-db", default="fileshare")
    parser.add_argument("--pg-user", default="postgres")
    commands = parser.add_subparsers(dest="command", required=True)
    writer = commands.add_parser("run")
    writer.add_argument("--sqlite", required=True)
    writer.add_argument("--interval", type=float, default=0.05, help="seconds between two transactions")
    writer.set_defaults(handler=run)
    switching = commands.add_parser("maintenance")
    switching.add_argument("state", choices=["on", "off"])
    switching.add_argument("--wait", type=float, default=30)
    switching.add_argument("--also-write-postgresql", action="store_true")
    switching.set_defaults(handler=maintenance)
    backends = commands.add_parser("switch")
    backends.add_argument("backend", choices=["postgresql", "sqlite"])
    backends.set_defaults(handler=switch)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
