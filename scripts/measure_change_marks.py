"""Which marks of a SQLite database move on what, in rollback-journal and WAL mode: the measurements behind the
cutover's proof that the source stood still (module_utils/sqlite_pg/stillness.py, docs/runbook.md).

    python scripts/measure_change_marks.py [--dir DIR]

For each event it prints the change marks that moved (stillness.change_marks(): the database file, the -wal
file, the wal-index header), whether PRAGMA data_version moved on a connection held open throughout, and
whether the content of a backup-API copy changed.
"""

import argparse
import os
import sqlite3
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "module_utils"))
from sqlite_pg.stillness import change_marks, describe_changes, online_copy, sha256_of  # noqa: E402


def content(path, scratch):
    online_copy(path, scratch).close()
    try:
        return sha256_of(scratch)
    finally:
        os.unlink(scratch)


def measure(directory, journal):
    path = os.path.join(directory, f"{journal}.db")
    scratch = os.path.join(directory, "copy.db")
    app = sqlite3.connect(path, isolation_level=None)
    app.execute(f"PRAGMA journal_mode = {journal}")
    app.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    app.execute("BEGIN")
    app.executemany("INSERT INTO t (v) VALUES (?)", [("x" * 100,)] * 2000)
    app.execute("COMMIT")
    held = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)

    def data_version():
        return held.execute("PRAGMA data_version").fetchone()[0]

    def reader():
        other = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        other.execute("SELECT count(*) FROM t").fetchone()
        other.close()

    events = [("a write", lambda: app.execute("UPDATE t SET v = 'y' WHERE id = 5")),
              ("a same-size write", lambda: app.execute("UPDATE t SET v = 'z' WHERE id = 5")),
              ("a reader", reader),
              ("a backup-API copy", lambda: content(path, scratch))]
    if journal == "wal":
        events += [(f"wal_checkpoint({kind}), no write",
                    lambda kind=kind: app.execute(f"PRAGMA wal_checkpoint({kind})").fetchone())
                   for kind in ("PASSIVE", "TRUNCATE", "RESTART")]
        events.append(("a write after a full checkpoint", lambda: app.execute("UPDATE t SET v = 'w' WHERE id = 5")))
    for name, event in events:
        marks, version, digest = change_marks(path), data_version(), content(path, scratch)
        event()
        moved = describe_changes(marks, change_marks(path)) or "nothing"
        print(f"{journal:8} | {name:34} | marks: {moved} | data_version moved: {data_version() != version} | "
              f"content changed: {content(path, scratch) != digest}")
    held.close()
    if journal == "wal":
        app.execute("UPDATE t SET v = 'q' WHERE id = 6")
        marks, digest = change_marks(path), content(path, scratch)
        app.close()
        print(f"{journal:8} | {'the last connection closes':34} | marks: {describe_changes(marks, change_marks(path))} "
              f"| content changed: {content(path, scratch) != digest}")
    else:
        app.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where the two databases go (default: a new temporary directory)")
    args = parser.parse_args()
    print(f"SQLite {sqlite3.sqlite_version}")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for journal in ("delete", "wal"):
            measure(directory, journal)


if __name__ == "__main__":
    main()
