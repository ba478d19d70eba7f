#!/usr/bin/python
"""Consistent copy of a live SQLite database through SQLite's online backup API.

Copying the file with cp can catch a write half-way and miss a WAL file's
contents; sqlite3's Connection.backup() copies a consistent snapshot while the
application keeps working. No Ansible collection wraps it, hence this module.
"""

from __future__ import annotations

import os
import sqlite3

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.sqlite_pg.profile import integrity_check
from ansible.module_utils.sqlite_pg.stillness import change_marks, online_copy, sha256_of, wait_until_quiet

DOCUMENTATION = r"""
---
module: sqlite_backup
short_description: Copy a SQLite database with the online backup API
description:
  - Opens O(src) read-only and copies it page by page into O(dest) with
    sqlite3's C(Connection.backup()), which yields a consistent snapshot even
    while the application writes.
  - Writes to a temporary file next to O(dest) and renames it into place only
    after C(PRAGMA quick_check) passed on the copy (unless O(quick_check=false)).
  - Returns the sha256 of the copy, its size, the row count of every table and the source's change marks
    taken just before the copy began (O(source_marks)), which the sqlite_unchanged module compares later.
  - With O(quiet_seconds), first waits until the source's files have not changed for that long.
  - The source is never written to.
  - In check mode, only checks that the source opens and is a SQLite database.
options:
  src:
    description: The SQLite database to copy.
    type: path
    required: true
  dest:
    description: The file to create. An existing file is left alone (no change).
    type: path
    required: true
  mode:
    description: Permissions of the copy.
    type: raw
    default: "0600"
  quick_check:
    description:
      - Run C(PRAGMA quick_check) on the copy before renaming it into place.
      - Turn it off only for a copy that is read next by the sqlite_to_postgres module, which runs the same
        check itself before its first write (the cutover's copy in the window).
    type: bool
    default: true
  quiet_seconds:
    description:
      - Before copying, wait until the source's files (database, -wal, wal-index header) have not changed for this
        many seconds. 0 copies at once.
    type: float
    default: 0
  quiet_timeout:
    description: Fail when the source has not been quiet for O(quiet_seconds) within this many seconds.
    type: float
    default: 300
author:
  - FileShareSystem operations
"""

EXAMPLES = r"""
- name: Copy the application's database
  sqlite_backup:
    src: /srv/fileshare/fileshare.db
    dest: /var/backups/fileshare/20240601T030000/fileshare.db

- name: Copy it once the application has been quiet for 5 seconds
  sqlite_backup:
    src: /srv/fileshare/fileshare.db
    dest: /var/backups/fileshare/20240601T030000/final-fileshare.db
    quiet_seconds: 5
"""

RETURN = r"""
dest:
  description: Path of the copy.
  type: str
  returned: always
sha256:
  description: sha256 of the copy.
  type: str
  returned: when not in check mode
size_bytes:
  description: Size of the copy.
  type: int
  returned: when not in check mode
tables:
  description: Row count of every table in the copy (or of the source in check mode).
  type: dict
  returned: always
source_marks:
  description:
    - The source's change marks (database file, -wal file, wal-index header) taken just before the copy began.
    - Equal marks later prove that nobody wrote to the source since; see the sqlite_unchanged module.
  type: dict
  returned: when not in check mode and the copy was made
"""


def table_counts(conn):
    names = [row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    # Table names come from sqlite_master and are quoted as identifiers.
    counts = {}
    for name in names:
        quoted = '"' + name.replace('"', '""') + '"'
        counts[name] = conn.execute("SELECT count(*) FROM " + quoted).fetchone()[0]  # noqa: S608
    return counts


def open_read_only(module, path):
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.Error as error:
        module.fail_json(msg=f"cannot read SQLite database {path}: {error}")


def main():
    module = AnsibleModule(
        argument_spec={
            "src": {"type": "path", "required": True},
            "dest": {"type": "path", "required": True},
            "mode": {"type": "raw", "default": "0600"},
            "quick_check": {"type": "bool", "default": True},
            "quiet_seconds": {"type": "float", "default": 0},
            "quiet_timeout": {"type": "float", "default": 300},
        },
        supports_check_mode=True,
    )
    src, dest = module.params["src"], module.params["dest"]
    if not os.path.isfile(src):
        module.fail_json(msg=f"SQLite source {src} does not exist or is not a file")
    if os.path.exists(dest):
        conn = open_read_only(module, dest)
        counts = table_counts(conn)
        conn.close()
        module.exit_json(changed=False, dest=dest, sha256=sha256_of(dest), size_bytes=os.path.getsize(dest),
                         tables=counts)
    source = open_read_only(module, src)
    if module.check_mode:
        counts = table_counts(source)
        source.close()
        module.exit_json(changed=True, dest=dest, tables=counts)

    source.close()
    quiet_seconds, quiet_timeout = module.params["quiet_seconds"], module.params["quiet_timeout"]
    if quiet_seconds > 0:
        marks, still_changing = wait_until_quiet(src, quiet_seconds, quiet_timeout)
        if still_changing:
            module.fail_json(msg=f"SQLite source {src} did not stay unchanged for {quiet_seconds:g} s within "
                                 f"{quiet_timeout:g} s (last change: {still_changing})", source_marks=marks)
    else:
        # Taken before the copy begins: a write after this moment shows in a later comparison.
        marks = change_marks(src)

    partial = f"{dest}.partial"
    target, failure = None, None
    try:
        target = online_copy(src, partial)
        problems = integrity_check(target, quick=True) if module.params["quick_check"] else []
        if problems:
            failure = f"SQLite copy of {src} failed its quick_check: {'; '.join(problems)}"
        else:
            counts = table_counts(target)
    except sqlite3.Error as error:
        failure = f"SQLite online backup of {src} to {dest} failed: {error}"
    finally:
        if target is not None:
            target.close()
    if failure:
        if os.path.exists(partial):
            os.unlink(partial)
        module.fail_json(msg=failure)
    module.set_mode_if_different(partial, module.params["mode"], False)
    os.replace(partial, dest)
    module.exit_json(changed=True, dest=dest, sha256=sha256_of(dest), size_bytes=os.path.getsize(dest), tables=counts,
                     source_marks=marks)


if __name__ == "__main__":
    main()
