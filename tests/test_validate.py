"""validate() and the sqlite_to_postgres_validate module against a real PostgreSQL.

The FileShareSystem sample is migrated by the engine into the runbook's typed
schema; then PostgreSQL is changed the way a broken migration would leave it
and validation must name exactly what differs. The standby tests attach a
real streaming standby (conftest's ``standby``) to the session's server.
"""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SCHEMA_SQL, execute, migrate_into_typed_schema
from psycopg2 import sql
from sqlite_pg import validate as validate_module
from sqlite_pg.engine import migrate
from sqlite_pg.errors import MigrationError
from sqlite_pg.validate import validate

ROOT = Path(__file__).resolve().parent.parent
GUIDE_QUERIES = {
    "files_per_node": "SELECT primary_node, COUNT(*) FROM files WHERE is_deleted = FALSE GROUP BY primary_node",
    "replication_logs_per_status": "SELECT status, COUNT(*) FROM replication_logs GROUP BY status",
}





@pytest.fixture
def migrated(sample_db, pg_database):
    """(SQLite path, conninfo) of the 125-row sample migrated into the typed schema."""
    migrate_into_typed_schema(sample_db, pg_database)
    return sample_db, pg_database


def sqlite_rows(path, query):
    with sqlite3.connect(path) as connection:
        return connection.execute(query).fetchall()


def test_identical_data_passes_every_check(migrated):
    src, conninfo = migrated
    result = validate(str(src), conninfo, queries=GUIDE_QUERIES)
    assert result["status"] == "completed", result["msg"]
    assert result["msg"].startswith("validation completed: 4 tables, 125 rows")
    counts = {t: sqlite_rows(src, f'SELECT count(*) FROM "{t}"')[0] for t in result["tables"]}  # noqa: S608
    for table, (count,) in counts.items():
        compared = result["tables"][table]
        assert compared["match"] and compared["differences"] == []
        assert compared["sqlite_rows"] == compared["postgres_rows"] == count
        assert compared["sqlite_checksum"] == compared["postgres_checksum"]
    assert sorted(result["tables"]) == ["files", "replication_logs", "storage_nodes", "tasks"]
    expected = dict(sqlite_rows(src, "SELECT primary_node, COUNT(*) FROM files WHERE is_deleted = 0 "
                                     "GROUP BY primary_node"))
    assert {row["primary_node"]: row["count"] for row in result["queries"]["files_per_node"]} == expected
    expected = dict(sqlite_rows(src, "SELECT status, COUNT(*) FROM replication_logs GROUP BY status"))
    assert {row["status"]: row["count"] for row in result["queries"]["replication_logs_per_status"]} == expected
    assert {(fk["table"], fk["references"]) for fk in result["foreign_keys"]} == {
        ("files", "storage_nodes(node_id)"), ("tasks", "files(id)"), ("replication_logs", "files(id)")}
    assert all(fk["validated"] and fk["ok"] for fk in result["foreign_keys"])
    assert {(s["table"], s["column"]) for s in result["sequences"]} == {
        ("files", "id"), ("tasks", "id"), ("replication_logs", "id"), ("storage_nodes", "id")}
    assert all(s["next_value"] > s["max_value"] for s in result["sequences"])
    assert result["replication"]["ok"] and result["replication"]["message"] == "no standbys were expected"


def test_serial_and_parallel_runs_agree(migrated):
    src, conninfo = migrated
    serial, parallel = validate(str(src), conninfo, jobs=1), validate(str(src), conninfo, jobs=3)
    for table in serial["tables"]:
        assert serial["tables"][table]["sqlite_checksum"] == parallel["tables"][table]["sqlite_checksum"]
        assert serial["tables"][table]["postgres_checksum"] == parallel["tables"][table]["postgres_checksum"]


def test_a_changed_value_names_the_key_and_the_column(migrated):
    src, conninfo = migrated
    (before,) = sqlite_rows(src, "SELECT filename FROM files WHERE id = 17")[0]
    execute(conninfo, "UPDATE files SET filename = 'renamed.pdf' WHERE id = 17")
    result = validate(str(src), conninfo)
    assert result["status"] == "failed"
    files = result["tables"]["files"]
    assert not files["match"] and files["sqlite_rows"] == files["postgres_rows"]
    assert files["differences"] == [{"key": 17, "problem": "values differ",
                                     "columns": {"filename": {"sqlite": before, "postgres": "renamed.pdf"}}}]
    assert all(result["tables"][table]["match"] for table in ("storage_nodes", "tasks", "replication_logs"))
    assert "table files" in result["msg"] and "id 17" in result["msg"] and "filename" in result["msg"]
    assert "\n" not in result["msg"]


def test_a_changed_json_document_is_named_even_when_its_text_looks_alike(migrated):
    src, conninfo = migrated
    (key,) = sqlite_rows(src, "SELECT min(id) FROM files WHERE metadata LIKE '%\"client\"%'")[0]
    execute(conninfo, "UPDATE files SET metadata = jsonb_set(metadata, '{client,name}', '\"other\"') WHERE id = %s",
            (key,))
    result = validate(str(src), conninfo)
    assert [(d["key"], list(d["columns"])) for d in result["tables"]["files"]["differences"]] == [(key, ["metadata"])]


def test_a_deleted_row_is_counted_and_named(migrated):
    src, conninfo = migrated
    execute(conninfo, "DELETE FROM replication_logs WHERE id = 5")
    result = validate(str(src), conninfo)
    logs = result["tables"]["replication_logs"]
    assert (logs["sqlite_rows"], logs["postgres_rows"]) == (27, 26)
    assert logs["differences"] == [{"key": 5, "problem": "missing in PostgreSQL"}]
    assert "table replication_logs: 27 rows in SQLite, 26 in PostgreSQL; id 5 missing in PostgreSQL" in result["msg"]


def test_an_extra_row_is_counted_and_named(migrated):
    src, conninfo = migrated
    execute(conninfo, "INSERT INTO storage_nodes (id, node_id, hostname) VALUES (1000, 'node-x', 'x.internal')")
    result = validate(str(src), conninfo)
    nodes = result["tables"]["storage_nodes"]
    assert (nodes["sqlite_rows"], nodes["postgres_rows"]) == (3, 4)
    assert nodes["differences"] == [{"key": 1000, "problem": "not in SQLite"}]
    assert result["status"] == "failed"


def test_differences_are_located_across_many_key_ranges(tmp_path, pg_database, monkeypatch):
    src = tmp_path / "sample-2000.db"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_db.py"), "--out", str(src), "--files", "2000",
                    "--quiet"], check=True)
    migrate_into_typed_schema(src, pg_database)
    # Small units and buckets, so the 2,000-row tables span many of both.
    monkeypatch.setattr(validate_module, "ROWS_PER_UNIT", 150)
    monkeypatch.setattr(validate_module, "BUCKETS_PER_TABLE", 64)
    assert validate(str(src), pg_database, jobs=2)["status"] == "completed"
    execute(pg_database, "UPDATE tasks SET priority = priority + 1 WHERE id IN (977, 1501)")
    execute(pg_database, "UPDATE files SET is_deleted = NOT is_deleted WHERE id = 1234")
    execute(pg_database, "DELETE FROM replication_logs WHERE id = 3")
    result = validate(str(src), pg_database, jobs=2)
    differences = {table: [(d["key"], d["problem"], sorted(d.get("columns", ()))) for d in compared["differences"]]
                   for table, compared in result["tables"].items()}
    assert differences == {
        "files": [(1234, "values differ", ["is_deleted"])],
        "tasks": [(977, "values differ", ["priority"]), (1501, "values differ", ["priority"])],
        "replication_logs": [(3, "missing in PostgreSQL", [])],
        "storage_nodes": [],
    }


def test_max_differences_caps_the_report(migrated):
    src, conninfo = migrated
    execute(conninfo, "UPDATE tasks SET retries = retries + 1")
    result = validate(str(src), conninfo, max_differences=3)
    assert [d["key"] for d in result["tables"]["tasks"]["differences"]] == [1, 2, 3]


def drop_foreign_keys(conninfo, table):
    for (name,) in execute(conninfo, "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass "
                                     "AND contype = 'f'", (table,)):
        execute(conninfo, sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            sql.Identifier(table), sql.Identifier(name)))


def test_an_orphan_row_without_a_constraint_is_found(migrated):
    src, conninfo = migrated
    drop_foreign_keys(conninfo, "tasks")
    execute(conninfo, "UPDATE tasks SET file_id = 999999 WHERE id = 4")
    result = validate(str(src), conninfo)
    [orphaned] = [fk for fk in result["foreign_keys"] if fk["table"] == "tasks"]
    assert orphaned["constraint"] is None and orphaned["orphans"] == 1 and not orphaned["ok"]
    assert orphaned["orphan_rows"] == [{"id": 4, "file_id": 999999}]
    assert "tasks(file_id) -> files(id)" in result["msg"] and "id 4 file_id 999999" in result["msg"]


def test_a_not_valid_constraint_fails_and_counts_its_orphans(migrated):
    src, conninfo = migrated
    drop_foreign_keys(conninfo, "replication_logs")
    execute(conninfo, "UPDATE replication_logs SET file_id = 888888 WHERE id IN (2, 3)")
    execute(conninfo, "ALTER TABLE replication_logs ADD CONSTRAINT logs_file_fk FOREIGN KEY (file_id) "
                      "REFERENCES files (id) NOT VALID")
    result = validate(str(src), conninfo)
    [constraint] = [fk for fk in result["foreign_keys"] if fk["constraint"] == "logs_file_fk"]
    assert not constraint["validated"] and constraint["orphans"] == 2 and not constraint["ok"]
    assert [row["id"] for row in constraint["orphan_rows"]] == [2, 3]
    assert "foreign key logs_file_fk on replication_logs(file_id) is NOT VALID (2 orphan rows)" in result["msg"]


def test_a_sequence_behind_the_data_is_found(migrated):
    src, conninfo = migrated
    execute(conninfo, "SELECT setval(pg_get_serial_sequence('files', 'id'), 30)")
    result = validate(str(src), conninfo)
    [files_id] = [s for s in result["sequences"] if s["table"] == "files"]
    assert (files_id["next_value"], files_id["max_value"], files_id["ok"]) == (31, 50, False)
    assert all(s["ok"] for s in result["sequences"] if s["table"] != "files")
    assert "of files.id would give 31 next, not past max(id) = 50" in result["msg"]


def test_queries_run_read_only_and_a_failing_one_fails_validation(migrated):
    src, conninfo = migrated
    result = validate(str(src), conninfo, queries={
        "nodes": "SELECT node_id FROM storage_nodes ORDER BY node_id",
        "write": "DELETE FROM tasks",
        "typo": "SELECT no_such_column FROM files",
    })
    assert result["queries"]["nodes"] == [{"node_id": n} for (n,) in sqlite_rows(
        src, "SELECT node_id FROM storage_nodes ORDER BY node_id")]
    assert execute(conninfo, "SELECT count(*) FROM tasks") == [(45,)]
    assert "query write failed: cannot execute DELETE in a read-only transaction" in result["msg"]
    assert "query typo failed" in result["msg"] and result["status"] == "failed"


def test_the_source_timezone_must_be_the_migrations(tmp_path, pg_database):
    src = tmp_path / "local.db"
    with sqlite3.connect(src) as connection:
        connection.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, at DATETIME)")
        connection.executemany("INSERT INTO events VALUES (?, ?)", [(1, "2024-03-31 01:30:00"),
                                                                   (2, "2024-07-01 12:00:00.250000")])
    connection.close()
    execute(pg_database, "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz)")
    migrate(str(src), pg_database, create_tables=False, jobs=1, source_timezone="Europe/Berlin")
    assert validate(str(src), pg_database, source_timezone="Europe/Berlin")["status"] == "completed"
    result = validate(str(src), pg_database, source_timezone="UTC")
    assert [(d["key"], list(d["columns"])) for d in result["tables"]["events"]["differences"]] == [
        (1, ["at"]), (2, ["at"])]


def test_text_that_is_not_utf8_is_reported_not_fatal(tmp_path, pg_database):
    src = tmp_path / "latin1.db"
    with sqlite3.connect(src) as connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        connection.execute("INSERT INTO notes VALUES (1, 'fine'), (2, CAST(X'6361666589' AS TEXT))")
    connection.close()
    execute(pg_database, "CREATE TABLE notes (id bigint PRIMARY KEY, body text)")
    execute(pg_database, "INSERT INTO notes VALUES (1, 'fine'), (2, 'café')")
    result = validate(str(src), pg_database)
    [difference] = result["tables"]["notes"]["differences"]
    assert difference["key"] == 2 and list(difference["columns"]) == ["body"]
    assert difference["columns"]["body"]["postgres"] == "café"


def test_a_missing_table_or_column_is_named(migrated):
    src, conninfo = migrated
    execute(conninfo, "ALTER TABLE tasks DROP COLUMN error_message")
    execute(conninfo, "DROP TABLE replication_logs")
    result = validate(str(src), conninfo)
    assert "table replication_logs is missing in PostgreSQL schema public" in result["msg"]
    assert "table tasks: column error_message missing in PostgreSQL" in result["msg"]
    assert result["tables"]["files"]["match"]
    missing = result["tables"]["replication_logs"]
    assert (missing["match"], missing["sqlite_rows"], missing["postgres_rows"]) == (False, 27, None)
    assert set(missing) >= set(result["tables"]["files"])


def test_rows_the_migration_rejected_are_left_out_with_its_reject_file(sample_db, pg_database, tmp_path):
    with sqlite3.connect(sample_db) as connection:
        connection.execute("UPDATE tasks SET created_at = 'yesterday' WHERE id IN (7, 9)")
    connection.close()
    pre_data = SCHEMA_SQL.read_text().split("-- section: post-data")[0].split("-- section: pre-data")[1]
    execute(pg_database, pre_data)
    rejects = tmp_path / "rejects.jsonl"
    migrate(str(sample_db), pg_database, create_tables=False, on_invalid="reject", max_rejects=5,
            reject_file=str(rejects))
    without = validate(str(sample_db), pg_database)
    assert [d["key"] for d in without["tables"]["tasks"]["differences"]] == [7, 9]
    result = validate(str(sample_db), pg_database, reject_file=str(rejects))
    assert result["status"] == "completed", result["msg"]
    tasks = result["tables"]["tasks"]
    assert (tasks["sqlite_rows"], tasks["postgres_rows"], tasks["rejected_rows"]) == (43, 43, 2)
    assert result["tables"]["files"]["rejected_rows"] == 0


def test_tables_without_an_integer_key_or_rows_are_still_compared(tmp_path, pg_database):
    src = tmp_path / "keys.db"
    with sqlite3.connect(src) as connection:
        connection.execute("CREATE TABLE tags (name TEXT PRIMARY KEY, weight INTEGER)")
        connection.executemany("INSERT INTO tags VALUES (?, ?)", [("a", 1), ("b", 2)])
        connection.execute("CREATE TABLE empty (id INTEGER PRIMARY KEY, note TEXT)")
    connection.close()
    execute(pg_database, "CREATE TABLE tags (name text PRIMARY KEY, weight integer)")
    execute(pg_database, "CREATE TABLE empty (id bigint PRIMARY KEY, note text)")
    execute(pg_database, "INSERT INTO tags VALUES ('a', 1), ('b', 2)")
    result = validate(str(src), pg_database)
    assert result["status"] == "completed", result["msg"]
    assert result["tables"]["empty"]["sqlite_rows"] == result["tables"]["empty"]["postgres_rows"] == 0
    assert result["tables"]["tags"]["key"] is None
    execute(pg_database, "UPDATE tags SET weight = 3 WHERE name = 'b'")
    result = validate(str(src), pg_database)
    assert not result["tables"]["tags"]["match"] and result["tables"]["tags"]["differences"] == []
    assert ("table tags: content checksums differ; the table has no single-column integer primary key to locate "
            "the differing rows by") in result["msg"]


def test_problems_that_stop_validation_are_one_line(migrated, tmp_path):
    src, conninfo = migrated
    with pytest.raises(MigrationError, match=r"^source .*nowhere\.db does not exist$"):
        validate(str(tmp_path / "nowhere.db"), conninfo)
    with pytest.raises(MigrationError, match=r"has no table not_there"):
        validate(str(src), conninfo, tables=["not_there"])
    with pytest.raises(MigrationError, match=r"source_timezone: unknown time zone"):
        validate(str(src), conninfo, source_timezone="Mars/Olympus")
    wrong = dict(conninfo, password="not-the-password")
    with pytest.raises(MigrationError) as raised:
        validate(str(src), wrong)
    assert "password authentication failed" in str(raised.value) and "\n" not in str(raised.value)
    assert "not-the-password" not in str(raised.value)


# --- Standbys -------------------------------------------------------------------------------------

def test_no_standbys_expected_passes_at_once(migrated):
    src, conninfo = migrated
    replication = validate(str(src), conninfo, expected_standbys=0)["replication"]
    assert replication["ok"] and replication["message"] == "no standbys were expected"
    assert replication["lsn"].count("/") == 1


def test_an_expected_standby_that_never_connects_fails_after_the_timeout(migrated):
    src, conninfo = migrated
    result = validate(str(src), conninfo, expected_standbys=1, standby_timeout=1, poll_interval=0.2)
    assert result["status"] == "failed" and not result["replication"]["ok"]
    assert result["msg"] == "validation failed: 0 of 1 expected standbys connected to the leader after 1 s"


def test_a_caught_up_standby_passes_with_its_lag(migrated, standby):
    src, conninfo = migrated
    result = validate(str(src), conninfo, expected_standbys=1, standby_timeout=60, poll_interval=0.2)
    assert result["status"] == "completed", result["msg"]
    [replica] = result["replication"]["standbys"]
    assert replica["name"] == "validate-standby" and replica["caught_up"] and replica["lag_bytes"] == 0
    assert result["replication"]["message"] == f"1 standbys have replayed {result['replication']['lsn']}"


def test_a_standby_that_stopped_replaying_is_named(migrated, standby):
    src, conninfo = migrated
    assert validate(str(src), conninfo, expected_standbys=1, standby_timeout=60)["status"] == "completed"
    execute(standby, "SELECT pg_wal_replay_pause()")
    try:
        execute(conninfo, "CREATE TABLE written_after_the_pause AS SELECT generate_series(1, 1000) AS n")
        result = validate(str(src), conninfo, tables=["storage_nodes"], expected_standbys=1, standby_timeout=1,
                          poll_interval=0.2)
    finally:
        execute(standby, "SELECT pg_wal_replay_resume()")
    [replica] = result["replication"]["standbys"]
    assert not replica["caught_up"] and replica["lag_bytes"] > 0
    assert result["status"] == "failed"
    assert f"standby validate-standby (replayed {replica['replay_lsn']}, {replica['lag_bytes']} bytes behind) had " \
           f"not replayed {result['replication']['lsn']} after 1 s" in result["msg"]


# --- Drift: the live source changed after the migration ----------------------------------------

def change_source(path, *statements):
    with sqlite3.connect(path) as connection:
        for statement in statements:
            connection.execute(statement)
    connection.close()


def test_a_clean_target_has_no_drift(migrated):
    src, conninfo = migrated
    result = validate(str(src), conninfo, drift=True)
    assert result["status"] == "completed", result["msg"]
    assert set(result["drift"]) == {"files", "storage_nodes", "tasks", "replication_logs"}
    for table, drift in result["drift"].items():
        assert drift["status"] == "ok" and drift["differing_ranges"] == [] and drift["first_differing_keys"] == []
        assert drift["source_rows"] == drift["target_rows"] == result["tables"][table]["sqlite_rows"]


def test_drift_names_the_inserted_updated_and_deleted_source_rows(migrated):
    src, conninfo = migrated
    change_source(src,
                  "INSERT INTO replication_logs (id, file_id, source_node, target_node, status, bytes_transferred, "
                  "created_at) VALUES (1000, 1, 'node-01', 'node-02', 'pending', 0, '2024-06-01 00:00:00')",
                  "UPDATE replication_logs SET status = 'failed', bytes_transferred = 7 WHERE id = 3",
                  "DELETE FROM replication_logs WHERE id = 12",
                  "UPDATE files SET filename = 'changed.pdf' WHERE id = 20")
    before = execute(conninfo, "SELECT count(*) FROM replication_logs")
    result = validate(str(src), conninfo, drift=True)
    assert result["status"] == "drift", result["msg"]
    assert result["msg"].startswith("drift found in 2 of 4 tables: ")
    logs = result["drift"]["replication_logs"]
    assert logs["status"] == "drift" and (logs["source_rows"], logs["target_rows"]) == (27, 27)
    assert logs["first_differing_keys"] == [
        {"key": {"id": 3}, "problem": "values differ", "columns": ["bytes_transferred", "status"]},
        {"key": {"id": 12}, "problem": "not in SQLite", "columns": []},
        {"key": {"id": 1000}, "problem": "missing in PostgreSQL", "columns": []}]
    assert all(low <= high for low, high in logs["differing_ranges"])
    for key in (3, 12, 1000):
        assert any(low <= key <= high for low, high in logs["differing_ranges"]), key
    assert logs["differing_range_count"] == len(logs["differing_ranges"])
    files = result["drift"]["files"]
    assert files["first_differing_keys"] == [{"key": {"id": 20}, "problem": "values differ", "columns": ["filename"]}]
    assert result["drift"]["tasks"]["status"] == result["drift"]["storage_nodes"]["status"] == "ok"
    assert execute(conninfo, "SELECT count(*) FROM replication_logs") == before  # nothing written


def test_without_drift_mode_the_same_change_fails_validation(migrated):
    src, conninfo = migrated
    change_source(src, "DELETE FROM replication_logs WHERE id = 12")
    result = validate(str(src), conninfo)
    assert result["status"] == "failed" and result["drift"]["replication_logs"]["status"] == "drift"
    assert "id 12 not in SQLite" in result["msg"]


def test_drift_mode_still_fails_on_what_is_not_drift(migrated):
    src, conninfo = migrated
    change_source(src, "UPDATE files SET filename = 'changed.pdf' WHERE id = 20")
    execute(conninfo, "SELECT setval(pg_get_serial_sequence('tasks', 'id'), 1)")
    result = validate(str(src), conninfo, drift=True)
    assert result["status"] == "failed" and result["drift"]["files"]["status"] == "drift"
    assert "sequence" in result["msg"]


# --- The Ansible module ---------------------------------------------------------------------------

def run_module(arguments, *options):
    """``ansible localhost -m sqlite_to_postgres_validate`` from the repository; (exit code, result, output)."""
    # JSON alone on stdout: the enabled callbacks replaced, so no profile_tasks timing (ansible.cfg) follows it.
    environment = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
                       ANSIBLE_CALLBACKS_ENABLED="ansible.builtin.json")
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "localhost", "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}", "-m", "sqlite_to_postgres_validate",
         "-a", json.dumps(arguments), *options],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    output = completed.stdout + completed.stderr
    result = json.loads(completed.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    return completed.returncode, result, output


def module_arguments(src, conninfo, **extra):
    return dict(src=str(src), login_host=conninfo["host"], login_port=conninfo["port"], login_user=conninfo["user"],
                login_password=conninfo["password"], login_db=conninfo["dbname"], **extra)


def test_the_module_returns_the_comparison(migrated):
    src, conninfo = migrated
    code, result, output = run_module(module_arguments(src, conninfo, queries=GUIDE_QUERIES), "--check")
    assert code == 0, result.get("msg")
    assert result["status"] == "completed" and result["changed"] is False
    assert set(result) >= {"tables", "foreign_keys", "sequences", "queries", "replication", "msg"}
    assert set(result["tables"]["files"]) >= {"sqlite_rows", "postgres_rows", "sqlite_checksum", "postgres_checksum",
                                              "match", "seconds", "differences"}
    assert set(result["queries"]) == set(GUIDE_QUERIES)
    assert conninfo["password"] not in output


def test_the_module_fails_on_a_mismatch(migrated):
    src, conninfo = migrated
    execute(conninfo, "UPDATE tasks SET status = 'failed' WHERE id = 2")
    code, result, output = run_module(module_arguments(src, conninfo))
    assert code != 0 and result["failed"] and result["status"] == "failed" and result["changed"] is False
    assert result["tables"]["tasks"]["differences"][0]["key"] == 2
    assert "table tasks" in result["msg"] and "id 2 values differ (status:" in result["msg"]
    assert conninfo["password"] not in output


def test_the_module_fails_in_one_line_without_the_password(migrated):
    src, conninfo = migrated
    arguments = module_arguments(src, conninfo)
    arguments["login_password"] = "wrong-" + conninfo["password"]
    code, result, output = run_module(arguments)
    assert code != 0 and "password authentication failed" in result["msg"] and "\n" not in result["msg"]
    assert arguments["login_password"] not in output


def test_the_module_reports_drift_without_failing(migrated):
    src, conninfo = migrated
    change_source(src, "DELETE FROM replication_logs WHERE id = 12")
    code, result, output = run_module(module_arguments(src, conninfo, drift=True), "--check")
    assert code == 0, result.get("msg")
    assert result["status"] == "drift" and result["changed"] is False and not result.get("failed")
    assert result["drift"]["replication_logs"]["first_differing_keys"] == [
        {"key": {"id": 12}, "problem": "not in SQLite", "columns": []}]
    assert conninfo["password"] not in output
