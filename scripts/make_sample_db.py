#!/usr/bin/env python3
"""Write a sample FileShareSystem SQLite database.

The schema is the one the FileShareSystem application created, character for
character; the rows look like the application's own (SQLAlchemy timestamps,
0/1 booleans, JSON kept as text, non-ASCII names, NULLs, sizes past 2^31,
stack traces with tabs, quotes and backslashes). The same arguments always
give a byte-identical file.

SQLite writes the rows itself: per table one INSERT ... SELECT over a
recursive CTE that counts the rows and carries their pseudo-random numbers
(Draws), so no row passes through Python (the 1M-file sample in about 26
CPU seconds, 10M in about 380, most of it maintaining the unique indexes of
random UUIDs). Standard library only, so it runs anywhere Python 3 does (lab,
CI, bench).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sqlite3
import string
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

NODE_STATUSES = ("online", "offline", "degraded")
TASK_STATUSES = ("pending", "running", "completed", "failed")
TASK_TYPES = ("thumbnail", "replicate", "virus_scan", "checksum")
REPLICATION_STATUSES = ("pending", "in_progress", "completed", "failed")

# Sample data spans eighteen months; a fixed origin keeps output reproducible.
EPOCH_UNIX = 1_672_531_200  # 2023-01-01 00:00:00 UTC
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


P = 2_147_483_647  # 2^31 - 1: the modulus of MINSTD, whose streams give the sample's random numbers


def sql_literal(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def choice(index: str, options) -> str:
    """SQL picking options[index]."""
    return f"CASE {index} " + " ".join(f"WHEN {n} THEN {sql_literal(o)}" for n, o in enumerate(options)) + " END"


class Draws:
    """SQL for pseudo-random numbers, fixed by the seed.

    SQLite's random() cannot be seeded, so each table's rows come from the
    recursive CTE that counts them, which also advances two multiplicative
    congruential streams h (multiplier 48271) and g (16807), MINSTD's, period
    2^31 - 2. Each draw of a row is (h * a + g * b) mod P with constants a, b
    of its own from the seeded generator: integer arithmetic that stays within
    SQLite's 63 bits, evaluated by SQLite's C code, millions of rows a second.
    A draw's SQL gives the same number wherever the row uses it again.
    """

    def __init__(self, rng: random.Random):
        self.rng = rng

    def start(self) -> tuple[int, int]:
        return self.rng.randrange(1, P), self.rng.randrange(1, P)

    def draw(self) -> str:
        """An integer 0 <= n < P."""
        return f"((h * {self.rng.randrange(1, P)} + g * {self.rng.randrange(1, P)}) % {P})"

    def chance(self) -> str:
        """A number 0 <= x < 1."""
        return f"({self.draw()} / {float(P)!r})"

    def between(self, low: int, high: int) -> str:
        """An integer low <= n < high."""
        if high - low < P:
            return f"({low} + {self.draw()} % {high - low})"
        return f"({low} + ({self.draw()} * {P} + {self.draw()}) % {high - low})"

    def weighted(self, options, weights) -> str:
        bound, total, arms = 0, sum(weights), []
        chance = self.chance()
        for option, weight in zip(options, weights):
            bound += weight
            arms.append(f"WHEN {chance} * {total} < {bound} THEN {sql_literal(option)}")
        return f"CASE {' '.join(arms[:-1])} ELSE {sql_literal(options[-1])} END"

    def hex(self, digits: int) -> str:
        """Lowercase hexadecimal digits, 7 per draw."""
        draws = -(-digits // 7)
        return f"substr(printf('{'%07x' * draws}', " + ", ".join(
            f"{self.draw()} % 268435456" for _ in range(draws)) + f"), 1, {digits})"

    def uuid(self) -> str:
        """A version-4 UUID."""
        d = [f"{self.draw()} % 65536" for _ in range(8)]
        return (f"printf('%04x%04x-%04x-4%03x-%04x-%04x%04x%04x', {d[0]}, {d[1]}, {d[2]}, ({d[3]}) % 4096, "
                f"32768 + ({d[4]}) % 16384, {d[5]}, {d[6]}, {d[7]})")

    def size(self) -> str:
        """Log-uniform from 10 B to ~50 GB: about one in seven is past 2^31 bytes."""
        return f"CAST(pow(10, 1 + {self.chance()} * 9.7) AS INTEGER)"

    def error_text(self, task: str, node_count: int) -> str:
        """An error message from ERROR_TEMPLATES (tabs, newlines, quotes, backslashes) about one node; ``task``:
        SQL of the worker's name."""
        node = self.between(1, node_count + 1)
        values = {"task": task, "node": f"printf('node-%02d', {node})",
                  "host": f"printf('storage-%d.fileshare.internal', {node})", "port": "8080",
                  "uuid": self.uuid(), "sha_a": self.hex(64), "sha_b": self.hex(64)}
        arms = []
        for number, template in enumerate(ERROR_TEMPLATES):
            parts = list(string.Formatter().parse(template))
            fmt = "".join(text.replace("%", "%%") + ("%s" if name else "") for text, name, _spec, _conv in parts)
            arguments = "".join(f", {values[name]}" for _text, name, _spec, _conv in parts if name)
            arms.append(f"WHEN {number} THEN printf({sql_literal(fmt)}{arguments})")
        return f"CASE {self.between(0, len(ERROR_TEMPLATES))} {' '.join(arms)} END"


def timestamp(offset_us: str) -> str:
    """SQL of a timestamp as SQLAlchemy stores DATETIME in SQLite (always six fractional digits)."""
    return (f"(datetime({EPOCH_UNIX} + ({offset_us}) / 1000000, 'unixepoch') "
            f"|| printf('.%06d', ({offset_us}) % 1000000))")


def primary_node_index(file_id: str, node_count: int) -> str:
    """SQL of which node holds a file, NULL when not placed yet; a pure function of the id, so replication_logs
    agree with files."""
    mixed = f"(({file_id} * 2654435761) & 4294967295)"
    return f"CASE WHEN {mixed} % 53 <> 0 THEN ({mixed} >> 7) % {node_count} END"


def node_name(index: str) -> str:
    return f"printf('node-%02d', {index} + 1)"


def rows_of(draw: Draws, count: int, select: str, computed: dict[str, str] | None = None, *derived: str) -> str:
    """SELECT ``select`` over ``count`` rows numbered i = 1, 2, ... (h and g: the row's random streams).

    ``computed``: {name: SQL} of values a row uses more than once, computed once per row by the recursive
    CTE that counts the rows (from the streams before they advance); ``derived``: SQL columns computed from
    those, each group able to use the ones before it by name (SQLite substitutes them where they are used).
    """
    h, g = draw.start()
    names = "".join(f", {name}" for name in computed or {})
    values = "".join(f", {sql}" for sql in (computed or {}).values())
    step = f"SELECT i + 1, h * 48271 % {P}, g * 16807 % {P}{values} FROM"
    layers = [f"row0(i, h, g{names}) AS ({step} (SELECT 0 AS i, {h} AS h, {g} AS g) UNION ALL "  # noqa: S608
              f"{step} row0 WHERE i < {count})"]
    layers += [f"row{n + 1} AS (SELECT *, {columns} FROM row{n})" for n, columns in enumerate(derived)]  # noqa: S608
    return f"WITH RECURSIVE {', '.join(layers)} SELECT {select} FROM row{len(derived)}"  # noqa: S608


def storage_node_rows(draw: Draws, count: int) -> str:
    status = draw.weighted(NODE_STATUSES, (8, 1, 1))
    capacity = f"{choice(draw.between(0, 4), (2, 4, 8, 16))} * 1000000000000"
    return rows_of(draw, count, ", ".join([
        "i", node_name("i - 1"), "printf('storage-%d.fileshare.internal', i)",
        "CASE WHEN i % 4 THEN 8080 ELSE 8443 END",
        "capacity", f"CAST(capacity * (0.05 + {draw.chance()} * 0.9) AS INTEGER)", "status",
        "CASE status WHEN 'offline' THEN 0 ELSE 1 END",
        f"CASE WHEN status = 'offline' AND {draw.chance()} < 0.5 THEN NULL "
        f"ELSE {timestamp(f'{SPAN_US} - {draw.between(0, HOUR_US)}')} END",
        timestamp(draw.between(0, 30 * DAY_US)),
    ]), {"status": status, "capacity": capacity})


def file_rows(draw: Draws, count: int, node_count: int) -> str:
    kind = draw.between(0, len(FILE_KINDS))
    extension, mime = (choice("kind", [k[n] for k in FILE_KINDS]) for n in (0, 1))
    stem = choice(draw.between(0, len(NAME_STEMS)), NAME_STEMS)
    original = (f"CASE WHEN {draw.chance()} < 0.04 THEN NULL WHEN {draw.chance()} < 0.2 "
                f"THEN printf('%s (%d)%s', stem, {draw.between(1, 9)}, extension) ELSE stem || extension END")
    shared = f"{draw.chance()} < 0.3"
    version = f"printf('2.%d.%d', {draw.between(0, 10)}, {draw.between(0, 20)})"
    first_tag, step = draw.between(0, len(TAGS)), choice(draw.between(0, 4), (1, 3, 7, 9))
    tags = [choice(f"(({first_tag} + {k} * {step}) % {len(TAGS)})", TAGS) for k in range(3)]
    tag_list = (f"CASE {draw.between(1, 4)} WHEN 1 THEN json_quote({tags[0]}) "
                f"WHEN 2 THEN json_quote({tags[0]}) || ', ' || json_quote({tags[1]}) "
                f"ELSE json_quote({tags[0]}) || ', ' || json_quote({tags[1]}) || ', ' || json_quote({tags[2]}) END")
    gps = (f"CASE WHEN {draw.chance()} < 0.5 THEN 'null' ELSE '[' || round({draw.chance()} * 180 - 90, 6) || ', ' "
           f"|| round({draw.chance()} * 360 - 180, 6) || ']' END")
    exif = (f"', \"exif\": {{\"width\": ' || {draw.between(320, 8000)} || ', \"height\": ' || "
            f"{draw.between(240, 6000)} || ', \"gps\": ' || {gps} || '}}'")
    metadata = (
        f"CASE WHEN {draw.chance()} < 0.35 THEN NULL ELSE '{{\"uploader_ip\": \"' || "
        f"printf('10.%d.%d.%d', {draw.between(0, 256)}, {draw.between(0, 256)}, {draw.between(1, 255)}) "
        f"|| '\", \"client\": {{\"name\": \"' || {choice(draw.between(0, len(CLIENTS)), CLIENTS)} "
        f"|| '\", \"version\": \"' || {version} || '\"}}' "
        f"|| CASE WHEN {draw.chance()} < 0.3 THEN ', \"tags\": [' || {tag_list} || ']' ELSE '' END "
        f"|| CASE WHEN mime LIKE 'image/%' AND {draw.chance()} < 0.7 THEN {exif} ELSE '' END "
        f"|| CASE WHEN original IS NOT NULL AND {draw.chance()} < 0.15 THEN ', \"title\": ' || json_quote(original) "
        f"ELSE '' END || '}}' END")
    primary = f"CASE WHEN node IS NOT NULL THEN {node_name('node')} END"
    replicas = (f"CASE WHEN node IS NOT NULL THEN CASE {draw.between(0, 3)} WHEN 0 THEN '[]' "
                f"WHEN 1 THEN '[\"' || {node_name(f'(node + 1) % {node_count}')} || '\"]' "
                f"ELSE '[\"' || {node_name(f'(node + 1) % {node_count}')} || '\", \"' || "
                f"{node_name(f'(node + 2) % {node_count}')} || '\"]' END END")
    # The row's id is i + 1 where the recursive CTE computes these (from the row before).
    computed = {"uuid": draw.uuid(), "kind": kind, "stem": stem, "node": primary_node_index("(i + 1)", node_count),
                "created": draw.between(0, SPAN_US), "shared": shared}
    select = ", ".join([
        "i", "uuid", "uuid || extension", "original", draw.size(),
        f"CASE WHEN {draw.chance()} > 0.05 THEN mime END", f"CASE WHEN {draw.chance()} > 0.03 THEN {draw.hex(64)} END",
        f"CASE WHEN {draw.chance()} > 0.02 THEN printf('user-%05d', {draw.between(1, 5000)}) END",
        primary, replicas,
        f"CASE WHEN node IS NOT NULL THEN '/data/' || {primary} || '/' || substr(uuid, 1, 2) || '/' "
        "|| substr(uuid, 3, 2) || '/' || uuid END",
        f"CASE WHEN shared THEN {draw.hex(32)} END",
        f"CASE WHEN shared THEN {draw.between(0, 5000)} ELSE {draw.between(0, 3)} END",
        f"CASE WHEN shared AND {draw.chance()} < 0.5 THEN "
        f"{timestamp(f'created + {draw.between(1, 90)} * {DAY_US}')} END",
        f"{draw.chance()} < 0.05", metadata, timestamp("created"),
        f"CASE WHEN {draw.chance()} < 0.6 THEN {timestamp(f'created + {draw.between(0, 30 * DAY_US)}')} END",
    ])
    return rows_of(draw, count, select, computed, f"{extension} AS extension, {mime} AS mime",
                   f"{original} AS original")


def task_rows(draw: Draws, count: int, file_count: int, node_count: int) -> str:
    node = draw.between(0, node_count)
    second = f"({node} + {draw.between(1, node_count)}) % {node_count}"
    file_ref = "coalesce(file_id, 'null')"
    payload = (
        f"CASE WHEN {draw.chance()} < 0.1 THEN NULL "
        f"WHEN kind = 'thumbnail' THEN '{{\"file_id\": ' || {file_ref} || ', \"sizes\": [64, 256, 1024], "
        f"\"format\": \"webp\"}}' "
        f"WHEN kind = 'replicate' THEN '{{\"file_id\": ' || {file_ref} || ', \"targets\": [\"' || {node_name(node)} "
        f"|| '\", \"' || {node_name(second)} || '\"], \"options\": {{\"verify\": true}}}}' "
        f"WHEN kind = 'virus_scan' THEN '{{\"file_id\": ' || {file_ref} || ', \"engine\": \"clamav\", "
        f"\"signatures\": \"daily-' || {draw.between(27000, 27400)} || '\"}}' "
        f"ELSE '{{\"file_id\": ' || {file_ref} || ', \"algorithm\": \"sha256\"}}' END")
    result = (f"CASE WHEN status = 'completed' AND {draw.chance()} < 0.9 THEN "
              f"printf('{{\"ok\": true, \"elapsed_ms\": %.3f, \"details\": {{\"worker\": \"worker-%d\", "
              f"\"attempt\": %d}}}}', {draw.chance()} * 5000, {draw.between(1, 9)}, {draw.between(1, 4)}) END")
    error = f"CASE WHEN status = 'failed' THEN {draw.error_text('kind', node_count)} END"
    computed = {"kind": choice(draw.between(0, len(TASK_TYPES)), TASK_TYPES),
                "status": draw.weighted(TASK_STATUSES, (2, 1, 12, 2)),
                "file_id": f"CASE WHEN {draw.chance()} > 0.02 THEN {draw.between(1, file_count + 1)} END",
                "created": draw.between(0, SPAN_US), "wait": draw.between(1, 600_000_000),
                "took": draw.between(50_000, 900_000_000)}
    select = ", ".join([
        "i", draw.uuid(), "kind", "file_id", "status", draw.between(1, 11), payload, result, error,
        f"CASE WHEN status = 'failed' THEN {draw.between(1, 6)} WHEN {draw.chance()} < 0.05 THEN 1 ELSE 0 END",
        timestamp("created"),
        f"CASE WHEN status <> 'pending' THEN {timestamp('created + wait')} END",
        f"CASE WHEN status IN ('completed', 'failed') THEN {timestamp('created + wait + took')} END",
    ])
    return rows_of(draw, count, select, computed)


def replication_log_rows(draw: Draws, count: int, file_count: int, node_count: int) -> str:
    file_id = draw.between(1, file_count + 1)
    status = draw.weighted(REPLICATION_STATUSES, (2, 1, 14, 3))
    size, jitter = draw.size(), draw.chance()
    computed = {
        "file_id": file_id, "status": status, "size": size, "share": draw.chance(), "created": draw.between(0, SPAN_US),
        "source": f"coalesce({primary_node_index(file_id, node_count)}, {draw.between(0, node_count)})",
        "hop": draw.between(1, node_count), "lag": draw.between(0, 1000),
        "duration": f"CASE {status} WHEN 'completed' THEN round({size} / 120000.0 + {jitter} * 50, 3) "
                    f"WHEN 'failed' THEN round({jitter} * 30000, 3) END",
    }
    source, duration = "source", "duration"
    select = ", ".join([
        "i", "file_id", node_name(source), node_name(f"({source} + hop) % {node_count}"), "status",
        "CASE status WHEN 'completed' THEN size WHEN 'pending' THEN 0 ELSE CAST(size * share AS INTEGER) END",
        duration, f"CASE WHEN status = 'failed' THEN {draw.error_text(sql_literal('replicate'), node_count)} END",
        timestamp("created"),
        f"CASE WHEN status IN ('completed', 'failed') THEN "
        f"{timestamp(f'created + CAST(({duration}) * 1000 AS INTEGER) + lag')} END",
    ])
    return rows_of(draw, count, select, computed)


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
    nodes = counts["storage_nodes"]
    # Each table's SQL takes its constants from one seeded generator, in this order: the file is fixed by the
    # arguments alone.
    tables = (
        ("storage_nodes", storage_node_rows(draw, nodes)),
        ("files", file_rows(draw, files, nodes)),
        ("tasks", task_rows(draw, counts["tasks"], files, nodes)),
        ("replication_logs", replication_log_rows(draw, counts["replication_logs"], files, nodes)),
    )
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        if connection.execute("SELECT count(*) FROM pragma_function_list WHERE name = 'pow'").fetchone()[0] == 0:
            # An SQLite built without its math functions: the same C pow() through Python.
            connection.create_function("pow", 2, math.pow, deterministic=True)
        # Nothing to protect while the file is still a temporary one: skip the
        # journal and fsyncs; the cache is bounded so memory stays flat.
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-1048576")  # 1 GiB: the unique indexes of 10M random uuids
        connection.executescript(SCHEMA)
        for table, select in tables:
            started = time.monotonic()
            connection.execute("BEGIN")
            connection.execute(f"INSERT INTO {table} {select}")  # noqa: S608 - SQL of this script's own
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
