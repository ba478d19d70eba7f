"""Dates as SQLite stores them: ISO 8601 text, Julian day numbers, Unix time (https://sqlite.org/lang_datefunc.html).

Numbers follow SQLite's 'auto' rule unless datetime_formats declares a column's
representation; a number that fits no representation, or a column mixing Julian
days and Unix times, stops the run naming the column and leaves the target as it was.
"""

import datetime
import os
import random
import sqlite3
import subprocess
from decimal import ROUND_HALF_UP, Decimal

import pytest
from conftest import build_sqlite, execute
from sqlite_pg import MigrationError, migrate
from sqlite_pg.loader import LoadPlan, copy_line_sql, load_table
from sqlite_pg.rules import Invalid, rule_for
from sqlite_pg.source import Source
from sqlite_pg.target import state_table_ddl
from sqlite_pg.typemap import TargetType

UTC = datetime.timezone.utc
EVENTS = "CREATE TABLE events (id INTEGER PRIMARY KEY, at);"
TIMESTAMPTZ = TargetType("timestamptz", "timestamptz")


def sqlite_times(path, values):
    """SQLite's own reading of each number: strftime('%Y-%m-%d %H:%M:%f', x), as UTC datetimes."""
    connection = sqlite3.connect(path)
    try:
        return [datetime.datetime.fromisoformat(connection.execute(
            "SELECT strftime('%Y-%m-%d %H:%M:%f', ?)", (value,)).fetchone()[0]).replace(tzinfo=UTC)
            for value in values]
    finally:
        connection.close()


def exact_instant(julian_day):
    micros = ((Decimal(julian_day) - Decimal("2440587.5")) * 86_400_000_000).quantize(Decimal(1), ROUND_HALF_UP)
    return datetime.datetime(1970, 1, 1, tzinfo=UTC) + datetime.timedelta(microseconds=int(micros))


def loaded(conninfo, column="at", table="events"):
    return [row[0] for row in execute(conninfo, f"SELECT {column} FROM {table} ORDER BY id")]  # noqa: S608


def pg_dump(postgres_server, conninfo):
    """The target's schema and data as pg_dump prints them, without the per-run \\restrict key lines."""
    output = subprocess.run(
        [str(postgres_server.bin / "pg_dump"), "-h", conninfo["host"], "-p", str(conninfo["port"]),
         "-U", conninfo["user"], "-d", conninfo["dbname"]],
        env=dict(os.environ, PGPASSWORD=conninfo["password"]), check=True, capture_output=True, text=True).stdout
    return [line for line in output.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))]


def fails_leaving_target_as_it_was(postgres_server, conninfo, src, *fragments, **options):
    before = pg_dump(postgres_server, conninfo)
    with pytest.raises(MigrationError) as failure:
        migrate(src, conninfo, **options)
    message = str(failure.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert pg_dump(postgres_server, conninfo) == before
    return message


@pytest.fixture
def prepared_target(pg_database):
    """A target that already holds something, so that "as it was" is more than an empty database."""
    execute(pg_database, "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz)")
    execute(pg_database, "CREATE TABLE kept (id int PRIMARY KEY, note text)")
    execute(pg_database, "INSERT INTO kept VALUES (1, 'before the run')")
    return pg_database


def _julian_source(tmp_path):
    connection = sqlite3.connect(":memory:")
    stored = [connection.execute("SELECT julianday(?)", (text,)).fetchone()[0] for text in
              ("2024-03-01 12:34:56.789", "1999-12-31 23:59:59.999", "0001-01-01 00:00:00.001")]
    values = stored + [2460000.5, 2460000.25, 2460000.123456789, 1721425.5, 5373484.499999, 2451545.0]
    src = build_sqlite(tmp_path / "j.db", "CREATE TABLE events (id INTEGER PRIMARY KEY, at REAL, "
                       "local TIMESTAMP, day DATE);",
                       {"events": [(i, v, v if v < 5373484 else None, v) for i, v in enumerate(values)]
                        + [(len(values), 2460000, None, None)]})
    return src, values, stored


def test_a_julian_day_column_becomes_the_timestamps_sqlite_shows(tmp_path, pg_database):
    src, values, stored = _julian_source(tmp_path)
    execute(pg_database, "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz, local timestamp, day date)")

    migrate(src, pg_database, source_timezone="Europe/Berlin")

    at = loaded(pg_database)
    expected = sqlite_times(src, values)
    # What julianday() stored comes back exactly; other doubles to their microsecond, which SQLite's
    # own reading (whole milliseconds, rounded in double arithmetic) is within a millisecond of.
    assert at[:len(stored)] == expected[:len(stored)]
    assert all(abs(got - sqlite) < datetime.timedelta(milliseconds=1) for got, sqlite in zip(at, expected))
    # The others are the double's own value to the microsecond (computed here in exact decimal arithmetic).
    assert at[len(stored):-1] == [exact_instant(value) for value in values[len(stored):]]
    assert at[len(stored)] == datetime.datetime(2023, 2, 25, tzinfo=UTC)
    assert at[len(stored) + 3:len(stored) + 6:2] == [datetime.datetime(1, 1, 1, tzinfo=UTC),
                                                     datetime.datetime(2000, 1, 1, 12, tzinfo=UTC)]
    assert at[-1] == datetime.datetime(2023, 2, 24, 12, tzinfo=UTC)  # an INTEGER Julian day is its noon
    # timestamp without time zone: the same instants as wall-clock time in the source zone (converted in Python)
    berlin = [row[0] for row in execute(pg_database, "SELECT local FROM events WHERE local IS NOT NULL "
                                                     "AND local > '0002-01-01' ORDER BY id")]
    zone = rule_for(TIMESTAMPTZ, "Europe/Berlin").zone
    assert berlin == [moment.astimezone(zone).replace(tzinfo=None) for moment in at[:-1] if 1 < moment.year < 9999]
    days = [row[0] for row in execute(pg_database, "SELECT day::text FROM events ORDER BY id")]
    assert days[:len(stored)] == ["2024-03-01", "1999-12-31", "0001-01-01"]
    assert days[len(stored):len(stored) + 2] == ["2023-02-25", "2023-02-24"]


def test_unix_seconds_and_milliseconds_columns(tmp_path, pg_database):
    rows = [(1, 1709296496, 1709296496123, 0), (2, 1709296496.25, 1709296496123.5, 1000),
            (3, -86400, -100000000000, -5), (4, 5373485, 100000000000, 5373484.25), (5, None, -100000000001, None)]
    src = build_sqlite(tmp_path / "u.db", "CREATE TABLE events (id INTEGER PRIMARY KEY, at, at_ms, small);",
                       {"events": rows})
    execute(pg_database, "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz, at_ms timestamptz, "
                         "small timestamptz)")

    # small holds Unix times SQLite's rule would take for Julian days: declared, they are seconds
    migrate(src, pg_database, datetime_formats={"events.small": "unixepoch"})

    def utc(*fields):
        return datetime.datetime(*fields, tzinfo=UTC)

    assert execute(pg_database, "SELECT at, at_ms, small FROM events ORDER BY id") == [
        (utc(2024, 3, 1, 12, 34, 56), utc(2024, 3, 1, 12, 34, 56, 123000), utc(1970, 1, 1)),
        (utc(2024, 3, 1, 12, 34, 56, 250000), utc(2024, 3, 1, 12, 34, 56, 123500), utc(1970, 1, 1, 0, 16, 40)),
        (utc(1969, 12, 31), utc(1966, 10, 31, 14, 13, 20), utc(1969, 12, 31, 23, 59, 55)),
        # just past the Julian-day range: Unix seconds; from |n| = 1e11 on: milliseconds
        (utc(1970, 3, 4, 4, 38, 5), utc(1973, 3, 3, 9, 46, 40), utc(1970, 3, 4, 4, 38, 4, 250000)),
        (None, utc(1966, 10, 31, 14, 13, 19, 999000), None),
    ]


def test_a_small_number_is_a_julian_day_unless_the_column_is_declared_unix_time(tmp_path, prepared_target,
                                                                               postgres_server):
    src = build_sqlite(tmp_path / "s.db", EVENTS, {"events": [(1, 1000), (2, 0)]})

    fragments = ("table events, column at, rowid 1: value 1000 is read as a Julian day number",
                 "declare it unixepoch in datetime_formats")
    fails_leaving_target_as_it_was(postgres_server, prepared_target, src, *fragments)
    # A run stops at the first bad value; the preflight profile counts them all.
    message = fails_leaving_target_as_it_was(postgres_server, prepared_target, src, *fragments, preflight=True)
    assert "(and 1 more invalid value)" in message

    migrate(src, prepared_target, datetime_formats={"events.at": "unixepoch"})
    assert loaded(prepared_target) == [datetime.datetime(1970, 1, 1, 0, 16, 40, tzinfo=UTC),
                                       datetime.datetime(1970, 1, 1, tzinfo=UTC)]


def test_a_declared_column_refuses_a_number_of_another_representation(tmp_path, prepared_target, postgres_server):
    src = build_sqlite(tmp_path / "d.db", EVENTS, {"events": [(1, 2460000.5), (2, 1700000000), (3, "2024-01-01")]})

    fails_leaving_target_as_it_was(postgres_server, prepared_target, src,
                                   "table events, column at, rowid 2: value 1700000000 is not a Julian day number",
                                   "datetime_formats declares", datetime_formats={"events.at": "julian"})
    fails_leaving_target_as_it_was(postgres_server, prepared_target, src,
                                   "table events, column at, rowid 1: value 2460000.5 is a number, but "
                                   "datetime_formats declares ISO 8601 text", datetime_formats={"EVENTS.AT": "iso"})


def test_numbers_that_fit_no_representation_stop_the_run_naming_the_column(tmp_path, prepared_target,
                                                                           postgres_server):
    src = build_sqlite(tmp_path / "n.db", EVENTS,
                       {"events": [(1, 1709296496), (2, 1e15), (3, -10**14), (4, 9e999)]})

    fragment = "table events, column at, rowid 2: value 1000000000000000.0 fits no date representation"
    fails_leaving_target_as_it_was(postgres_server, prepared_target, src, fragment)
    message = fails_leaving_target_as_it_was(postgres_server, prepared_target, src, fragment, preflight=True)
    assert "(and 2 more invalid values)" in message


def test_a_column_mixing_julian_days_and_unix_times_stops_the_run(tmp_path, prepared_target, postgres_server):
    src = build_sqlite(tmp_path / "m.db", EVENTS, {"events": [(1, 2460000.5), (2, 1700000000), (3, "2024-01-01")]})

    for check_mode in (False, True):
        fails_leaving_target_as_it_was(postgres_server, prepared_target, src, "table events, column at:",
                                       "value 1700000000 is Unix time but the column also holds Julian day numbers "
                                       "(such as 2460000.5)", "declare the column in datetime_formats",
                                       check_mode=check_mode)

    migrate(src, prepared_target, datetime_formats={"events.at": "unixepoch"})
    assert loaded(prepared_target)[:2] == [datetime.datetime(1970, 1, 29, 11, 20, 0, 500000, tzinfo=UTC),
                                           datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)]


def test_check_mode_reports_each_date_columns_representations(tmp_path, pg_database):
    rows = [(1, "2024-01-01 10:00:00", 2460000.5, 1700000000, 1700000000123),
            (2, "2024-01-02", 2460001.5, 1700000001.5, None),
            (3, None, None, 10, 1700000000)]
    src = build_sqlite(tmp_path / "p.db", "CREATE TABLE events (id INTEGER PRIMARY KEY, iso DATETIME, "
                       "julian DATETIME, unix DATETIME, millis DATETIME);", {"events": rows})

    result = migrate(src, pg_database, check_mode=True, datetime_formats={"events.unix": "unixepoch"})

    columns = result["profile"]["tables"]["events"]["columns"]
    assert {name: columns[name]["dates"] for name in ("iso", "julian", "unix", "millis")} == {
        "iso": {"iso": 2, "julian": 0, "unixepoch": 0, "unixepoch_ms": 0, "datetime_format": "auto"},
        "julian": {"iso": 0, "julian": 2, "unixepoch": 0, "unixepoch_ms": 0, "datetime_format": "auto"},
        "unix": {"iso": 0, "julian": 0, "unixepoch": 3, "unixepoch_ms": 0, "datetime_format": "unixepoch"},
        "millis": {"iso": 0, "julian": 0, "unixepoch": 1, "unixepoch_ms": 1, "datetime_format": "auto"},
    }
    assert "dates" not in columns["id"]
    assert execute(pg_database, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


@pytest.mark.parametrize("formats, fragment", [
    ({"event.at": "julian"}, "datetime_formats: event.at names no column of the source"),
    ({"events.when": "julian"}, "datetime_formats: events.when names no column of the source"),
    ({"events.at": "jd"}, "datetime_formats: events.at is 'jd', not one of auto, iso, julian, unixepoch"),
    ({"events.id": "julian"}, "datetime_formats: events.id becomes bigint, not a date or timestamp"),
])
def test_a_datetime_format_for_no_date_column_is_one_line_before_anything_is_written(
        tmp_path, prepared_target, postgres_server, formats, fragment):
    src = build_sqlite(tmp_path / "o.db", EVENTS, {"events": [(1, 2460000.5)]})

    fails_leaving_target_as_it_was(postgres_server, prepared_target, src, fragment, datetime_formats=formats)


def _plan_watching(classes):
    """A load plan whose date field watches its numbers, as a load no profile has vetted builds it."""
    formatted = rule_for(TIMESTAMPTZ, "UTC", "auto", ("events", "at")).format_sql("at", classes)
    fields = ["CAST(id AS TEXT)", f"CASE WHEN at IS NULL THEN '\\N' ELSE {formatted} END"]
    return LoadPlan(
        index=0, source_table="events", target_table="events", schema="public", create_sql="",
        copy_columns=["id", "at"], copy_sources=["id", "at"], sql_fields=fields,
        field_types=[TargetType("bigint", "integer"), TIMESTAMPTZ], raw_types=[],
        select_sql=f"SELECT {copy_line_sql(fields)} FROM events",  # noqa: S608
        parameters=(), python_types=[], datetime_formats={}, source_rows=3, expected_rows=3, key_sql="rowid",
        key_columns=["rowid"], table_sql="events", where_sql="1", source_timezone="UTC", source_id="test")


def test_a_stream_stops_at_the_first_number_of_a_second_representation(tmp_path, prepared_target, postgres_server):
    execute(prepared_target, state_table_ddl("public"))
    mixed = build_sqlite(tmp_path / "w.db", EVENTS, {"events": [(1, "2024-01-01"), (2, 2460000.5), (3, 1700000000)]})
    source = Source(mixed)
    before = pg_dump(postgres_server, prepared_target)

    with pytest.raises(MigrationError) as failure:
        load_table(source, prepared_target, _plan_watching({"integer", "real", "text"}), source.fingerprint())

    assert str(failure.value) == (
        "table events, column at: value 1700000000 is Unix time but the column also holds Julian day numbers "
        "(such as 2460000.5), so its dates cannot be told apart; declare the column in datetime_formats as julian, "
        "unixepoch or unixepoch_ms; nothing of this table was written")
    assert pg_dump(postgres_server, prepared_target) == before

    # The same watch lets a column of one representation through.
    plain = build_sqlite(tmp_path / "p.db", EVENTS, {"events": [(1, "2024-01-01"), (2, 2460000.5), (3, 2460001)]})
    source = Source(plain)
    load_table(source, prepared_target, _plan_watching({"integer", "real", "text"}), source.fingerprint())
    assert loaded(prepared_target) == [datetime.datetime(2024, 1, 1, tzinfo=UTC),
                                       datetime.datetime(2023, 2, 25, tzinfo=UTC),
                                       datetime.datetime(2023, 2, 25, 12, tzinfo=UTC)]


def test_the_python_conversion_watches_a_stream_the_same_way():
    rule = rule_for(TargetType("timestamp", "timestamp"), "Europe/Berlin", "auto", ("events", "at"))
    assert rule.convert("real", 2460000.5) == b"2023-02-25 01:00:00"
    with pytest.raises(Invalid, match=r"is Unix time but the column also holds Julian day numbers \(such as"):
        rule.convert("integer", 1700000000)


@pytest.mark.parametrize("datetime_format", ["auto", "julian", "unixepoch", "unixepoch_ms", "iso"])
@pytest.mark.parametrize("target", [TIMESTAMPTZ, TargetType("date", "date")])
def test_sql_and_python_read_every_number_alike(datetime_format, target):
    # The load formats numbers in SQLite's SQL; defaults, naive timestamps in another zone and the
    # validation go through Python: both must give the same instant, and refuse the same values.
    generator = random.Random(5)
    values = [0, 1721425.5, 1721425.4999, 2440587.5, 5373484.499999, 5373484.4999999999, 5373484.5, -1,
              1e11, 253402300799, 253402300800, -62135596800, -62135596801, 2460000, 1e300, 9e999, -9e999]
    values += [generator.uniform(1721425.5, 5373484.5) for _ in range(3000)]
    values += [generator.uniform(-1e11, 1e11) for _ in range(3000)]
    values += [generator.randint(-10**14, 3 * 10**14) for _ in range(3000)]
    values += [generator.randint(0, 6_000_000) for _ in range(3000)]
    rule = rule_for(target, "UTC", datetime_format)
    connection = sqlite3.connect(":memory:")
    query = f"SELECT {rule.format_sql('x', {'integer', 'real'})}, {rule.valid_sql('x')} FROM (SELECT ? AS x)"  # noqa: S608
    read = datetime.date.fromisoformat if target.category == "date" else (
        lambda text: datetime.datetime.fromisoformat(text.replace("+00", "+00:00").replace("+00:00:00", "+00:00")))
    for value in values:
        formatted, valid = connection.execute(query, (value,)).fetchone()
        try:
            converted = rule.convert("integer" if isinstance(value, int) else "real", value).decode()
        except Invalid:
            converted = None
        assert (formatted and read(formatted)) == (converted and read(converted)), value
        assert bool(valid) == (converted is not None), value
