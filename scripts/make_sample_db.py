#!/usr/bin/env python3
"""Write a sample FileShareSystem SQLite database.

The schema is the one the FileShareSystem application created, character for
character; the rows look like the application's own (SQLAlchemy timestamps,
0/1 booleans, JSON kept as text, non-ASCII names, NULLs, sizes past 2^31,
stack traces with tabs, quotes and backslashes). The same arguments always
give a byte-identical file.

Standard library only, so it runs anywhere Python 3 does (lab, CI, bench).
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import itertools
import json
import os
import random
import signal
import sqlite3
import sys
import time

# The FileShareSystem application's schema: the contract. Do not edit.
SCHEMA = """\
CREATE TABLE storage_nodes (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id         VARCHAR(64) NOT NULL UNIQUE,
    hostname        VARCHAR(255) NOT NULL,
    port            INTEGER NOT NULL DEFAULT 8080,
    capacity_bytes  BIGINT NOT NULL DEFAULT 0,
    used_bytes      BIGINT NOT NULL DEFAULT 0,
    status          VARCHAR(20) NOT NULL DEFAULT 'online',
    is_active       BOOLEAN NOT NULL DEFAULT 1,
    last_heartbeat  DATETIME,
    created_at      DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE files (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    file_uuid       VARCHAR(36) NOT NULL UNIQUE,
    filename        VARCHAR(255) NOT NULL,
    original_name   TEXT,
    size_bytes      BIGINT NOT NULL DEFAULT 0,
    mime_type       VARCHAR(127),
    checksum_sha256 CHAR(64),
    owner_id        VARCHAR(64),
    primary_node    VARCHAR(64) REFERENCES storage_nodes(node_id),
    replica_nodes   TEXT,              -- JSON array of node_id
    storage_path    TEXT,
    share_token     VARCHAR(64) UNIQUE,
    download_count  INTEGER NOT NULL DEFAULT 0,
    expires_at      DATETIME,
    is_deleted      BOOLEAN NOT NULL DEFAULT 0,
    metadata        TEXT,              -- JSON object
    created_at      DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at      DATETIME
);
CREATE INDEX ix_files_primary_node ON files(primary_node);
CREATE INDEX ix_files_owner ON files(owner_id);
CREATE TABLE tasks (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    task_uuid       VARCHAR(36) NOT NULL UNIQUE,
    task_type       VARCHAR(50) NOT NULL,
    file_id         INTEGER REFERENCES files(id),
    status          VARCHAR(20) NOT NULL DEFAULT 'pending',
    priority        INTEGER NOT NULL DEFAULT 5,
    payload         TEXT,              -- JSON
    result          TEXT,              -- JSON
    error_message   TEXT,
    retries         INTEGER NOT NULL DEFAULT 0,
    created_at      DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    started_at      DATETIME,
    completed_at    DATETIME
);
CREATE INDEX ix_tasks_status ON tasks(status);
CREATE TABLE replication_logs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id           INTEGER NOT NULL REFERENCES files(id),
    source_node       VARCHAR(64) NOT NULL,
    target_node       VARCHAR(64) NOT NULL,
    status            VARCHAR(20) NOT NULL DEFAULT 'pending',
    bytes_transferred BIGINT NOT NULL DEFAULT 0,
    duration_ms       REAL,
    error_message     TEXT,
    created_at        DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    completed_at      DATETIME
);
CREATE INDEX ix_replication_logs_file ON replication_logs(file_id);
"""

DEFAULT_FILES = 50
DEFAULT_SEED = 20240601
LARGE_SAMPLE_FILES = 10_000  # from here on the cluster has LARGE_NODE_COUNT nodes
SMALL_NODE_COUNT = 3
LARGE_NODE_COUNT = 12
PROGRESS_ROWS = 250_000

NODE_STATUSES = ("online", "offline", "degraded")
TASK_STATUSES = ("pending", "running", "completed", "failed")
TASK_TYPES = ("thumbnail", "replicate", "virus_scan", "checksum")
REPLICATION_STATUSES = ("pending", "in_progress", "completed", "failed")

# Sample data spans eighteen months; a fixed origin keeps output reproducible.
EPOCH = datetime.datetime(2023, 1, 1, 0, 0, 0)
SPAN_US = 548 * 86_400 * 1_000_000
HOUR_US = 3_600 * 1_000_000
DAY_US = 24 * HOUR_US

# Names users upload: accents, CJK, Cyrillic, Greek, Hebrew, emoji, quotes,
# commas and a Windows path (old browsers sent the full client path).
NAME_STEMS = (
    "report", "invoice_2023-11", "IMG_4821", "Résumé final", "Über uns", "naïve café menu",
    "報告書_第3四半期", "会議メモ", "照片_北京", "отчёт за квартал", "Ελληνικά σημειώσεις",
    "קובץ חשוב", "mañana", "🎉 party invite", "holiday 🏖️ photos", 'contract "draft" v2',
    "budget, final, really", "C:\\Users\\jdoe\\Desktop\\notes", "backup.tar", "データ分析",
)
# (extension, MIME type); a None MIME type is an upload the sniffer gave up on.
FILE_KINDS = (
    (".pdf", "application/pdf"), (".docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
    (".xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"), (".jpg", "image/jpeg"),
    (".png", "image/png"), (".mp4", "video/mp4"), (".mp3", "audio/mpeg"), (".txt", "text/plain; charset=utf-8"),
    (".zip", "application/zip"), (".gz", "application/gzip"), (".bin", None), (".iso", "application/x-iso9660-image"),
)
CLIENTS = ("web", "android", "ios", "desktop-sync", "api")
TAGS = ("invoice", "2023", "2024", "personal", "work", "shared", "archive", "photos", "légal", "重要")
ERROR_TEMPLATES = (
    'Traceback (most recent call last):\n  File "/srv/fileshare/workers/{task}.py", line 88, in run\n'
    "    resp = session.put(url, data=chunk, timeout=30)\n"
    "requests.exceptions.ConnectionError: HTTPConnectionPool(host='{host}', port={port}): "
    "Max retries exceeded with url: /blobs/{uuid}",
    'Traceback (most recent call last):\n  File "/srv/fileshare/workers/{task}.py", line 141, in verify\n'
    "    raise ChecksumMismatch(expected, actual)\n"
    "ChecksumMismatch: expected '{sha_a}'\n\tgot      '{sha_b}'",
    "OSError: [Errno 28] No space left on device: '/data/{node}/tmp/{uuid}.part'",
    'subprocess.CalledProcessError: Command \'["convert", "C:\\\\upload\\\\{uuid}", "-thumbnail", "256x256"]\' '
    "returned non-zero exit status 1.\nstderr:\tconvert: no decode delegate for this image format "
    "`' @ error/constitute.c/ReadImage/575.",
    'TimeoutError: node {node} did not answer within 30.0s\n\tlast status: "degraded"\n\tretry budget exhausted',
    "clamd: stream: Win.Test.EICAR_HDB-1 FOUND\\n (raw reply kept verbatim)",
)


# One encoder for every JSON column: json.dumps builds a new encoder per call
# when given options, and the names in metadata stay readable UTF-8.
to_json = json.JSONEncoder(ensure_ascii=False).encode


class Draws:
    """Fast draws from one seeded generator. random.randrange and random.choices
    are pure Python (about 1.5 µs a call) and the 1M-file sample needs some
    fifteen million draws; scaling random.random() is several times cheaper."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.chance = rng.random
        self.bits = rng.getrandbits

    def between(self, low: int, high: int) -> int:
        """An integer n with low <= n < high."""
        return low + int(self.chance() * (high - low))

    def pick(self, options):
        return options[int(self.chance() * len(options))]

    def weighted(self, options, weights):
        """A zero-argument function drawing from options with the given weights."""
        cumulative = list(itertools.accumulate(weights))
        total, chance = cumulative[-1], self.chance
        return lambda: options[bisect.bisect(cumulative, chance() * total)]

    def uuid(self) -> str:
        """A version-4 UUID string (uuid.UUID is several times slower)."""
        h = f"{self.bits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"

    def size(self) -> int:
        """Log-uniform from 10 B to ~50 GB: about one in seven is past 2^31 bytes."""
        return int(10 ** (1 + self.chance() * 9.7))

    def error_text(self, task: str, nodes: list[str]) -> str:
        node = self.pick(nodes)
        return self.pick(ERROR_TEMPLATES).format(
            task=task, node=node, host=f"storage-{int(node[5:])}.fileshare.internal", port=8080,
            uuid=self.uuid(), sha_a=f"{self.bits(256):064x}", sha_b=f"{self.bits(256):064x}",
        )


def node_ids(count: int) -> list[str]:
    return [f"node-{number:02d}" for number in range(1, count + 1)]


def timestamp(offset_us: int) -> str:
    """A timestamp as SQLAlchemy stores DATETIME in SQLite (always six fractional digits)."""
    return (EPOCH + datetime.timedelta(microseconds=offset_us)).isoformat(" ", "microseconds")


def primary_node_index(file_id: int, node_count: int) -> int | None:
    """Which node holds a file; a pure function of the id so replication_logs can
    agree with files without keeping a per-file table in memory. None = not placed yet."""
    mixed = (file_id * 2_654_435_761) & 0xFFFFFFFF
    if mixed % 53 == 0:
        return None
    return (mixed >> 7) % node_count


def storage_node_rows(draw: Draws, nodes: list[str]):
    node_status = draw.weighted(NODE_STATUSES, (8, 1, 1))
    for number, node in enumerate(nodes, start=1):
        capacity = draw.pick((2, 4, 8, 16)) * 1_000_000_000_000
        status = node_status()
        silent = status == "offline" and draw.chance() < 0.5
        heartbeat = None if silent else timestamp(SPAN_US - draw.between(0, HOUR_US))
        yield (
            number, node, f"storage-{number}.fileshare.internal", 8080 if number % 4 else 8443,
            capacity, int(capacity * (0.05 + draw.chance() * 0.9)), status, 0 if status == "offline" else 1,
            heartbeat, timestamp(draw.between(0, 30 * DAY_US)),
        )


def file_rows(draw: Draws, count: int, nodes: list[str]):
    chance, between, pick, bits = draw.chance, draw.between, draw.pick, draw.bits
    # replica_nodes as the application wrote it: zero to two nodes after the primary.
    replica_choices = [
        [to_json([nodes[(index + step) % len(nodes)] for step in range(1, copies + 1)]) for copies in range(3)]
        for index in range(len(nodes))
    ]
    for file_id in range(1, count + 1):
        file_uuid = draw.uuid()
        extension, mime = pick(FILE_KINDS)
        stem = pick(NAME_STEMS)
        if chance() < 0.04:
            original = None
        elif chance() < 0.2:
            original = f"{stem} ({between(1, 9)}){extension}"
        else:
            original = stem + extension
        node_index = primary_node_index(file_id, len(nodes))
        primary = None if node_index is None else nodes[node_index]
        replicas = None if node_index is None else replica_choices[node_index][between(0, 3)]
        created_us = between(0, SPAN_US)
        shared = chance() < 0.3
        if chance() < 0.35:
            metadata = None
        else:
            meta = {"uploader_ip": f"10.{between(0, 256)}.{between(0, 256)}.{between(1, 255)}",
                    "client": {"name": pick(CLIENTS), "version": f"2.{between(0, 10)}.{between(0, 20)}"}}
            if chance() < 0.3:
                meta["tags"] = draw.rng.sample(TAGS, between(1, 4))
            if mime and mime.startswith("image/") and chance() < 0.7:
                gps = None if chance() < 0.5 else [round(chance() * 180 - 90, 6), round(chance() * 360 - 180, 6)]
                meta["exif"] = {"width": between(320, 8000), "height": between(240, 6000), "gps": gps}
            if original and chance() < 0.15:
                meta["title"] = original
            metadata = to_json(meta)
        yield (
            file_id, file_uuid, f"{file_uuid}{extension}", original, draw.size(), mime if chance() > 0.05 else None,
            f"{bits(256):064x}" if chance() > 0.03 else None,
            f"user-{between(1, 5000):05d}" if chance() > 0.02 else None,
            primary, replicas,
            f"/data/{primary}/{file_uuid[:2]}/{file_uuid[2:4]}/{file_uuid}" if primary else None,
            f"{bits(128):032x}" if shared else None,
            between(0, 5000) if shared else between(0, 3),
            timestamp(created_us + between(1, 90) * DAY_US) if shared and chance() < 0.5 else None,
            1 if chance() < 0.05 else 0, metadata, timestamp(created_us),
            timestamp(created_us + between(0, 30 * DAY_US)) if chance() < 0.6 else None,
        )


def task_rows(draw: Draws, count: int, file_count: int, nodes: list[str]):
    chance, between, pick = draw.chance, draw.between, draw.pick
    task_status = draw.weighted(TASK_STATUSES, (2, 1, 12, 2))
    for task_id in range(1, count + 1):
        task_type = pick(TASK_TYPES)
        status = task_status()
        # A few tasks outlived their file (purged), so file_id is NULL.
        file_id = between(1, file_count + 1) if chance() > 0.02 else None
        created_us = between(0, SPAN_US)
        started_us = None if status == "pending" else created_us + between(1, 600_000_000)
        finished_us = started_us + between(50_000, 900_000_000) if status in ("completed", "failed") else None
        # Fixed-shape JSON of numbers and known words is formatted directly:
        # json's encoder costs ~5 µs a call, a third of the time per task row.
        file_ref = "null" if file_id is None else file_id
        if chance() < 0.1:
            payload = None
        elif task_type == "thumbnail":
            payload = f'{{"file_id": {file_ref}, "sizes": [64, 256, 1024], "format": "webp"}}'
        elif task_type == "replicate":
            first = between(0, len(nodes))
            second = (first + between(1, len(nodes))) % len(nodes)
            payload = (f'{{"file_id": {file_ref}, "targets": ["{nodes[first]}", "{nodes[second]}"], '
                       f'"options": {{"verify": true}}}}')
        elif task_type == "virus_scan":
            payload = f'{{"file_id": {file_ref}, "engine": "clamav", "signatures": "daily-{between(27000, 27400)}"}}'
        else:
            payload = f'{{"file_id": {file_ref}, "algorithm": "sha256"}}'
        result = None
        if status == "completed" and chance() < 0.9:
            result = (f'{{"ok": true, "elapsed_ms": {chance() * 5000:.3f}, '
                      f'"details": {{"worker": "worker-{between(1, 9)}", "attempt": {between(1, 4)}}}}}')
        yield (
            task_id, draw.uuid(), task_type, file_id, status, between(1, 11),
            payload, result, draw.error_text(task_type, nodes) if status == "failed" else None,
            between(1, 6) if status == "failed" else (1 if chance() < 0.05 else 0),
            timestamp(created_us),
            None if started_us is None else timestamp(started_us),
            None if finished_us is None else timestamp(finished_us),
        )


def replication_log_rows(draw: Draws, count: int, file_count: int, nodes: list[str]):
    chance, between = draw.chance, draw.between
    replication_status = draw.weighted(REPLICATION_STATUSES, (2, 1, 14, 3))
    for log_id in range(1, count + 1):
        file_id = between(1, file_count + 1)
        source_index = primary_node_index(file_id, len(nodes))
        if source_index is None:
            source_index = between(0, len(nodes))
        target_index = (source_index + between(1, len(nodes))) % len(nodes)
        status = replication_status()
        size = draw.size()
        created_us = between(0, SPAN_US)
        if status == "completed":
            transferred, duration = size, round(size / 120_000 + chance() * 50, 3)
        elif status == "failed":
            transferred, duration = int(size * chance()), round(chance() * 30_000, 3)
        elif status == "in_progress":
            transferred, duration = int(size * chance()), None
        else:
            transferred, duration = 0, None
        finished = status in ("completed", "failed")
        yield (
            log_id, file_id, nodes[source_index], nodes[target_index], status, transferred, duration,
            draw.error_text("replicate", nodes) if status == "failed" else None,
            timestamp(created_us),
            timestamp(created_us + int(duration * 1000) + between(0, 1000)) if finished else None,
        )


def row_counts(files: int) -> dict[str, int]:
    """Rows per table for a sample of `files` files (the guide's proportions)."""
    return {
        "storage_nodes": LARGE_NODE_COUNT if files >= LARGE_SAMPLE_FILES else SMALL_NODE_COUNT,
        "files": files,
        "tasks": files * 9 // 10,
        "replication_logs": files * 54 // 100,
    }


def write_database(path: str, files: int, seed: int, progress=None) -> dict[str, int]:
    counts = row_counts(files)
    draw = Draws(random.Random(seed))
    nodes = node_ids(counts["storage_nodes"])
    # Generators over one seeded source, consumed table after table: the
    # order of draws, hence the file, is fixed by the arguments alone.
    tables = (
        ("storage_nodes", 10, storage_node_rows(draw, nodes)),
        ("files", 18, file_rows(draw, files, nodes)),
        ("tasks", 13, task_rows(draw, counts["tasks"], files, nodes)),
        ("replication_logs", 10, replication_log_rows(draw, counts["replication_logs"], files, nodes)),
    )
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        # Nothing to protect while the file is still a temporary one: skip the
        # journal and fsyncs; the cache is bounded so memory stays flat.
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-131072")
        connection.executescript(SCHEMA)
        for table, width, rows in tables:
            started = time.monotonic()
            insert = f"INSERT INTO {table} VALUES ({', '.join('?' * width)})"  # noqa: S608 - fixed names
            connection.execute("BEGIN")
            # Slices of the generator, so a long table reports progress at no cost per row.
            for done in range(0, counts[table], PROGRESS_ROWS):
                connection.executemany(insert, itertools.islice(rows, PROGRESS_ROWS))
                if progress and done + PROGRESS_ROWS < counts[table]:
                    progress(f"{table}: {done + PROGRESS_ROWS:,} of {counts[table]:,} rows, "
                             f"{time.monotonic() - started:.0f} s")
            connection.execute("COMMIT")
            if progress:
                progress(f"{table}: {counts[table]:,} rows in {time.monotonic() - started:.1f} s")
        connection.execute("PRAGMA journal_mode=DELETE")
    finally:
        connection.close()
    return counts


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def whole_number(minimum: int):
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def parse_args(argv):
    parser = OneLineParser(
        description="Write a sample FileShareSystem SQLite database (the application's exact schema).",
        epilog=(
            f"Rows: files N (default {DEFAULT_FILES}), tasks floor(0.9*N), replication_logs floor(0.54*N), "
            f"storage_nodes {SMALL_NODE_COUNT} below N={LARGE_SAMPLE_FILES:,} and {LARGE_NODE_COUNT} from there on. "
            f"The default is the migration guide's sample: 50/3/45/27 = 125 rows. "
            "The same arguments always give a byte-identical file."
        ),
    )
    parser.add_argument("--files", type=whole_number(1), default=DEFAULT_FILES,
                        help=f"number of rows in files (default {DEFAULT_FILES})")
    parser.add_argument("--seed", type=whole_number(0), default=DEFAULT_SEED,
                        help=f"random seed (default {DEFAULT_SEED})")
    parser.add_argument("--out", default="fileshare.db", help="database to write (default fileshare.db)")
    parser.add_argument("--force", action="store_true", help="replace --out if it already exists")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    prog = os.path.basename(sys.argv[0])
    out = args.out
    if os.path.isdir(out):
        print(f"{prog}: error: --out {out} is a directory", file=sys.stderr)
        return 2
    if os.path.lexists(out) and not args.force:
        print(f"{prog}: error: {out} already exists; pass --force to replace it", file=sys.stderr)
        return 2
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        print(f"{prog}: error: directory {directory} does not exist (from --out {out})", file=sys.stderr)
        return 2

    def progress(line):
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    # Build beside the target and rename at the end: an interrupted run never
    # leaves a half-written database under the real name.
    partial = f"{out}.partial"
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM as on Ctrl-C
    started = time.monotonic()
    try:
        if os.path.lexists(partial):
            os.remove(partial)
        counts = write_database(partial, args.files, args.seed, progress)
        os.replace(partial, out)
    except (OSError, sqlite3.Error) as error:
        print(f"{prog}: error: writing {out}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {out} left untouched", file=sys.stderr)
        return 130
    finally:
        if os.path.lexists(partial):
            os.remove(partial)
    total = sum(counts.values())
    progress(f"wrote {out}: {total:,} rows ({', '.join(f'{t} {n}' for t, n in counts.items())}) "
             f"in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
