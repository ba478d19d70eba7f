"""Whether a live SQLite database was written since a moment: the cutover's proof that the source stood still.

The cutover copies the source once the application is in maintenance, and
switches the application only if nobody wrote to the source after that copy.
A check in a later task cannot hold a connection open since the copy (PRAGMA
data_version needs one), so the proof is made of what the files themselves
show, measured in both journal modes (docs/runbook.md, "The source stood
still"):

* rollback journal: every commit rewrites the database file's header
  (the change counter at offset 24) and its mtime;
* WAL: a commit leaves the database file alone; it appends frames to the
  -wal file (size, mtime) or restarts it (new salts in its header), and
  moves the wal-index header at the start of the -shm file (its change
  counter iChange and mxFrame).

So the marks below change on every commit in either mode. They also change
without a commit: a checkpoint writes pages back into the database file and
may truncate the -wal file, and the last connection to close deletes -wal and
-shm; PRAGMA data_version moves on a TRUNCATE checkpoint too. When the marks
differ, the content decides: a second copy through the backup API is compared
with the first byte for byte (two copies of the same content are identical).
"""

import hashlib
import os
import sqlite3
import sys
import time

HEADER_BYTES = 100
WAL_HEADER_BYTES = 32
# One copy of the wal-index header (WalIndexHdr): iVersion, unused, iChange, isInit, bigEndCksum, szPage, mxFrame,
# nPage, aFrameCksum, aSalt, aCksum. Written only by writers (and recovery), in the machine's byte order.
WAL_INDEX_HEADER_BYTES = 48
READ_BLOCK = 1 << 20


def _file_marks(path, header_bytes):
    try:
        status = os.stat(path)
        with open(path, "rb") as handle:
            head = handle.read(header_bytes)
    except FileNotFoundError:
        return None
    return [status.st_ino, status.st_size, status.st_mtime_ns, head.hex()]


def change_marks(path):
    """What a commit to the database at ``path`` changes, as JSON-ready values (see the module's docstring).

    {"db": [inode, size, mtime_ns, header], "wal": the same for the -wal file or None,
     "wal_index": the -shm file's first wal-index header (hex) or None}. The -shm file's mtime is left out:
    readers write their read marks into it.
    """
    try:
        with open(path + "-shm", "rb") as handle:
            wal_index = handle.read(WAL_INDEX_HEADER_BYTES).hex()
    except FileNotFoundError:
        wal_index = None
    return {"db": _file_marks(path, HEADER_BYTES), "wal": _file_marks(path + "-wal", WAL_HEADER_BYTES),
            "wal_index": wal_index}


def _counter(header_hex, offset, byteorder="big"):
    raw = bytes.fromhex(header_hex)[offset:offset + 4]
    return int.from_bytes(raw, byteorder) if len(raw) == 4 else None


def describe_changes(before, after):
    """The differences between two change_marks() results, in words ("" when there are none)."""
    found = []
    if before.get("db") != after.get("db"):
        if not after.get("db"):
            found.append("the database file is gone")
        else:
            old, new = (_counter(marks[3], 24) for marks in (before["db"], after["db"]))
            detail = f"change counter {old} -> {new}" if old != new else "modified"
            found.append(f"database file {detail}" + (", replaced" if before["db"][0] != after["db"][0] else ""))
    if before.get("wal") != after.get("wal"):
        if before.get("wal") is None:
            found.append("a -wal file appeared")
        elif after.get("wal") is None:
            found.append("the -wal file was removed")
        else:
            # A restarted WAL has a new checkpoint sequence and new salts (header bytes 12 to 24).
            restarted = before["wal"][3][24:48] != after["wal"][3][24:48]
            found.append(f"-wal file {before['wal'][1]} -> {after['wal'][1]} bytes"
                         + (", restarted" if restarted else ""))
    if before.get("wal_index") != after.get("wal_index"):
        if before.get("wal_index") and after.get("wal_index"):
            old, new = (_counter(marks, 8, sys.byteorder) for marks in (before["wal_index"], after["wal_index"]))
            if old != new:
                found.append(f"wal-index change counter {old} -> {new}")
            else:
                old, new = (_counter(marks, 16, sys.byteorder) for marks in (before["wal_index"], after["wal_index"]))
                found.append(f"wal-index frames {old} -> {new}")
        else:
            found.append("the -shm file " + ("appeared" if after.get("wal_index") else "was removed"))
    return "; ".join(found)


def wait_until_quiet(path, quiet_seconds, timeout, interval=0.1, clock=time.monotonic, sleep=time.sleep):
    """(marks, None) once the marks of ``path`` have not changed for ``quiet_seconds``, or (marks, what changed
    last) when ``timeout`` seconds passed first."""
    marks = change_marks(path)
    started = since = clock()
    last_change = None
    while clock() - since < quiet_seconds:
        if clock() - started >= timeout:
            return marks, last_change or "it kept changing"
        sleep(interval)
        now = change_marks(path)
        if now != marks:
            last_change = describe_changes(marks, now)
            marks, since = now, clock()
    return marks, None


def online_copy(src, dest):
    """Copy the live database ``src`` into the new file ``dest`` with SQLite's backup API: one consistent
    snapshot, whatever the application does meanwhile. The source is opened read-only. Returns the open
    connection to ``dest`` (the caller checks and closes it)."""
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = None
    try:
        target = sqlite3.connect(dest)
        source.backup(target)
    except BaseException:
        if target is not None:
            target.close()
        raise
    finally:
        source.close()
    return target


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def written_since(path, marks, copy_sha256, scratch):
    """(written, evidence): whether the database at ``path`` was written since ``marks`` were taken, just
    before a copy whose sha256 is ``copy_sha256``. Equal marks prove it was not. Different marks are decided
    by the content: a new copy into ``scratch`` (removed again) compared with the first one."""
    now = change_marks(path)
    if now == marks:
        return False, "its files are as they were at the copy"
    changes = describe_changes(marks, now)
    try:
        online_copy(path, scratch).close()
        same = sha256_of(scratch) == copy_sha256
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    if same:
        return False, f"its files changed ({changes}) but not its content: a checkpoint, no write"
    return True, changes
