"""Check mode on an empty target profiles against the tables the schema SQL will create, and leaves nothing."""

import sqlite3
import subprocess

import pytest
from conftest import ROOT, execute
from sqlite_pg import MigrationError, migrate

SCHEMA_SQL = (ROOT / "roles" / "schema_init" / "files" / "postgres_init_schema.sql").read_text()
PRE_DATA = SCHEMA_SQL.split("-- section: post-data")[0]


def schema_dump(postgres_server, conninfo):
    """pg_dump --schema-only of the test database (the password reaches pg_dump through its environment)."""
    done = subprocess.run(
        [str(postgres_server.bin / "pg_dump"), "--schema-only", "-h", conninfo["host"], "-p", str(conninfo["port"]),
         "-U", conninfo["user"], conninfo["dbname"]],
        env={"PGPASSWORD": conninfo["password"]}, capture_output=True, text=True, check=True)
    # pg_dump 15.14+ brackets its output with a random \\restrict key: not part of the schema.
    return [line for line in done.stdout.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))]


def user_relations(conninfo):
    return execute(conninfo, "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
                             "ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', "
                             "'pg_toast')")


def spoil(path, statement):
    connection = sqlite3.connect(path)
    connection.execute(statement)
    connection.commit()
    connection.close()


def test_a_value_only_the_schema_refuses_fails_check_mode_and_nothing_remains(sample_db, pg_database,
                                                                              postgres_server):
    spoil(sample_db, "UPDATE files SET file_uuid = 'not-a-uuid' WHERE id = 7")
    before = schema_dump(postgres_server, pg_database)
    # Without the schema's SQL the column would be created as the SQLite declaration says (VARCHAR(36)).
    assert migrate(str(sample_db), pg_database, check_mode=True)["status"] == "completed"

    with pytest.raises(MigrationError) as failure:
        migrate(str(sample_db), pg_database, check_mode=True, target_ddl=PRE_DATA)

    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("table files, column file_uuid, ")
    assert "7" in message.split(":")[0] and "'not-a-uuid'" in message and "nothing was written" in message
    assert schema_dump(postgres_server, pg_database) == before
    assert user_relations(pg_database) == []


def test_a_good_source_passes_check_mode_against_the_schema_and_nothing_remains(sample_db, pg_database,
                                                                                postgres_server):
    before = schema_dump(postgres_server, pg_database)

    result = migrate(str(sample_db), pg_database, check_mode=True, target_ddl=PRE_DATA, create_tables=False,
                     post_data=False)

    assert result["status"] == "completed"
    assert result["msg"] == "check mode: would load 4 of 4 tables (125 rows); nothing was written"
    assert result["profile"]["tables"]["files"]["columns"]["file_uuid"]["target"] == "uuid"
    assert schema_dump(postgres_server, pg_database) == before
    assert user_relations(pg_database) == []


def test_a_schema_that_does_not_exist_yet_is_created_only_for_the_check(sample_db, pg_database):
    result = migrate(str(sample_db), pg_database, schema="fileshare", check_mode=True, target_ddl=PRE_DATA,
                     create_tables=False)

    assert result["status"] == "completed"
    assert execute(pg_database, "SELECT count(*) FROM pg_namespace WHERE nspname = 'fileshare'") == [(0,)]


def test_a_commit_inside_the_ddl_cannot_end_the_check_transaction(sample_db, pg_database):
    with pytest.raises(MigrationError) as failure:
        migrate(str(sample_db), pg_database, check_mode=True,
                target_ddl=PRE_DATA + "\nCOMMIT;\nCREATE TABLE x (a int);")

    assert str(failure.value).startswith("target_ddl cannot be applied to schema public (tried in a transaction "
                                         "that was rolled back): ")
    assert user_relations(pg_database) == []


def test_an_existing_table_is_used_as_it_is_and_only_the_missing_ones_come_from_the_ddl(sample_db, pg_database):
    # files exists (its file_uuid as text); the other three come from the DDL's CREATE TABLE IF NOT EXISTS.
    execute(pg_database, PRE_DATA.replace("file_uuid       uuid NOT NULL", "file_uuid       text NOT NULL"))
    execute(pg_database, "DROP TABLE storage_nodes, tasks, replication_logs")
    spoil(sample_db, "UPDATE tasks SET task_uuid = 'not-a-uuid' WHERE id = 3")
    spoil(sample_db, "UPDATE files SET file_uuid = 'fine-as-text' WHERE id = 7")  # files loads before tasks

    with pytest.raises(MigrationError) as failure:
        migrate(str(sample_db), pg_database, check_mode=True, target_ddl=PRE_DATA)

    assert str(failure.value).startswith("table tasks, column task_uuid, ")
    assert sorted(r[1] for r in user_relations(pg_database)) == ["files", "files_id_seq", "files_pkey"]
