"""A validation that starts from an earlier one (the cutover's window) against a real PostgreSQL.

A 5,000-file sample is migrated and validated in full; the SQLite file is then
changed by scripts/measure_sync.py's change_rows (inserts, updates and deletes
in all four tables) and synced by migrate(). The validation given the first
one's baseline and the sync's changed keys must compare only those keys, find
both sides equal, and still find what anyone else wrote to the target since:
a changed row, an inserted one, a deleted one, each named by its key.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import execute, migrate_into_typed_schema
from sqlite_pg.engine import migrate
from sqlite_pg.names import intervals_from_text
from sqlite_pg.validate import validate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from measure_sync import change_rows  # noqa: E402

FILES = 5000


@pytest.fixture(scope="module")
def larger_sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("window") / "fileshare.db"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_db.py"), "--files", str(FILES),
                    "--out", str(path), "--quiet"], check=True)
    return path


@pytest.fixture
def synced(larger_sample, tmp_path, pg_database):
    """(source, conninfo, the full validation's baseline, the sync's tables) after a 1 % change and its sync."""
    src = tmp_path / "fileshare.db"
    src.write_bytes(larger_sample.read_bytes())
    migrate_into_typed_schema(src, pg_database)
    first = migrate(str(src), pg_database, create_tables=False)
    full = validate(str(src), pg_database, source_id=first["source_id"])
    assert full["status"] == "completed" and full["baseline"]["source_id"] == first["source_id"]
    change_rows(str(src), fraction=0.01)
    second = migrate(str(src), pg_database, create_tables=False)
    assert {t["action"] for t in second["tables"].values()} == {"synced"}
    assert all(t["changed_keys"]["since"] == first["source_id"] for t in second["tables"].values())
    return src, pg_database, full["baseline"], second["tables"]


def narrowed_validation(synced):
    src, conninfo, baseline, tables = synced
    return validate(str(src), conninfo, baseline=baseline, changed_keys=tables)


def test_only_the_changed_keys_are_compared_and_found_equal(synced):
    src, conninfo, _baseline, tables = synced
    result = narrowed_validation(synced)
    assert result["status"] == "completed", result["msg"]
    assert {t["compared"]["keys"] for t in result["tables"].values()} == {"changed since the baseline"}
    # (files: retiring one of the sample's three storage nodes moved a third of them)
    for table in ("tasks", "replication_logs"):
        entry = result["tables"][table]
        assert 0 < entry["compared"]["rows"] < entry["sqlite_rows"] / 2
        assert entry["sqlite_rows"] == entry["postgres_rows"] == execute(
            conninfo, f"SELECT count(*) FROM {table}")[0][0]  # noqa: S608
    assert "compared on the" in result["msg"]
    # The same source compared in full agrees.
    assert validate(str(src), conninfo)["status"] == "completed"


def a_clean_key(synced, table):
    """A key of ``table`` no changed interval covers (the sync did not touch it)."""
    _src, conninfo, _baseline, tables = synced
    intervals = intervals_from_text(tables[table]["changed_keys"]["keys"])
    for (key,) in execute(conninfo, f"SELECT id FROM {table} ORDER BY id"):  # noqa: S608
        if not any(low <= key <= high for low, high in intervals):
            return key
    raise AssertionError(f"every key of {table} is in a changed interval")


def test_a_row_changed_in_the_target_outside_the_changed_keys_is_named(synced):
    key = a_clean_key(synced, "files")
    execute(synced[1], "UPDATE files SET filename = 'changed-behind-the-sync' WHERE id = %s", (key,))
    result = narrowed_validation(synced)
    assert result["status"] == "failed"
    assert f"table files: content checksums differ; id {key} values differ (filename:" in result["msg"]


def test_a_row_inserted_in_the_target_outside_the_changed_keys_is_named(synced):
    key = a_clean_key(synced, "tasks")
    execute(synced[1], "INSERT INTO tasks SELECT (SELECT max(id) + 1000 FROM tasks), gen_random_uuid(), task_type, "
            "file_id, status, priority, payload, result, error_message, retries, created_at, started_at, "
            "completed_at FROM tasks WHERE id = %s", (key,))
    result = narrowed_validation(synced)
    assert result["status"] == "failed"
    assert "not in SQLite" in result["msg"] and "table tasks" in result["msg"]


def test_a_row_deleted_from_the_target_outside_the_changed_keys_is_named(synced):
    key = a_clean_key(synced, "replication_logs")
    execute(synced[1], "DELETE FROM replication_logs WHERE id = %s", (key,))
    result = narrowed_validation(synced)
    assert result["status"] == "failed"
    assert f"id {key} missing in PostgreSQL" in result["msg"]
    # Unequal counts made it compare every row of that table.
    assert result["tables"]["replication_logs"]["compared"]["keys"] == "all"


def test_a_baseline_of_another_snapshot_compares_everything(synced):
    src, conninfo, baseline, tables = synced
    result = validate(str(src), conninfo, baseline=dict(baseline, source_id="another"), changed_keys=tables)
    assert result["status"] == "completed"
    assert {t["compared"]["keys"] for t in result["tables"].values()} == {"all"}


def test_a_row_a_subtransaction_wrote_while_the_baseline_was_taken_is_named(synced):
    """The baseline's snapshot lists running transactions, not their subtransactions: a row written in a
    savepoint of a transaction still open while the baseline was read must count as written since."""
    import psycopg2

    src, conninfo, _baseline, _tables = synced
    key = a_clean_key(synced, "files")
    writer = psycopg2.connect(**conninfo)
    try:
        with writer.cursor() as cursor:
            cursor.execute("SELECT pg_current_xact_id()")  # the top-level xid, then a subtransaction's
            cursor.execute("SAVEPOINT behind")
            cursor.execute("UPDATE files SET filename = 'written-in-a-savepoint' WHERE id = %s", (key,))
        # A later transaction that ends first: the snapshot's xmax then lies above the subtransaction's xid.
        execute(conninfo, "SELECT pg_current_xact_id()")
        rerun = migrate(str(src), conninfo, create_tables=False)
        assert {t["action"] for t in rerun["tables"].values()} == {"skipped"}
        baseline = validate(str(src), conninfo, source_id=rerun["source_id"])["baseline"]
        assert baseline is not None, "the open transaction's change is not visible: the baseline must pass"
        writer.commit()
    finally:
        writer.close()
    result = validate(str(src), conninfo, baseline=baseline, changed_keys=rerun["tables"])
    assert result["status"] == "failed"
    assert f"id {key} values differ (filename:" in result["msg"]
