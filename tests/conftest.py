"""Shared fixtures: a real PostgreSQL server for the whole session, a fresh database per test.

The server is started here with initdb and pg_ctl in a temporary directory (as
the ``postgres`` user when the tests run as root, since PostgreSQL refuses to
run as root), on a free port on 127.0.0.1 with scram-sha-256 password
authentication, and stopped at the end of the session even when tests fail.
Set PG_BIN to use another PostgreSQL installation's binaries.
"""

import contextlib
import fcntl
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "module_utils"))  # the engine imports without Ansible


def _pg_bin():
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries not found: install postgresql or set PG_BIN")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    directory: str
    bin: Path

    def conninfo(self, dbname="postgres"):
        return {"host": self.host, "port": self.port, "user": self.user, "password": self.password,
                "dbname": dbname}

    def connect(self, dbname="postgres", autocommit=True):
        connection = psycopg2.connect(**self.conninfo(dbname))
        connection.autocommit = autocommit
        return connection


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of this session's own (see the module docstring)."""
    with running_server() as server:
        yield server


@contextlib.contextmanager
def running_server(**overrides):
    """Start a server as the module docstring says (``overrides``: settings to change), stop it at the end."""
    pg_bin = _pg_bin()
    as_root = os.geteuid() == 0
    directory = tempfile.mkdtemp(prefix="pytest-postgres-")
    prefix = []
    if as_root:
        owner = pwd.getpwnam("postgres")
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    password = secrets.token_urlsafe(18)
    data = os.path.join(directory, "data")
    password_file = os.path.join(directory, "pwfile")
    with open(password_file, "w") as stream:
        stream.write(password + "\n")
    if as_root:
        os.chown(password_file, owner.pw_uid, owner.pw_gid)
    subprocess.run(prefix + [str(pg_bin / "initdb"), "-D", data, "-U", "postgres", "-E", "UTF8", "--no-locale",
                             "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password_file}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.unlink(password_file)
    # Large tables load in rowid ranges committed by two-phase commit (module_utils/sqlite_pg/ranges.py). In the
    # configuration file, not on the command line, so that a standby cloned from this server has it too (a hot
    # standby needs at least the primary's max_prepared_transactions).
    with open(os.path.join(data, "postgresql.conf"), "a") as conf:
        conf.write("max_prepared_transactions = 8\n")
    port = _free_port()
    settings = ["-p", str(port), "-k", directory, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                "-c", "full_page_writes=off", "-c", "max_connections=60", "-c", "shared_buffers=64MB"]
    for name, value in overrides.items():
        settings += ["-c", f"{name}={value}"]
    log = os.path.join(directory, "server.log")
    server = PostgresServer("127.0.0.1", port, "postgres", password, directory, pg_bin)
    try:
        subprocess.run(prefix + [str(pg_bin / "pg_ctl"), "-D", data, "-l", log, "-w", "-t", "60",
                                 "-o", " ".join(settings), "start"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        yield server
    finally:
        subprocess.run(prefix + [str(pg_bin / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pg_database(postgres_server):
    """A fresh, empty database for one test: its libpq connection parameters (a dict, password included)."""
    name = "test_" + uuid.uuid4().hex[:12]
    admin = postgres_server.connect()
    try:
        admin.cursor().execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    try:
        yield postgres_server.conninfo(name)
    finally:
        admin = postgres_server.connect()
        try:
            admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            admin.close()


def run_as_postgres(args):
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(prefix + [str(arg) for arg in args], check=True, capture_output=True, text=True)


@pytest.fixture
def standby(postgres_server):
    """A streaming standby of the session's server (pg_basebackup), named validate-standby; its conninfo."""
    directory = Path(postgres_server.directory)
    data = directory / f"standby-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    run_as_postgres([postgres_server.bin / "pg_basebackup", "-h", directory, "-p", postgres_server.port,
                     "-U", "postgres", "-D", data, "-R", "-X", "stream", "--checkpoint=fast"])
    run_as_postgres([postgres_server.bin / "pg_ctl", "-D", data, "-l", data / "log", "-w", "-o",
                     f"-p {port} -k {directory} -c listen_addresses='' -c cluster_name=validate-standby", "start"])
    try:
        yield {"host": str(directory), "port": port, "user": "postgres", "dbname": "postgres"}
    finally:
        run_as_postgres([postgres_server.bin / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"])


@pytest.fixture
def pgpass_file(postgres_server, tmp_path):
    """A libpq password file for the session's server (pass it as PGPASSFILE)."""
    path = tmp_path / "pgpass"
    path.write_text(f"{postgres_server.host}:{postgres_server.port}:*:{postgres_server.user}:"
                    f"{postgres_server.password}\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def sample_template(tmp_path_factory):
    """The guide's 125-row FileShareSystem sample, written once by scripts/make_sample_db.py."""
    path = tmp_path_factory.mktemp("sample") / "fileshare.db"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_db.py"), "--out", str(path), "--quiet"],
                   check=True)
    return path


@pytest.fixture
def sample_db(sample_template, tmp_path):
    """A private copy of the 125-row sample."""
    path = tmp_path / "fileshare.db"
    shutil.copyfile(sample_template, path)
    return path


def build_sqlite(path, script, rows=None):
    """A SQLite file from a DDL script and {table: [row, ...]}; returns its path as a string."""
    connection = sqlite3.connect(path)
    connection.executescript(script)
    for table, values in (rows or {}).items():
        marks = ", ".join("?" * len(values[0]))
        connection.executemany(f'INSERT INTO "{table}" VALUES ({marks})', values)  # noqa: S608 - test's own names
    connection.commit()
    connection.close()
    return str(path)


def execute(conninfo, statement, parameters=None):
    """Run one statement in autocommit; its rows, or None when it returns none."""
    connection = psycopg2.connect(**conninfo)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement, parameters)
            return cursor.fetchall() if cursor.description else None
    finally:
        connection.close()


SCHEMA_SQL = ROOT / "roles" / "schema_init" / "files" / "postgres_init_schema.sql"


def migrate_into_typed_schema(src, conninfo):
    """The runbook's tables (pre-data section), then the engine's load with its keys and foreign keys."""
    from sqlite_pg.engine import migrate

    pre_data = SCHEMA_SQL.read_text().split("-- section: post-data")[0].split("-- section: pre-data")[1]
    execute(conninfo, pre_data)
    migrate(str(src), conninfo, create_tables=False, jobs=2)


def processes_with(argument, environment=None):
    """Pids whose command line holds argument (and whose environment holds the entry environment, if given).

    The suite runs its files in parallel, so a test that signals or counts processes by name picks its own
    by what only they hold (a path of its own, a variable of its lab), never every such process on the machine.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if argument.encode() in (entry / "cmdline").read_bytes() and (
                    environment is None or environment.encode() in (entry / "environ").read_bytes().split(b"\0")):
                found.append(int(entry.name))
        except OSError:  # the process ended while it was read
            continue
    return found


def kill_processes_with(environment):
    """SIGKILL every process whose environment holds the entry ``environment``; their command lines.

    A suite marks the runs a case starts with a variable of its lab: every process they start inherits it,
    the ones that leave the run's process group too (the background load, the lock holder), so what a failed
    case left running can be ended before it holds the next case's lock.
    """
    killed = []
    for pid in processes_with("", environment):
        try:
            command = Path("/proc", str(pid), "cmdline").read_bytes().replace(b"\0", b" ")
            os.kill(pid, signal.SIGKILL)
        except OSError:  # it ended meanwhile
            continue
        killed.append(command.decode(errors="replace").strip()[:200])
    return killed


def wait_until(predicate, timeout=30.0, interval=0.02):
    """Poll ``predicate`` until it returns something true: that value, or None when it has not by ``timeout``
    seconds (it is asked once more at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


# Helpers the tests share ---------------------------------------------------------------

def file_digests(path):
    """sha256 of a SQLite file and of its -wal and -shm files (None for a missing one)."""
    import hashlib

    digests = {}
    for suffix in ("", "-wal", "-shm"):
        candidate = f"{path}{suffix}"
        digests[suffix or "db"] = hashlib.sha256(Path(candidate).read_bytes()).hexdigest() \
            if os.path.exists(candidate) else None
    return digests


def break_index_page(path, index="sqlite_autoindex_files_1"):
    """Zero the page type of the last page of ``index``: the tables stay whole, PRAGMA quick_check fails on
    that page. Returns its number."""
    with sqlite3.connect(path) as connection:
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        (page,) = connection.execute("SELECT max(pageno) FROM dbstat WHERE name = ?", (index,)).fetchone()
    connection.close()
    with open(path, "r+b") as file:
        file.seek((page - 1) * page_size)
        file.write(b"\x00")
    return page


def data_dump(conninfo):
    """pg_dump --data-only of the database (every row of every table in its physical order, every sequence's
    value), without the random key of its \\restrict line: equal before and after means nothing was written."""
    dump = subprocess.run([str(_pg_bin() / "pg_dump"), "--data-only", "-h", conninfo["host"], "-p",
                           str(conninfo["port"]), "-U", conninfo["user"], conninfo["dbname"]], check=True,
                          capture_output=True, text=True, env=dict(os.environ, PGPASSWORD=conninfo["password"])).stdout
    return [line for line in dump.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))]


def target_snapshot(conninfo):
    """Everything user-visible in a database: relations, columns, constraints, and each table's content hash."""
    connection = psycopg2.connect(**conninfo)
    try:
        cursor = connection.cursor()
        cursor.execute(
            "SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1, 2")
        relations = cursor.fetchall()
        cursor.execute("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                       "WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace) "
                       "ORDER BY 1, 2")
        constraints = cursor.fetchall()
        contents = {}
        for schema, name, kind in relations:
            if kind == "r":
                cursor.execute(sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) "
                                       "FROM {} t").format(sql.Identifier(schema, name)))
                contents[f"{schema}.{name}"] = cursor.fetchone()
        cursor.execute("SELECT nspname FROM pg_namespace ORDER BY 1")
        schemas = cursor.fetchall()
        return {"relations": relations, "constraints": constraints, "contents": contents, "schemas": schemas}
    finally:
        connection.close()


def _expected(value, pg_type):
    """What a SQLite value must read back as from a column of this PostgreSQL type (independent of the engine)."""
    import datetime
    import json
    from decimal import Decimal

    if value is None:
        return None
    if pg_type == "boolean":
        if isinstance(value, str):
            return value.strip().lower() in ("true", "t", "yes", "y", "on", "1")
        return bool(value)
    if pg_type.startswith("timestamp"):
        if isinstance(value, (int, float)):
            seconds = value if abs(value) < 100_000_000_000 else value / 1000
            moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(
                microseconds=round(Decimal(repr(seconds)) * 1_000_000))
        else:
            moment = datetime.datetime.fromisoformat(value.strip())
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=datetime.timezone.utc)
        return moment.astimezone(datetime.timezone.utc) if pg_type.endswith("with time zone") else moment
    if pg_type == "date":
        return datetime.date.fromisoformat(value)
    if pg_type in ("jsonb", "json"):
        return json.loads(value) if isinstance(value, str) else value
    if pg_type == "uuid":
        return str(uuid.UUID(value if isinstance(value, str) else None, bytes=value if isinstance(value, bytes)
                             else None))
    if pg_type == "bytea":
        return value if isinstance(value, bytes) else (value.encode() if isinstance(value, str) else
                                                       str(value).encode())
    if pg_type.startswith("numeric"):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    if pg_type in ("double precision", "real"):
        return float(value)
    if pg_type in ("bigint", "integer", "smallint"):
        return int(value)
    return value if isinstance(value, str) else (repr(value) if isinstance(value, float) else str(value))


def _normalise(value, pg_type):
    import datetime

    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, datetime.datetime) and value.tzinfo is not None:
        return value.astimezone(datetime.timezone.utc)
    if pg_type == "uuid":
        return str(value)
    return value


def _quote(name):
    return '"' + name.replace('"', '""') + '"'


def assert_same_content(sqlite_path, conninfo, table, target=None, schema="public", order_by=None):
    """Every value of a SQLite table equals, once read back from PostgreSQL, what its column type makes of it.

    Rows are matched in ``order_by`` order (column names; default the first column), which the
    C collation of the test server sorts as SQLite does.
    """
    import sqlite3

    target = target or table
    source = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    try:
        columns = [r[1] for r in source.execute(f'PRAGMA table_info("{table}")')]
        order = ", ".join(_quote(c) for c in (order_by or columns[:1]))
        column_list = ", ".join(_quote(c) for c in columns)
        rows = source.execute(f"SELECT {column_list} FROM {_quote(table)} ORDER BY {order}").fetchall()  # noqa: S608
    finally:
        source.close()
    connection = psycopg2.connect(**conninfo)
    try:
        cursor = connection.cursor()
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            (f"{_quote(schema)}.{_quote(target)}",))
        types = dict(cursor.fetchall())
        pg_order = ", ".join(f"{_quote(c)} NULLS FIRST" for c in (order_by or columns[:1]))  # SQLite's NULL order
        cursor.execute(f"SELECT {column_list} FROM {_quote(schema)}.{_quote(target)} ORDER BY {pg_order}")  # noqa: S608
        loaded = cursor.fetchall()
    finally:
        connection.close()
    column_types = [types[c] for c in columns]
    assert len(loaded) == len(rows), f"{table}: {len(loaded)} rows in PostgreSQL, {len(rows)} in SQLite"
    for source_row, loaded_row in zip(rows, loaded):
        want = tuple(_expected(v, t) for v, t in zip(source_row, column_types))
        got = tuple(_normalise(v, t) for v, t in zip(loaded_row, column_types))
        assert got == want, f"{table}: PostgreSQL has {got!r}, SQLite gives {want!r}"


# docs/RELIABILITY.md ------------------------------------------------------------------------
# The lab suites mark each case ``fault(done=..., checked=...)``; each test module that has
# such cases names its section of docs/RELIABILITY.md (RELIABILITY_SECTION: title, then the
# lines under it). When every marked case of a module ran, its section is rewritten from
# the results; the other sections are kept as they are.

RELIABILITY = ROOT / "docs" / "RELIABILITY.md"
_reliability_results = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "fault(done, checked): a case of a lab suite, for docs/RELIABILITY.md")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault")
    if marker is None or report.when != "call" and not (report.when == "setup" and report.failed):
        return
    _reliability_results.setdefault(item.module, []).append(
        {"case": item.name.removeprefix("test_").replace("_", " "), **marker.kwargs, "result": report.outcome,
         "seconds": round(report.duration)})


def _marked_cases(module):
    return [name for name, function in vars(module).items() if name.startswith("test_")
            and any(mark.name == "fault" for mark in getattr(function, "pytestmark", []))]


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("FAULTS_NO_REPORT"):
        return
    for module, results in _reliability_results.items():
        # A partial run (-k, -x, a failure in setup) does not rewrite the record.
        if len(results) != len(_marked_cases(module)):
            continue
        title, *intro = module.RELIABILITY_SECTION
        lines = [f"## {title}", "", *intro, "", "| case | what was done | what was checked | result | seconds |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['done']} | {r['checked']} | {r['result']} | {r['seconds']} |" for r in results]
        passed = sum(result["result"] == "passed" for result in results)
        lines += ["", f"{passed} of {len(results)} cases passed."]
        _write_reliability_section(title, "\n".join(lines))


def _write_reliability_section(title, text):
    # Each parallel worker writes the sections of its own files: the lock keeps one from losing another's.
    with open(RELIABILITY, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _replace_reliability_section(title, text)


def _replace_reliability_section(title, text):
    head = ["# Reliability: the lab suites' results", "",
            "Each section is written by its suite (part of `bash scripts/test.sh`) from that suite's last complete "
            "run;", "a partial run (`-k`, `-x`, a failure in setup) leaves it as it was.", ""]
    sections = {}
    if RELIABILITY.exists():
        for block in RELIABILITY.read_text().split("\n## ")[1:]:
            sections[block.split("\n", 1)[0]] = "## " + block.strip()
    sections[title] = text
    RELIABILITY.write_text("\n".join(head) + "\n" + "\n\n".join(sections[name] for name in sorted(sections)) + "\n")
