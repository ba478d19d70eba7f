"""Canonical values and checksums (module_utils/sqlite_pg/checksum.py) against a real PostgreSQL.

Every canonical form computed in Python must be the one PostgreSQL computes
for the value the migration stored; these tests load data with the migration
engine, or hand values to PostgreSQL directly, and compare both sides value by
value, row hash by row hash, and range by range.
"""

import json
import random
import sqlite3
import struct
from decimal import Decimal

import psycopg2
import pytest
from conftest import execute
from sqlite_pg.checksum import (
    Checksum,
    PostgresTable,
    SqliteTable,
    decimal_text,
    jsonb_text,
    row_hash,
    source_canonicaliser,
)
from sqlite_pg.engine import migrate
from sqlite_pg.source import Source, read_schema
from sqlite_pg.validate import describe_table, validate

# A SQLite table holding every form the migration accepts, and the typed table it goes to.
EVERY_TYPE_SQLITE = """
CREATE TABLE every_type (
    id INTEGER PRIMARY KEY, flag BOOLEAN, at DATETIME, at_local DATETIME, doc JSON, raw_doc JSON, ident VARCHAR(36),
    ratio REAL, payload BLOB, note TEXT, amount NUMERIC(12,3), day DATE, code CHAR(8), counter BIGINT)
"""
EVERY_TYPE_POSTGRES = """
CREATE TABLE every_type (
    id bigint PRIMARY KEY, flag boolean, at timestamptz, at_local timestamp, doc jsonb, raw_doc json, ident uuid,
    ratio double precision, payload bytea, note text, amount numeric(12,3), day date, code char(8), counter bigint)
"""
NESTED_JSON = ('{"b": 1, "a": [1, 2.50, -0.0, 1e300, 0.1, -0, 1E-3], "é": "x\\ny\\t\\"q\\" \\\\ \\u00e9 😀", '
               '"nested": {"z": null, "aa": true, "a": {}}}')
EVERY_TYPE_ROWS = [
    (1, 0, "2024-01-02 03:04:05", "2024-01-02 03:04:05", NESTED_JSON, '{"keep":  "as written" }',
     "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", 0.1, b"\x00\x01\xff", "NULL", 1.5, "2024-02-29", "ab", 0),
    (2, 1, "2024-01-02 03:04:05.123456", "2024-01-02T03:04:05.5", "[]", "[1,2]",
     "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A12", 1e300, b"", "\\N", "2.250", "1999-12-31", "abcdefgh", -1),
    (3, "true", "2024-01-02T03:04:05Z", "2024-01-02T03:04:05+02:00", "{}", "{}",
     "a0eebc999c0b4ef8bb6d6bb9bd380a13", -0.0, "text in a blob column", "", 3, None, None, 2**62),
    (4, "false", "2024-01-02T03:04:05+02:00", None, '"text"', '"x"', None, 0.0, None, "tab\there", 1.0005,
     "2000-01-01", "x  ", None),
    (5, "t", "2024-01-02T03:04:05.5-05:30", "2024-01-02 03:04:05.999999", "null", "null",
     "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a15", 3.119, b"\xde\xad", "new\nline\r\n", None, None, "", 5),
    (6, "f", 1704164645, 1704164645, '{"dup": 1, "dup": 2, "a": 1}', '{"dup": 1, "dup": 2}',
     "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a16", 1 / 3, None, "back\\slash \\N \\t", -7.25, None, None, None),
    (7, "yes", 1704164645123, None, "12345678901234567890", "1", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a17", 5e-324,
     None, "quote\"'", 0, None, None, None),
    (8, "no", "2024-01-02 03:04", None, "-0", "-0", None, 7, None, "é😀 日本語", None, None, None, None),
    (9, None, None, None, None, None, None, None, None, None, None, None, None, None),
    (10, 1, "1969-12-31 23:59:59.999999", "1900-01-01 00:00:00",
     '{"k": [{"x": 1.0}, {"x": 1.10}], "long key name": "v", "kz": "\\u001f\\u007f"}', '{"a" : 1}',
     "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1a", 123456789.125, b"\x00" * 40, "  trailing  ", "99999.999",
     "0001-01-01", "zz", 0),
]


def write_every_type(path):
    with sqlite3.connect(path) as connection:
        connection.execute(EVERY_TYPE_SQLITE)
        connection.executemany("INSERT INTO every_type VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               EVERY_TYPE_ROWS)
    connection.close()



@pytest.fixture
def every_type(tmp_path, pg_database):
    """(SQLite path, conninfo): the every-type table migrated by the engine into its typed table."""
    path = tmp_path / "every.db"
    write_every_type(path)
    execute(pg_database, EVERY_TYPE_POSTGRES)
    migrate(str(path), pg_database, create_tables=False, jobs=1)
    return path, pg_database


def sides(path, conninfo, table, source_timezone="UTC"):
    """(SqliteTable, PostgresTable, open connections) of one table."""
    source = Source(str(path)).connect()
    target = psycopg2.connect(**conninfo)
    source_table = next(t for t in read_schema(source)[0] if t.name == table)
    spec, problem = describe_table(source_table, target, "public")
    assert problem is None
    return SqliteTable(source, spec, source_timezone), PostgresTable(target, "public", spec), (source, target)


def test_every_column_of_every_row_has_the_same_canonical_value_on_both_sides(every_type):
    path, conninfo = every_type
    sqlite_table, postgres_table, connections = sides(path, conninfo, "every_type")
    try:
        source_rows = sqlite_table.canonical_rows()
        target_rows = postgres_table.canonical_rows()
        assert sorted(source_rows) == sorted(target_rows) == [row[0] for row in EVERY_TYPE_ROWS]
        names = [column.name for column in sqlite_table.spec.columns]
        for key, (canonical, _source_row) in source_rows.items():
            for name, ours, theirs in zip(names, canonical, target_rows[key]):
                assert ours == theirs, f"id {key} column {name}: SQLite side {ours!r}, PostgreSQL {theirs!r}"
        assert sqlite_table.checksum() == postgres_table.checksum()
        assert sqlite_table.checksum().rows == len(EVERY_TYPE_ROWS)
    finally:
        for connection in connections:
            connection.close()
    result = validate(str(path), conninfo)
    assert result["status"] == "completed", result["msg"]
    assert result["tables"]["every_type"]["sqlite_rows"] == len(EVERY_TYPE_ROWS)


@pytest.mark.parametrize("source_timezone", ["UTC", "Europe/Berlin", "America/St_Johns"])
def test_naive_timestamps_are_taken_in_the_source_timezone(tmp_path, pg_database, source_timezone):
    path = tmp_path / "every.db"
    write_every_type(path)
    execute(pg_database, EVERY_TYPE_POSTGRES)
    migrate(str(path), pg_database, create_tables=False, jobs=1, source_timezone=source_timezone)
    sqlite_table, postgres_table, connections = sides(path, pg_database, "every_type", source_timezone)
    try:
        assert sqlite_table.checksum() == postgres_table.checksum()
    finally:
        for connection in connections:
            connection.close()


def test_shortcuts_give_what_the_migration_rules_give(every_type):
    path, conninfo = every_type
    for source_timezone in ("UTC", "Europe/Berlin"):
        sqlite_table, _, connections = sides(path, conninfo, "every_type", source_timezone)
        try:
            for index, column in enumerate(sqlite_table.spec.columns):
                fast = source_canonicaliser(column, source_timezone)
                rules = source_canonicaliser(column, source_timezone, shortcuts=False)
                for row in EVERY_TYPE_ROWS:
                    if row[index] is not None:
                        assert fast(row[index]) == rules(row[index]), f"{column.name} {row[index]!r}"
        finally:
            for connection in connections:
                connection.close()


def test_range_checksums_add_up_to_the_table_on_both_sides(every_type):
    path, conninfo = every_type
    sqlite_table, postgres_table, connections = sides(path, conninfo, "every_type")
    try:
        low, high = (1, 5), (6, 10)
        for side in (sqlite_table, postgres_table):
            assert side.checksum(low) + side.checksum(high) == side.checksum()
            assert side.checksum(low).rows == 5
        assert sqlite_table.checksum(low) == postgres_table.checksum(low)
        assert sqlite_table.checksum(high) == postgres_table.checksum(high)
        assert sqlite_table.checksum(low) != sqlite_table.checksum(high)
        buckets = sqlite_table.bucket_checksums(1, 3)
        assert buckets == postgres_table.bucket_checksums(1, 3)
        assert sorted(buckets) == [0, 1, 2, 3]
        assert sum(buckets.values(), Checksum()) == sqlite_table.checksum()
    finally:
        for connection in connections:
            connection.close()


# One UPDATE per column, each of a kind of change the canonical form must see.
COLUMN_CHANGES = [
    ("flag", "UPDATE every_type SET flag = NOT flag WHERE id = 1"),
    ("at", "UPDATE every_type SET at = at + interval '1 microsecond' WHERE id = 1"),
    ("at_local", "UPDATE every_type SET at_local = at_local - interval '1 microsecond' WHERE id = 1"),
    ("doc", """UPDATE every_type SET doc = doc || '{"x": 1}' WHERE id = 1"""),
    ("raw_doc", """UPDATE every_type SET raw_doc = '{"keep": "as written" }' WHERE id = 1"""),  # one blank less
    ("ident", "UPDATE every_type SET ident = gen_random_uuid() WHERE id = 1"),
    ("ratio", "UPDATE every_type SET ratio = -ratio WHERE id = 4"),  # 0.0 becomes -0.0
    ("payload", "UPDATE every_type SET payload = payload || '\\x00'::bytea WHERE id = 1"),
    ("note", "UPDATE every_type SET note = NULL WHERE id = 3"),  # '' becomes NULL
    ("note", "UPDATE every_type SET note = 'NULL' WHERE id = 9"),  # NULL becomes 'NULL'
    ("amount", "UPDATE every_type SET amount = amount + 0.001 WHERE id = 1"),
    ("day", "UPDATE every_type SET day = day + 1 WHERE id = 1"),
    ("code", "UPDATE every_type SET code = 'abc' WHERE id = 1"),
    ("counter", "UPDATE every_type SET counter = counter + 1 WHERE id = 1"),
]


def test_a_change_in_any_column_changes_the_checksum(every_type):
    path, conninfo = every_type
    sqlite_table, postgres_table, connections = sides(path, conninfo, "every_type")
    try:
        before = postgres_table.checksum()
        assert before == sqlite_table.checksum()
        target = connections[1]
        for column, statement in COLUMN_CHANGES:
            with target.cursor() as cursor:
                cursor.execute(statement)
                assert cursor.rowcount == 1
            assert postgres_table.checksum() != before, f"{statement}: the change of {column} went unnoticed"
            assert postgres_table.checksum().rows == before.rows
            target.rollback()
        assert postgres_table.checksum() == before
    finally:
        for connection in connections:
            connection.close()


def test_null_empty_and_lookalike_strings_are_all_different():
    values = [None, "", "NULL", "null", "\\N", "N", "None"]
    hashes = {row_hash(["x", value]) for value in values}
    assert len(hashes) == len(values)
    # Column boundaries count: moving text between columns changes the hash.
    assert row_hash(["ab", "c"]) != row_hash(["a", "bc"])


def test_lookalike_strings_hash_the_same_in_postgresql(tmp_path, pg_database):
    texts = [None, "", "NULL", "\\N", "tab\there", "new\nline", "back\\slash", 'quo"te', "é😀", "\x01\x1f\x7f"]
    path = tmp_path / "texts.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE texts (id INTEGER PRIMARY KEY, note TEXT)")
        connection.executemany("INSERT INTO texts VALUES (?, ?)", list(enumerate(texts, start=1)))
    connection.close()
    execute(pg_database, "CREATE TABLE texts (id bigint PRIMARY KEY, note text)")
    migrate(str(path), pg_database, create_tables=False, jobs=1)
    sqlite_table, postgres_table, connections = sides(path, pg_database, "texts")
    try:
        source_rows = {key: row_hash(canonical) for key, (canonical, _) in sqlite_table.canonical_rows().items()}
        target_rows = {key: row_hash(canonical) for key, canonical in postgres_table.canonical_rows().items()}
        assert source_rows == target_rows
        assert len(set(source_rows.values())) == len(texts)
    finally:
        for connection in connections:
            connection.close()


def test_a_table_wider_than_json_build_array_takes(tmp_path, pg_database):
    width = 150
    path = tmp_path / "wide.db"
    columns = [f"c{number}" for number in range(width)]
    with sqlite3.connect(path) as connection:
        connection.execute(f"CREATE TABLE wide (id INTEGER PRIMARY KEY, {', '.join(c + ' TEXT' for c in columns)})")
        connection.executemany(f"INSERT INTO wide VALUES (?, {', '.join('?' * width)})",  # noqa: S608 - placeholders
                               [(row, *(f"{row}:{number}" for number in range(width))) for row in range(1, 4)])
    connection.close()
    execute(pg_database, f"CREATE TABLE wide (id bigint PRIMARY KEY, {', '.join(c + ' text' for c in columns)})")
    migrate(str(path), pg_database, create_tables=False, jobs=1)
    sqlite_table, postgres_table, connections = sides(path, pg_database, "wide")
    try:
        assert sqlite_table.checksum() == postgres_table.checksum()
        assert sqlite_table.canonical_rows()[2][0] == postgres_table.canonical_rows()[2]
        with connections[1].cursor() as cursor:
            cursor.execute("UPDATE wide SET c149 = 'changed' WHERE id = 2")
        assert sqlite_table.checksum() != postgres_table.checksum()
    finally:
        for connection in connections:
            connection.close()


def random_document(rng, depth=0):
    """A JSON value with the features jsonb normalises: key order, duplicates, number spellings, escapes."""
    choice = rng.randrange(9 if depth < 3 else 5)
    if choice == 0:
        return rng.choice(["null", "true", "false"])
    if choice == 1:
        return rng.choice(["0", "-0", "12", "-7", "123456789012345678901234567890"])
    if choice == 2:
        mantissa = rng.choice(["0", "1", "2.5", "2.50", "0.1", "-3.125", "1.000", "-0.0", "9.99"])
        return mantissa + rng.choice(["", "e5", "E-3", "e+2", "e0", "e-10", "e300"])
    if choice in (3, 4):
        text = "".join(rng.choice(["a", "é", "😀", "\\n", "\\t", '\\"', "\\\\", "\\u0001", "\\u001f", "\\u00e9",
                                   "\\ud83d\\ude00", "/", "\\/", "\x7f", " "]) for _ in range(rng.randrange(6)))
        return f'"{text}"'
    if choice in (5, 6):
        keys = ["a", "b", "aa", "é", "ab", "ba", "a b", "😀", "Z", "zz", "", "a"]
        members = [f'"{rng.choice(keys)}": {random_document(rng, depth + 1)}' for _ in range(rng.randrange(5))]
        return "{" + rng.choice([", ", ",", " ,  "]).join(members) + "}"
    return "[" + ", ".join(random_document(rng, depth + 1) for _ in range(rng.randrange(4))) + "]"


def test_jsonb_text_is_postgresql_jsonb_output(pg_database):
    rng = random.Random(20240601)
    documents = [NESTED_JSON, '{"dup": 1, "dup": 2}', " [ 1 , 2 ] ", '{"a": {"b": {"c": [{}]}}}', "1e-7", "1E+2",
                 "0.000", '"\\u00e9\\u0041"', '{"aaa": 1, "bb": 2, "c": 3, "é": 4, "ab": 5}']
    documents += [random_document(rng) for _ in range(600)]
    rows = execute(pg_database, "SELECT document::jsonb::text FROM unnest(%s::text[]) WITH ORDINALITY "
                                "AS d(document, n) ORDER BY n", (documents,))
    for document, (expected,) in zip(documents, rows):
        assert jsonb_text(document) == expected, document


def test_float_canonical_is_float8send(pg_database):
    values = [0.1, 1e300, -1e300, -0.0, 0.0, 5e-324, 2.2250738585072014e-308, 1 / 3, 123456789.125, 1e16, -7.0,
              float("inf"), float("-inf")]
    # As text (the migration's COPY field): a float parameter would pass through numeric, which has no -0.
    rows = execute(pg_database, "SELECT encode(float8send(v::float8), 'hex') FROM unnest(%s::text[]) "
                                "WITH ORDINALITY AS f(v, n) ORDER BY n", ([repr(value) for value in values],))
    assert [struct.pack(">d", value).hex() for value in values] == [hex_text for (hex_text,) in rows]


def test_numeric_canonical_is_trim_scale(pg_database):
    values = ["1.500", "0.000", "-0.0", "100", "1e3", "12345678901234567890.000100", "-2.50", "NaN", "0.1e-5"]
    rows = execute(pg_database, "SELECT trim_scale(v::numeric)::text FROM unnest(%s::text[]) WITH ORDINALITY "
                                "AS f(v, n) ORDER BY n", (values,))
    assert [decimal_text(Decimal(value)) for value in values] == [text for (text,) in rows]


def test_checksum_digest_is_the_sum_in_hex():
    total = Checksum(2, 255) + Checksum(1, 1)
    assert total == Checksum(3, 256)
    assert int(total.digest, 16) == 256
    assert json.dumps(total.digest)
