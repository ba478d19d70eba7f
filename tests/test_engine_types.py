"""Conversion by the target column's type: one test per rule, values read back from PostgreSQL."""

import datetime
import json
import random
import re
import sqlite3
import struct
import uuid
from decimal import Decimal

import psycopg2
import pytest
from conftest import assert_same_content
from sqlite_pg import MigrationError, migrate
from sqlite_pg.rules import rule_for
from sqlite_pg.typemap import TargetType

UTC = datetime.timezone.utc


def make_source(path, ddl, rows):
    connection = sqlite3.connect(path)
    connection.execute(ddl)
    table = ddl.split()[2].strip('"')
    if rows:
        marks = ", ".join("?" * len(rows[0]))
        connection.executemany(f'INSERT INTO "{table}" VALUES ({marks})', rows)  # noqa: S608 - test's own names
    connection.commit()
    connection.close()
    return str(path)


def run_sql(conninfo, statement):
    connection = psycopg2.connect(**conninfo)
    connection.autocommit = True
    try:
        connection.cursor().execute(statement)
    finally:
        connection.close()


def fetch(conninfo, query):
    connection = psycopg2.connect(**conninfo)
    try:
        cursor = connection.cursor()
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute(query)
        return cursor.fetchall()
    finally:
        connection.close()


def test_booleans_from_numbers_and_words(tmp_path, pg_database):
    words = [(1, 1), (2, 0), (3, "true"), (4, "false"), (5, "t"), (6, "f"), (7, "yes"), (8, "no"), (9, " TRUE "),
             (10, None), (11, 1.0)]
    src = make_source(tmp_path / "b.db", "CREATE TABLE flags (id INTEGER PRIMARY KEY, flag)", words)
    run_sql(pg_database, "CREATE TABLE flags (id bigint PRIMARY KEY, flag boolean)")

    migrate(src, pg_database)

    assert fetch(pg_database, "SELECT flag FROM flags ORDER BY id") == [
        (True,), (False,), (True,), (False,), (True,), (False,), (True,), (False,), (True,), (None,), (True,)]


def test_timestamps_from_text_shapes_and_epochs(tmp_path, pg_database):
    values = [
        (1, "2024-03-01 12:34:56"),
        (2, "2024-03-01 12:34:56.123456"),
        (3, "2024-03-01T12:34:56"),
        (4, "2024-03-01T12:34:56Z"),
        (5, "2024-03-01 12:34:56+05:30"),
        (6, 1709296496),  # epoch seconds (INTEGER storage)
        (7, 1709296496123),  # epoch milliseconds
        (8, 1709296496.25),  # epoch seconds with a fraction (REAL storage)
        (9, "2024-02-29"),
        (10, None),
    ]
    src = make_source(tmp_path / "t.db", "CREATE TABLE events (id INTEGER PRIMARY KEY, at)", values)
    run_sql(pg_database, "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz)")

    migrate(src, pg_database)

    got = [r[0] for r in fetch(pg_database, "SELECT at FROM events ORDER BY id")]
    assert got == [
        datetime.datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC),
        datetime.datetime(2024, 3, 1, 12, 34, 56, 123456, tzinfo=UTC),
        datetime.datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC),
        datetime.datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC),
        datetime.datetime(2024, 3, 1, 7, 4, 56, tzinfo=UTC),
        datetime.datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC),
        datetime.datetime(2024, 3, 1, 12, 34, 56, 123000, tzinfo=UTC),
        datetime.datetime(2024, 3, 1, 12, 34, 56, 250000, tzinfo=UTC),
        datetime.datetime(2024, 2, 29, tzinfo=UTC),
        None,
    ]


def test_extra_fraction_digits_round_as_postgresql_does(tmp_path, pg_database):
    # The REAL value sends the column through Python; the same text in a text-only column goes as it is.
    values = [(1, "2024-03-01 12:34:05.9999999", "2024-03-01 12:34:05.9999999"),
              (2, "2024-03-01 12:34:05.1234564", "2024-03-01 12:34:05.1234564"),
              (3, 1709296496.5, "2024-03-01 12:34:05")]
    src = make_source(tmp_path / "f.db", "CREATE TABLE events (id INTEGER PRIMARY KEY, mixed, plain)", values)
    run_sql(pg_database, "CREATE TABLE events (id bigint PRIMARY KEY, mixed timestamptz, plain timestamptz)")

    migrate(src, pg_database)

    rows = fetch(pg_database, "SELECT mixed, plain FROM events WHERE id < 3 ORDER BY id")
    assert [mixed for mixed, _ in rows] == [plain for _, plain in rows]
    assert rows[0][0] == datetime.datetime(2024, 3, 1, 12, 34, 6, tzinfo=UTC)


def test_naive_timestamps_are_read_in_the_source_timezone(tmp_path, pg_database):
    src = make_source(tmp_path / "z.db", "CREATE TABLE events (id INTEGER PRIMARY KEY, at DATETIME, local TIMESTAMP)",
                      [(1, "2024-07-01 12:00:00", "2024-07-01 12:00:00Z")])
    run_sql(pg_database, "CREATE TABLE events (id bigint, at timestamptz, local timestamp)")

    migrate(src, pg_database, source_timezone="Europe/Berlin")

    at, local = fetch(pg_database, "SELECT at, local FROM events")[0]
    assert at == datetime.datetime(2024, 7, 1, 10, 0, tzinfo=UTC)  # 12:00 in Berlin (CEST) is 10:00 UTC
    # timestamp without time zone keeps wall-clock time in the source zone: 12:00Z is 14:00 in Berlin
    assert local == datetime.datetime(2024, 7, 1, 14, 0)


def test_json_text_into_jsonb(tmp_path, pg_database):
    documents = [(1, '{"a": [1, 2.5, null], "b": "x\\ty", "c": {"d": true}}'), (2, "[]"), (3, '"text"'),
                 (4, None), (5, '{"emoji": "🎉", "quote": "\\"", "backslash": "\\\\"}')]
    src = make_source(tmp_path / "j.db", "CREATE TABLE docs (id INTEGER PRIMARY KEY, body JSON)", documents)
    run_sql(pg_database, "CREATE TABLE docs (id bigint, body jsonb)")

    migrate(src, pg_database)

    got = [r[0] for r in fetch(pg_database, "SELECT body FROM docs ORDER BY id")]
    assert got == [json.loads(d) if d else None for _, d in documents]


def test_text_and_blob_uuids_into_uuid(tmp_path, pg_database):
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    rows = [(1, str(first)), (2, str(second).upper()), (3, third.bytes), (4, first.hex)]
    src = make_source(tmp_path / "u.db", "CREATE TABLE things (id INTEGER PRIMARY KEY, ref)", rows)
    run_sql(pg_database, "CREATE TABLE things (id bigint, ref uuid)")

    migrate(src, pg_database)

    assert [r[0] for r in fetch(pg_database, "SELECT ref::text FROM things ORDER BY id")] == [
        str(first), str(second), str(third), str(first)]


def test_integers_past_2_31_widen_a_new_integer_column_to_bigint(tmp_path, pg_database):
    rows = [(1, 2**31), (2, -(2**40)), (3, 2**63 - 1), (4, 7)]
    src = make_source(tmp_path / "i.db", "CREATE TABLE sizes (id INTEGER PRIMARY KEY, size INTEGER)", rows)

    result = migrate(src, pg_database)

    assert result["profile"]["tables"]["sizes"]["columns"]["size"]["target"] == "bigint"
    assert fetch(pg_database, "SELECT size FROM sizes ORDER BY id") == [(2**31,), (-(2**40),), (2**63 - 1,), (7,)]


def test_blobs_into_bytea(tmp_path, pg_database):
    rows = [(1, bytes(range(256))), (2, b""), (3, b"\\N\t\n\x00"), (4, None)]
    src = make_source(tmp_path / "x.db", "CREATE TABLE files (id INTEGER PRIMARY KEY, content BLOB)", rows)

    migrate(src, pg_database)

    assert [bytes(r[0]) if r[0] is not None else None for r in fetch(
        pg_database, "SELECT content FROM files ORDER BY id")] == [v for _, v in rows]


def test_real_values_are_kept_exactly(tmp_path, pg_database):
    generator = random.Random(7)
    tricky = [0.1, 1 / 3, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 8.228927346002939e-297,
              6.203765383161799e-298, 4.0858482746520603e-39, -123456.789, 1e16, 3.0]
    doubles = tricky + [struct.unpack("<d", generator.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(2000)]
    doubles = [d for d in doubles if d == d and abs(d) != float("inf")]
    rows = [(i, d) for i, d in enumerate(doubles)]
    src = make_source(tmp_path / "r.db", "CREATE TABLE measures (id INTEGER PRIMARY KEY, value REAL)", rows)

    migrate(src, pg_database)

    got = [r[0] for r in fetch(pg_database, "SELECT value FROM measures ORDER BY id")]
    assert [struct.pack("<d", g) for g in got] == [struct.pack("<d", d) for d in doubles]


def test_real_values_streamed_into_existing_tables_are_kept_exactly(tmp_path, pg_database):
    # No profile: each REAL is formatted by the rule's Python form called from the streaming query.
    generator = random.Random(11)
    doubles = [0.1, 1 / 3, 5e-324, 1.7976931348623157e308, -123456.789] + [
        struct.unpack("<d", generator.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(3000)]
    doubles = [d for d in doubles if d == d and abs(d) != float("inf")]
    src = make_source(tmp_path / "r.db", "CREATE TABLE measures (id INTEGER PRIMARY KEY, value REAL, note TEXT)",
                      [(i, d, f"row {i}") for i, d in enumerate(doubles)] + [(len(doubles), None, "none")])
    run_sql(pg_database, "CREATE TABLE measures (id bigint, value double precision, note text)")

    result = migrate(src, pg_database, create_tables=False)

    assert result["profile"]["tables"]["measures"]["columns"]["value"]["conversion"] == "streamed"
    got = [r[0] for r in fetch(pg_database, "SELECT value FROM measures ORDER BY id")]
    assert [None if g is None else struct.pack("<d", g) for g in got] == [
        struct.pack("<d", d) for d in doubles] + [None]


def test_a_streamed_real_the_column_cannot_hold_is_named_by_its_rule(tmp_path, pg_database):
    src = make_source(tmp_path / "r.db", "CREATE TABLE measures (id INTEGER PRIMARY KEY, value REAL)",
                      [(1, 1.5), (2, 2.5), (3, 1e300), (4, 4.5)])
    run_sql(pg_database, "CREATE TABLE measures (id bigint, value real)")

    with pytest.raises(MigrationError) as failure:
        migrate(src, pg_database, create_tables=False)

    assert str(failure.value).startswith("table measures, column value, rowid 3: value 1e+300 is out of range for real")
    assert fetch(pg_database, "SELECT count(*) FROM measures") == [(0,)]


def test_text_round_trips_byte_for_byte(tmp_path, pg_database):
    texts = ["tab\there", "new\nline", "carriage\rreturn", "back\\slash", "\\N", "NULL", "", "'single' \"double\"",
             "\\.", "trailing backslash\\", "ünïcödé ✓ 日本語 🎉", "\\\\t not a tab", " spaces ", "a\r\n\tb\\c"]
    rows = [(i, t) for i, t in enumerate(texts)] + [(len(texts), None)]
    src = make_source(tmp_path / "s.db", "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, name VARCHAR(40))",
                      [(i, t, t) for i, t in rows])

    migrate(src, pg_database)

    got = fetch(pg_database, "SELECT body, name FROM notes ORDER BY id")
    assert got == [(t, t) for _, t in rows]
    assert_same_content(src, pg_database, "notes")


def test_numeric_precision_and_scale(tmp_path, pg_database):
    # A REAL goes in as its shortest decimal representation, the one that reads back as the same double.
    rows = [(1, 12345678901234.123456), (2, 0.1), (3, 42), (4, "3.25")]
    src = make_source(tmp_path / "n.db", "CREATE TABLE money (id INTEGER PRIMARY KEY, amount numeric(20,6))", rows)

    result = migrate(src, pg_database)

    assert result["profile"]["tables"]["money"]["columns"]["amount"]["target"] == "numeric(20,6)"
    assert [r[0] for r in fetch(pg_database, "SELECT amount FROM money ORDER BY id")] == [
        Decimal("12345678901234.123000"), Decimal("0.100000"), Decimal("42.000000"), Decimal("3.250000")]


def test_a_value_the_target_type_refuses_names_table_column_rowid_and_value(tmp_path, pg_database):
    rows = [(1, "2024-01-01 00:00:00"), (2, "2024-02-30 10:00:00"), (3, "not a date")]
    src = make_source(tmp_path / "bad.db", "CREATE TABLE events (id INTEGER PRIMARY KEY, at DATETIME)", rows)

    with pytest.raises(MigrationError) as failure:
        migrate(src, pg_database)

    message = str(failure.value)
    assert "\n" not in message
    assert "table events, column at, rowid 2: value '2024-02-30 10:00:00'" in message
    assert "nothing was written" in message


def test_dates_the_calendar_refuses_are_caught_before_writing(tmp_path, pg_database):
    rows = [(1, "2024-02-29"), (2, "2024-13-01"), (3, "2023-02-29")]
    src = make_source(tmp_path / "d.db", "CREATE TABLE days (id INTEGER PRIMARY KEY, day DATE)", rows)

    with pytest.raises(MigrationError) as failure:
        migrate(src, pg_database)

    assert "table days, column day, rowid 2: value '2024-13-01' is not a date" in str(failure.value)
    assert "(and 1 more invalid value)" in str(failure.value)


def _timestamp_candidates(count):
    """Text near the edges of what SQLite's date functions and the calendar accept."""
    generator = random.Random(7)
    pick = generator.choice
    for _ in range(count):
        year = pick(["0000", "0001", "1900", "2000", "2023", "2024", "2100", "9999"])
        month = pick(["00", "01", "02", "04", "09", "11", "12", "13"])
        date = f"{year}-{month}-{pick(['00', '01', '09', '28', '29', '30', '31', '32'])}"
        time = pick(["", " 00:00", "T23:59:59", " 24:00", " 23:60", " 12:00:60", " 10:00:00.123456",
                     " 10:00:00.1234567890123", " 1:00", "\t10:00"])
        zone = pick(["", "", "Z", "z", "+05:30", "-13:59", "+14:00", "+23:59", " +01:00", "+0100"]) if time else ""
        yield date + time + zone
    yield from ("now", "2024-01-01\n", "2024-01-01 10:00\r", "20240101", "2024-1-01", "")


def _uuid_candidates(count):
    generator = random.Random(11)
    for _ in range(count):
        text = str(uuid.UUID(int=generator.getrandbits(128)))
        yield generator.choice([text, text.upper(), text.replace("-", ""), "{" + text + "}", text[:-1] + "g",
                                text[:-1], text.replace("-", "", 1), text + " "])


@pytest.mark.parametrize("target, candidates", [
    (TargetType("timestamptz", "timestamptz"), _timestamp_candidates(20000)),
    (TargetType("uuid", "uuid"), _uuid_candidates(2000)),
])
def test_a_text_pattern_accepts_only_what_the_sql_check_accepts(target, candidates):
    # The profile trusts a rule's text_pattern instead of its valid_sql for whole slices of a
    # column: a value the pattern accepts and valid_sql refuses would reach PostgreSQL unchecked.
    rule = rule_for(target)
    pattern = re.compile(rule.text_pattern)
    connection = sqlite3.connect(":memory:")
    check = f"SELECT {rule.valid_sql('x')} FROM (SELECT ? AS x)"  # noqa: S608 - the rule's own SQL
    matched = 0
    for text in candidates:
        if pattern.fullmatch(text.encode()):
            matched += 1
            assert connection.execute(check, (text,)).fetchone()[0] == 1, text
    assert matched > 100  # the pattern does the work for ordinary values
