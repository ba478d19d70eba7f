#!/usr/bin/python
"""Consistent copy of a live SQLite database through SQLite's online backup API.

Copying the file with cp can catch a write half-way and miss a WAL file's
contents; sqlite3's Connection.backup() copies a consistent snapshot while the
application keeps working. No Ansible collection wraps it, hence this module.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.sqlite_pg.profile import integrity_check

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
  - Returns the sha256 of the copy, its size and the row count of every table.
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
author:
  - FileShareSystem operations
"""

EXAMPLES = r"""
- name: Copy the application's database
  sqlite_backup:
    src: /srv/fileshare/fileshare.db
    dest: /var/backups/fileshare/20240601T030000/fileshare.db
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
"""


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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

    partial = f"{dest}.partial"
    target, failure = None, None
    try:
        target = sqlite3.connect(partial)
        source.backup(target)
        problems = integrity_check(target, quick=True) if module.params["quick_check"] else []
        if problems:
            failure = f"SQLite copy of {src} failed its quick_check: {'; '.join(problems)}"
        else:
            counts = table_counts(target)
    except sqlite3.Error as error:
        failure = f"SQLite online backup of {src} to {dest} failed: {error}"
    finally:
        source.close()
        if target is not None:
            target.close()
    if failure:
        if os.path.exists(partial):
            os.unlink(partial)
        module.fail_json(msg=failure)
    module.set_mode_if_different(partial, module.params["mode"], False)
    os.replace(partial, dest)
    module.exit_json(changed=True, dest=dest, sha256=sha256_of(dest), size_bytes=os.path.getsize(dest), tables=counts)


if __name__ == "__main__":
    main()
