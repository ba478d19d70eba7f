"""scripts/make_sample_db.py: the sample FileShareSystem database, run as operators run it."""

import hashlib
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_sample_db.py"

# The FileShareSystem application's schema, kept here independently of the
# script so that any drift in the script's copy fails this test.
CONTRACT = """\
CREATE TABLE storage_nodes (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id         VARCHAR(64) NOT NULL UNIQUE,
    hostname        VARCHAR(255) NOT NULL,
    port            INTEGER NOT NULL DEFAULT 8080,
    capacity_bytes  BIGINT NOT NULL DEFAULT 0,
    used_bytes      BIGINT NOT NULL DEFAULT 0,
    status          VARCHAR(20) NOT NULL DEFAULT 'online',
    is_active       BOOLEAN NOT NULL DEFAULT 1,
    last_heartbeat  DATETIME,
    created_at      DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE files (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    file_uuid       VARCHAR(36) NOT NULL UNIQUE,
    filename        VARCHAR(255) NOT NULL,
    original_name   TEXT,
    size_bytes      BIGINT NOT NULL DEFAULT 0,
    mime_type       VARCHAR(127),
    checksum_sha256 CHAR(64),
    owner_id        VARCHAR(64),
    primary_node    VARCHAR(64) REFERENCES storage_nodes(node_id),
    replica_nodes   TEXT,              -- JSON array of node_id
    storage_path    TEXT,
    share_token     VARCHAR(64) UNIQUE,
    download_count  INTEGER NOT NULL DEFAULT 0,
    expires_at      DATETIME,
    is_deleted      BOOLEAN NOT NULL DEFAULT 0,
    metadata        TEXT,              -- JSON object
    created_at      DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at      DATETIME
);
CREATE INDEX ix_files_primary_node ON files(primary_node);
CREATE INDEX ix_files_owner ON files(owner_id);
CREATE TABLE tasks (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    task_uuid       VARCHAR(36) NOT NULL UNIQUE,
    task_type       VARCHAR(50) NOT NULL,
    file_id         INTEGER REFERENCES files(id),
    status          VARCHAR(20) NOT NULL DEFAULT 'pending',
    priority        INTEGER NOT NULL DEFAULT 5,
    payload         TEXT,              -- JSON
    result          TEXT,              -- JSON
    error_message   TEXT,
    retries         INTEGER NOT NULL DEFAULT 0,
    created_at      DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    started_at      DATETIME,
    completed_at    DATETIME
);
CREATE INDEX ix_tasks_status ON tasks(status);
CREATE TABLE replication_logs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id           INTEGER NOT NULL REFERENCES files(id),
    source_node       VARCHAR(64) NOT NULL,
    target_node       VARCHAR(64) NOT NULL,
    status            VARCHAR(20) NOT NULL DEFAULT 'pending',
    bytes_transferred BIGINT NOT NULL DEFAULT 0,
    duration_ms       REAL,
    error_message     TEXT,
    created_at        DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    completed_at      DATETIME
);
CREATE INDEX ix_replication_logs_file ON replication_logs(file_id);
"""
TABLES = ("storage_nodes", "files", "tasks", "replication_logs")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
SQLALCHEMY_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}$")
DATETIME_COLUMNS = {
    "storage_nodes": ("last_heartbeat", "created_at"),
    "files": ("expires_at", "created_at", "updated_at"),
    "tasks": ("created_at", "started_at", "completed_at"),
    "replication_logs": ("created_at", "completed_at"),
}


def make(*args, check=True):
    return subprocess.run([sys.executable, str(SCRIPT), "--quiet", *args],
                          capture_output=True, text=True, check=check)


def counts(path):
    with sqlite3.connect(path) as db:
        return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}  # noqa: S608


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "thousand.db"
    make("--files", "1000", "--out", str(path))
    return path


def test_default_sample_is_the_guides_125_rows(tmp_path):
    path = tmp_path / "fileshare.db"
    make("--out", str(path))
    assert counts(path) == {"storage_nodes": 3, "files": 50, "tasks": 45, "replication_logs": 27}


def test_default_output_is_fileshare_db_in_the_working_directory(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--quiet"], cwd=tmp_path, check=True)
    assert counts(tmp_path / "fileshare.db")["files"] == 50


def test_schema_is_the_application_contract(thousand):
    with sqlite3.connect(thousand) as db:
        stored = [sql for (sql,) in db.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name <> 'sqlite_sequence' ORDER BY rowid")]
    expected = [statement for statement in CONTRACT.split(";\n") if statement.strip()]
    assert stored == expected


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first, second, other = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "c.db"
    make("--files", "300", "--seed", "7", "--out", str(first))
    make("--files", "300", "--seed", "7", "--out", str(second))
    make("--files", "300", "--seed", "8", "--out", str(other))
    assert sha256(first) == sha256(second)
    assert sha256(first) != sha256(other)


def test_proportions_follow_files(thousand):
    assert counts(thousand) == {"storage_nodes": 3, "files": 1000, "tasks": 900, "replication_logs": 540}


def test_large_samples_have_twelve_storage_nodes(tmp_path):
    path = tmp_path / "large.db"
    make("--files", "10000", "--out", str(path))
    assert counts(path) == {"storage_nodes": 12, "files": 10000, "tasks": 9000, "replication_logs": 5400}


def test_referential_integrity_holds(thousand):
    with sqlite3.connect(thousand) as db:
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        # replication_logs names nodes without a foreign key; they must exist all the same.
        assert db.execute("""
            SELECT count(*) FROM replication_logs
            WHERE source_node NOT IN (SELECT node_id FROM storage_nodes)
               OR target_node NOT IN (SELECT node_id FROM storage_nodes)
               OR source_node = target_node""").fetchone()[0] == 0


def test_values_look_like_the_applications(thousand):
    with sqlite3.connect(thousand) as db:
        def one(sql):
            return db.execute(sql).fetchone()[0]

        for table, columns in DATETIME_COLUMNS.items():
            for column in columns:
                values = [v for (v,) in db.execute(f"SELECT {column} FROM {table}")]  # noqa: S608
                assert all(v is None or SQLALCHEMY_DATETIME.match(v) for v in values), (table, column)
        for table, column in (("files", "replica_nodes"), ("files", "metadata"),
                              ("tasks", "payload"), ("tasks", "result")):
            parsed = [json.loads(v) for (v,) in db.execute(f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL")]  # noqa: S608
            assert parsed, (table, column)
            assert one(f"SELECT count(*) FROM {table} WHERE {column} IS NULL") > 0, (table, column)  # noqa: S608
        nodes = {n for (n,) in db.execute("SELECT node_id FROM storage_nodes")}
        replicas = [json.loads(v) for (v,) in db.execute(
            "SELECT replica_nodes FROM files WHERE replica_nodes IS NOT NULL")]
        assert all(isinstance(r, list) and set(r) <= nodes for r in replicas)
        assert any(isinstance(v, dict) for m in db.execute("SELECT metadata FROM files WHERE metadata IS NOT NULL")
                   for v in json.loads(m[0]).values()), "some metadata is nested"
        assert one("SELECT count(*) FROM files WHERE size_bytes > 2147483647") > 0
        uuids = [u for (u,) in db.execute("SELECT file_uuid FROM files UNION ALL SELECT task_uuid FROM tasks")]
        assert all(UUID4.match(u) for u in uuids) and len(set(uuids)) == len(uuids)
        hex_digits = [(len(v), set(v) <= set("0123456789abcdef")) for (v,) in db.execute(
            "SELECT checksum_sha256 FROM files WHERE checksum_sha256 IS NOT NULL "
            "UNION ALL SELECT share_token FROM files WHERE share_token IS NOT NULL")]
        assert {length for length, _ in hex_digits} == {32, 64} and all(digits for _, digits in hex_digits)
        assert one("SELECT count(*) FROM files WHERE filename <> file_uuid || substr(filename, 37)") == 0
        assert one("SELECT count(*) FROM files WHERE storage_path <> '/data/' || primary_node || '/' || "
                   "substr(file_uuid, 1, 2) || '/' || substr(file_uuid, 3, 2) || '/' || file_uuid") == 0
        assert one("SELECT count(*) FROM replication_logs WHERE bytes_transferred > 2147483647") > 0
        assert one("SELECT count(*) FROM files WHERE is_deleted NOT IN (0, 1)") == 0
        assert one("SELECT count(*) FROM files WHERE is_deleted = 1") > 0
        assert one("SELECT count(*) FROM replication_logs WHERE duration_ms <> CAST(duration_ms AS INTEGER)") > 0
        names = [n for (n,) in db.execute("SELECT original_name FROM files WHERE original_name IS NOT NULL")]
        assert any(re.search(r"[àéïñöü]", n) for n in names)
        assert any(re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", n) for n in names)
        assert any(re.search(r"[\U0001F300-\U0001FAFF]", n) for n in names)
        errors = [e for (e,) in db.execute(
            "SELECT error_message FROM tasks WHERE error_message IS NOT NULL "
            "UNION ALL SELECT error_message FROM replication_logs WHERE error_message IS NOT NULL")]
        for character in ("\t", "\n", '"', "'", "\\"):
            assert any(character in e for e in errors), repr(character)
        assert {s for (s,) in db.execute("SELECT DISTINCT status FROM tasks")} == {
            "pending", "running", "completed", "failed"}
        assert {s for (s,) in db.execute("SELECT DISTINCT task_type FROM tasks")} == {
            "thumbnail", "replicate", "virus_scan", "checksum"}
        assert {s for (s,) in db.execute("SELECT DISTINCT status FROM replication_logs")} == {
            "pending", "in_progress", "completed", "failed"}
        assert {s for (s,) in db.execute("SELECT DISTINCT status FROM storage_nodes")} <= {
            "online", "offline", "degraded"}


def test_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "fileshare.db"
    path.write_bytes(b"precious")
    refused = make("--out", str(path), check=False)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "already exists" in refused.stderr and str(path) in refused.stderr
    assert path.read_bytes() == b"precious"
    make("--out", str(path), "--force")
    assert counts(path)["files"] == 50
    assert not Path(f"{path}.partial").exists()


@pytest.mark.parametrize("args, named", [
    (["--files", "0"], "--files"),
    (["--files", "many"], "--files"),
    (["--seed", "-1"], "--seed"),
    (["--out", "/nonexistent-directory/fileshare.db"], "/nonexistent-directory"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, named):
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and named in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "fileshare.db").exists()
