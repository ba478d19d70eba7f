"""What a SQLite table's b-tree looks like page by page, without reading its rows.

A leaf page of a table b-tree holds the rows of one run of rowids. Two snapshots
whose leaf page (and the overflow pages of its cells) are byte for byte the same
hold the same rows for that run, so comparing page checksums with those kept
from the last sync finds the changed rows while reading only page headers:
SQLite's ``dbstat`` table walks the b-tree in C (leaves in key order, each
followed by its overflow pages), the page bytes come straight from the file,
overlaid with the newest committed frame of each page in the ``-wal`` file.

Within a changed leaf page, the rows that changed are found from its cells:
each cell (rowid and record, with its overflow chain) gets an 8-byte digest,
and the digests kept from the last sync (``Cells``) name the rows whose record
differs, which were inserted and which deleted.
"""

import array
import bisect
import hashlib
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field

from .errors import MigrationError
from .stillness import WAL_HEADER_BYTES, WAL_INDEX_HEADER_BYTES

WAL_FRAME_HEADER_BYTES = 24
TABLE_LEAF = 13  # b-tree page type byte of a table leaf
TABLE_INTERIOR = 5
DIGEST_BYTES = 8  # of a cell: a changed row is missed only if its digest collides with its own old one


@dataclass(frozen=True)
class Page:
    """One leaf page: its first and last rowid, cell count, and crc32 of its bytes and overflow pages."""

    first: int
    last: int
    cells: int
    crc: int
    number: int = field(default=0, compare=False)  # where it is in this snapshot (not recorded)

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
            # The payload bytes a cell keeps on its page before it spills to overflow pages (fileformat2.html).
            usable = self.page_size - self.page(1)[20]
            self.max_local = usable - 35
            self.min_local = (usable - 12) * 32 // 255 - 23
            self.overflow_bytes = usable - 4
        except BaseException:
            self.close()
            raise

    def _read_wal_index(self):
        """Which frames of the -wal file are committed: the -shm header's mxFrame says (what readers use too)."""
        with open(self.source.path + "-shm", "rb") as handle:
            # The -shm file starts with two copies of the wal-index header; they differ while a writer changes it.
            header, copy = handle.read(WAL_INDEX_HEADER_BYTES), handle.read(WAL_INDEX_HEADER_BYTES)
        if len(copy) < WAL_INDEX_HEADER_BYTES or header != copy:
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

    def cells(self, page, low, high):
        """(rowids, digests) of the cells of leaf ``page`` whose rowid lies in [low, high], in key order."""
        data = self.page(page.number)
        header = 100 if page.number == 1 else 0
        count = (data[header + 3] << 8) | data[header + 4]
        rowids, digests = [], []
        blake2b, max_local = hashlib.blake2b, self.max_local
        for pointer in struct.unpack_from(f">{count}H", data, header + 8):
            # Two varints (payload size, rowid): their short forms are read inline, the rest by _varint().
            payload = data[pointer]
            if payload < 0x80:
                position = pointer + 1
            elif data[pointer + 1] < 0x80:
                payload = ((payload & 0x7F) << 7) | data[pointer + 1]
                position = pointer + 2
            else:
                payload, position = _varint(data, pointer)
            rowid = data[position]
            if rowid < 0x80:
                position += 1
            elif data[position + 1] < 0x80:
                rowid = ((rowid & 0x7F) << 7) | data[position + 1]
                position += 2
            elif data[position + 2] < 0x80:
                rowid = ((rowid & 0x7F) << 14) | ((data[position + 1] & 0x7F) << 7) | data[position + 2]
                position += 3
            else:
                rowid, position = _varint(data, position)
                if rowid >= 1 << 63:
                    rowid -= 1 << 64
            if rowid < low or rowid > high:
                continue
            if payload <= max_local:
                digest = blake2b(data[pointer:position + payload], digest_size=DIGEST_BYTES)
            else:
                local = self.min_local + (payload - self.min_local) % self.overflow_bytes
                if local > max_local:
                    local = self.min_local
                end = position + local + 4
                digest = blake2b(data[pointer:end], digest_size=DIGEST_BYTES)
                self._overflow(digest, struct.unpack_from(">I", data, end - 4)[0], payload - local)
            rowids.append(rowid)
            digests.append(digest.digest())
        return rowids, b"".join(digests)

    def _overflow(self, digest, number, remaining):
        """Add the overflow chain starting at page ``number`` (``remaining`` payload bytes) to ``digest``."""
        while number and remaining > 0:
            data = self.page(number)
            digest.update(data[:4 + min(remaining, self.overflow_bytes)])
            remaining -= self.overflow_bytes
            number = struct.unpack_from(">I", data, 0)[0]

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
    """The leaf pages of ``table`` in key order, as Page records, one at a time (an empty table has none).

    ``connection`` must read the same snapshot as ``reader`` (the caller checks the
    source's fingerprint after the last read).
    """
    current, crc, first, last, cells = None, 0, 0, 0, 0
    for number, kind, count in connection.execute(
            "SELECT pageno, pagetype, ncell FROM dbstat WHERE name = ?", (table,)):
        if kind == "overflow":
            crc = zlib.crc32(reader.page(number), crc)
            continue
        if current is not None:
            yield Page(first, last, cells, crc, current)
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
        yield Page(first, last, cells, crc, current)


def table_bounds(reader, root):
    """(lowest, highest) rowid of the table whose b-tree has its root at page ``root``, (None, None) when it is
    empty: from the leftmost and rightmost leaf, found by a few page reads (no SQL, which reads through indexes
    that may be broken: the source's checks name those)."""
    bounds = []
    for leftmost in (True, False):
        number = root
        while True:
            data = reader.page(number)
            header = 100 if number == 1 else 0
            count = (data[header + 3] << 8) | data[header + 4]
            if data[header] == TABLE_LEAF:
                if not count:
                    return None, None
                bounds.append(_cell_rowid(data, header, 0 if leftmost else count - 1))
                break
            if data[header] != TABLE_INTERIOR:
                raise MigrationError(f"source page {number} is not a table b-tree page; the file changed while it "
                                     "was being read")
            if leftmost:
                pointer = struct.unpack_from(">H", data, header + 12)[0]
                number = struct.unpack_from(">I", data, pointer)[0]
            else:
                number = struct.unpack_from(">I", data, header + 8)[0]
    return tuple(bounds)


def table_digest(connection, reader, table):
    """crc32 of every page of ``table`` in b-tree order, and its row count: for tables without an integer key."""
    crc = 0
    for (number,) in connection.execute("SELECT pageno FROM dbstat WHERE name = ?", (table,)):
        crc = zlib.crc32(reader.page(number), crc)
    return crc


@dataclass
class Cells:
    """The cells of one span of a table at one snapshot: rowids in key order and their digests, concatenated."""

    rowids: array.array  # of "q"
    digests: bytes

    @classmethod
    def of(cls, rowids, digests):
        return cls(array.array("q", rowids), bytes(digests))

    def replace(self, intervals, now):
        """These cells with those in ``intervals`` replaced by the current ones, and the keys whose cells differ.

        ``intervals``: [[low, high], ...] in key order, where the leaf pages changed.
        ``now(low, high)``: (rowids, digests) of the current cells in [low, high].
        Returns (Cells, [[low, high], ...]): the intervals now hold exactly the keys
        inserted, deleted or changed; a run of such keys is one interval when no
        unchanged key lies between (no row has the keys in between, on either side).
        """
        rowids, digests, changed, position = array.array("q"), bytearray(), [], 0
        for low, high in intervals:
            start = bisect.bisect_left(self.rowids, low, position)
            end = bisect.bisect_right(self.rowids, high, start)
            rowids.extend(self.rowids[position:start])
            digests += self.digests[DIGEST_BYTES * position:DIGEST_BYTES * start]
            now_rowids, now_digests = now(low, high)
            changed.extend(_changed(self.rowids[start:end], self.digests[DIGEST_BYTES * start:DIGEST_BYTES * end],
                                    now_rowids, now_digests))
            rowids.extend(now_rowids)
            digests += now_digests
            position = end
        rowids.extend(self.rowids[position:])
        digests += self.digests[DIGEST_BYTES * position:]
        return Cells(rowids, bytes(digests)), changed


def _changed(old_rowids, old_digests, new_rowids, new_digests):
    """Runs [[low, high], ...] of the keys whose cell was inserted, deleted or changed: both sides in key order."""
    runs, run, i, j = [], None, 0, 0
    while i < len(old_rowids) or j < len(new_rowids):
        old = old_rowids[i] if i < len(old_rowids) else None
        new = new_rowids[j] if j < len(new_rowids) else None
        if new is None or (old is not None and old < new):
            key, differs, i = old, True, i + 1
        elif old is None or new < old:
            key, differs, j = new, True, j + 1
        else:
            key = old
            differs = (old_digests[DIGEST_BYTES * i:DIGEST_BYTES * (i + 1)]
                       != new_digests[DIGEST_BYTES * j:DIGEST_BYTES * (j + 1)])
            i, j = i + 1, j + 1
        if not differs:
            run = None
        elif run is None:
            run = [key, key]
            runs.append(run)
        else:
            run[1] = key
    return runs


PAGE_RECORD = struct.Struct("<qqII")  # first and last rowid, cell count, crc32


def pack_pages(records):
    """A span's page records ([first, last, cells, crc] or Page) as bytes, for the state's span rows."""
    return b"".join(PAGE_RECORD.pack(*(r.record() if isinstance(r, Page) else r)) for r in records)


def unpack_pages(data):
    """[(first, last, cells, crc), ...] from pack_pages()' bytes."""
    return list(PAGE_RECORD.iter_unpack(data))


def encode_cells(pages, cells):
    """One span's Cells as compressed bytes (little-endian), tied to its packed page records by their crc32:
    cells stored beside other pages (a state put together from two runs) are not used."""
    rowids = array.array("q", cells.rowids)
    if sys.byteorder == "big":
        rowids.byteswap()
    return zlib.compress(struct.pack("<I", zlib.crc32(pages)) + rowids.tobytes() + cells.digests, 1)


def decode_cells(pages, blob):
    """The Cells of encode_cells()' bytes, or None when they belong to other page records than ``pages``."""
    data = zlib.decompress(blob)
    if struct.unpack_from("<I", data)[0] != zlib.crc32(pages):
        return None
    rows = (len(data) - 4) // (8 + DIGEST_BYTES)
    rowids = array.array("q", data[4:4 + 8 * rows])
    if sys.byteorder == "big":
        rowids.byteswap()
    return Cells(rowids, data[4 + 8 * rows:])
