#!/usr/bin/env python3
"""Measure sync() against a full migration on a FileShareSystem sample.

For each round: a fresh database gets the runbook's schema and a full
migrate() of the sample (timed; it ends by recording the page checksums);
then a copy of the sample has a fraction of its rows changed (inserts, updates
and deletes in all four tables, children of deleted parents deleted, children
re-pointed to new parents) and is synced (timed), then the same file is synced
after a write that changes no row (timed: every page is checked), and once
more with nothing written at all (timed). Prints one JSON document with the
medians.

    python scripts/measure_sync.py --sample /var/tmp/sync-100k.db --port 5432 --rounds 3 [--index-task-files]

``change_rows`` is also what the tests change a sample with.
"""

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_SQL = ROOT / "roles" / "schema_init" / "files" / "postgres_init_schema.sql"


def change_rows(path, fraction=0.01, seed=1):
    """Insert, update and delete about ``fraction`` of each table's rows (a third each); returns the counts."""
    draw = random.Random(seed)
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA foreign_keys = ON")  # the changes must leave the source consistent
    counts = {}

    def ids(table):
        return [row[0] for row in connection.execute(f"SELECT id FROM {table} ORDER BY id")]  # noqa: S608

    def share(table):
        return max(1, round(len(ids(table)) * fraction / 3))

    def new_uuid():
        return str(uuid.UUID(int=draw.getrandbits(128), version=4))

    with connection:
        # storage_nodes: a new node, one renamed host, one node retired (its files move to the new node)
        nodes = ids("storage_nodes")
        count = share("storage_nodes")
        new_nodes = []
        for number in range(count):
            node_id = f"node-sync-{seed}-{number}"
            connection.execute(
                "INSERT INTO storage_nodes (node_id, hostname, port, capacity_bytes, used_bytes, status, is_active, "
                "last_heartbeat, created_at) VALUES (?, ?, 8080, 4000000000000, 0, 'online', 1, "
                "'2024-06-02 10:00:00.000000', '2024-06-02 09:00:00')", (node_id, f"{node_id}.internal"))
            new_nodes.append(node_id)
        for key in draw.sample(nodes, count):
            connection.execute("UPDATE storage_nodes SET hostname = hostname || '.moved', used_bytes = used_bytes + 1 "
                               "WHERE id = ?", (key,))
        # the nodes holding the fewest files retire, so that few files move
        retired = [row[0] for row in connection.execute(
            "SELECT n.id FROM storage_nodes n LEFT JOIN files f ON f.primary_node = n.node_id "
            "WHERE n.node_id NOT LIKE 'node-sync-%' GROUP BY n.id ORDER BY count(f.id), n.id LIMIT ?", (count,))]
        for key in retired:
            (node_id,) = connection.execute("SELECT node_id FROM storage_nodes WHERE id = ?", (key,)).fetchone()
            connection.execute("UPDATE files SET primary_node = ? WHERE primary_node = ?", (new_nodes[0], node_id))
            connection.execute("DELETE FROM storage_nodes WHERE id = ?", (key,))
        counts["storage_nodes"] = 3 * count

        # files: new ones on the new node, some downloaded, some deleted with their tasks and replication logs
        files = ids("files")
        count = share("files")
        new_files = []
        for source in draw.sample(files, count):
            cursor = connection.execute(
                "INSERT INTO files (file_uuid, filename, original_name, size_bytes, mime_type, checksum_sha256, "
                "owner_id, primary_node, replica_nodes, storage_path, share_token, download_count, expires_at, "
                "is_deleted, metadata, created_at, updated_at) SELECT ?, 'sync-' || filename, original_name, "
                "size_bytes + 1, mime_type, checksum_sha256, owner_id, ?, replica_nodes, storage_path, NULL, 0, "
                "expires_at, 0, metadata, '2024-06-02 11:00:00.000000', NULL FROM files WHERE id = ?",
                (new_uuid(), new_nodes[0], source))
            new_files.append(cursor.lastrowid)
        for key in draw.sample(files, count):
            connection.execute("UPDATE files SET download_count = download_count + 1, "
                               "updated_at = '2024-06-02 12:00:00.123456' WHERE id = ?", (key,))
        for key in draw.sample(files, count):
            connection.execute("DELETE FROM tasks WHERE file_id = ?", (key,))
            connection.execute("DELETE FROM replication_logs WHERE file_id = ?", (key,))
            connection.execute("DELETE FROM files WHERE id = ?", (key,))
        counts["files"] = 3 * count

        # tasks: new ones for new files, some finished, some moved to a new file, some deleted
        tasks = ids("tasks")
        count = share("tasks")
        for source in draw.sample(tasks, min(count, len(tasks))):
            connection.execute(
                "INSERT INTO tasks (task_uuid, task_type, file_id, status, priority, payload, result, error_message, "
                "retries, created_at, started_at, completed_at) SELECT ?, task_type, ?, 'pending', priority, payload, "
                "NULL, NULL, 0, '2024-06-02 11:30:00', NULL, NULL FROM tasks WHERE id = ?",
                (new_uuid(), draw.choice(new_files), source))
        tasks = ids("tasks")
        for key in draw.sample(tasks, min(count, len(tasks))):
            connection.execute("UPDATE tasks SET status = 'completed', retries = retries + 1, "
                               "completed_at = '2024-06-02 12:30:00' WHERE id = ?", (key,))
        for key in draw.sample(tasks, min(count, len(tasks))):
            connection.execute("UPDATE tasks SET file_id = ? WHERE id = ?", (draw.choice(new_files), key))
        for key in draw.sample(tasks, min(count, len(tasks))):
            connection.execute("DELETE FROM tasks WHERE id = ?", (key,))
        counts["tasks"] = 4 * count

        # replication_logs: new ones, some completed (a new duration), some deleted
        logs = ids("replication_logs")
        count = share("replication_logs")
        for source in draw.sample(logs, min(count, len(logs))):
            connection.execute(
                "INSERT INTO replication_logs (file_id, source_node, target_node, status, bytes_transferred, "
                "duration_ms, error_message, created_at, completed_at) SELECT ?, source_node, target_node, "
                "'pending', 0, NULL, NULL, '2024-06-02 11:45:00', NULL FROM replication_logs WHERE id = ?",
                (draw.choice(new_files), source))
        logs = ids("replication_logs")
        for key in draw.sample(logs, min(count, len(logs))):
            connection.execute("UPDATE replication_logs SET status = 'completed', duration_ms = ?, "
                               "completed_at = '2024-06-02 12:45:00' WHERE id = ?", (draw.random() * 1000, key))
        for key in draw.sample(logs, min(count, len(logs))):
            connection.execute("DELETE FROM replication_logs WHERE id = ?", (key,))
        counts["replication_logs"] = 3 * count
    connection.close()
    return counts


def add_spare_nodes(path, count):
    """Storage nodes without files: on a large sample every real node holds thousands of files, and retiring
    one would move them all (far more than the fraction of rows measured)."""
    connection = sqlite3.connect(path)
    with connection:
        for number in range(count):
            connection.execute(
                "INSERT INTO storage_nodes (node_id, hostname, port, capacity_bytes, used_bytes, status, is_active, "
                "last_heartbeat, created_at) VALUES (?, ?, 8080, 0, 0, 'offline', 0, NULL, '2024-06-01 00:00:00')",
                (f"node-spare-{number}", f"spare-{number}.internal"))
    connection.close()


def touch_without_change(path):
    """Commit a write that changes no row: the file (and its source_id) changes, its content does not."""
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("UPDATE storage_nodes SET id = id WHERE id = (SELECT min(id) FROM storage_nodes)")
    connection.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--index-task-files", action="store_true",
                        help="index tasks(file_id) after the load (counted in the migration's time): without it "
                             "PostgreSQL scans tasks once per deleted file to check the foreign key")
    options = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "module_utils"))
    import psycopg2
    from sqlite_pg.engine import migrate
    from sqlite_pg.sync import sync
    from sqlite_pg.validate import validate

    admin = {"host": options.host, "port": options.port, "user": options.user, "dbname": "postgres"}
    pre_data = SCHEMA_SQL.read_text().split("-- section: post-data")[0].split("-- section: pre-data")[1]
    figures = {"migrate": [], "sync_changed": [], "sync_touched": [], "sync_same_file": []}
    details = []
    for round_number in range(options.rounds):
        database = f"measure_sync_{os.getpid()}_{round_number}"
        copy = os.path.join(options.workdir, f"{database}.db")
        shutil.copyfile(options.sample, copy)
        add_spare_nodes(copy, 1)
        connection = psycopg2.connect(**admin)
        connection.autocommit = True
        connection.cursor().execute(f'CREATE DATABASE "{database}"')
        connection.close()
        conninfo = dict(admin, dbname=database)
        try:
            target = psycopg2.connect(**conninfo)
            target.autocommit = True
            target.cursor().execute(pre_data)
            target.close()
            started = time.monotonic()
            migrate(copy, conninfo, create_tables=False, jobs=options.jobs)
            if options.index_task_files:
                target = psycopg2.connect(**conninfo)
                target.autocommit = True
                target.cursor().execute("CREATE INDEX tasks_file_id_idx ON tasks (file_id)")
                target.close()
            figures["migrate"].append(time.monotonic() - started)
            changed = change_rows(copy, options.fraction, seed=round_number + 1)
            result = sync(copy, conninfo, jobs=options.jobs)
            figures["sync_changed"].append(result["seconds"])
            touch_without_change(copy)
            touched = sync(copy, conninfo, jobs=options.jobs)
            figures["sync_touched"].append(touched["seconds"])
            same = sync(copy, conninfo, jobs=options.jobs)
            figures["sync_same_file"].append(same["seconds"])
            check = validate(copy, conninfo, jobs=options.jobs)
            details.append({"changed_rows": changed, "sync": result["tables"], "touched_changed": touched["changed"],
                            "same_changed": same["changed"], "validation": check["status"]})
        finally:
            connection = psycopg2.connect(**admin)
            connection.autocommit = True
            connection.cursor().execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            connection.close()
            os.unlink(copy)
    medians = {name: round(statistics.median(values), 3) for name, values in figures.items()}
    full = medians["migrate"]
    print(json.dumps({"sample": options.sample, "rounds": options.rounds, "fraction": options.fraction,
                      "index_task_files": options.index_task_files,
                      "seconds": figures, "medians": medians,
                      "ratios": {name: round(value / full, 3) for name, value in medians.items() if name != "migrate"},
                      "details": details}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
