"""The runbook against a plain PostgreSQL: one server, no Patroni, no PgBouncer.

Starts a throwaway PostgreSQL 15 (initdb + pg_ctl, password authentication,
reached through a pgpass file like the lab), writes an inventory with only a
postgres_cluster group of one host, and runs `ansible-playbook migrate.yml`
as an operator would. Each test works in its own database.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
import psycopg2.sql
import pytest
from conftest import data_dump, wait_until
from conftest import execute as run_statement

ROOT = Path(__file__).resolve().parent.parent
BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "runbook-test-secret-4f1c"
LOCK_KEY = 4608230915
GUIDE_VARIABLES = ("DATABASE_URL", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_PORT", "SQLITE_PATH")

pytestmark = pytest.mark.skipif(not (BIN / "initdb").exists(), reason="PostgreSQL 15 server binaries not installed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def as_postgres(args, **kwargs):
    """initdb and postgres refuse to run as root."""
    if os.geteuid() == 0:
        args = ["runuser", "-u", "postgres", "--", *args]
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def server():
    # Not under pytest's tmp_path: the postgres user cannot enter root's 0700 directory.
    base = Path(tempfile.mkdtemp(prefix="runbook-plain-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        postgres = pwd.getpwnam("postgres")
        os.chown(base, postgres.pw_uid, postgres.pw_gid)
    password_file = base / "pw"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o644)
    as_postgres([str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "scram-sha-256",
                 f"--pwfile={password_file}", "-E", "UTF8"])
    password_file.unlink()
    port = free_port()
    as_postgres([str(BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(base / "log"), "-o",
                 f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"])
    pgpass = base / "pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:*:postgres:{PASSWORD}\n")
    pgpass.chmod(0o600)
    yield {"port": port, "pgpass": pgpass, "base": base}
    as_postgres([str(BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
    shutil.rmtree(base, ignore_errors=True)


def execute(server, dbname, sql, parameters=None):
    conninfo = {"host": "127.0.0.1", "port": server["port"], "user": "postgres", "password": PASSWORD, "dbname": dbname}
    return run_statement(conninfo, sql, parameters)


class Workspace:
    """One database, one SQLite source, one inventory, one backup and report directory."""

    def __init__(self, server, path: Path, name: str):
        self.server, self.path, self.db = server, path, name
        execute(server, "postgres", psycopg2.sql.SQL("CREATE DATABASE {}").format(psycopg2.sql.Identifier(name)))
        self.source = path / "fileshare.db"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_db.py"), "--out", str(self.source),
                        "--quiet"], check=True)
        inventory = path / "inventory"
        inventory.mkdir()
        (inventory / "hosts.yml").write_text(
            "all:\n"
            "  vars:\n"
            "    ansible_connection: local\n"
            '    ansible_python_interpreter: "{{ ansible_playbook_python }}"\n'
            f"    pg_pgpass_file: {server['pgpass']}\n"
            "  children:\n"
            "    postgres_cluster:\n"
            "      hosts:\n"
            "        db1:\n"
            "          ansible_host: 127.0.0.1\n"
            f"          postgresql_port: {server['port']}\n")
        self.inventory = inventory
        self.backups = path / "backups"
        self.reports = path / "reports"
        self.async_dir = path / "async"

    def run(self, *extra, wait=True, playbook="migrate.yml"):
        # The background jobs' result files go to the workspace, where a test can see what a run leaves.
        env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), PWD=str(self.path), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_ASYNC_DIR=str(self.async_dir))
        for name in GUIDE_VARIABLES:
            env.pop(name, None)
        args = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory),
                str(ROOT / playbook), "-e", f"fileshare_db_name={self.db}", "-e", f"backup_dir={self.backups}",
                "-e", f"report_dir={self.reports}", "-e", "sqlite_path=fileshare.db", *extra]
        if not wait:
            return subprocess.Popen(args, cwd=self.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        return subprocess.run(args, cwd=self.path, env=env, capture_output=True, text=True, timeout=600)

    def query(self, sql, parameters=None):
        return execute(self.server, self.db, sql, parameters)

    def dump(self):
        """pg_dump --data-only of the database: equal before and after means nothing was written."""
        return data_dump({"host": "127.0.0.1", "port": self.server["port"], "user": "postgres", "password": PASSWORD,
                          "dbname": self.db})

    def snapshot(self):
        """Every table of the public schema with its rows, in a comparable form."""
        tables = [row[0] for row in self.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")]
        return {table: sorted(map(repr, self.query(
            psycopg2.sql.SQL("SELECT * FROM public.{}").format(psycopg2.sql.Identifier(table))))) for table in tables}


@pytest.fixture
def workspace(server, tmp_path, request):
    name = "fs_" + re.sub(r"\W", "_", request.node.name)[:40].lower()
    return Workspace(server, tmp_path, name)


def recap_changed(output: str) -> dict:
    return {host: int(changed) for host, changed in re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", output, re.M)}


def words(output: str) -> str:
    """Output with whitespace collapsed: the default callback wraps long messages."""
    return " ".join(output.split())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SUMMARY = """\
============================================================
SQLite to PostgreSQL Data Migration
============================================================
Status: completed
Total tables migrated: 4
Total rows migrated: 125

files:
  Total rows: 50
  Migrated: 50
  Status: completed

storage_nodes:
  Total rows: 3
  Migrated: 3
  Status: completed

tasks:
  Total rows: 45
  Migrated: 45
  Status: completed

replication_logs:
  Total rows: 27
  Migrated: 27
  Status: completed

============================================================
VALIDATION
============================================================
Validation status: completed
✓ files: SQLite=50, PostgreSQL=50
✓ storage_nodes: SQLite=3, PostgreSQL=3
✓ tasks: SQLite=45, PostgreSQL=45
✓ replication_logs: SQLite=27, PostgreSQL=27
============================================================"""


def printed_summary(output: str) -> str:
    """The summary as the default callback prints it: a YAML block, indented."""
    first = output.rfind("\n", 0, output.index("=" * 60)) + 1
    lines = output[first:].splitlines()
    indent = len(lines[0]) - len(lines[0].lstrip())
    block = []
    for line in lines:
        block.append(line[indent:])
        if len(block) > 1 and block[-1] == "=" * 60 and block[-2].startswith(("✓", "✗", "Validation status")):
            break
    return "\n".join(block)


def test_migrates_a_plain_postgresql_then_changes_nothing(workspace):
    source_digest = sha256(workspace.source)
    first = workspace.run()
    assert first.returncode == 0, first.stdout[-4000:]
    assert printed_summary(first.stdout) == SUMMARY
    for skipped in ("Patroni checks skipped", "etcd checks skipped", "PgBouncer checks skipped",
                    "pool summary skipped", "cluster state skipped"):
        assert skipped in words(first.stdout)
    counts = dict(workspace.query(
        "SELECT 'files', count(*) FROM files UNION ALL SELECT 'storage_nodes', count(*) FROM storage_nodes "
        "UNION ALL SELECT 'tasks', count(*) FROM tasks "
        "UNION ALL SELECT 'replication_logs', count(*) FROM replication_logs"))
    assert counts == {"files": 50, "storage_nodes": 3, "tasks": 45, "replication_logs": 27}
    # post-data is in place and new ids continue after the migrated ones
    assert workspace.query("SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
                           "AND connamespace = 'public'::regnamespace")[0][0] == 3
    assert workspace.query("SELECT nextval(pg_get_serial_sequence('files', 'id')) > max(id) FROM files")[0][0]
    [run_dir] = workspace.reports.iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed"
    assert [stage["name"] for stage in report["stages"]] == [
        "readiness", "backup", "schema", "migrate", "post_data", "validate", "post_checks"]
    # Stages back to back, from the run's start to the report: their seconds add up to the run's.
    assert round(sum(stage["seconds"] for stage in report["stages"]), 2) == report["seconds"] > 0
    # A real run reads the state table before the backup, not a full profile of the source.
    assert "profile:" not in first.stdout and "no profile before the load" in words(first.stdout)
    assert (run_dir / "report.md").read_text().startswith("# FileShareSystem migration run")
    [backup] = workspace.backups.iterdir()
    assert (backup / f"{workspace.db}.pgc").stat().st_size > 0
    assert sha256(workspace.source) == source_digest
    for text in (first.stdout, first.stderr, (run_dir / "report.json").read_text(),
                 (run_dir / "report.md").read_text(), (backup / "manifest.json").read_text()):
        assert PASSWORD not in text
    # The load and the validation ran in the background; their result files went with them.
    assert workspace.async_dir.is_dir() and not list(workspace.async_dir.iterdir())

    second = workspace.run()
    assert second.returncode == 0, second.stdout[-4000:]
    assert set(recap_changed(second.stdout).values()) == {0}, second.stdout[-3000:]
    assert "no backup needed" in words(second.stdout)
    assert len(list(workspace.backups.iterdir())) == 1


def test_rerun_explains_what_an_earlier_run_left_from_the_state_table(workspace):
    first = workspace.run()
    assert first.returncode == 0, first.stdout[-4000:]
    # What a run killed during its load leaves: tables loaded, one not, no validation since.
    workspace.query("UPDATE sqlite_to_postgres_state SET validated_at = NULL; TRUNCATE replication_logs; "
                    "DELETE FROM sqlite_to_postgres_state WHERE table_name = 'replication_logs'")
    rerun = workspace.run()
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    printed = words(rerun.stdout)
    assert ("readiness: an earlier run of this source stopped before its validation: it left storage_nodes, "
            "files, tasks loaded and replication_logs not loaded") in printed, printed[-3000:]
    assert "profile:" not in rerun.stdout and "no backup needed" not in printed
    assert len(list(workspace.backups.iterdir())) == 2
    assert workspace.query("SELECT count(*) FROM replication_logs")[0][0] == 27

    # The operator's preflight profiles the whole source before the backup, as --check does.
    preflight = workspace.run("-e", "migration_preflight=true")
    assert preflight.returncode == 0, preflight.stdout[-4000:]
    assert "profile:" in preflight.stdout and "no backup needed" in words(preflight.stdout)
    assert set(recap_changed(preflight.stdout).values()) == {0}, preflight.stdout[-3000:]


def test_check_mode_writes_nothing(workspace):
    before = workspace.snapshot()
    result = workspace.run("--check")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "would create" in words(result.stdout)
    assert workspace.snapshot() == before
    assert not workspace.backups.exists()
    # only the rehearsal's own report, on the control node
    [run_dir] = workspace.reports.iterdir()
    assert json.loads((run_dir / "report.json").read_text())["check_mode"] is True
    assert set(recap_changed(result.stdout).values()) == {0}


def test_second_concurrent_run_fails_at_once(workspace):
    first = workspace.run(wait=False)
    try:
        deadline = time.monotonic() + 120
        held = False
        while time.monotonic() < deadline and first.poll() is None and not held:
            held = workspace.query(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND (classid::bigint << 32) + objid::bigint = %s", (LOCK_KEY,))[0][0] > 0
            time.sleep(0.2)
        assert held, "the first run never took the migration lock"
        second = workspace.run()
        assert second.returncode != 0
        assert "a migration is already running" in words(second.stdout)
        assert re.search(r"held by backend pid (\d+) .*; to stop that run, interrupt its ansible-playbook on \S+ "
                         r"\(the lock goes with it\), or end its session with SELECT pg_terminate_backend\(\1\)",
                         words(second.stdout)), words(second.stdout)[-2000:]
    finally:
        output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-4000:]
    # each run reported in its own directory, even when both started in the same second
    statuses = sorted(json.loads((run_dir / "report.json").read_text())["status"]
                      for run_dir in workspace.reports.iterdir())
    assert statuses == ["completed", "failed"]
    # the first run released its lock
    assert workspace.query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")[0][0] == 0


def test_broken_source_rolls_back_and_fails(workspace):
    workspace.query("CREATE TABLE keep_me (id int PRIMARY KEY, note text); INSERT INTO keep_me VALUES (1, 'before')")
    with sqlite3.connect(workspace.source) as source:
        source.execute("UPDATE tasks SET task_type = 'unknown_kind' WHERE id = 7")
    source.close()
    digest = sha256(workspace.source)
    before = workspace.snapshot()
    result = workspace.run()
    assert result.returncode != 0
    assert "rollback: target restored from" in words(result.stdout)
    # The task the operator is told failed: the background job's poll, named for what it follows.
    assert re.search(r"Migration failed in stage migrate, task 'Poll \| Check the load': .*tasks",
                     words(result.stdout)), words(result.stdout)[-3000:]
    assert workspace.snapshot() == before
    assert sha256(workspace.source) == digest
    [run_dir] = workspace.reports.iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "failed"
    assert report["rollback"]["restored"] is True
    assert report["failure"]["stage"] in ("migrate", "post_data", "validate")



def test_check_mode_finds_a_value_the_schema_would_refuse(workspace):
    # The target is empty: the profile must check the values against the schema stage's types (uuid), not
    # the SQLite declaration (VARCHAR(36)), or --check passes and the real run fails after backup and schema.
    with sqlite3.connect(workspace.source) as source:
        source.execute("UPDATE files SET file_uuid = 'not-a-uuid' WHERE id = 7")
    source.close()
    before = workspace.snapshot()
    result = workspace.run("--check")
    assert result.returncode != 0
    printed = words(result.stdout)
    assert "table files, column file_uuid, rowid 7: value 'not-a-uuid' is not a UUID" in printed
    assert "declared:" not in result.stdout and "conversion:" not in result.stdout  # no profile dump
    assert workspace.snapshot() == before
    assert workspace.query("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace")[0][0] == 0
def test_failed_runs_never_push_out_the_pre_migration_dump(workspace):
    keep_one = ("-e", "backup_keep=1")
    first = workspace.run(*keep_one)
    assert first.returncode == 0, first.stdout[-4000:]
    [pre_migration] = workspace.backups.iterdir()
    record = json.loads((pre_migration / "backup.json").read_text())
    assert record["pre_migration"] is True and record["outcome"] == "completed" and record["validated"] is True

    # One table to load again, so each run takes a backup of the migrated target, and an application URL
    # that answers nothing, so each run fails in its post-checks, after its backup, and is rolled back.
    workspace.query("TRUNCATE replication_logs; "
                    "DELETE FROM sqlite_to_postgres_state WHERE table_name = 'replication_logs'")
    failing = (*keep_one, "-e", f"fileshare_api_url=http://127.0.0.1:{free_port()}")
    for _ in range(2):
        failed = workspace.run(*failing)
        assert failed.returncode != 0
        assert "rollback: target restored from" in words(failed.stdout), failed.stdout[-4000:]
    newest_run = sorted(workspace.backups.iterdir())[-1].name
    assert (f"backup retention (backup_keep 1): keeping {newest_run} (this run), no dump protected beyond "
            f"backup_keep (a validated migration exists), successful runs {pre_migration.name}, failed runs none; "
            f"removing ") in words(failed.stdout)
    kept = sorted(workspace.backups.iterdir())
    assert len(kept) == 2 and kept[0] == pre_migration, kept
    newest = json.loads((kept[1] / "backup.json").read_text())
    assert newest["outcome"] == "failed" and newest["pre_migration"] is False


def test_a_run_after_the_application_wrote_to_the_source_syncs_the_target(workspace):
    sys.path.insert(0, str(ROOT / "scripts"))
    from measure_sync import change_rows

    first = workspace.run()
    assert first.returncode == 0, first.stdout[-4000:]
    change_rows(str(workspace.source), fraction=0.1, seed=11)
    synced = workspace.run()
    assert synced.returncode == 0, synced.stdout[-4000:]
    printed = words(synced.stdout)
    assert ("sha256 " + sha256(workspace.source)[:12] + "): storage_nodes, files, tasks, replication_logs to sync "
            "(they hold an earlier snapshot of this file)") in printed, printed[-3000:]
    summary = printed_summary(synced.stdout)
    assert re.search(r"^  Synced: \d+ inserted, \d+ updated, [1-9]\d* deleted$", summary, re.M), summary
    assert "Validation status: completed" in summary and "✗" not in summary
    with sqlite3.connect(workspace.source) as connection:
        for table in ("storage_nodes", "files", "tasks", "replication_logs"):
            expected = connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
            assert workspace.query(f"SELECT count(*) FROM {table}")[0][0] == expected, table  # noqa: S608
            assert re.search(rf"^{table}:\n  Total rows: {expected}\n  Synced: ", summary, re.M), summary

    again = workspace.run()
    assert again.returncode == 0, again.stdout[-4000:]
    assert set(recap_changed(again.stdout).values()) == {0}, again.stdout[-3000:]
    assert "no backup needed" in words(again.stdout)


def test_another_database_at_the_source_path_is_synced_and_said_in_one_line(workspace):
    first = workspace.run()
    assert first.returncode == 0, first.stdout[-4000:]
    other = workspace.path / "other.db"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_db.py"), "--files", "30", "--seed", "9",
                    "--out", str(other), "--quiet"], check=True)
    connection = sqlite3.connect(other)
    connection.execute("PRAGMA page_size = 1024")  # takes effect with the VACUUM of the same connection
    connection.execute("VACUUM")
    connection.close()
    workspace.source.write_bytes(other.read_bytes())
    synced = workspace.run()
    assert synced.returncode == 0, synced.stdout[-4000:]
    said = [line for line in synced.stdout.splitlines() if "migrate: the sync says: " in line]
    assert len(said) == 1, synced.stdout[-4000:]
    assert "the source's page size changed from 4096 to 1024 bytes" in said[0] and "another database" in said[0]
    assert "Validation status: completed" in printed_summary(synced.stdout)


def test_a_table_dropped_from_the_source_stops_the_run_until_the_operator_chooses(workspace):
    first = workspace.run()
    assert first.returncode == 0, first.stdout[-4000:]
    with sqlite3.connect(workspace.source) as connection:
        connection.execute("DROP TABLE replication_logs")
    before = workspace.dump()
    refused = workspace.run()
    assert refused.returncode != 0
    assert ("no longer has table replication_logs, migrated from it before: the target still holds "
            "public.replication_logs (27 rows); drop it in the target (DROP TABLE), or keep it as it is, no longer "
            "synced, with keep_dropped_tables; nothing was written") in words(refused.stdout), refused.stdout[-4000:]
    assert workspace.dump() == before
    kept = workspace.run("-e", "migration_keep_dropped_tables=true")
    assert kept.returncode == 0, kept.stdout[-4000:]
    assert ("migrate: the sync says: table replication_logs was dropped from the source: kept in the target as it "
            "is (public.replication_logs, 27 rows), no longer synced (keep_dropped_tables)") in words(kept.stdout)
    assert workspace.query("SELECT count(*) FROM replication_logs") == [(27,)]


def test_a_validation_in_the_background_prints_its_step_until_it_ends(workspace):
    """Validation runs in the background and prints what it does on each poll, where it used to be silent until
    it ended (five minutes at 10M files). `--tags validate` runs with one more of the guide's queries, on a table
    the test holds with an ACCESS EXCLUSIVE lock (the stage before reads every migrated table): validation waits
    on it while running the queries, and its progress line says so."""
    first = workspace.run()
    assert first.returncode == 0, first.stdout[-4000:]
    workspace.query("CREATE TABLE held_by_test (id int)")
    queries = {"row_counts": "SELECT 'files' AS table_name, count(*) AS row_count FROM public.files",
               "file_distribution": "SELECT primary_node, count(*) AS file_count FROM public.files "
                                    "GROUP BY primary_node ORDER BY primary_node",
               "replication_status": "SELECT status, count(*) AS count FROM public.replication_logs GROUP BY status",
               "held": "SELECT count(*) FROM public.held_by_test"}
    progress = workspace.path / "validation-progress.json"
    holder = psycopg2.connect(host="127.0.0.1", port=workspace.server["port"], user="postgres", password=PASSWORD,
                              dbname=workspace.db)
    lines = []
    try:
        holder.cursor().execute("LOCK TABLE held_by_test IN ACCESS EXCLUSIVE MODE")
        extra = {"migration_progress_interval": 1, "validation_queries": queries,
                 "validation_progress_file": str(progress)}
        run = workspace.run("--tags", "validate", "-e", json.dumps(extra), wait=False)
        reader = threading.Thread(target=lambda: lines.extend(run.stdout), daemon=True)
        reader.start()
        waiting = wait_until(lambda: any("validate: running the queries" in line for line in lines), timeout=120)
        assert waiting, "".join(lines)[-4000:]
        assert workspace.query("SELECT count(*) FROM pg_locks WHERE NOT granted "
                               "AND relation = 'held_by_test'::regclass") == [(1,)]
        assert json.loads(progress.read_text())["phase"] == "running the queries"
    finally:
        holder.close()
    run.wait(timeout=600)
    reader.join(timeout=60)
    output = "".join(lines)
    assert run.returncode == 0, output[-4000:]
    assert "Validation status: completed" in printed_summary(output)
    assert not progress.exists()


def test_drift_in_check_mode_compares_in_the_background_and_writes_nothing(workspace):
    """drift.yml --check still compares (the comparison only reads), now through the background job and its
    polls, which must run in check mode too: it names the table that differs, exits non-zero, writes nothing."""
    first = workspace.run()
    assert first.returncode == 0, first.stdout[-4000:]
    with sqlite3.connect(workspace.source) as connection:
        connection.execute("UPDATE files SET size_bytes = size_bytes + 1 WHERE id = 7")
    connection.close()
    before = workspace.dump()
    drift = workspace.run("--check", "-e", "migration_progress_interval=1", playbook="drift.yml")
    assert drift.returncode != 0
    printed = words(drift.stdout)
    assert "drift: drift found in 1 of 4 tables: table files:" in printed, printed[-3000:]
    assert "id 7 values differ (size_bytes: SQLite" in printed, printed[-3000:]
    assert workspace.dump() == before
