"""sync() against a real PostgreSQL: a migrated target brought up to date with a changed source.

The sample is migrated into the runbook's typed schema (foreign keys built by
the migration, so every commit of the sync is checked against them); the
SQLite file is then changed by scripts/measure_sync.py's change_rows (inserts,
updates and deletes in all four tables, a parent deleted with its children,
children re-pointed to new parents) and synced; the validation then has to
find both sides equal, as after a full migration.
"""

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    assert_same_content,
    break_index_page,
    build_sqlite,
    data_dump,
    execute,
    file_digests,
    migrate_into_typed_schema,
    wait_until,
)
from sqlite_pg.engine import migrate
from sqlite_pg.errors import MigrationError
from sqlite_pg.names import intervals_from_text, intervals_text
from sqlite_pg.sync import Sync, dirty_intervals, sync
from sqlite_pg.validate import changed_since, validate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from measure_sync import change_rows, touch_without_change  # noqa: E402

TABLES = ("storage_nodes", "files", "tasks", "replication_logs")
SPAN = 8  # rowids per key range here, so that the 125-row sample has several




@pytest.fixture
def migrated(sample_db, pg_database):
    migrate_into_typed_schema(sample_db, pg_database)
    forget_page_checksums(pg_database)
    return sample_db, pg_database


def forget_page_checksums(conninfo):
    """The migration records page checksums in spans of 65536 rowids: one span for these samples. Without them
    the first sync records spans of the width it is given (SPAN), so that the changes fall into several."""
    execute(conninfo, "UPDATE sqlite_to_postgres_state SET key_range_checksums = NULL")


def assert_equal_content(src, conninfo):
    result = validate(str(src), conninfo)
    mismatched = {t: v["differences"][:3] for t, v in result["tables"].items() if not v["match"]}
    assert result["status"] == "completed" and not mismatched, (result["msg"], mismatched)
    assert all(fk["validated"] and fk["ok"] for fk in result["foreign_keys"])
    assert all(s["next_value"] > s["max_value"] for s in result["sequences"])
    return result


def row_versions(conninfo):
    """xmin and ctid of every row of the tables and of the state table: any write changes them."""
    versions = {}
    for table in TABLES + ("sqlite_to_postgres_state",):
        versions[table] = execute(conninfo, f"SELECT xmin::text, ctid::text FROM {table} ORDER BY ctid")  # noqa: S608
    return versions


def sqlite_count(path, table):
    with sqlite3.connect(path) as connection:
        return connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608


def test_inserts_updates_and_deletes_reach_the_target(migrated):
    src, conninfo = migrated
    first = sync(str(src), conninfo, range_keys=SPAN)
    assert first["status"] == "completed" and "recorded" in first["msg"]
    assert all(t["inserted"] == t["updated"] == t["deleted"] == 0 for t in first["tables"].values())
    before = {table: sqlite_count(src, table) for table in TABLES}
    change_rows(str(src), fraction=0.1)
    result = sync(str(src), conninfo, range_keys=SPAN)
    assert result["status"] == "completed" and result["changed"]
    for table in TABLES:
        counts = result["tables"][table]
        assert counts["inserted"] and counts["updated"] and counts["deleted"], (table, counts)
        assert before[table] + counts["inserted"] - counts["deleted"] == sqlite_count(src, table)
        assert counts["ranges_changed"] <= counts["ranges_checked"] + 1
    assert "inserted" in result["msg"] and "\n" not in result["msg"]
    assert_equal_content(src, conninfo)
    # The state rows now name this snapshot, so a rerun of the migration skips every table.
    rerun = migrate(str(src), conninfo, create_tables=False)
    assert all(t["action"] == "skipped" for t in rerun["tables"].values())
    assert {r[0] for r in execute(conninfo, "SELECT source_id FROM sqlite_to_postgres_state")} == {result["source_id"]}


def test_a_sync_after_a_sync_writes_nothing(migrated):
    src, conninfo = migrated
    sync(str(src), conninfo, range_keys=SPAN)
    change_rows(str(src), fraction=0.1)
    sync(str(src), conninfo, range_keys=SPAN)
    versions = row_versions(conninfo)
    again = sync(str(src), conninfo, range_keys=SPAN)
    assert not again["changed"] and again["msg"].startswith("the target is up to date")
    assert row_versions(conninfo) == versions
    # A commit that changes no row changes the file: every page is checked, and still nothing is written
    # but the state rows, which now name the new snapshot.
    touch_without_change(str(src))
    touched = sync(str(src), conninfo, range_keys=SPAN)
    assert touched["changed"] and all(t["inserted"] == t["updated"] == t["deleted"] == 0
                                      for t in touched["tables"].values())
    after = row_versions(conninfo)
    assert {t: after[t] for t in TABLES} == {t: versions[t] for t in TABLES}
    assert not sync(str(src), conninfo, range_keys=SPAN)["changed"]


def test_changed_keys_are_written_as_one_string_and_read_back():
    intervals = [[-5, -3], [0, 0], [7, 12], [2**62, 2**62]]
    assert intervals_text(intervals) == f"-5:-3,0,7:12,{2**62}"
    assert intervals_from_text(intervals_text(intervals)) == intervals
    assert intervals_from_text("") == []


def test_only_the_rows_whose_cells_changed_are_sent(migrated):
    src, conninfo = migrated
    sync(str(src), conninfo, range_keys=SPAN)
    with sqlite3.connect(src) as connection:
        connection.execute("UPDATE files SET download_count = download_count + 1 WHERE id = 12")
        connection.execute("INSERT INTO files (file_uuid, filename, size_bytes, is_deleted, created_at) "
                           "VALUES ('0b0f2c35-96a4-4d7e-8d1a-5c6f4f1d9e21', 'new.bin', 1, 0, '2024-06-02 10:00:00')")
        connection.execute("DELETE FROM replication_logs WHERE id = 7")
    result = sync(str(src), conninfo, range_keys=SPAN)
    files, logs = result["tables"]["files"], result["tables"]["replication_logs"]
    # Every other row of the changed pages has the cell it had: only these rows are read and sent.
    assert (files["rows_sent"], files["updated"], files["inserted"]) == (2, 1, 1)
    assert files["changed_keys"]["keys"] == "12,51"
    assert (logs["rows_sent"], logs["deleted"], logs["changed_keys"]["keys"]) == (0, 1, "7")
    assert result["tables"]["tasks"]["changed_keys"]["keys"] == ""
    assert_equal_content(src, conninfo)


def test_a_change_in_an_overflow_page_alone_is_found(migrated):
    src, conninfo = migrated
    long_text = "x" * 20_000  # spills over several overflow pages of a 4096-byte page
    with sqlite3.connect(src) as connection:
        connection.execute("UPDATE tasks SET error_message = ? WHERE id = 3", (long_text + "a",))
    sync(str(src), conninfo, range_keys=SPAN)
    with sqlite3.connect(src) as connection:  # same length, same bytes on the leaf page: only the last byte moves
        connection.execute("UPDATE tasks SET error_message = ? WHERE id = 3", (long_text + "b",))
    result = sync(str(src), conninfo, range_keys=SPAN)
    assert (result["tables"]["tasks"]["rows_sent"], result["tables"]["tasks"]["updated"]) == (1, 1)
    assert execute(conninfo, "SELECT right(error_message, 1) FROM tasks WHERE id = 3") == [("b",)]
    assert_equal_content(src, conninfo)


def test_cells_of_another_sync_are_not_used(migrated):
    """A span's stored cells count only with the page records they were read with (a state table put together
    from two runs): cells that belong to other pages leave the span to its pages, and are read afresh."""
    src, conninfo = migrated
    sync(str(src), conninfo, range_keys=SPAN)
    stale = execute(conninfo, "SELECT table_name, span, cells FROM sqlite_to_postgres_spans")
    change_rows(str(src), fraction=0.1)
    sync(str(src), conninfo, range_keys=SPAN)
    for table, span, cells in stale:
        execute(conninfo, "UPDATE sqlite_to_postgres_spans SET cells = %s WHERE table_name = %s AND span = %s",
                (cells, table, span))
    change_rows(str(src), fraction=0.1, seed=5)
    result = sync(str(src), conninfo, range_keys=SPAN)
    assert result["tables"]["files"]["rows_sent"] > 10  # whole changed pages, not single rows
    assert_equal_content(src, conninfo)
    change_rows(str(src), fraction=0.02, seed=6)  # the cells that sync read afresh narrow this one
    narrowed = sync(str(src), conninfo, range_keys=SPAN)
    files = narrowed["tables"]["files"]
    assert files["rows_sent"] == files["inserted"] + files["updated"]
    assert_equal_content(src, conninfo)


def test_checksums_stored_by_an_earlier_version_are_compared_in_full_once(migrated):
    """A state table of the format before span rows (one document of every span's page records and one blob of
    cells per table): not read, its tables' rows compared in full once, and the checksums stored span by span."""
    src, conninfo = migrated
    sync(str(src), conninfo, range_keys=SPAN)
    execute(conninfo, "DROP TABLE sqlite_to_postgres_spans")
    execute(conninfo, "ALTER TABLE sqlite_to_postgres_state ADD COLUMN cell_checksums bytea")
    execute(conninfo, "UPDATE sqlite_to_postgres_state SET cell_checksums = '\\x00', key_range_checksums = "
                      "key_range_checksums || '{\"format\": 1, \"ranges\": {\"0\": [[1, 8, 8, 1]]}}'")
    change_rows(str(src), fraction=0.1)
    result = sync(str(src), conninfo, range_keys=SPAN)
    assert_equal_content(src, conninfo)
    for table in TABLES:
        assert any(note.startswith(f"table {table}: its page checksums were stored by an earlier version")
                   for note in result["notes"]), result["notes"]
    assert execute(conninfo, "SELECT count(*) FROM sqlite_to_postgres_state WHERE cell_checksums IS NOT NULL") == [
        (0,)]
    spans = dict(execute(conninfo, "SELECT table_name, count(*) FROM sqlite_to_postgres_spans GROUP BY table_name"))
    assert spans == {table: result["tables"][table]["ranges_checked"] for table in TABLES}
    change_rows(str(src), fraction=0.02, seed=6)  # the span rows just stored narrow this one to single rows
    narrowed = sync(str(src), conninfo, range_keys=SPAN)
    assert not narrowed["notes"]
    files = narrowed["tables"]["files"]
    assert files["rows_sent"] == files["inserted"] + files["updated"]
    assert_equal_content(src, conninfo)


def test_a_vacuum_that_moves_rows_to_other_pages_sends_none_of_them(migrated):
    src, conninfo = migrated
    sync(str(src), conninfo, range_keys=SPAN)
    with sqlite3.connect(src) as connection:
        connection.execute("DELETE FROM replication_logs WHERE id = 7")
    connection = sqlite3.connect(src)
    connection.execute("VACUUM")  # the rows after the gap move up: the pages of later key ranges change too
    connection.close()
    result = sync(str(src), conninfo, range_keys=SPAN)
    logs = result["tables"]["replication_logs"]
    assert logs["ranges_changed"] > 1 and logs["deleted"] == 1, logs
    assert sum(t["rows_sent"] for t in result["tables"].values()) == 0  # their cells are the same bytes
    assert_equal_content(src, conninfo)


def test_a_first_sync_without_checksums_compares_every_row(migrated):
    src, conninfo = migrated
    change_rows(str(src), fraction=0.1)  # changed before any sync recorded checksums
    result = sync(str(src), conninfo, range_keys=SPAN)
    assert all(t["ranges_changed"] >= t["ranges_checked"] for t in result["tables"].values())
    assert_equal_content(src, conninfo)
    change_rows(str(src), fraction=0.05, seed=7)  # now from the checksums that sync stored
    sync(str(src), conninfo, range_keys=SPAN)
    assert_equal_content(src, conninfo)


def test_a_killed_sync_is_finished_by_the_next(tmp_path, pg_database):
    """SIGKILL of a sync once it has applied every change, before its commit: the target is as it was, and the
    next sync does it all."""
    src = tmp_path / "big.db"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_db.py"), "--files", "3000", "--out", str(src),
                    "--quiet"], check=True)
    migrate_into_typed_schema(src, pg_database)
    forget_page_checksums(pg_database)
    sync(str(src), pg_database, range_keys=SPAN)
    change_rows(str(src), fraction=0.2, seed=3)
    before = data_dump(pg_database)
    applied = tmp_path / "applied"
    # The child stops once its changes are in the target but not committed, for as long as it takes to kill it.
    script = ("import json, pathlib, sys, time; sys.path.insert(0, sys.argv[1])\n"
              "from sqlite_pg.sync import Sync, sync\n"
              "close = Sync._close_state\n"
              "def stop(self, cursor):\n"
              "    close(self, cursor); pathlib.Path(sys.argv[4]).touch(); time.sleep(600)\n"
              "Sync._close_state = stop; sync(sys.argv[2], json.loads(sys.argv[3]), range_keys=8, jobs=1)")
    runner = subprocess.Popen([sys.executable, "-c", script, str(ROOT / "module_utils"), str(src),
                               json.dumps(pg_database), str(applied)])
    try:
        assert wait_until(applied.exists, timeout=60), "the sync never applied its changes"
        runner.send_signal(signal.SIGKILL)
    finally:
        runner.wait()
    assert data_dump(pg_database) == before
    result = sync(str(src), pg_database, range_keys=SPAN)
    assert result["status"] == "completed" and result["tables"]["tasks"]["updated"]
    assert_equal_content(src, pg_database)
    assert not sync(str(src), pg_database, range_keys=SPAN)["changed"]


def test_a_sync_stopped_mid_way_then_the_source_changed_back_ends_exact(migrated, monkeypatch, tmp_path):
    """Stopped after some of its writes, a sync leaves nothing of them: the next sync, of the recorded snapshot
    again, finds nothing to do and the target equals it."""
    src, conninfo = migrated
    sync(str(src), conninfo, range_keys=SPAN)
    recorded = tmp_path / "recorded.db"
    shutil.copyfile(src, recorded)
    before = data_dump(conninfo)
    change_rows(str(src), fraction=0.2, seed=4)
    update = Sync._update

    def stop_at_tasks(self, cursor, plan):
        if plan.name == "tasks":
            raise KeyboardInterrupt
        update(self, cursor, plan)

    monkeypatch.setattr(Sync, "_update", stop_at_tasks)
    with pytest.raises(KeyboardInterrupt):
        sync(str(src), conninfo, range_keys=SPAN, jobs=1)
    monkeypatch.setattr(Sync, "_update", update)
    assert data_dump(conninfo) == before
    shutil.copyfile(recorded, src)  # the application undid its changes: the file is the recorded snapshot again
    result = sync(str(src), conninfo, range_keys=SPAN)
    assert not result["changed"], result["msg"]
    assert_equal_content(src, conninfo)


def test_a_wal_source_with_uncheckpointed_changes(migrated):
    src, conninfo = migrated
    with sqlite3.connect(src) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
    sync(str(src), conninfo, range_keys=SPAN)
    writer = sqlite3.connect(src)  # kept open: the -wal file keeps the changes, nothing is checkpointed
    try:
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("SELECT count(*) FROM files").fetchone()  # a read opens the -wal file
        change_rows(str(src), fraction=0.1, seed=5)
        assert Path(f"{src}-wal").stat().st_size > 0
        result = sync(str(src), conninfo, range_keys=SPAN)
        assert sum(t["updated"] for t in result["tables"].values())
        assert_equal_content(src, conninfo)
    finally:
        writer.close()


def test_migrate_syncs_a_target_that_holds_an_earlier_snapshot_of_the_same_file(sample_db, pg_database):
    src, conninfo = sample_db, pg_database
    migrate_into_typed_schema(src, conninfo)
    # The migration recorded its page checksums: a sync of an unchanged source writes nothing.
    assert all(execute(conninfo, "SELECT key_range_checksums ? 'range_keys' FROM sqlite_to_postgres_state")[0])
    before = row_versions(conninfo)
    assert sync(str(src), conninfo)["changed"] is False
    assert row_versions(conninfo) == before
    change_rows(str(src), fraction=0.1)
    result = migrate(str(src), conninfo, create_tables=False)
    assert {t["action"] for t in result["tables"].values()} == {"synced"}
    assert result["changed"] and result["msg"].startswith("synced 4 tables with this source: ")
    assert sum(t["deleted"] for t in result["tables"].values())
    assert_equal_content(src, conninfo)
    again = migrate(str(src), conninfo, create_tables=False)
    assert again["changed"] is False and again["msg"].startswith("all 4 tables were already loaded")


def test_a_source_failing_its_integrity_check_stops_the_sync_before_its_first_write(sample_db, pg_database):
    src, conninfo = sample_db, pg_database
    migrate_into_typed_schema(src, conninfo)
    change_rows(str(src), fraction=0.1)
    page = break_index_page(src)  # the tables the sync reads stay whole
    versions, digest = row_versions(conninfo), file_digests(src)
    with pytest.raises(MigrationError) as failure:
        migrate(str(src), conninfo, create_tables=False)
    message = str(failure.value)
    assert f"source {src} fails PRAGMA quick_check: Page {page}: " in message and "\n" not in message
    assert message.endswith("nothing was written")
    assert failure.value.result["tables"]["files"]["action"] == "sync"
    assert row_versions(conninfo) == versions and file_digests(src) == digest


def test_a_table_loaded_from_another_file_is_still_refused(migrated, tmp_path):
    src, conninfo = migrated
    copy = tmp_path / "copy.db"
    copy.write_bytes(Path(src).read_bytes())
    change_rows(str(copy), fraction=0.1)
    with pytest.raises(MigrationError, match="already holds rows loaded from another source"):
        migrate(str(copy), conninfo, create_tables=False)


def test_an_invalid_changed_value_stops_the_sync_and_names_it(migrated):
    src, conninfo = migrated
    sync(str(src), conninfo, range_keys=SPAN)
    with sqlite3.connect(src) as connection:
        connection.execute("UPDATE files SET created_at = 'not a date' WHERE id = 20")
        connection.execute("UPDATE files SET download_count = 77 WHERE id = 3")
    before = data_dump(conninfo)
    with pytest.raises(MigrationError) as failure:
        sync(str(src), conninfo, range_keys=SPAN)
    message = str(failure.value)
    assert "table files, column created_at, id 20" in message and "\n" not in message
    assert "Error" not in message and message.endswith("nothing was written: the target is as it was before the sync")
    assert data_dump(conninfo) == before


def test_dirty_intervals():
    a, b, c = (1, 10, 10, 1), (11, 20, 10, 2), (21, 30, 10, 3)
    assert dirty_intervals(0, 99, [a, b, c], [a, b, c]) == []
    assert dirty_intervals(0, 99, [a, (11, 20, 10, 9), c], [a, b, c]) == [[11, 20]]
    # The middle page went entirely: its keys lie between two unchanged pages that were not neighbours.
    assert dirty_intervals(0, 99, [a, c], [a, b, c]) == [[11, 20]]
    # Rows appended after the last page; keys before the first page that was not the first before.
    assert dirty_intervals(0, 99, [a, b, c, (31, 40, 10, 4)], [a, b, c]) == [[31, 99]]
    assert dirty_intervals(0, 99, [b, c], [a, b, c]) == [[0, 10]]
    assert dirty_intervals(0, 99, [], [a]) == [[0, 99]]


def test_a_table_without_any_key_is_compared_by_content_and_says_so(tmp_path, pg_database):
    # Named as the sync's own columns of its matching by content: they must not clash.
    src = build_sqlite(tmp_path / "tags.db", "CREATE TABLE tags (content TEXT NOT NULL, copy REAL);",
                       {"tags": [("red", 1.5), ("blue", None), ("green", 0.1), ("green", 0.1)]})
    migrate(src, pg_database)  # records the table's digest
    assert not sync(src, pg_database)["changed"]
    with sqlite3.connect(src) as connection:
        connection.execute("UPDATE tags SET copy = 0.30000000000000004 WHERE rowid = 3")
        connection.execute("DELETE FROM tags WHERE content = 'red'")
        connection.execute("INSERT INTO tags VALUES ('tab\tbed', -0.0)")
    before = execute(pg_database, "SELECT source_id FROM sqlite_to_postgres_state")[0][0]
    unchanged = execute(pg_database, "SELECT ctid::text FROM tags WHERE content = 'blue'")
    result = sync(src, pg_database)
    # A changed row is a row deleted and a row inserted: the others stay where they are.
    assert result["tables"]["tags"] == {"inserted": 2, "updated": 0, "deleted": 2, "rows_sent": 4, "total_rows": 4,
                                        "ranges_checked": 1, "ranges_changed": 1,
                                        "changed_keys": {"since": before, "keys": None}}
    assert execute(pg_database, "SELECT ctid::text FROM tags WHERE content = 'blue'") == unchanged
    assert [n for n in result["notes"] if n.startswith("table tags has no primary key: ")], result["notes"]
    assert_same_content(src, pg_database, "tags", order_by=["content", "copy"])
    rerun = sync(src, pg_database)
    assert not rerun["changed"] and rerun["tables"]["tags"]["changed_keys"]["keys"] == ""
    # A validation from the snapshot the rerun started on reads that nothing changed.
    since = rerun["tables"]["tags"]["changed_keys"]["since"]
    assert changed_since({"snapshot": "1:1:", "source_id": since}, rerun["tables"]) == {"tags": []}


def test_a_state_table_made_before_validated_at_still_reads(migrated):
    # Made by a version that did not mark validated migrations: the rerun reads its rows as not validated.
    src, conninfo = migrated
    execute(conninfo, "ALTER TABLE sqlite_to_postgres_state DROP COLUMN validated_at")
    again = migrate(str(src), conninfo, create_tables=False)
    assert again["status"] == "completed" and not again["changed"], again["msg"]
    assert {t["action"] for t in again["tables"].values()} == {"skipped"}
