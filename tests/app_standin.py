"""A stand-in for FileShareSystem during a cutover: it writes as the application does, and obeys its hooks.

    python tests/app_standin.py run --state-dir DIR --sqlite FILE --pg-port PORT   the application
    python tests/app_standin.py maintenance on|off --state-dir DIR                 cutover_maintenance_*_command
    python tests/app_standin.py switch postgresql|sqlite --state-dir DIR           cutover_switch(_back)_command
    python tests/app_standin.py serve --state-dir DIR [--answer-500 PATH]          the same hooks as URLs

`run` keeps inserting, updating and deleting rows of all four tables in the
SQLite file, one transaction at a time, until maintenance begins; it then
finishes its transaction, writes DIR/quiesced and waits. When maintenance ends
it writes to the backend DIR/backend names: SQLite, or PostgreSQL through
PgBouncer (PGPASSFILE supplies the password). It changes only rows it inserted
itself, so the rows the SQLite file started with stay as they were.
DIR/stats.json counts its writes per backend; DIR/stop ends it.

Every transaction it believes committed is appended to DIR/commits.jsonl,
after the commit returned: the backend and, per row, the table, the id and
the values it wrote (None for a row it deleted). missing_commits() replays
that log and checks the database the application ends on holds each row as
the last logged commit left it: no logged commit may be missing.

`maintenance on` returns once the writer has quiesced, as an application's
maintenance switch must. With --also-write-postgresql it then changes one row
of PostgreSQL directly, as a second instance already pointed at PostgreSQL
would: the cutover's validation must see that difference. With
--lie-until-copy GLOB it returns at once and the writer goes on writing, as an
application that notices the flag late: until a file matching GLOB (the
cutover's copy at rest) appears, and for a few commits after. `maintenance off
--then-fail` ends maintenance, then exits 1. The first maintenance-on and
the last maintenance-off are kept (DIR/maintenance_first_on,
DIR/maintenance_last_off), and every call of a hook is appended to
DIR/hooks.jsonl.

`serve` answers the same hooks over HTTP (POST /maintenance/on,
/maintenance/off, /switch/postgresql, /switch/sqlite) on a free port of
127.0.0.1 that it writes to DIR/http_port; --answer-500 PATH answers 500 to
PATH without doing anything.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sqlite3
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg2

TABLES = ("storage_nodes", "files", "tasks", "replication_logs")
# What the log keeps of a row of each table: the columns the stand-in writes.
LOGGED = {"storage_nodes": ("node_id", "used_bytes"), "files": ("file_uuid", "download_count"),
          "tasks": ("task_uuid", "status", "retries"), "replication_logs": ("file_id", "bytes_transferred")}
# Commits a lying writer makes once it has seen the copy, before it notices maintenance.
LATE_COMMITS = 3


def state_file(state_dir: Path, name: str) -> Path:
    return state_dir / name


def backend(state_dir: Path) -> str:
    path = state_file(state_dir, "backend")
    return path.read_text().strip() if path.exists() else "sqlite"


def append_line(path: Path, record: dict) -> None:
    with open(path, "a") as stream:
        stream.write(json.dumps(record) + "\n")
        stream.flush()


def record_hook(state_dir: Path, step: str, via: str, outcome: int) -> None:
    append_line(state_file(state_dir, "hooks.jsonl"), {"step": step, "via": via, "outcome": outcome,
                                                        "at": time.time()})


def row_ops(table: str, rows) -> list:
    """[table, id, {column: value}] of rows returned as (id, *LOGGED[table])."""
    return [[table, row[0], dict(zip(LOGGED[table], row[1:]))] for row in rows]


class SqliteWriter:
    """One transaction per step over storage_nodes, files, tasks and replication_logs."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA foreign_keys = ON")
        first = {table: self.db.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0]  # noqa: S608
                 for table in TABLES}
        self.first_max = first
        self.nodes = [row[0] for row in self.db.execute("SELECT node_id FROM storage_nodes WHERE id <= ?",
                                                         (first["storage_nodes"],))]
        self.steps = 0

    def own(self, table: str, where: str = "") -> int | None:
        """A random id of a row this stand-in inserted, or None."""
        row = self.db.execute(f"SELECT id FROM {table} WHERE id > ? {where} ORDER BY random() LIMIT 1",  # noqa: S608
                              (self.first_max[table],)).fetchone()
        return row[0] if row else None

    def returning(self, table: str, statement: str, parameters) -> list:
        columns = ", ".join(LOGGED[table])
        return row_ops(table, self.db.execute(f"{statement} RETURNING id, {columns}", parameters).fetchall())

    def deleting(self, table: str, where: str, parameters, counts: dict) -> list:
        rows = self.db.execute(f"DELETE FROM {table} WHERE {where} RETURNING id", parameters).fetchall()  # noqa: S608
        counts["deleted"] += len(rows)
        return [[table, row[0], None] for row in rows]

    def step(self, counts: dict) -> list:
        """One transaction; returns what it wrote, once committed."""
        self.steps += 1
        now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        db, ops = self.db, []
        db.execute("BEGIN IMMEDIATE")
        try:
            file_uuid = str(uuid.uuid4())
            ops += self.returning(
                "files",
                "INSERT INTO files (file_uuid, filename, original_name, size_bytes, mime_type, owner_id, primary_node,"
                " replica_nodes, storage_path, metadata, created_at) VALUES (?, ?, ?, ?, 'text/plain', 'standin', ?,"
                " '[]', ?, '{}', ?)",
                (file_uuid, f"standin-{self.steps}.txt", f"standin {self.steps}", random.randint(1, 10**9),
                 random.choice(self.nodes), f"/data/{file_uuid}", now))
            file_id = ops[-1][1]
            ops += self.returning("tasks", "INSERT INTO tasks (task_uuid, task_type, file_id, status, payload,"
                                  " created_at) VALUES (?, 'replicate', ?, 'pending', '{}', ?)",
                                  (str(uuid.uuid4()), file_id, now))
            ops += self.returning("replication_logs", "INSERT INTO replication_logs (file_id, source_node,"
                                  " target_node, status, created_at) VALUES (?, ?, ?, 'pending', ?)",
                                  (file_id, self.nodes[0], self.nodes[-1], now))
            counts["inserted"] += 3
            for table, change in (("files", "download_count = download_count + 1"),
                                  ("tasks", "status = 'completed', retries = retries + 1"),
                                  ("replication_logs", "bytes_transferred = bytes_transferred + 4096")):
                row = self.own(table)
                if row is not None:
                    ops += self.returning(table, f"UPDATE {table} SET {change} WHERE id = ?", (row,))  # noqa: S608
                    counts["updated"] += 1
            if self.steps % 3 == 0:
                victim = self.own("files", f"AND id < {file_id}")
                if victim is not None:
                    for table in ("tasks", "replication_logs"):
                        ops += self.deleting(table, "file_id = ?", (victim,), counts)
                    ops += self.deleting("files", "id = ?", (victim,), counts)
            if self.steps % 5 == 0:
                ops += self.returning("storage_nodes", "INSERT INTO storage_nodes (node_id, hostname,"
                                      " capacity_bytes, created_at) VALUES (?, ?, ?, ?)",
                                      (f"node-{uuid.uuid4().hex[:8]}", "standin.local", 10**12, now))
                counts["inserted"] += 1
                node = self.own("storage_nodes")
                ops += self.returning("storage_nodes", "UPDATE storage_nodes SET used_bytes = used_bytes + 1"
                                      " WHERE id = ?", (node,))
                counts["updated"] += 1
            if self.steps % 10 == 0:
                ops += self.deleting("storage_nodes", "id = (SELECT min(id) FROM storage_nodes WHERE id > ?)",
                                     (self.first_max["storage_nodes"],), counts)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return ops


def pg_connect(args) -> psycopg2.extensions.connection:
    return psycopg2.connect(host=args.pg_host, port=args.pg_port, dbname=args.pg_db, user=args.pg_user,
                            connect_timeout=10)


def pg_step(connection, steps: int, counts: dict) -> list:
    """What the application does on PostgreSQL, in one transaction: a new file with a task, an update of it."""
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO files (file_uuid, filename, owner_id, created_at) VALUES (%s, %s, 'standin', now())"
                       " RETURNING id, file_uuid::text, download_count", (str(uuid.uuid4()), f"standin-pg-{steps}.txt"))
        ops = row_ops("files", cursor.fetchall())
        file_id = ops[0][1]
        cursor.execute("INSERT INTO tasks (task_uuid, task_type, file_id, created_at)"
                       " VALUES (%s, 'replicate', %s, now()) RETURNING id, task_uuid::text, status, retries",
                       (str(uuid.uuid4()), file_id))
        ops += row_ops("tasks", cursor.fetchall())
        cursor.execute("UPDATE files SET download_count = download_count + 1 WHERE id = %s"
                       " RETURNING id, file_uuid::text, download_count", (file_id,))
        ops += row_ops("files", cursor.fetchall())
    connection.commit()
    counts["inserted"] += 2
    counts["updated"] += 1
    return ops


class Maintenance:
    """Whether the writer must stop now: the flag, unless a lying hook set it and the copy it waits for (and a
    few commits after it) has not come yet."""

    def __init__(self, state_dir: Path):
        self.flag = state_file(state_dir, "maintenance")
        self.late_commits = None

    def active(self) -> bool:
        try:
            flag = json.loads(self.flag.read_text())
        except (FileNotFoundError, ValueError):
            self.late_commits = None
            return False
        if not flag.get("lie_until_copy"):
            return True
        if self.late_commits is None:
            copies = [path for path in glob.glob(flag["lie_until_copy"]) if os.stat(path).st_mtime >= flag["since"]]
            if not copies:
                return False
            self.late_commits = LATE_COMMITS
        self.late_commits -= 1
        return self.late_commits < 0


def run(args) -> int:
    state_dir = Path(args.state_dir)
    writer = SqliteWriter(args.sqlite)
    maintenance = Maintenance(state_dir)
    stats = {"sqlite": {"inserted": 0, "updated": 0, "deleted": 0},
             "postgresql": {"inserted": 0, "updated": 0, "deleted": 0},
             "backend": "sqlite", "maintenance_seen": 0, "steps": 0, "postgresql_errors": 0}
    pg = None
    while not state_file(state_dir, "stop").exists():
        if maintenance.active():
            if not state_file(state_dir, "quiesced").exists():
                stats["maintenance_seen"] += 1
                state_file(state_dir, "quiesced").write_text(str(time.time()))
            time.sleep(0.05)
            continue
        stats["backend"] = backend(state_dir)
        stats["steps"] += 1
        if stats["backend"] == "postgresql":
            try:
                pg = pg or pg_connect(args)
                ops = pg_step(pg, stats["steps"], stats["postgresql"])
            except psycopg2.Error as error:
                # Not committed, as far as the application knows: not logged; it tries again with a new session.
                print(f"postgresql: {error}".strip(), file=sys.stderr)
                stats["postgresql_errors"] += 1
                pg = None
                time.sleep(0.5)
                continue
        else:
            ops = writer.step(stats["sqlite"])
        append_line(state_file(state_dir, "commits.jsonl"), {"backend": stats["backend"], "at": time.time(),
                                                             "ops": ops})
        stats["last_write"] = time.time()
        partial = state_file(state_dir, "stats.json.partial")
        partial.write_text(json.dumps(stats))
        partial.replace(state_file(state_dir, "stats.json"))
        time.sleep(args.interval)
    return 0


def maintenance_on(state_dir: Path, wait: float, lie_until_copy: str = "") -> int:
    flag, quiesced = state_file(state_dir, "maintenance"), state_file(state_dir, "quiesced")
    first_on = state_file(state_dir, "maintenance_first_on")
    now = time.time()
    if not first_on.exists():
        first_on.write_text(str(now))
    if not flag.exists():
        flag.write_text(json.dumps({"since": now, "lie_until_copy": lie_until_copy}))
    if lie_until_copy:
        return 0
    deadline = time.monotonic() + wait
    while not quiesced.exists():
        if time.monotonic() > deadline:
            print(f"the application did not stop writing within {wait} s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    return 0


def maintenance_off(state_dir: Path) -> int:
    state_file(state_dir, "maintenance").unlink(missing_ok=True)
    state_file(state_dir, "quiesced").unlink(missing_ok=True)
    state_file(state_dir, "maintenance_last_off").write_text(str(time.time()))
    return 0


def maintenance(args) -> int:
    state_dir = Path(args.state_dir)
    if args.state == "off":
        outcome = maintenance_off(state_dir)
        if args.then_fail:
            print("maintenance ended, but the notification to the load balancer failed", file=sys.stderr)
            outcome = 1
    else:
        outcome = maintenance_on(state_dir, args.wait, args.lie_until_copy)
        if outcome == 0 and args.also_write_postgresql:
            with pg_connect(args) as connection, connection.cursor() as cursor:
                cursor.execute("UPDATE files SET download_count = download_count + 1000"
                               " WHERE id = (SELECT min(id) FROM files)")
    record_hook(state_dir, f"maintenance {args.state}", "command", outcome)
    return outcome


def set_backend(state_dir: Path, name: str) -> int:
    state_file(state_dir, "backend").write_text(name + "\n")
    return 0


def switch(args) -> int:
    state_dir = Path(args.state_dir)
    outcome = set_backend(state_dir, args.backend)
    record_hook(state_dir, f"switch {args.backend}", "command", outcome)
    return outcome


def serve(args) -> int:
    state_dir = Path(args.state_dir)
    actions = {"/maintenance/on": lambda: maintenance_on(state_dir, args.wait),
               "/maintenance/off": lambda: maintenance_off(state_dir),
               "/switch/postgresql": lambda: set_backend(state_dir, "postgresql"),
               "/switch/sqlite": lambda: set_backend(state_dir, "sqlite")}

    class Hooks(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the name http.server calls
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?")[0]
            if path in args.answer_500:
                status = 500
            elif path in actions:
                status = 200 if not actions[path]() else 503
            else:
                status = 404
            append_line(state_file(state_dir, "hooks.jsonl"),
                        {"step": path.strip("/").replace("/", " "), "via": "http", "outcome": status,
                         "at": time.time(), "headers": sorted(self.headers.keys())})
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    partial = state_file(state_dir, "http_port.partial")
    partial.write_text(str(server.server_address[1]))
    partial.replace(state_file(state_dir, "http_port"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    while not state_file(state_dir, "stop").exists():
        time.sleep(0.1)
    server.shutdown()
    return 0


def expected_rows(state_dir: Path) -> dict:
    """{(table, id): values or None (deleted)} as the logged commits, replayed in order, left each row."""
    rows = {}
    log = state_file(state_dir, "commits.jsonl")
    for line in log.read_text().splitlines() if log.exists() else []:
        for table, key, values in json.loads(line)["ops"]:
            rows[(table, key)] = values
    return rows


def missing_commits(state_dir: Path, read_rows) -> list:
    """Rows whose last logged commit the database does not show: [(table, id, logged, found)].
    read_rows(table, ids) -> {id: {column: value}} of the rows of table whose id is in ids."""
    expected = expected_rows(state_dir)
    missing = []
    for table in TABLES:
        keys = sorted(key for (name, key) in expected if name == table)
        found = read_rows(table, keys) if keys else {}
        for key in keys:
            logged, there = expected[(table, key)], found.get(key)
            if logged != there:
                missing.append((table, key, logged, there))
    return missing


def sqlite_reader(path: str):
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def read_rows(table, keys):
        columns = ", ".join(LOGGED[table])
        rows = connection.execute(f"SELECT id, {columns} FROM {table} WHERE id IN "  # noqa: S608
                                  f"(SELECT value FROM json_each(?))", (json.dumps(keys),)).fetchall()
        return {row[0]: dict(zip(LOGGED[table], row[1:])) for row in rows}
    return read_rows


def postgresql_reader(connection):
    def read_rows(table, keys):
        columns = ", ".join(f"{column}::text" if column.endswith("_uuid") else column for column in LOGGED[table])
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT id, {columns} FROM {table} WHERE id = ANY(%s)", (keys,))  # noqa: S608
            return {row[0]: dict(zip(LOGGED[table], row[1:])) for row in cursor.fetchall()}
    return read_rows


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
    switching.add_argument("--wait", type=float, default=60)
    switching.add_argument("--also-write-postgresql", action="store_true")
    switching.add_argument("--lie-until-copy", default="", metavar="GLOB")
    switching.add_argument("--then-fail", action="store_true")
    switching.set_defaults(handler=maintenance)
    backends = commands.add_parser("switch")
    backends.add_argument("backend", choices=["postgresql", "sqlite"])
    backends.set_defaults(handler=switch)
    server = commands.add_parser("serve")
    server.add_argument("--answer-500", action="append", default=[], metavar="PATH")
    server.add_argument("--wait", type=float, default=60)
    server.set_defaults(handler=serve)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
