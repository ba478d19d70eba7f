"""One pass, all or nothing: the default run reads each table once, by its load, and a failure puts back
everything the run wrote, whether the SQL formatting, PostgreSQL or a foreign key build found the problem."""

import difflib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, assert_same_content, build_sqlite, execute, wait_until
from sqlite_pg import STATE_TABLE, MigrationError, migrate
from test_engine_crash import build

EXCEPTION_NAME = re.compile(r"\b\w*(Error|Exception)\b|Traceback")
UNDONE = "everything this run wrote was undone"


def dump(conninfo, postgres_server, schema_only=False):
    """pg_dump of the whole database (schema and data, or the schema alone), without its per-run lines."""
    command = [str(postgres_server.bin / "pg_dump"), "-h", conninfo["host"], "-p", str(conninfo["port"]),
               "-U", conninfo["user"], "-d", conninfo["dbname"], "--no-owner"] + (["--schema-only"] * schema_only)
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            env={"PGPASSWORD": conninfo["password"], "PATH": "/usr/bin:/bin"}).stdout
    return "\n".join(line for line in output.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def fails_and_puts_back(src, conninfo, postgres_server, *fragments, **options):
    """migrate() fails with one line holding every fragment; pg_dump (schema, and schema with data) is unchanged."""
    before = dump(conninfo, postgres_server), dump(conninfo, postgres_server, schema_only=True)
    with pytest.raises(MigrationError) as failure:
        migrate(str(src), conninfo, **options)
    message = str(failure.value)
    assert "\n" not in message and not EXCEPTION_NAME.search(message), message
    for fragment in fragments:
        assert fragment in message, message
    after = dump(conninfo, postgres_server), dump(conninfo, postgres_server, schema_only=True)
    assert after[1] == before[1], "".join(difflib.unified_diff(before[1].splitlines(True), after[1].splitlines(True)))
    # Rows put back may sit elsewhere in their table: the data is compared line by line, in any order.
    assert sorted(after[0].splitlines()) == sorted(before[0].splitlines()), "".join(
        difflib.unified_diff(before[0].splitlines(True), after[0].splitlines(True)))
    return message


def two_tables(tmp_path, rows=1000, bad=None):
    """SQLite parent (loaded first, committed) and child; ``bad``: (rowid, column, value) put into child."""
    src = tmp_path / "two.db"
    build_sqlite(src, """
        CREATE TABLE parent (id INTEGER PRIMARY KEY, name TEXT);
        CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent(id), at DATETIME,
                            code VARCHAR(5), doc TEXT, amount REAL);
    """, {"parent": [(i, f"p{i}") for i in range(1, 11)],
          "child": [(i, i % 10 + 1, f"2024-01-02 03:04:{i % 60:02d}", "ab", '{"a": 1}', i / 4)
                    for i in range(1, rows + 1)]})
    if bad:
        connection = sqlite3.connect(src)
        connection.execute(f"UPDATE child SET {bad[1]} = ? WHERE id = ?", (bad[2], bad[0]))  # noqa: S608
        connection.commit()
        connection.close()
    return src


def precreate(conninfo, code="varchar(5)", doc="jsonb", at="timestamptz"):
    execute(conninfo, "CREATE TABLE parent (id bigint, name text)")
    execute(conninfo, f"CREATE TABLE child (id bigint, parent_id bigint, at {at}, code {code}, doc {doc}, "
                      "amount double precision)")


def test_the_default_run_reads_each_table_once_and_loads_exact_content(tmp_path, pg_database):
    src = two_tables(tmp_path)
    precreate(pg_database)

    result = migrate(str(src), pg_database)

    assert result["profile"]["tables"]["child"]["columns"]["at"]["conversion"] == "streamed"
    assert result["tables"]["child"]["migrated"] == 1000
    assert result["profile"]["source"]["integrity_mode"] == "quick"
    for table in ("parent", "child"):
        assert_same_content(src, pg_database, table)
    assert execute(pg_database, "SELECT count(*) FROM pg_constraint WHERE contype = 'f'") == [(1,)]


@pytest.mark.parametrize(("value", "reason"), [
    ("now", "is not a timestamp"),  # PostgreSQL's timestamptz input would take it as the time of the load
    ("infinity", "is not a timestamp"),
    ("2024-01-02 03:04:05 PST", "is not a timestamp"),
    (b"\x00\x01", "is a BLOB"),
])
def test_a_value_the_sql_formatting_refuses_names_it_and_puts_everything_back(tmp_path, pg_database,
                                                                              postgres_server, value, reason):
    src = two_tables(tmp_path, bad=(700, "at", value))
    precreate(pg_database)

    message = fails_and_puts_back(src, pg_database, postgres_server, "table child, column at, rowid 700: value ",
                                  reason, UNDONE)
    assert "tables parent" in message  # committed before child failed, then undone


def test_a_value_python_formats_is_checked_too(tmp_path, pg_database, postgres_server):
    src = two_tables(tmp_path, bad=(650, "amount", "a lot"))
    precreate(pg_database)
    fails_and_puts_back(src, pg_database, postgres_server,
                        "table child, column amount, rowid 650: value 'a lot' is not a number", UNDONE)


@pytest.mark.parametrize(("column", "value", "shown"), [
    ("doc", '"\\ud800"', "invalid input syntax for type json (Unicode low surrogate must follow a high"),
    ("doc", b"caf\xe9", "invalid byte sequence"),
])
def test_a_refusal_only_postgresql_makes_is_mapped_back_to_its_row(tmp_path, pg_database, postgres_server, column,
                                                                   value, shown):
    src = two_tables(tmp_path, bad=(900, column, value))
    if isinstance(value, bytes):
        connection = sqlite3.connect(src)
        connection.execute(f"UPDATE child SET {column} = CAST(? AS TEXT) WHERE id = 900", (value,))  # noqa: S608
        connection.commit()
        connection.close()
    precreate(pg_database, doc="jsonb" if column == "doc" and not isinstance(value, bytes) else "text")
    fails_and_puts_back(src, pg_database, postgres_server, f"table child, column {column}, rowid 900: ", shown,
                        "PostgreSQL", UNDONE)


def one_column(tmp_path, pg_database, pg_type, good, bad, rows=50, rowid=30):
    """SQLite t(id, v TEXT) holding ``good`` in every row but ``bad`` at ``rowid``; t(id bigint, v pg_type) made."""
    src = build_sqlite(tmp_path / "one.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);",
                       {"t": [(i, bad if i == rowid else good) for i in range(1, rows + 1)]})
    execute(pg_database, f"CREATE TABLE t (id bigint, v {pg_type})")
    return src


UUID = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
STAMP = "2024-02-28 03:04:05.000000"


@pytest.mark.parametrize(("pg_type", "good", "bad", "reason", "refusal"), [
    ("uuid", UUID, "g" + UUID[1:], "is not a UUID", "invalid input syntax for type uuid"),
    # COPY's own characters in a UUID's layout: it reads another field, or an escape, and refuses the row.
    ("uuid", UUID, UUID[:20] + "\t" + UUID[21:], "is not a UUID", "extra data after last expected column"),
    ("uuid", UUID, UUID[:34] + "\\1", "is not a UUID", "invalid input syntax for type uuid"),
    ("timestamptz", STAMP, "2024-02-30 03:04:05.000000", "is not a valid timestamp (day is out of range for month)",
     "date/time field value out of range"),
    ("timestamptz", STAMP, "0000-06-01 03:04:05", "is not a valid timestamp (year 0 is out of range)",
     "date/time field value out of range"),
    ("date", "2024-01-02", "2023-02-29", "is not a date", "date/time field value out of range"),
    ("jsonb", '{"a": 1}', '{"a": }', "is not valid JSON", "invalid input syntax for type json"),
    ("jsonb", '{"a": 1}', '{"a": "\\u0000"}', "holds the JSON escape \\u0000", "unsupported Unicode escape sequence"),
], ids=["uuid digits", "uuid tab", "uuid backslash", "calendar day", "year 0", "date", "json syntax",
        "jsonb NUL escape"])
def test_a_check_left_to_postgresql_names_the_value_with_the_rules_reason(tmp_path, pg_database, postgres_server,
                                                                         pg_type, good, bad, reason, refusal):
    src = one_column(tmp_path, pg_database, pg_type, good, bad)
    fails_and_puts_back(src, pg_database, postgres_server, "table t, column v, rowid 30: value ", reason,
                        f"; PostgreSQL refused it: {refusal}")


@pytest.mark.parametrize(("pg_type", "good", "bad", "reason"), [
    ("uuid", UUID, "{" + UUID + "}", "is not a UUID"),  # PostgreSQL's input takes braces
    ("timestamptz", STAMP, "2024-02-28 23:59:60", "is not a valid timestamp"),  # the next minute for PostgreSQL
    ("timestamptz", STAMP, "2024-02-28 03:04:05 PST", "is not a timestamp"),
    ("json", '{"a": 1}', '{"a": "\\u0000"}', "holds the JSON escape \\u0000"),  # json keeps the escape
], ids=["uuid braces", "second 60", "zone abbreviation", "json NUL escape"])
def test_what_postgresql_would_accept_silently_is_still_refused_in_the_stream(tmp_path, pg_database,
                                                                               postgres_server, pg_type, good, bad,
                                                                               reason):
    src = one_column(tmp_path, pg_database, pg_type, good, bad)
    message = fails_and_puts_back(src, pg_database, postgres_server, "table t, column v, rowid 30: value ", reason)
    assert "PostgreSQL" not in message


def mixed_column(tmp_path, changes):
    """SQLite t(id, v TEXT, w without a type) of 3000 rows of text, with ``changes`` [(rowid, column, value)]."""
    src = build_sqlite(tmp_path / "mixed.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, w);",
                       {"t": [(i, f"v{i}", f"w{i}") for i in range(1, 3001)]})
    connection = sqlite3.connect(src)
    for rowid, column, value in changes:
        connection.execute(f"UPDATE t SET {column} = ? WHERE id = ?", (value, rowid))  # noqa: S608
    connection.commit()
    connection.close()
    return src


def test_classes_python_formats_come_beside_the_line_or_by_rowid_when_seldom(tmp_path, pg_database):
    # v is TEXT: a blob there is seldom, its row is read again by rowid; w has no type: its own raw field.
    src = mixed_column(tmp_path, [(2000, "v", "héllo".encode()), (2001, "v", b"x"), (1000, "w", 1.5),
                                  (2000, "w", "wé".encode()), (2500, "w", 7), (2999, "w", 0.1)])
    execute(pg_database, "CREATE TABLE t (id bigint, v text, w text)")
    migrate(str(src), pg_database)
    assert execute(pg_database, "SELECT id, v, w FROM t WHERE id IN (1, 1000, 2000, 2001, 2500, 2999) ORDER BY id") \
        == [(1, "v1", "w1"), (1000, "v1000", "1.5"), (2000, "héllo", "wé"), (2001, "x", "w2001"),
            (2500, "v2500", "7"), (2999, "v2999", "0.1")]


@pytest.mark.parametrize("column", ["v", "w"])
def test_a_bad_value_of_a_class_python_formats_is_named(tmp_path, pg_database, postgres_server, column):
    src = mixed_column(tmp_path, [(1000, "w", 1.5), (1500, "v", b"ok"), (2100, column, b"\xff")])
    execute(pg_database, "CREATE TABLE t (id bigint, v text, w text)")
    fails_and_puts_back(src, pg_database, postgres_server,
                        f"table t, column {column}, rowid 2100: value x'ff' is not valid UTF-8 (byte 0)")


def test_a_varchar_too_long_for_the_target(tmp_path, pg_database, postgres_server):
    src = two_tables(tmp_path, bad=(901, "code", "abcdefg"))
    precreate(pg_database)
    fails_and_puts_back(src, pg_database, postgres_server, "table child, column code, rowid 901: value 'abcdefg' is "
                        "7 characters long, more than character varying(5) holds", UNDONE)


def test_an_orphan_found_when_the_foreign_key_is_built_is_named_from_the_target(tmp_path, pg_database,
                                                                                postgres_server):
    src = two_tables(tmp_path, bad=(333, "parent_id", 77))
    precreate(pg_database)
    execute(pg_database, "ALTER TABLE child ADD PRIMARY KEY (id)")
    fails_and_puts_back(src, pg_database, postgres_server,
                        "table child, column parent_id, key (id=333): value 77 references a row missing from parent",
                        UNDONE, "tables child, parent")


def test_an_orphan_is_found_in_sqlite_when_the_keys_are_built_elsewhere(tmp_path, pg_database, postgres_server):
    src = two_tables(tmp_path, bad=(334, "parent_id", 78))
    precreate(pg_database)
    fails_and_puts_back(src, pg_database, postgres_server,
                        "table child, column parent_id, rowid 334: foreign key (parent_id) references a row missing "
                        "from parent", UNDONE, post_data=False)


def test_state_rows_a_failed_rerun_replaced_come_back_as_they_were(tmp_path, pg_database, postgres_server):
    src = two_tables(tmp_path)
    precreate(pg_database)
    migrate(str(src), pg_database, post_data=False)
    execute(pg_database, "TRUNCATE parent, child")  # emptied since: the rerun loads both again
    execute(pg_database, "ALTER TABLE child ADD CHECK (amount < 100)")  # and now refuses rows 400 and up
    fails_and_puts_back(src, pg_database, postgres_server, "table child, rowid 400: was refused by PostgreSQL: new row "
                        'for relation "child" violates check constraint "child_amount_check"', UNDONE, post_data=False)
    assert execute(pg_database, f"SELECT count(*) FROM {STATE_TABLE}") == [(2,)]  # noqa: S608


def test_preflight_finds_the_bad_value_before_anything_is_written(tmp_path, pg_database, postgres_server):
    src = two_tables(tmp_path, bad=(700, "at", "now"))
    precreate(pg_database)
    message = fails_and_puts_back(src, pg_database, postgres_server, "table child, column at, rowid 700: value 'now'",
                                  preflight=True)
    assert message.endswith("nothing was written")


def test_more_than_1600_columns_is_refused_before_anything_is_written(tmp_path, pg_database):
    columns = ", ".join(f"c{i} INTEGER" for i in range(1700))
    src = build_sqlite(tmp_path / "wide.db", f"CREATE TABLE wide (id INTEGER PRIMARY KEY, {columns});")
    with pytest.raises(MigrationError, match="^table wide has 1701 columns; PostgreSQL allows at most 1,600 per "
                                             "table"):
        migrate(src, pg_database)
    assert execute(pg_database, "SELECT to_regclass('wide')") == [(None,)]


def test_long_names_are_cut_and_the_notes_say_what_they_become(tmp_path, pg_database):
    long_column = "c" * 70
    src = build_sqlite(tmp_path / "long.db", f"CREATE TABLE t (id INTEGER PRIMARY KEY, {long_column} TEXT);",
                       {"t": [(1, "x")]})
    result = migrate(src, pg_database)
    assert f"table t: column {long_column} becomes {'c' * 63} in PostgreSQL (names are cut to 63 bytes)" in \
        result["profile"]["notes"]


def test_a_source_written_during_the_load_puts_everything_back(tmp_path, pg_database, postgres_server, monkeypatch):
    src = two_tables(tmp_path)
    connection = sqlite3.connect(src)
    connection.execute("PRAGMA journal_mode = WAL")  # a writer can commit while the load reads
    connection.close()
    precreate(pg_database)
    from sqlite_pg import loader

    original = loader.CopyStream.read
    writer = f"import sqlite3; c = sqlite3.connect({str(src)!r}); c.execute('UPDATE parent SET name = 1'); c.commit()"  # noqa: S608

    def read_then_write(stream, size=-1):
        if stream.plan.source_table == "child" and stream.rows == 0:
            subprocess.run([sys.executable, "-c", writer], check=True)  # another process writes while child loads
        return original(stream, size)

    monkeypatch.setattr(loader.CopyStream, "read", read_then_write)  # inherited by the forked workers
    fails_and_puts_back(src, pg_database, postgres_server, f"source {src} changed while table child was being read",
                        UNDONE, jobs=1)


def test_a_failure_while_the_loaded_tables_are_recorded_puts_their_sequences_back_too(tmp_path, pg_database,
                                                                                      postgres_server, monkeypatch):
    # Each loaded table is synced from the snapshot it loaded in a worker of its own, which moves its identity
    # sequence past max(id) and commits: with one worker, child (the larger) is recorded, then parent fails.
    from sqlite_pg import sync as sync_module

    src = two_tables(tmp_path)
    execute(pg_database, "CREATE TABLE parent (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name text)")
    execute(pg_database, "CREATE TABLE child (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
                         "parent_id bigint, at timestamptz, code varchar(5), doc jsonb, amount double precision)")
    original = sync_module.Sync._close_state

    def close_state(self, cursor):
        if "parent" in self.plans:
            raise MigrationError("recording parent failed on purpose")
        return original(self, cursor)

    monkeypatch.setattr(sync_module.Sync, "_close_state", close_state)  # inherited by the forked workers
    fails_and_puts_back(src, pg_database, postgres_server, "recording parent failed on purpose", UNDONE, jobs=1,
                        post_data=False)


def test_the_sample_streamed_into_existing_tables_arrives_exactly(sample_db, pg_database):
    migrate(str(sample_db), pg_database, post_data=False)  # creates the tables (profiled: types from the values)
    execute(pg_database, f"TRUNCATE files, tasks, replication_logs, storage_nodes; DROP TABLE {STATE_TABLE}")

    result = migrate(str(sample_db), pg_database)

    assert {c["conversion"] for c in result["profile"]["tables"]["files"]["columns"].values()} == {"streamed"}
    assert result["total_rows"] == 125
    for table in ("files", "tasks", "replication_logs", "storage_nodes"):
        assert_same_content(sample_db, pg_database, table)


def precreate_crash_tables(conninfo):
    execute(conninfo, "CREATE TABLE alpha (id bigint, name text)")
    execute(conninfo, "CREATE TABLE zeta (id bigint, alpha_id bigint, label text, amount double precision, "
                      "at timestamptz, flag boolean)")


def start_run(src, conninfo, output):
    """migrate() in a process of its own (jobs=1: alpha commits before zeta streams); its outcome as JSON."""
    options = {k: v for k, v in conninfo.items() if k != "password"}
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / "module_utils")!r})
        from sqlite_pg import MigrationError, migrate
        try:
            result = migrate({str(src)!r}, {options!r}, jobs=1)
        except MigrationError as error:
            result = dict(error.result or {{}}, msg=str(error))
        with open({str(output)!r}, "w") as stream:
            json.dump({{"msg": result["msg"], "status": result["status"]}}, stream)
    """)
    return subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PGPASSWORD=conninfo["password"]))


def wait_for_zeta_streaming(run, conninfo):
    streaming = "SELECT count(*) FROM pg_stat_progress_copy WHERE tuples_processed > 1000"
    assert wait_until(lambda: execute(conninfo, streaming)[0][0] or run.poll() is not None, timeout=60)
    assert run.poll() is None, "the run ended before its COPY could be interrupted"


def test_kill_9_mid_load_then_a_rerun_gives_exact_content(tmp_path, pg_database):
    src = tmp_path / "big.db"
    build(src)
    precreate_crash_tables(pg_database)
    run = start_run(src, pg_database, tmp_path / "outcome.json")
    try:
        wait_for_zeta_streaming(run, pg_database)
        os.kill(run.pid, signal.SIGKILL)  # no chance to undo: each table stays loaded (with its state row) or empty
        run.wait(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
    assert wait_until(lambda: execute(pg_database, "SELECT count(*) FROM pg_stat_activity WHERE application_name "
                                                   "LIKE 'sqlite_to_postgres %'")[0][0] == 0, timeout=30) is not None
    assert execute(pg_database, "SELECT (SELECT count(*) FROM alpha), (SELECT count(*) FROM zeta)") == [(100, 0)]

    result = migrate(str(src), pg_database, jobs=1)

    assert result["tables"]["alpha"]["action"] == "skipped" and result["tables"]["zeta"]["action"] == "loaded"
    assert_same_content(src, pg_database, "alpha")
    assert_same_content(src, pg_database, "zeta")


def test_a_server_restart_mid_load_says_so_in_one_line_puts_back_and_a_rerun_completes(tmp_path, pg_database,
                                                                                      postgres_server):
    src = tmp_path / "big.db"
    build(src)
    precreate_crash_tables(pg_database)
    before = dump(pg_database, postgres_server)
    output = tmp_path / "outcome.json"
    run = start_run(src, pg_database, output)
    data = os.path.join(postgres_server.directory, "data")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    try:
        wait_for_zeta_streaming(run, pg_database)
        subprocess.run(as_postgres + [str(postgres_server.bin / "pg_ctl"), "-D", data, "-m", "immediate", "-w",
                                      "-l", os.path.join(postgres_server.directory, "server.log"), "restart"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run.wait(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
    outcome = json.loads(output.read_text())

    assert outcome["status"] == "failed"
    message = outcome["msg"]
    assert "\n" not in message and not EXCEPTION_NAME.search(message), message
    assert message.startswith(f"table zeta: the connection to {pg_database['host']}:{pg_database['port']} was lost "
                              "while the table was loading (server restart, failover or network); everything this "
                              "run wrote was undone (tables alpha)"), message
    assert sorted(dump(pg_database, postgres_server).splitlines()) == sorted(before.splitlines())

    result = migrate(str(src), pg_database, jobs=1)

    assert result["tables"]["alpha"]["action"] == "loaded" and result["tables"]["zeta"]["action"] == "loaded"
    assert_same_content(src, pg_database, "alpha")
    assert_same_content(src, pg_database, "zeta")
