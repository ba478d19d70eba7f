#!/usr/bin/python
"""Whether a live SQLite database was written since a copy of it was made (sqlite_backup's source_marks).

No collection checks this; the measurements behind it are in module_utils/sqlite_pg/stillness.py.
"""

from __future__ import annotations

import os
import sqlite3

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.sqlite_pg.stillness import written_since

DOCUMENTATION = r"""
---
module: sqlite_unchanged
short_description: Tell whether a SQLite database was written since a copy of it was made
description:
  - Compares the change marks of O(src) (database file, -wal file, wal-index header) with those the
    sqlite_backup module returned as C(source_marks) when it made O(copy). Equal marks prove that nobody
    committed to O(src) since.
  - Marks that differ can also come from a checkpoint or from the last connection closing; then a new copy is
    made with SQLite's backup API next to O(copy), compared with O(copy) by sha256, and removed.
  - Reads only; never fails because the source was written (see RV(written)).
options:
  src:
    description: The live SQLite database.
    type: path
    required: true
  marks:
    description: The C(source_marks) sqlite_backup returned when it copied O(src).
    type: dict
    required: true
  copy:
    description: The copy sqlite_backup made then.
    type: path
    required: true
  copy_sha256:
    description: Its sha256, as sqlite_backup returned it.
    type: str
    required: true
author:
  - FileShareSystem operations
"""

EXAMPLES = r"""
- name: Copy the source at rest
  sqlite_backup:
    src: /srv/fileshare/fileshare.db
    dest: /var/backups/fileshare/run/final-fileshare.db
  register: final_copy

- name: Prove nobody wrote to it since
  sqlite_unchanged:
    src: /srv/fileshare/fileshare.db
    marks: "{{ final_copy.source_marks }}"
    copy: "{{ final_copy.dest }}"
    copy_sha256: "{{ final_copy.sha256 }}"
  register: still
  failed_when: still.written
"""

RETURN = r"""
written:
  description: Whether O(src) holds a commit O(copy) does not.
  type: bool
  returned: always
evidence:
  description: What showed it, in words (which marks moved; whether the content was compared).
  type: str
  returned: always
"""


def main():
    module = AnsibleModule(
        argument_spec={
            "src": {"type": "path", "required": True},
            "marks": {"type": "dict", "required": True},
            "copy": {"type": "path", "required": True},
            "copy_sha256": {"type": "str", "required": True},
        },
        supports_check_mode=True,
    )
    src, copy = module.params["src"], module.params["copy"]
    if not os.path.isfile(src):
        module.fail_json(msg=f"SQLite source {src} does not exist or is not a file")
    try:
        written, evidence = written_since(src, module.params["marks"], module.params["copy_sha256"],
                                          f"{copy}.compare")
    except (OSError, sqlite3.Error) as error:
        module.fail_json(msg=f"cannot tell whether SQLite source {src} was written since {copy}: {error}")
    module.exit_json(changed=False, written=written, evidence=evidence)


if __name__ == "__main__":
    main()
