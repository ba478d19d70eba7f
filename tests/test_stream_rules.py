"""The stream's tests leave checks to PostgreSQL only where its input refuses exactly what the rules refuse.

For every value of a corpus of edge cases: the stream's test (rules.Rule.stream_sql) and
PostgreSQL's input together accept a value exactly when the rule's whole test (valid_sql,
as the profile runs it) and PostgreSQL's input do. So a value only the stream test lets
through is one PostgreSQL refuses, and no value the rules accept is refused by the stream.
"""

import itertools
import json
import random
import sqlite3

import psycopg2
import pytest
from sqlite_pg.rules import rule_for
from sqlite_pg.typemap import TargetType

ACCEPTS = """CREATE FUNCTION pg_temp.accepts(value text, type text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN EXECUTE format('SELECT %L::' || type, value); RETURN true; EXCEPTION WHEN others THEN RETURN false; END $$"""


def timestamps():
    random.seed(11)
    values = {"now", "today", "tomorrow", "infinity", "-infinity", "epoch", "allballs", "today 03:04", "J2451187",
              "Jan 2 2024", "2024-01-02 03:04:05 BC", "20240102", "2024/01/02", " 2024-01-02 03:04:05",
              "2024-01-02  03:04:05", "2024-01-02\t03:04:05", "2024-01-02 03:04:05\n", "2024-01-02 now",
              "2024-01-02 allballs", "2024-01-02 040506", "2024-01-02 3:04:05", "20240-01-02 03:04:05"}
    years, months, days = ("0000", "0001", "2023", "2024", "9999"), ("00", "01", "02", "04", "12", "13"), \
        ("00", "28", "29", "30", "31", "32")
    for year, month, day in itertools.product(years, months, days):
        values.add(f"{year}-{month}-{day}")
        for hour, minute, second in (("00", "00", "00"), ("23", "59", "59"), ("23", "59", "60"), ("24", "00", "00"),
                                     ("24", "30", "00"), ("25", "00", "00"), ("03", "60", "00")):
            for separator, fraction in itertools.product((" ", "T"), ("", ".5", ".123456", ".1234567", ".12345Z")):
                values.add(f"{year}-{month}-{day}{separator}{hour}:{minute}:{second}{fraction}")
    base = "2024-03-04 05:06:07.123456"
    pool = "0123456789 \t+-:.TZzaPM/"
    for _ in range(3000):
        value = list(base)
        for _ in range(random.randint(1, 3)):
            value[random.randrange(len(value))] = random.choice(pool)
        values.add("".join(value))
    for suffix in ("Z", "+05:30", "-08:00", " +05:30", "+05", "+0530", " PST", " UTC", " Europe/Berlin", " z"):
        values.update({base + suffix, base[:19] + suffix, base[:16] + suffix})
    return sorted(values)


def uuids():
    canonical = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    bare = canonical.replace("-", "")
    values = {canonical, canonical.upper(), bare, bare.upper(), "{" + canonical + "}", "{" + bare + "}",
              "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11", "a0eebc999c0b4ef8-bb6d6bb9bd380a11",
              canonical + " ", " " + canonical, canonical[:-1], bare[:-1], bare + "0", "urn:uuid:" + canonical}
    for position in range(36):
        for char in "g-{}\\ \t":
            values.add(canonical[:position] + char + canonical[position + 1:])
    for position in range(32):
        values.add(bare[:position] + "x" + bare[position + 1:])
    return sorted(values)


def json_documents():
    tokens = ['{', '}', '[', ']', ',', ':', '"a"', '"', '1', '-', '0', '.', 'e', '+', '01', 'true', 'null', 'NaN',
              ' ', '\t', '\n', '\\', '\\u0000', '\\ud800', '\\udc00', '\\u00e9', '\x01', 'é', '\\n', '-0', '1e5']
    values = {"".join(combo) for n in (1, 2, 3) for combo in itertools.product(tokens, repeat=n)}
    values.update({'{"a": {"b": [1, 2.5e3, "x\\u0000"]}}', '{"a": 1, "a": 2}', "[" * 100 + "]" * 100,
                   '"\\ud83d\\ude00"', "1e400"})
    return sorted(values)


CASES = [
    ("timestamptz", TargetType("timestamp with time zone", "timestamptz"), timestamps()),
    ("timestamp", TargetType("timestamp without time zone", "timestamp"), timestamps()),
    ("date", TargetType("date", "date"), timestamps()),
    ("uuid", TargetType("uuid", "uuid"), uuids()),
    ("jsonb", TargetType("jsonb", "json"), json_documents()),
    ("json", TargetType("json", "json"), json_documents()),
]


@pytest.mark.parametrize(("pg_type", "target", "values"), CASES, ids=[case[0] for case in CASES])
def test_stream_test_and_postgresql_refuse_what_the_rule_refuses(pg_database, pg_type, target, values):
    rule = rule_for(target)
    lite = sqlite3.connect(":memory:")
    lite.execute("CREATE TABLE t (v)")
    lite.executemany("INSERT INTO t VALUES (?)", [(v,) for v in values])
    stream, valid = rule.stream_sql("v", "text") or "1", rule.valid_sql("v")
    judged = lite.execute(f"SELECT v, coalesce({stream}, 0), coalesce({valid}, 0) FROM t").fetchall()  # noqa: S608
    connection = psycopg2.connect(**pg_database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'")
            cursor.execute(ACCEPTS)
            cursor.execute("SELECT pg_temp.accepts(v, %s) FROM unnest(%s::text[]) v",
                           (pg_type, [v.replace("\x00", "") for v, _, _ in judged]))
            accepted = [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()
    differences = [value for (value, by_stream, by_rule), by_pg in zip(judged, accepted)
                   if bool(by_stream and by_pg) != bool(by_rule and by_pg)]
    assert not differences, json.dumps(differences[:20])
    assert sum(accepted) >= 4 and not all(accepted)  # the corpus holds both kinds
    if rule.stream_sql("v", "text") != valid:
        # Something is left to PostgreSQL: some value the stream lets through is one only PostgreSQL refuses.
        assert any(by_stream and not by_rule for _, by_stream, by_rule in judged)
