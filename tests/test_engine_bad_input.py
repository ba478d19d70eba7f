"""Bad input fails closed: one line naming what and where, the target exactly as it was, the source untouched."""

import json
import shutil
import sqlite3

import psycopg2
import pytest
from conftest import assert_same_content, build_sqlite, file_digests, target_snapshot
from sqlite_pg import MigrationError, migrate


def fails_closed(src, conninfo, *fragments, **options):
    """Run, expect a one-line MigrationError holding every fragment; check nothing changed anywhere."""
    before_target = target_snapshot(conninfo)
    before_source = file_digests(src)
    with pytest.raises(MigrationError) as failure:
        migrate(str(src), conninfo, **options)
    message = str(failure.value)
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message
    assert target_snapshot(conninfo) == before_target
    assert file_digests(src) == before_source
    assert failure.value.result["status"] == "failed"
    return message


def test_missing_file(tmp_path, pg_database):
    missing = tmp_path / "nope.db"
    with pytest.raises(MigrationError) as failure:
        migrate(str(missing), pg_database)
    assert str(failure.value) == f"source {missing} does not exist"


def test_file_that_is_not_a_sqlite_database(tmp_path, pg_database):
    path = tmp_path / "notes.db"
    path.write_text("just some text, not a database\n" * 100)
    fails_closed(path, pg_database, f"source {path} is not a SQLite database")


def test_truncated_database(sample_db, pg_database):
    data = sample_db.read_bytes()
    sample_db.write_bytes(data[: len(data) // 2 + 100])
    fails_closed(sample_db, pg_database, f"source {sample_db} is truncated")


def test_truncated_on_a_page_boundary_is_caught_by_the_integrity_check(sample_db, pg_database):
    data = sample_db.read_bytes()
    sample_db.write_bytes(data[: len(data) // 2])
    fails_closed(sample_db, pg_database, f"source {sample_db}")


def test_unknown_table_name(sample_db, pg_database):
    fails_closed(sample_db, pg_database, "table invoices does not exist in source",
                 "files, replication_logs, storage_nodes, tasks", tables=["files", "invoices"])


def test_invalid_utf8_and_nul_characters(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "enc.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT);")
    connection = sqlite3.connect(src)
    connection.execute("INSERT INTO t VALUES (1, 'fine'), (2, CAST(x'636166e9' AS TEXT))")  # 'caf' + Latin-1 é
    connection.commit()
    connection.close()
    fails_closed(src, pg_database, "table t, column name, rowid 2", "is not valid UTF-8")

    nul = build_sqlite(tmp_path / "nul.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT);")
    connection = sqlite3.connect(nul)
    connection.execute("INSERT INTO t VALUES (7, 'a' || char(0) || 'b')")
    connection.commit()
    connection.close()
    fails_closed(nul, pg_database, "table t, column name, rowid 7", "NUL character")


def test_foreign_key_violation(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "fk.db", """
        CREATE TABLE parent (id INTEGER PRIMARY KEY);
        CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent(id));
    """, {"parent": [(1,)], "child": [(1, 1), (5, 99)]})
    fails_closed(src, pg_database, "table child, column parent_id, rowid 5", "references a row missing from parent")


@pytest.mark.parametrize("parents, missing", [
    ([1, 2, 4, 5], 3),  # a gap inside the parent's ids: the rowid bitmap must see it
    ([10, 11], 9),  # below the lowest parent id
    ([10, 11], 12),  # above the highest
    ([1, 2**40], 7),  # ids too sparse for a bitmap: PRAGMA foreign_key_check decides
    ([1, 2], "x"),  # text in the child column: PRAGMA foreign_key_check decides
])
def test_foreign_key_violations_are_found_however_the_parent_ids_lie(tmp_path, pg_database, parents, missing):
    src = build_sqlite(tmp_path / "fk.db", """
        CREATE TABLE parent (id INTEGER PRIMARY KEY);
        CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id REFERENCES parent(id));
    """, {"parent": [(p,) for p in parents], "child": [(1, parents[0]), (2, missing), (3, None)]})
    fails_closed(src, pg_database, "table child, column parent_id, rowid 2", "references a row missing from parent")


@pytest.mark.parametrize("parents, missing", [
    ([1, 2, 4, 5], 3),
    ([10, 11], 12),
    ([1, 2**40], 7),
    ([1, 2], "x"),
    ([1, 2], 2.5),  # a real: SQLite compares it with the parent's key itself
])
def test_foreign_key_violations_beside_a_streamed_load_are_found_however_the_child_values_lie(
        tmp_path, pg_database, parents, missing):
    # Tables that exist in the target load without a profile: the keys are checked in SQLite beside the load
    # (post_data false: PostgreSQL builds no foreign key), with nothing known about the child column's values.
    src = build_sqlite(tmp_path / "fk.db", """
        CREATE TABLE parent (id INTEGER PRIMARY KEY);
        CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id REFERENCES parent(id));
    """, {"parent": [(p,) for p in parents], "child": [(1, parents[0]), (2, missing), (3, None)]})
    connection = psycopg2.connect(**pg_database)
    with connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE parent (id bigint PRIMARY KEY); CREATE TABLE child (id bigint, parent_id text)")
    connection.close()
    fails_closed(src, pg_database, "table child, column parent_id, rowid 2", "references a row missing from parent",
                 create_tables=False, post_data=False)


def test_null_into_a_not_null_target_column(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "nn.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);",
                       {"t": [(1, "a"), (3, None)]})
    connection = psycopg2.connect(**pg_database)
    with connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE t (id bigint, v text NOT NULL)")
    connection.close()
    fails_closed(src, pg_database, "table t, column v, rowid 3: is NULL but the target column is NOT NULL")


def test_target_table_holding_rows_from_elsewhere_is_never_appended_to(sample_db, pg_database):
    connection = psycopg2.connect(**pg_database)
    with connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE storage_nodes (id bigint, node_id text, hostname text, port int, "
                       "capacity_bytes bigint, used_bytes bigint, status text, is_active boolean, "
                       "last_heartbeat timestamptz, created_at timestamptz)")
        cursor.execute("INSERT INTO storage_nodes (id, node_id) VALUES (99, 'someone-elses')")
    connection.close()
    fails_closed(sample_db, pg_database, "target table public.storage_nodes already holds rows not loaded by this "
                                         "module")


def test_rows_from_another_source_are_named(sample_db, tmp_path, pg_database):
    migrate(str(sample_db), pg_database, tables=["storage_nodes"])
    other = tmp_path / "other.db"
    shutil.copyfile(sample_db, other)
    connection = sqlite3.connect(other)
    connection.execute("UPDATE storage_nodes SET hostname = 'changed' WHERE id = 1")
    connection.commit()
    connection.close()
    fails_closed(other, pg_database, "target table public.storage_nodes already holds rows loaded from another "
                                     f"source ({sample_db}", tables=["storage_nodes"])


def test_connection_failure_is_one_line_without_the_password(sample_db, postgres_server, pg_database):
    wrong = dict(pg_database, password="Wr0ng-S3cret-Pass")
    with pytest.raises(MigrationError) as failure:
        migrate(str(sample_db), wrong)
    message = str(failure.value)
    assert message.startswith(f"cannot connect to PostgreSQL at 127.0.0.1 port {postgres_server.port} as postgres:")
    assert "password authentication failed" in message
    assert "Wr0ng-S3cret-Pass" not in message and "\n" not in message

    closed = dict(pg_database, port=1)
    with pytest.raises(MigrationError) as failure:
        migrate(str(sample_db), closed)
    assert "cannot connect to PostgreSQL at 127.0.0.1 port 1" in str(failure.value)


def test_reject_mode_sets_bad_rows_aside_and_loads_the_rest(tmp_path, pg_database):
    rows = [(1, "2024-01-01 00:00:00", 1), (2, "garbage", 1), (3, "2024-01-03 00:00:00", 7), (4, None, 0)]
    src = build_sqlite(tmp_path / "rej.db", "CREATE TABLE ev (id INTEGER PRIMARY KEY, at DATETIME, ok BOOLEAN);",
                {"ev": rows})
    rejects = tmp_path / "ev.rej.jsonl"

    result = migrate(src, pg_database, on_invalid="reject", max_rejects=2, reject_file=str(rejects))

    assert result["tables"]["ev"]["migrated"] == 2 and result["tables"]["ev"]["rejected"] == 2
    records = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert sorted((r["table"], r["rowid"], r["column"], r["value"]) for r in records) == [
        ("ev", 2, "at", "garbage"), ("ev", 3, "ok", 7)]
    assert all(r["reason"] for r in records)
    connection = psycopg2.connect(**pg_database)
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT id FROM ev ORDER BY id")
        assert cursor.fetchall() == [(1,), (4,)]
    connection.close()


def test_more_rejects_than_allowed_fail_before_writing(tmp_path, pg_database):
    rows = [(1, "bad"), (2, "worse"), (3, "2024-01-01")]
    src = build_sqlite(tmp_path / "many.db", "CREATE TABLE ev (id INTEGER PRIMARY KEY, at DATETIME);", {"ev": rows})
    rejects = tmp_path / "r.jsonl"
    fails_closed(src, pg_database, "2 rows are invalid, more than max_rejects (1)", "table ev, column at, rowid 1",
                 on_invalid="reject", max_rejects=1, reject_file=str(rejects))
    assert not rejects.exists()


def test_bad_options_are_one_line(sample_db, pg_database):
    fails_closed(sample_db, pg_database, "source_timezone: unknown time zone 'Mars/Olympus'",
                 source_timezone="Mars/Olympus")
    fails_closed(sample_db, pg_database, "on_invalid: reject needs reject_file", on_invalid="reject")
    fails_closed(sample_db, pg_database, "jobs must be a whole number of at least 1", jobs=0)


def test_create_tables_false_needs_the_tables(sample_db, pg_database):
    fails_closed(sample_db, pg_database, "target table public.files does not exist (and create_tables is false)",
                 create_tables=False, tables=["files"])


def test_a_good_run_after_a_failed_one_loads_everything(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "fix.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, at DATETIME);",
                {"t": [(1, "2024-01-01"), (2, "nope")]})
    fails_closed(src, pg_database, "rowid 2")
    connection = sqlite3.connect(src)
    connection.execute("UPDATE t SET at = '2024-01-02' WHERE id = 2")
    connection.commit()
    connection.close()
    assert migrate(src, pg_database)["total_rows"] == 2
    assert_same_content(src, pg_database, "t")


def test_a_row_with_several_problems_is_rejected_once(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "twice.db", "CREATE TABLE ev (id INTEGER PRIMARY KEY, at DATETIME, note TEXT);")
    connection = sqlite3.connect(src)
    connection.execute("INSERT INTO ev VALUES (1, '2024-01-01', 'ok'), (2, 'bad', CAST(x'ff' AS TEXT)), "
                       "(3, '2024-01-03', CAST(x'fe' AS TEXT))")
    connection.commit()
    connection.close()
    rejects = tmp_path / "twice.jsonl"

    result = migrate(src, pg_database, on_invalid="reject", max_rejects=2, reject_file=str(rejects))

    assert (result["tables"]["ev"]["migrated"], result["tables"]["ev"]["rejected"]) == (1, 2)
    records = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert sorted((r["rowid"], r["column"]) for r in records) == [(2, "at"), (2, "note"), (3, "note")]


def test_a_value_only_postgresql_can_judge_rolls_its_table_back_and_names_the_row(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "inet.db", "CREATE TABLE hosts (id INTEGER PRIMARY KEY, address TEXT);",
                {"hosts": [(1, "10.0.0.1"), (2, "192.168.1.300"), (3, "::1")]})
    connection = psycopg2.connect(**pg_database)
    with connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE hosts (id bigint, address inet)")
    connection.close()
    message = fails_closed(src, pg_database, "table hosts, column address, rowid 2: value '192.168.1.300' was "
                           "refused by PostgreSQL", "everything this run wrote was undone")
    assert "192.168.1.300" in message
