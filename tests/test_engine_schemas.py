"""Any SQLite database: odd declared types, reserved and mixed-case names, keys, defaults, FK order."""


import threading

import psycopg2
import pytest
from conftest import assert_same_content, build_sqlite, execute, target_snapshot
from sqlite_pg import MigrationError, migrate


def catalog(conninfo, query, parameters=None):
    connection = psycopg2.connect(**conninfo)
    try:
        cursor = connection.cursor()
        cursor.execute(query, parameters)
        return cursor.fetchall()
    finally:
        connection.close()


def column_types(conninfo, table):
    return dict(catalog(conninfo, "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                                  "WHERE attrelid = %s::regclass AND attnum > 0", (f'public."{table}"',)))


def test_declared_types_map_to_postgresql_types(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "types.db", """
        CREATE TABLE odd (
            id INTEGER PRIMARY KEY, name NVARCHAR(160), amount numeric(20,6), ratio "double precision",
            small smallint unsigned, happened DATETIME DEFAULT 0, anything, flag BOOLEAN, day DATE,
            doc JSON, raw BLOB, big BIGINT, note TEXT, price REAL, code CHAR(3), mixed STRING);
    """, {"odd": [(1, "Zoë", 12.5, 0.25, 65535, "2024-01-02 03:04:05", "x", 1, "2024-01-02", '{"a": 1}',
                   b"\x00\x01", 2**40, "n", 1.5, "abc", "text")]})

    result = migrate(src, pg_database, datetime_formats={"odd.happened": "unixepoch"})

    assert column_types(pg_database, "odd") == {
        "id": "bigint", "name": "character varying(160)", "amount": "numeric(20,6)", "ratio": "double precision",
        "small": "integer", "happened": "timestamp with time zone", "anything": "text", "flag": "boolean",
        "day": "date", "doc": "jsonb", "raw": "bytea", "big": "bigint", "note": "text", "price": "double precision",
        "code": "character varying(3)", "mixed": "text"}
    assert result["profile"]["tables"]["odd"]["columns"]["mixed"]["declared"] == "STRING"
    assert_same_content(src, pg_database, "odd")
    # DATETIME DEFAULT 0 of a column declared Unix time is epoch 0 in PostgreSQL, not the text '0'
    # (read by SQLite's auto rule, 0 would be Julian day 0, before the year 1: the default is then dropped)
    default = catalog(pg_database, "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef "
                                   "WHERE adrelid = 'odd'::regclass AND adnum = 6")[0][0]
    assert default.startswith("'1970-01-01 00:00:00+00'")


def test_reserved_and_mixed_case_names(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "names.db", """
        CREATE TABLE "user" (id INTEGER PRIMARY KEY, "order" INTEGER, "select" TEXT, "Group" TEXT);
        CREATE TABLE "references" (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES "user"(id), "from" TEXT);
        CREATE TABLE "TableName" ("ColumnName" TEXT PRIMARY KEY, "with space" TEXT, "quo""te" TEXT);
        CREATE INDEX "Index With Space" ON "TableName" ("with space");
    """, {"user": [(1, 2, "s", "G")], "references": [(1, 1, "f")], "TableName": [("k", "v w", 'q"')]})

    migrate(src, pg_database)

    for table in ("user", "references", "TableName"):
        assert_same_content(src, pg_database, table)
    assert ("Index With Space",) in catalog(pg_database, "SELECT indexname FROM pg_indexes WHERE schemaname='public'")


def test_composite_keys_no_key_without_rowid_and_empty_tables(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "keys.db", """
        CREATE TABLE pairs (a INTEGER, b TEXT, v REAL, PRIMARY KEY (a, b));
        CREATE TABLE loose (x, y);
        CREATE TABLE wr (k TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID;
        CREATE TABLE empty_table (id INTEGER PRIMARY KEY, v TEXT);
    """, {"pairs": [(1, "a", 0.5), (1, "b", 1.5)], "loose": [(1, "x"), (1, "x"), (None, None)],
          "wr": [("b", 2), ("a", 1)]})

    result = migrate(src, pg_database)

    migrated = {t: e["migrated"] for t, e in result["tables"].items()}
    assert migrated == {"pairs": 2, "loose": 3, "wr": 2, "empty_table": 0}
    for table, order in (("pairs", ["a", "b"]), ("loose", ["x", "y"]), ("wr", ["k"]), ("empty_table", None)):
        assert_same_content(src, pg_database, table, order_by=order)
    keys = dict(catalog(pg_database, "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint "
                                     "WHERE contype = 'p' AND connamespace = 'public'::regnamespace"))
    keys.pop("sqlite_to_postgres_state")
    keys.pop("sqlite_to_postgres_spans")
    assert keys == {"pairs": "PRIMARY KEY (a, b)", "wr": "PRIMARY KEY (k)", "empty_table": "PRIMARY KEY (id)"}
    # an empty table is recorded as loaded too: the rerun skips it
    assert migrate(src, pg_database)["changed"] is False


def test_sqlite_only_defaults_are_translated_or_dropped_with_a_note(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "defaults.db", """
        CREATE TABLE d (
            id INTEGER PRIMARY KEY,
            created DATETIME DEFAULT CURRENT_TIMESTAMP,
            stamp TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            day DATE DEFAULT (date('now')),
            odd INTEGER DEFAULT (abs(random()) % 10),
            label TEXT DEFAULT 'it''s',
            active BOOLEAN DEFAULT TRUE);
    """)

    result = migrate(src, pg_database)

    defaults = dict(catalog(pg_database, "SELECT a.attname, pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d "
                                         "JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum "
                                         "WHERE d.adrelid = 'd'::regclass"))
    assert defaults["created"] == "CURRENT_TIMESTAMP"
    assert defaults["day"] == "CURRENT_DATE"
    assert defaults["label"].startswith("'it''s'")
    assert defaults["active"] == "true"
    assert "odd" not in defaults and "stamp" not in defaults
    notes = " ".join(result["profile"]["notes"])
    assert "d.odd" in notes and "d.stamp" in notes
    connection = psycopg2.connect(**pg_database)
    with connection, connection.cursor() as cursor:
        cursor.execute("INSERT INTO d DEFAULT VALUES RETURNING created IS NOT NULL, label, active")
        assert cursor.fetchone() == (True, "it's", True)
    connection.close()


def test_parents_load_before_children_self_references_and_cycles(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "fk.db", """
        CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent(id));
        CREATE TABLE parent (id INTEGER PRIMARY KEY, boss INTEGER REFERENCES parent(id));
        CREATE TABLE a (id INTEGER PRIMARY KEY, b_id INTEGER REFERENCES b(id));
        CREATE TABLE b (id INTEGER PRIMARY KEY, a_id INTEGER REFERENCES a(id));
    """, {"parent": [(1, None), (2, 1), (3, 4), (4, 1)], "child": [(1, 1), (2, 4)],
          "a": [(1, 1)], "b": [(1, 1)]})

    result = migrate(src, pg_database)

    order = list(result["tables"])
    assert order.index("parent") < order.index("child")
    assert any("cycle" in note for note in result["profile"]["notes"])
    fks = {r[0] for r in catalog(pg_database, "SELECT conname FROM pg_constraint WHERE contype = 'f' "
                                              "AND convalidated")}
    assert {"child_parent_id_fkey", "parent_boss_fkey", "a_b_id_fkey", "b_a_id_fkey"} <= fks


def test_preexisting_foreign_keys_make_children_wait_for_their_parents(tmp_path, pg_database):
    rows = {"parent": [(i,) for i in range(1, 2001)], "child": [(i, i) for i in range(1, 2001)]}
    src = build_sqlite(tmp_path / "wait.db", """
        CREATE TABLE parent (id INTEGER PRIMARY KEY);
        CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent(id));
    """, rows)
    connection = psycopg2.connect(**pg_database)
    with connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE parent (id bigint PRIMARY KEY); "
                       "CREATE TABLE child (id bigint PRIMARY KEY, parent_id bigint REFERENCES parent(id))")
    connection.close()

    result = migrate(src, pg_database, jobs=2)

    assert result["status"] == "completed" and result["total_rows"] == 4000
    execute(pg_database, "CREATE EXTENSION IF NOT EXISTS pg_visibility")
    frozen = {table: execute(pg_database, "SELECT bool_and(all_frozen) FROM pg_visibility_map(%s)", (table,))[0][0]
              for table in ("parent", "child")}
    # child was truncated in its load transaction, so COPY wrote its rows frozen; a foreign key
    # references parent, which therefore cannot be truncated and loads as it is.
    assert frozen == {"parent": False, "child": True}


def test_a_target_table_another_session_reads_loads_without_waiting_for_it(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "read.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);",
                       {"t": [(i, f"value {i}") for i in range(1, 1001)]})
    execute(pg_database, "CREATE TABLE t (id bigint PRIMARY KEY, v text)")
    reader = psycopg2.connect(**pg_database)
    reader.cursor().execute("SELECT count(*) FROM t")  # an open transaction that has read t
    ended = threading.Event()

    def end_reader():  # safety net only: were the load to wait for the reader, this ends the wait
        ended.set()
        execute(pg_database, "SELECT pg_terminate_backend(%s)", (reader.info.backend_pid,))

    release = threading.Timer(60, end_reader)
    release.start()
    try:
        result = migrate(src, pg_database, jobs=1)
    finally:
        release.cancel()
        reader.close()

    assert result["status"] == "completed" and not ended.is_set()
    assert_same_content(src, pg_database, "t")


def test_names_colliding_at_63_bytes_fail_before_writing(tmp_path, pg_database):
    long = "x" * 70
    src = build_sqlite(tmp_path / "long.db",
                       f'CREATE TABLE t (id INTEGER PRIMARY KEY, "{long}a" TEXT, "{long}b" TEXT);')
    snapshot = target_snapshot(pg_database)

    with pytest.raises(MigrationError) as failure:
        migrate(src, pg_database)

    assert f"columns {long}a and {long}b both become {'x' * 63}" in str(failure.value)
    assert target_snapshot(pg_database) == snapshot


def test_text_longer_than_its_varchar_fails_before_writing(tmp_path, pg_database):
    src = build_sqlite(tmp_path / "len.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, code VARCHAR(3));",
                {"t": [(1, "abc"), (2, "abcd")]})
    snapshot = target_snapshot(pg_database)

    with pytest.raises(MigrationError) as failure:
        migrate(src, pg_database)

    assert "table t, column code, rowid 2: value 'abcd' is 4 characters long" in str(failure.value)
    assert target_snapshot(pg_database) == snapshot


def test_another_schema_is_created_and_used(sample_db, pg_database):
    result = migrate(str(sample_db), pg_database, schema="Legacy App", tables=["storage_nodes", "files"])

    assert result["total_rows"] == 53
    assert_same_content(sample_db, pg_database, "files", schema="Legacy App")
    tables = {r[0] for r in catalog(pg_database, "SELECT tablename FROM pg_tables WHERE schemaname = 'Legacy App'")}
    assert tables == {"storage_nodes", "files", "sqlite_to_postgres_state", "sqlite_to_postgres_spans"}
    assert migrate(str(sample_db), pg_database, schema="Legacy App", tables=["storage_nodes", "files"])[
        "changed"] is False
