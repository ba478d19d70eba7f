"""The SQLite side: opening the file read-only, its identity, its schema."""

import fcntl
import hashlib
import os
import sqlite3
import struct
from dataclasses import dataclass, field
from urllib.parse import quote

from .errors import MigrationError
from .names import sqlite_ident
from .rules import SAME_REPRESENTATION, RepresentationWatch
from .stillness import HEADER_BYTES, change_marks

SQLITE_MAGIC = b"SQLite format 3\x00"
READ_BLOCK = 4 << 20
ROWID_ALIASES = ("rowid", "_rowid_", "oid")
RESERVED_BYTE = 0x40000001  # SQLite's lock bytes: PENDING_BYTE (1 GiB) + 1 (os_unix.c)


@dataclass
class SourceColumn:
    name: str
    declared: str
    notnull: bool
    default: object  # the default's SQL text as SQLite keeps it, or None
    pk_position: int  # 1-based position in the primary key, 0 when not part of it


@dataclass
class ForeignKey:
    columns: list
    parent: str
    parent_columns: list  # empty: the parent's primary key
    on_update: str
    on_delete: str


@dataclass
class SourceIndex:
    name: str
    unique: bool
    origin: str  # 'c' CREATE INDEX, 'u' UNIQUE constraint, 'pk' primary key
    columns: list  # [(column, descending)]
    skipped: str = ""  # why it cannot be rebuilt in PostgreSQL, if it cannot


@dataclass
class SourceTable:
    name: str
    columns: list
    primary_key: list
    rowid: str  # how to address the rowid ('rowid', '_rowid_', 'oid'), "" for WITHOUT ROWID tables
    rowid_alias: str  # the INTEGER PRIMARY KEY column, if any
    foreign_keys: list = field(default_factory=list)
    indexes: list = field(default_factory=list)

    @property
    def key_columns(self):
        """What identifies a row in messages and reject records."""
        return [self.rowid] if self.rowid else list(self.primary_key)


class SourceConnection(sqlite3.Connection):
    """A source connection with the SQL functions the rules' formatting may call.

    same_date_representation (rules.RepresentationWatch) is called only for the
    numbers of date columns a load watches, so text dates never pay for it. It
    has state, so it is not registered as deterministic.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.date_watch = RepresentationWatch()
        self.create_function(SAME_REPRESENTATION, 3, self.date_watch)


def mixed_dates(connection):
    """The message for the first date column this connection's reads found mixing Julian days and Unix
    times (the formatting of its numbers then gave NULL), or ""."""
    return connection.date_watch.mixed if isinstance(connection, SourceConnection) else ""


class Source:
    """A SQLite database opened read-only, whatever its journal mode.

    * rollback journal: ``mode=ro``; a read transaction holds a SHARED lock, so
      no writer can commit while it lasts;
    * WAL with a ``-wal`` file: ``mode=ro&readonly_shm=1`` reads the WAL frames
      too and writes nothing, not even the ``-shm`` read marks;
    * WAL without a ``-wal`` file (last writer closed cleanly): everything is in
      the main file; ``immutable=1`` reads it without creating ``-wal``/``-shm``.
      immutable is only sound while nobody writes, which ``fingerprint()`` checks.
    """

    def __init__(self, path, name=None):
        self.path = os.path.abspath(path)
        # What the state table records as this source: the live database when ``path`` is a copy of it.
        self.name = os.path.abspath(name) if name else self.path
        self.header = self._read_header()
        self.page_size = int.from_bytes(self.header[16:18], "big")
        if self.page_size == 1:
            self.page_size = 65536
        self.wal_mode = self.header[18] == 2 or self.header[19] == 2
        self.wal_path = self.path + "-wal"
        has_wal = os.path.exists(self.wal_path)
        if self.wal_mode and has_wal and not os.path.exists(self.path + "-shm"):
            raise MigrationError(
                f"source {self.path} is a WAL database with a -wal file but no -shm file: "
                "open it once with sqlite3 (read-write) to recover it, or copy the -shm file along"
            )
        if not self.wal_mode and self._journal_has_a_header():
            # SQLite writes the header (zeros until then, unless synchronous is off) before the file changes:
            # until the writer's commit ends, or if it died, the file may hold a half-written transaction.
            if self._reserved_by_a_writer():
                raise MigrationError(f"source {self.path} is being written: another process is committing a "
                                     "transaction (or holds one larger than its cache); run again once it ends")
            # Read again after the lock, as SQLite's own test for a hot journal does: a writer that committed
            # since the first read deleted (or zeroed) its journal before it let its lock go.
            if self._journal_has_a_header():
                raise MigrationError(
                    f"source {self.path} has a hot journal ({self.path}-journal): a writer stopped mid-transaction; "
                    "open it once with sqlite3 (read-write) to roll it back"
                )
        if not self.wal_mode:
            self.open_mode = "mode=ro"
        elif has_wal:
            self.open_mode = "mode=ro&readonly_shm=1"
        else:
            self.open_mode = "mode=ro&immutable=1"
        self.uri = "file:" + quote(self.path) + "?" + self.open_mode
        self.size = os.path.getsize(self.path)
        self._check_length(has_wal)

    def _read_header(self):
        path = self.path
        if not os.path.exists(path):
            raise MigrationError(f"source {path} does not exist")
        if os.path.isdir(path):
            raise MigrationError(f"source {path} is a directory, not a SQLite database file")
        try:
            with open(path, "rb") as handle:
                header = handle.read(HEADER_BYTES)
        except OSError as error:
            raise MigrationError(f"source {path} cannot be read: {error.strerror}") from None
        if not header:
            raise MigrationError(f"source {path} is empty (0 bytes), not a SQLite database")
        if not header.startswith(SQLITE_MAGIC):
            raise MigrationError(f"source {path} is not a SQLite database (no 'SQLite format 3' header)")
        if len(header) < HEADER_BYTES:
            raise MigrationError(f"source {path} is truncated: {len(header)} bytes, shorter than a SQLite header")
        return header

    def _journal_has_a_header(self):
        """A journal whose header is still zero belongs to a transaction that has not touched the file yet (or
        never will): readers read past it, as SQLite does (fileformat2.html, "hot journal")."""
        try:
            with open(self.path + "-journal", "rb") as handle:
                return handle.read(8) not in (b"", b"\x00" * 8)
        except FileNotFoundError:  # none, or its writer's commit just deleted it
            return False

    def _reserved_by_a_writer(self):
        """Whether a process holds SQLite's RESERVED lock on the file (a POSIX lock on byte RESERVED_BYTE). Asked
        with F_GETLK, which takes no lock: this process's own locks on the file would be dropped with any
        descriptor of it that it closes. struct flock as Linux lays it out: short, short, off_t, off_t, pid_t."""
        layout = "hhxxxxqqixxxx"
        with open(self.path, "rb") as handle:
            answer = fcntl.fcntl(handle.fileno(), fcntl.F_GETLK,
                                 struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, RESERVED_BYTE, 1, 0))
        return struct.unpack(layout, answer)[0] != fcntl.F_UNLCK

    def _check_length(self, has_wal):
        # The page count in the header is trustworthy when the "version-valid-for"
        # number matches the change counter (SQLite file format, section 1.3.7).
        pages = int.from_bytes(self.header[28:32], "big")
        valid = self.header[92:96] == self.header[24:28]
        expected = pages * self.page_size
        if valid and pages and self.size < expected and not has_wal:
            raise MigrationError(
                f"source {self.path} is truncated: its header says {pages} pages ({expected} bytes) "
                f"but the file has {self.size} bytes"
            )
        if self.size % self.page_size and not has_wal:
            raise MigrationError(
                f"source {self.path} is truncated: {self.size} bytes is not a whole number of "
                f"{self.page_size}-byte pages"
            )

    def connect(self, text_as_bytes=False):
        """A new read-only connection with its read transaction begun."""
        try:
            connection = sqlite3.connect(self.uri, uri=True, isolation_level=None, check_same_thread=False,
                                         factory=SourceConnection)
            if text_as_bytes:
                connection.text_factory = bytes
            connection.execute("PRAGMA query_only = ON")
            connection.execute("BEGIN")
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as error:
            raise MigrationError(f"source {self.path} cannot be read: {error}") from None
        return connection

    def fingerprint(self):
        """What changes whenever anybody commits to the database (stillness.change_marks()).

        Compared before the first read and after the last one of every task: if it
        is unchanged, every read of the run saw the same bytes, so all workers read
        one snapshot.
        """
        return change_marks(self.path)

    def content_id(self):
        """sha256 of the snapshot's bytes: the main file, then the -wal file if there is one."""
        digest = hashlib.sha256()
        for path in (self.path, self.wal_path):
            if not os.path.exists(path):
                continue
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(READ_BLOCK), b""):
                    digest.update(block)
        return digest.hexdigest()


def read_schema(connection):
    """Every ordinary table of the database, with columns, keys, foreign keys and indexes.

    Returns (tables, notes); virtual tables and their shadow tables are left out
    with a note (they cannot be copied as tables).
    """
    notes = []
    rows = connection.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
        "ORDER BY name"
    ).fetchall()
    kinds = _table_kinds(connection)
    tables = []
    for name, create_sql in rows:
        if create_sql and create_sql.lstrip().upper().startswith("CREATE VIRTUAL"):
            notes.append(f"table {name} is a virtual table and is not migrated")
            continue
        if kinds.get(name) == "shadow":
            notes.append(f"table {name} is a virtual table's shadow table and is not migrated")
            continue
        tables.append(read_table(connection, name, kinds.get(name)))
    return tables, notes


def _table_kinds(connection):
    """{name: 'table'|'shadow'|'virtual'} and whether WITHOUT ROWID, from PRAGMA table_list (SQLite 3.37+)."""
    try:
        rows = connection.execute("SELECT name, type, wr FROM pragma_table_list WHERE schema = 'main'").fetchall()
    except sqlite3.DatabaseError:
        return {}
    return {name: ("without_rowid" if kind == "table" and without_rowid else kind)
            for name, kind, without_rowid in rows}


def read_table(connection, name, kind=None):
    ident = sqlite_ident(name)
    columns = []
    for _cid, column, declared, notnull, default, pk, hidden in connection.execute(
        "SELECT cid, name, type, \"notnull\", dflt_value, pk, hidden FROM pragma_table_xinfo(?)", (name,)
    ):
        if hidden == 1:  # hidden columns of virtual tables
            continue
        columns.append(SourceColumn(column, declared or "", bool(notnull), default, pk))
    primary_key = [c.name for c in sorted((c for c in columns if c.pk_position), key=lambda c: c.pk_position)]
    column_names = {c.name.lower() for c in columns}
    rowid = ""
    if kind != "without_rowid":
        for alias in ROWID_ALIASES:
            if alias in column_names:
                continue
            try:
                connection.execute(f"SELECT {alias} FROM {ident} LIMIT 0")  # noqa: S608 - quoted identifier
            except sqlite3.OperationalError:
                break  # WITHOUT ROWID (older SQLite without table_list)
            rowid = alias
            break
    rowid_alias = ""
    if rowid and len(primary_key) == 1 and table_column(columns, primary_key[0]).declared.upper() == "INTEGER":
        rowid_alias = primary_key[0]
    table = SourceTable(name, columns, primary_key, rowid, rowid_alias)
    table.foreign_keys = _foreign_keys(connection, name)
    table.indexes = _indexes(connection, name)
    return table


def table_column(columns, name):
    return next(c for c in columns if c.name == name)


def _foreign_keys(connection, table):
    grouped = {}
    for fk_id, _seq, parent, child_column, parent_column, on_update, on_delete, _match in connection.execute(
        "SELECT id, seq, \"table\", \"from\", \"to\", on_update, on_delete, \"match\" "
        "FROM pragma_foreign_key_list(?) ORDER BY id, seq",
        (table,),
    ):
        key = grouped.setdefault(fk_id, ForeignKey([], parent, [], on_update, on_delete))
        key.columns.append(child_column)
        if parent_column is not None:
            key.parent_columns.append(parent_column)
    return list(grouped.values())


def _indexes(connection, table):
    indexes = []
    for _seq, name, unique, origin, partial in connection.execute(
        "SELECT seq, name, \"unique\", origin, partial FROM pragma_index_list(?) ORDER BY seq DESC", (table,)
    ):
        columns, skipped = [], ""
        for _seqno, cid, column, descending, _collation, key in connection.execute(
            "SELECT seqno, cid, name, \"desc\", coll, key FROM pragma_index_xinfo(?) ORDER BY seqno", (name,)
        ):
            if not key:
                continue
            if cid == -2:
                skipped = "it is an expression index"
            elif cid == -1:
                skipped = "it indexes the rowid"
            else:
                columns.append((column, bool(descending)))
        if partial:
            skipped = "it is a partial index (its WHERE clause is SQLite SQL)"
        indexes.append(SourceIndex(name, bool(unique), origin, columns, skipped))
    return indexes


def foreign_key_order(tables):
    """Tables ordered parents first; self-references ignored, cycles broken by name (with a note)."""
    names = {t.name for t in tables}
    parents = {t.name: {fk.parent for fk in t.foreign_keys if fk.parent in names and fk.parent != t.name}
               for t in tables}
    ordered, placed, notes = [], set(), []
    remaining = sorted(names)
    while remaining:
        ready = [name for name in remaining if parents[name] <= placed]
        if not ready:
            cycle = remaining[0]
            notes.append(f"tables {', '.join(remaining)} reference each other in a cycle; {cycle} is loaded first")
            ready = [cycle]
        for name in ready:
            ordered.append(name)
            placed.add(name)
        remaining = [name for name in remaining if name not in placed]
    return ordered, notes
