"""What a SQLite table's b-tree looks like page by page, without reading its rows.

A leaf page of a table b-tree holds the rows of one run of rowids. Two snapshots
whose leaf page (and the overflow pages of its cells) are byte for byte the same
hold the same rows for that run, so comparing page checksums with those kept
from the last sync finds the changed rows while reading only page headers:
SQLite's ``dbstat`` table walks the b-tree in C (leaves in key order, each
followed by its overflow pages), the page bytes come straight from the file,
overlaid with the newest committed frame of each page in the ``-wal`` file.
"""

import os
import struct
import zlib
from dataclasses import dataclass

from .errors import MigrationError

WAL_HEADER_BYTES = 32
WAL_FRAME_HEADER_BYTES = 24
SHM_HEADER_BYTES = 48  # one copy of the wal-index header; the -shm file starts with two
TABLE_LEAF = 13  # b-tree page type byte of a table leaf


@dataclass(frozen=True)
class Page:
    """One leaf page: its first and last rowid, cell count, and crc32 of its bytes and overflow pages."""

    first: int
    last: int
    cells: int
    crc: int

    def record(self):
        return [self.first, self.last, self.cells, self.crc]


class PageReader:
    """Page bytes of one snapshot of the source: the main file, overlaid with the -wal file's committed frames."""

    def __init__(self, source):
        self.source = source
        self.page_size = source.page_size
        self.main = os.open(source.path, os.O_RDONLY)
        self.wal = None
        self.frames = {}  # page number -> offset of its newest committed frame's data in the -wal file
        try:
            if source.wal_mode and os.path.exists(source.wal_path):
                self._read_wal_index()
        except BaseException:
            self.close()
            raise

    def _read_wal_index(self):
        """Which frames of the -wal file are committed: the -shm header's mxFrame says (what readers use too)."""
        with open(self.source.path + "-shm", "rb") as handle:
            header = handle.read(2 * SHM_HEADER_BYTES)
        if len(header) < 2 * SHM_HEADER_BYTES or header[:SHM_HEADER_BYTES] != header[SHM_HEADER_BYTES:]:
            raise MigrationError(f"source {self.source.path} is being written (its -shm header is changing): "
                                 "stop the application and run again")
        last_frame = struct.unpack("=I", header[16:20])[0]
        salts = header[32:40]
        self.wal = os.open(self.source.wal_path, os.O_RDONLY)
        wal_header = os.pread(self.wal, WAL_HEADER_BYTES, 0)
        if last_frame and wal_header[16:24] != salts:
            raise MigrationError(f"source {self.source.path}: its -wal file does not belong to its -shm file; "
                                 "open it once with sqlite3 (read-write) to recover it")
        frame_bytes = WAL_FRAME_HEADER_BYTES + self.page_size
        for number in range(last_frame):
            offset = WAL_HEADER_BYTES + number * frame_bytes
            frame_header = os.pread(self.wal, WAL_FRAME_HEADER_BYTES, offset)
            if len(frame_header) < WAL_FRAME_HEADER_BYTES or frame_header[8:16] != salts:
                raise MigrationError(f"source {self.source.path}: its -wal file is shorter than its -shm file says")
            self.frames[struct.unpack(">I", frame_header[:4])[0]] = offset + WAL_FRAME_HEADER_BYTES

    def page(self, number):
        offset = self.frames.get(number)
        if offset is not None:
            return os.pread(self.wal, self.page_size, offset)
        return os.pread(self.main, self.page_size, (number - 1) * self.page_size)

    def close(self):
        for descriptor in (self.main, self.wal):
            if descriptor is not None:
                os.close(descriptor)
        self.main = self.wal = None


def _varint(data, position):
    """SQLite's big-endian variable-length integer at ``position``: (value, next position)."""
    value = 0
    for index in range(8):
        byte = data[position + index]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, position + index + 1
    return (value << 8) | data[position + 8], position + 9


def _cell_rowid(data, header, cell):
    pointer = struct.unpack_from(">H", data, header + 8 + 2 * cell)[0]
    _payload, position = _varint(data, pointer)
    rowid, _ = _varint(data, position)
    return rowid - (1 << 64) if rowid >= 1 << 63 else rowid


def table_pages(connection, reader, table):
    """The leaf pages of ``table`` in key order, as Page records (an empty table has none).

    ``connection`` must read the same snapshot as ``reader`` (the caller checks the
    source's fingerprint after the last read).
    """
    pages, current, crc, first, last, cells = [], None, 0, 0, 0, 0
    for number, kind, count in connection.execute(
            "SELECT pageno, pagetype, ncell FROM dbstat WHERE name = ?", (table,)):
        if kind == "overflow":
            crc = zlib.crc32(reader.page(number), crc)
            continue
        if current is not None:
            pages.append(Page(first, last, cells, crc))
            current = None
        if kind != "leaf" or not count:
            continue
        data = reader.page(number)
        header = 100 if number == 1 else 0
        if data[header] != TABLE_LEAF:
            raise MigrationError(f"source table {table}: page {number} is not a table leaf although dbstat says so; "
                                 "the file changed while it was being read")
        current, crc, cells = number, zlib.crc32(data), count
        first, last = _cell_rowid(data, header, 0), _cell_rowid(data, header, count - 1)
    if current is not None:
        pages.append(Page(first, last, cells, crc))
    return pages


def table_digest(connection, reader, table):
    """crc32 of every page of ``table`` in b-tree order, and its row count: for tables without an integer key."""
    crc = 0
    for (number,) in connection.execute("SELECT pageno FROM dbstat WHERE name = ?", (table,)):
        crc = zlib.crc32(reader.page(number), crc)
    return crc
