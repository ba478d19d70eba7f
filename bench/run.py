#!/usr/bin/env python3
"""Benchmark: the FileShareSystem sample from SQLite into PostgreSQL, several ways, one run.

Every system loads the same SQLite sample into a fresh database holding the
same typed tables (the pre-data section of the runbook's schema file), then
the same post-data section (unique constraints, indexes, foreign keys,
sequence resets) is applied; the figure is load + post-data as one wall time.
Row counts are checked against SQLite after each system. The baseline
(`pipeline`) always runs, so every ratio compares figures from the same run on
the same machine. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import psycopg2
import yaml

REPO = Path(__file__).resolve().parent.parent
ANSIBLE_CONFIG = REPO / "ansible.cfg"
LAB_INVENTORY = REPO / "inventory" / "lab"
LAB_PLAYBOOK = REPO / "playbooks" / "lab.yml"
MIGRATE_PLAYBOOK = REPO / "migrate.yml"
CUTOVER_PLAYBOOK = REPO / "cutover.yml"
# inventory/lab's ports plus this: clear of the bundled lab (+0) and the test suites' labs (+100 to +300).
DEFAULT_LAB_PORT_OFFSET = 600
# The original guide's settings, which the runbook reads from the environment: not the bench's to pass on.
GUIDE_VARIABLES = ("DATABASE_URL", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_PORT", "SQLITE_PATH")
SAMPLE_SCRIPT = REPO / "scripts" / "make_sample_db.py"
SCHEMA_FILE = REPO / "roles" / "schema_init" / "files" / "postgres_init_schema.sql"
MODULE_FILE = REPO / "library" / "sqlite_to_postgres.py"
DEFAULT_PG_BIN = "/usr/lib/postgresql/15/bin"
DEFAULT_FILES = 1_000_000
BASELINE = "pipeline"
# Parents before children, as the foreign keys (built afterwards) expect.
TABLES = ("storage_nodes", "files", "tasks", "replication_logs")
RSS_SAMPLE_SECONDS = 0.1
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The benchmark server is configured as a production primary would be, not
# for speed tricks: durable (fsync, synchronous_commit, full_page_writes),
# wal_level=replica as under Patroni, data checksums as the lab's initdb, and
# memory sized for a shared 2-core box. Trust auth on loopback only, for the
# few minutes the throwaway server lives: no password exists to leak.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "100",
    "max_prepared_transactions": "8",  # the module loads large tables in rowid ranges (two-phase commit)
    "shared_buffers": "1GB",
    "maintenance_work_mem": "256MB",
    "work_mem": "16MB",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "timezone": "UTC",
    "logging_collector": "off",
}
INITDB_OPTIONS = ["--encoding=UTF8", "--locale=C.UTF-8", "--data-checksums", "--auth=trust", "--username=postgres"]


class BenchError(Exception):
    """A failure to report as one line (no traceback)."""


@dataclass
class Sample:
    path: Path
    files: int
    seed: int
    size_bytes: int
    counts: dict[str, int]
    columns: dict[str, list[str]]

    @property
    def rows(self) -> int:
        return sum(self.counts.values())


@dataclass
class Context:
    sample: Sample
    server: Postgres  # the bench's own server, or the lab's leader
    run_dir: Path
    timeout: float
    deadline: float  # of the system running now, on the time.monotonic() clock
    pre_data: str
    post_data: str
    module_jobs: int
    module_integrity_check: str
    lab: Lab | None = None  # the runbook's cluster, for the systems that need it


@dataclass
class ProcessUse:
    """One process a system ran (or a PostgreSQL process that worked for it): CPU seconds (user + system)
    while it was watched and its highest resident memory."""

    pid: int
    role: str
    command: str
    cpu_s: float = 0.0
    peak_rss_bytes: int = 0
    name: str = ""  # the program's name (/proc/<pid>/stat), to see an exec


# Roles of the server's processes: PostgreSQL's resident memory counts the shared buffers a process
# touched, so their memory is reported apart from the client's processes.
SERVER_ROLES = ("postgres backend", "postgres autovacuum", "postgres background")


@dataclass
class Usage:
    """What a system's processes used (see ProcessAccount): the peak of their summed memory, two ways,
    and each process's CPU seconds and peak RSS."""

    rss_bytes: int = 0
    pss_bytes: int = 0
    pss_all_bytes: int = 0  # the whole process tree, where only part of it is counted (see ProcessAccount)
    processes: list[ProcessUse] = field(default_factory=list)

    def __or__(self, other: Usage) -> Usage:
        return Usage(max(self.rss_bytes, other.rss_bytes), max(self.pss_bytes, other.pss_bytes),
                     max(self.pss_all_bytes, other.pss_all_bytes), self.processes + other.processes)

    def by_role(self) -> dict:
        """{role: processes, CPU seconds summed, the highest peak RSS of one of them}."""
        roles, pids = {}, {}
        for process in self.processes:
            entry = roles.setdefault(process.role, {"processes": 0, "cpu_s": 0.0, "peak_rss_mb": 0.0})
            pids.setdefault(process.role, set()).add(process.pid)  # a server process is watched by each step
            entry["processes"] = len(pids[process.role])
            entry["cpu_s"] = round(entry["cpu_s"] + process.cpu_s, 2)
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], round(process.peak_rss_bytes / 1e6, 1))
        return dict(sorted(roles.items(), key=lambda item: -item[1]["cpu_s"]))

    def cpu(self, server: bool) -> float:
        return round(sum(p.cpu_s for p in self.processes if (p.role in SERVER_ROLES) == server), 2)

    def largest_client_process(self) -> ProcessUse | None:
        clients = [p for p in self.processes if p.role not in SERVER_ROLES]
        return max(clients, key=lambda p: p.peak_rss_bytes) if clients else None

    def figures(self) -> dict:
        """The per-process figures of a run, as the JSON holds them."""
        largest = self.largest_client_process()
        return {"cpu_s": {"client": self.cpu(server=False), "server": self.cpu(server=True)},
                "processes": self.by_role(),
                "peak_rss_process_mb": round(largest.peak_rss_bytes / 1e6, 1) if largest else 0.0,
                "peak_rss_process_role": largest.role if largest else None}


@dataclass
class Outcome:
    """What a loader reports back: what its processes used (see ProcessAccount) and how it was run."""

    usage: Usage
    details: dict = field(default_factory=dict)


# ---------------------------------------------------------------- measuring


@dataclass
class ServerProcesses:
    """The PostgreSQL server whose processes a measurement also watches, and the database the system loads."""

    postmaster: int
    database: str


class ProcessAccount:
    """Per process CPU seconds and peak RSS of some processes and all their descendants (and of a PostgreSQL
    server's processes), and the highest summed memory of the tree, two ways.

    Sampled from /proc every RSS_SAMPLE_SECONDS: the kernel here has no
    /proc/<pid>/task/<tid>/children, so the tree is rebuilt from each
    process's parent id. /proc is enough; psutil would add a dependency.
    A process's CPU is its utime + stime at the last sample that saw it (a
    server process that existed before: less what it had used by then), so
    up to one interval of a process that ends is not counted.
    `peak` sums RSS, which counts every page a forked worker shares with its
    parent once per process; `peak_pss` sums PSS (each shared page divided
    among the processes sharing it), the memory the tree really holds.
    With `within`, both count only the processes whose command line holds
    that text, and their descendants; `peak_pss_all` still counts the whole tree.
    Each process gets a role: `labels` names the roots' roles, descendants inherit
    theirs, except that an Ansible module (AnsiballZ) is `module`, its forked workers
    `worker` and the shell that starts it `shell`; the server's processes are
    `postgres backend` (of `database`, or a parallel worker), `postgres autovacuum`
    or `postgres background` (writer, checkpointer, ...).
    """

    def __init__(self, roots: list[int], within: str | None = None, labels: dict[int, str] | None = None,
                 server: ServerProcesses | None = None):
        self.roots = set(roots)
        self.within = within.encode() if within else None
        self.labels = labels or {}
        self.server = server
        self.peak = 0
        self.peak_pss = 0
        self.peak_pss_all = 0
        self.seen: dict[int, ProcessUse] = {}
        self.before: dict[int, float] = {}  # CPU of the server's processes when the watch began
        if server:
            for pid, (parent, cpu, _rss, _name) in self.read_proc().items():
                if parent == server.postmaster:
                    self.before[pid] = cpu
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.sample()  # the last figures of whatever still runs

    def usage(self) -> Usage:
        return Usage(self.peak, self.peak_pss, self.peak_pss_all, list(self.seen.values()))

    def _run(self):
        while True:
            rss, pss, pss_all = self.sample()
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self.peak_pss_all = max(self.peak_pss_all, pss_all)
            if self._stop.wait(RSS_SAMPLE_SECONDS):
                return

    @staticmethod
    def read_proc() -> dict[int, tuple[int, float, int, str]]:
        """{pid: (parent pid, CPU seconds, RSS bytes, command name)} of every process."""
        found = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    text = stat.read()
            except OSError:  # the process ended between listing and reading
                continue
            # Fields after the parenthesised command name: state, ppid, ...; utime, stime are the 12th and 13th,
            # rss the 22nd.
            fields = text[text.rindex(b")") + 2:].split()
            name = text[text.index(b"(") + 1:text.rindex(b")")].decode(errors="replace")
            found[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
                                      int(fields[21]) * PAGE_SIZE, name)
        return found

    def sample(self) -> tuple[int, int, int]:
        processes = self.read_proc()
        children: dict[int, list[int]] = {}
        for pid, (parent, _cpu, _rss, _name) in processes.items():
            children.setdefault(parent, []).append(pid)
        rss = pss = pss_all = 0
        pending, seen = [(pid, self.within is None, "") for pid in self.roots], set()
        while pending:
            pid, counted, parent_role = pending.pop()
            if pid in seen or pid not in processes:
                continue
            seen.add(pid)
            command = command_line(pid)
            counted = counted or self.within in command
            role = self._note(pid, processes[pid], command, parent_role)
            size = proportional_set_size(pid)
            pss_all += size
            if counted:
                rss += processes[pid][2]
                pss += size
            pending.extend((child, counted, role) for child in children.get(pid, ()))
        if self.server:
            for pid in children.get(self.server.postmaster, ()):
                self._note(pid, processes[pid], command_line(pid), self._server_role(command_line(pid)))
        return rss, pss, pss_all

    def _note(self, pid, process, command, role) -> str:
        """Record a sample of one process (``role``: its parent's, or its own for a server process); returns
        its role."""
        _parent, cpu, rss, name = process
        use = self.seen.get(pid)
        if use is None or use.name != name:  # new, or it exec'd another program since (a shell does)
            if pid in self.labels:
                role = self.labels[pid]
            elif role in ("module", "worker"):
                role = "worker"
            elif b"AnsiballZ_" in command:
                role = "shell" if name in ("sh", "bash", "dash") else "module"
            shown = command.replace(b"\0", b" ").decode(errors="replace").strip() or name
            if use is None:
                use = self.seen[pid] = ProcessUse(pid, role or name, shown[:200], name=name)
            else:
                use.role, use.command, use.name = role or name, shown[:200], name
        use.cpu_s = round(cpu - self.before.get(pid, 0.0), 2)
        use.peak_rss_bytes = max(use.peak_rss_bytes, rss)
        return use.role

    def _server_role(self, command: bytes) -> str:
        if b"autovacuum" in command:
            return "postgres autovacuum"
        if f" {self.server.database} ".encode() in command or b"parallel worker" in command:
            return "postgres backend"
        return "postgres background"


def command_line(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read()
    except OSError:
        return b""


def proportional_set_size(pid: int) -> int:
    """PSS of one process in bytes (0 when it has ended)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_processes(commands: list[list[str]], log: Path, deadline: float, env: dict[str, str] | None = None,
                  cwd: Path | None = None, within: str | None = None, labels: list[str] | None = None,
                  server: ServerProcesses | None = None) -> Usage:
    """Run commands as a pipeline (each one's stdout into the next one's stdin),
    stderr and the last stdout to `log`; return what all their trees used (ProcessAccount; `labels`: the
    commands' roles, by default their program's name; `server`: whose processes are watched too).
    Each process leads its own session, so a timeout or Ctrl-C can stop its whole tree.
    `deadline` is on the time.monotonic() clock."""
    processes: list[subprocess.Popen] = []
    labels = labels or [Path(command[0]).name for command in commands]
    with open(log, "ab") as log_file:
        try:
            upstream = subprocess.DEVNULL
            for index, command in enumerate(commands):
                last = index == len(commands) - 1
                process = subprocess.Popen(command, stdin=upstream, stdout=log_file if last else subprocess.PIPE,
                                           stderr=log_file, env=env, cwd=cwd, start_new_session=True)
                if upstream is not subprocess.DEVNULL:
                    upstream.close()  # only the reader holds it now, so the writer sees a closed pipe
                upstream = process.stdout
                processes.append(process)
            with ProcessAccount([process.pid for process in processes], within,
                                {process.pid: label for process, label in zip(processes, labels)},
                                server) as account:
                for process in processes:
                    process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            raise BenchError(f"{Path(commands[0][0]).name} still running at the --timeout; stopped") from None
        finally:
            for process in processes:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    for command, process in zip(commands, processes):
        if process.returncode != 0:
            raise BenchError(f"{Path(command[0]).name} exited with {process.returncode}: {last_line(log)}")
    return account.usage()


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else f"no output (see {log})"


# ---------------------------------------------------------------- the sample


def sample_script_default_seed() -> int:
    """make_sample_db.py's own default, so the cache name says which sample it holds."""
    spec = importlib.util.spec_from_file_location("make_sample_db", SAMPLE_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.DEFAULT_SEED


def engine_and_sample_arguments(parser: argparse.ArgumentParser, files: int):
    """The options the measuring tools beside this benchmark share (bench/stream_cpu.py, bench/validate_cpu.py)."""
    parser.add_argument("--files", type=int, default=files)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--data-dir", type=Path, default=REPO / "bench" / "data")
    parser.add_argument("--engine", type=Path, default=REPO / "module_utils",
                        help="the module_utils directory whose sqlite_pg is measured")


def engine_and_sample(args: argparse.Namespace, tool: str) -> tuple[Sample, Server]:
    """For such a tool: its engine importable as sqlite_pg, the sample built, and a server of its own to start
    (in a new directory ``<tool>-...`` under the data directory, its log beside it)."""
    sys.path.insert(0, str(args.engine.resolve()))
    seed = sample_script_default_seed() if args.seed is None else args.seed
    sample = build_sample(args.data_dir, args.files, seed)
    directory = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=args.data_dir))
    directory.rmdir()
    return sample, Server(Path(DEFAULT_PG_BIN), directory, args.data_dir / f"{directory.name}.log")


def build_sample(data_dir: Path, files: int, seed: int) -> Sample:
    """The sample database, built once per (files, seed) and reused afterwards."""
    path = data_dir / f"sample-{files}-seed{seed}.db"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        progress(f"building the sample: {files:,} files -> {path}")
        result = subprocess.run([sys.executable, str(SAMPLE_SCRIPT), "--files", str(files), "--seed", str(seed),
                                 "--out", str(path)], stdout=subprocess.DEVNULL)
        if result.returncode != 0:
            raise BenchError(f"make_sample_db.py failed (exit {result.returncode}) building {path}")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        counts = {t: db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in TABLES}  # noqa: S608
        columns = {t: [row[1] for row in db.execute(f'PRAGMA table_info("{t}")')] for t in TABLES}
    return Sample(path, files, seed, path.stat().st_size, counts, columns)


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Postgres:
    """A PostgreSQL on loopback the benchmark connects to as `postgres`: trust, or a pgpass file."""

    def __init__(self, pg_bin: Path, port: int, passfile: Path | None = None):
        self.pg_bin = pg_bin
        self.port = port
        self.passfile = passfile
        self._postmaster = 0

    @property
    def env(self) -> dict[str, str]:
        """libpq environment for client programs: loopback TCP, as the runbook connects."""
        return {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": "postgres",
                "PGCONNECT_TIMEOUT": "10", **({"PGPASSFILE": str(self.passfile)} if self.passfile else {})}

    @contextlib.contextmanager
    def connection(self, database: str = "postgres", autocommit: bool = False):
        """A connection that is closed afterwards (psycopg2's own `with` only ends the transaction)."""
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database,
                                      connect_timeout=10, **({"passfile": str(self.passfile)} if self.passfile else {}))
        try:
            connection.autocommit = autocommit
            yield connection
        finally:
            connection.close()

    def watch(self, database: str) -> ServerProcesses:
        """This server's processes, for a ProcessAccount: the postmaster is the parent of any backend."""
        if not self._postmaster:
            # Read while the session lives: its backend's /proc entry goes when it disconnects.
            with self.connection() as connection, connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                with open(f"/proc/{cursor.fetchone()[0]}/stat", "rb") as stat:
                    text = stat.read()
            self._postmaster = int(text[text.rindex(b")") + 2:].split()[1])
        return ServerProcesses(self._postmaster, database)

    def version(self) -> str:
        with self.connection() as connection, connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            return cursor.fetchone()[0]

    def admin(self, statement: str):
        """A statement that cannot run in a transaction block (CREATE/DROP DATABASE)."""
        with self.connection(autocommit=True) as connection, connection.cursor() as cursor:
            cursor.execute(statement)

    def execute(self, database: str, sql: str):
        """A script of statements, in one transaction."""
        with self.connection(database) as connection:
            with connection, connection.cursor() as cursor:  # commits, or rolls back on error
                cursor.execute(sql)

    def rows(self, database: str, query: str, params: tuple = ()) -> list[tuple]:
        with self.connection(database) as connection, connection.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall()

    def wal_position(self) -> str:
        return self.rows("postgres", "SELECT pg_current_wal_lsn()::text")[0][0]

    def wal_since(self, position: str) -> int:
        """Bytes of WAL the server wrote since ``position`` (pg_current_wal_lsn() then)."""
        return int(self.rows("postgres", "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (position,))[0][0])

    def database_size(self, database: str) -> int:
        return self.rows("postgres", "SELECT pg_database_size(%s)", (database,))[0][0]

    def counts(self, database: str) -> dict[str, int]:
        counts = {}
        with self.connection(database) as connection, connection.cursor() as cursor:
            for table in TABLES:
                cursor.execute(f'SELECT count(*) FROM "{table}"')  # noqa: S608 - fixed table names
                counts[table] = cursor.fetchone()[0]
        return counts


class Server(Postgres):
    """A throwaway PostgreSQL for one benchmark run, stopped whatever happens."""

    def __init__(self, pg_bin: Path, directory: Path, log: Path):
        super().__init__(pg_bin, free_port())
        self.directory = directory
        self.data = directory / "data"
        self.log = log  # outside `directory`, which goes away with the server
        # initdb and postgres refuse to run as root: run them as `postgres`.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start(self):
        self.directory.mkdir(parents=True)
        self.log.touch()
        if self.as_user:
            account = pwd.getpwnam("postgres")
            for path in (self.directory, self.log):
                os.chown(path, account.pw_uid, account.pw_gid)
        self.directory.chmod(0o700)
        if self.as_user and subprocess.run([*self.as_user, "test", "-w", str(self.directory)]).returncode != 0:
            raise BenchError(f"the postgres account cannot reach {self.directory}: use a --data-dir it can traverse")
        self._run([str(self.pg_bin / "initdb"), "-D", str(self.data), *INITDB_OPTIONS], "initdb")
        settings = {**SERVER_SETTINGS, "port": str(self.port), "unix_socket_directories": str(self.directory)}
        options = " ".join(f"-c {name}={value}" for name, value in settings.items())
        self._run([str(self.pg_bin / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data),
                   "-l", str(self.log), "-o", options], "pg_ctl start")

    def stop(self):
        # postmaster.pid, not a flag: an interrupt can land after pg_ctl has
        # launched the server but before start() returned.
        if (self.data / "postmaster.pid").exists():
            self._run([str(self.pg_bin / "pg_ctl"), "stop", "-m", "fast", "-w", "-D", str(self.data)], "pg_ctl stop")
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, command: list[str], what: str):
        result = subprocess.run([*self.as_user, *command], capture_output=True, text=True, cwd=self.directory)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines() or [f"exit {result.returncode}"]
            raise BenchError(f"{what} failed: {detail[-1]} (log: {self.log})")


# ---------------------------------------------------------------- the lab cluster


def ansible_tool(name: str) -> str:
    tool = Path(sys.executable).with_name(name)
    return str(tool) if tool.exists() else name


def ansible_environment(**extra: str) -> dict[str, str]:
    """What ansible-playbook runs with: the repository's ansible.cfg, no libpq or guide settings of the caller."""
    env = {k: v for k, v in os.environ.items() if k not in GUIDE_VARIABLES and not k.startswith("PG")}
    return {**env, "ANSIBLE_CONFIG": str(ANSIBLE_CONFIG), "ANSIBLE_NOCOLOR": "1", **extra}


class Lab:
    """The runbook's lab cluster (etcd, three Patroni members, PgBouncer) from inventory/lab,
    every port shifted by `port_offset`, under a root of its own; torn down whatever happens."""

    def __init__(self, run_dir: Path, pg_bin: Path, port_offset: int, root: Path | None):
        self.pg_bin = pg_bin
        self.root = root or Path(f"/var/tmp/fileshare-bench-lab-{os.getpid()}")
        self.inventory = run_dir / "lab-inventory"
        self.log = run_dir / "lab.log"
        self.started = False
        hosts = yaml.safe_load((LAB_INVENTORY / "hosts.yml").read_text())
        self.ports = []
        for group in hosts["all"]["children"].values():
            for host in group["hosts"].values():
                for key in [key for key in host if key.endswith("_port")]:
                    host[key] += port_offset
                    self.ports.append(host[key])
        self.members = hosts["all"]["children"]["postgres_cluster"]["hosts"]
        settings = yaml.safe_load((LAB_INVENTORY / "group_vars" / "all.yml").read_text())
        settings.update(lab_root=str(self.root), patroni_scope=f"fileshare-bench-{os.getpid()}",
                        pg_pgpass_file=str(self.root / "pgpass"))
        (self.inventory / "group_vars").mkdir(parents=True)
        (self.inventory / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
        (self.inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(settings))

    def up(self, deadline: float):
        for port in self.ports:
            with socket.socket() as probe:
                # As the lab's servers bind: a closed connection of the last run (TIME-WAIT) does not hold the port.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    raise BenchError(f"port {port} of the lab is in use: choose another --lab-port-offset") from None
        if self.root.exists():
            raise BenchError(f"lab root {self.root} exists already: choose another --lab-root")
        self.started = True  # from here on, down() has something to stop
        self.root.mkdir(parents=True)
        self.root.chmod(0o755)  # its daemons run as postgres
        run_processes([[ansible_tool("ansible-playbook"), "-i", str(self.inventory), str(LAB_PLAYBOOK)]],
                      self.log, deadline, env=ansible_environment(), cwd=REPO)

    def down(self):
        if not self.started:
            return
        result = subprocess.run([ansible_tool("ansible-playbook"), "-i", str(self.inventory), str(LAB_PLAYBOOK),
                                 "-e", "lab_state=absent"], cwd=REPO, env=ansible_environment(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with open(self.log, "a") as log:
            log.write(result.stdout)
        shutil.rmtree(self.root, ignore_errors=True)
        self.started = False
        if result.returncode != 0:
            raise BenchError(f"tearing the lab down failed (exit {result.returncode}): see {self.log}")

    def leader(self) -> Postgres:
        """The member Patroni names leader, asked of every member in turn."""
        for host in self.members.values():
            url = f"http://127.0.0.1:{host['patroni_restapi_port']}/cluster"
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - a fixed http URL
                    members = json.load(answer)["members"]
            except (OSError, ValueError, KeyError):
                continue
            for member in members:
                if member.get("role") == "leader":
                    return Postgres(self.pg_bin, int(member["port"]), self.root / "pgpass")
        raise BenchError("no Patroni member of the lab names a leader")


# ---------------------------------------------------------------- the systems


def load_pipeline(ctx: Context, database: str) -> Outcome:
    """sqlite3 -csv | psql \\copy, one table after another.

    No conversion in the SELECT: PostgreSQL takes everything this sample
    holds as CSV text. 0/1 are valid boolean input; SQLAlchemy's
    'YYYY-MM-DD HH:MM:SS.ffffff' is valid timestamptz input (read in the
    server's TimeZone, UTC); JSON text is valid jsonb input; the uuids are
    canonical. NULL leaves sqlite3 as an empty unquoted field, which CSV COPY
    reads as NULL (the sample has no empty strings to confuse with it).
    """
    env = {**ctx.server.env, "PGDATABASE": database}
    sqlite3_cli, psql = shutil.which("sqlite3"), str(ctx.server.pg_bin / "psql")
    usage = Usage()
    for table in TABLES:
        columns = ", ".join(f'"{column}"' for column in ctx.sample.columns[table])
        usage |= run_processes(
            [[sqlite3_cli, "-readonly", "-csv", str(ctx.sample.path), f'SELECT {columns} FROM "{table}"'],  # noqa: S608
             [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1",
              "-c", f'\\copy "{table}" ({columns}) FROM pstdin WITH (FORMAT csv)']],
            ctx.run_dir / "pipeline.log", ctx.deadline, env=env, server=ctx.server.watch(database))
    return Outcome(usage, {"conversions": "none"})


def module_missing() -> str | None:
    if not MODULE_FILE.exists():
        return f"{MODULE_FILE.relative_to(REPO)} does not exist yet"
    return None


def run_module(ctx: Context, module: str, arguments: dict) -> Usage:
    """One of the runbook's modules, run through Ansible from the repository root so
    ansible.cfg (library, module_utils) applies. Its memory is that of the process
    Ansible starts for it on the host (AnsiballZ) and its workers; the controller
    (about 90 MB, the same for any task) is in `pss_all_bytes` only. The server's
    processes working for its database are watched too."""
    ansible = Path(sys.executable).with_name("ansible")
    command = [str(ansible) if ansible.exists() else "ansible", "localhost", "-i", "localhost,", "-c", "local",
               "-m", module, "-a", json.dumps(arguments), "-e", f"ansible_python_interpreter={sys.executable}"]
    env = {**ctx.server.env, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "false"}
    return run_processes([command], ctx.run_dir / f"{module}.log", ctx.deadline, env=env, cwd=REPO,
                         within=f"AnsiballZ_{module}", labels=["controller"],
                         server=ctx.server.watch(arguments["login_db"]) if "login_db" in arguments else None)


def module_connection(ctx: Context, database: str) -> dict:
    return {"src": str(ctx.sample.path), "login_host": "127.0.0.1", "login_port": ctx.server.port,
            "login_user": "postgres", "login_db": database}


def load_module(ctx: Context, database: str) -> Outcome:
    """The runbook's sqlite_to_postgres module into the pre-created tables."""
    usage = run_module(ctx, "sqlite_to_postgres", {
        **module_connection(ctx, database), "create_tables": False, "jobs": ctx.module_jobs,
        # The schema file's post-data section follows, as for every system.
        "post_data": False, "integrity_check": ctx.module_integrity_check,
    })
    return Outcome(usage, {"jobs": ctx.module_jobs, "integrity_check": ctx.module_integrity_check,
                           "with_controller_peak_pss_mb": round(usage.pss_all_bytes / 1e6, 1)})


def backup_source(ctx: Context) -> dict:
    """The runbook's backup of the source (migrate.yml's backup stage): a copy with SQLite's backup API,
    quick-checked, by the sqlite_backup module. Its size and time; the copy is removed afterwards."""
    copy = ctx.run_dir / "backup" / ctx.sample.path.name
    copy.parent.mkdir(exist_ok=True)
    started = time.monotonic()
    try:
        usage = run_module(ctx, "sqlite_backup", {"src": str(ctx.sample.path), "dest": str(copy)})
        return {"seconds": round(time.monotonic() - started, 3), "sqlite_copy_mb": round(copy.stat().st_size / 1e6, 1),
                **usage.figures()}
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


def validate_module(ctx: Context, database: str) -> Outcome:
    """The runbook's validation after the module's load and the post-data: content
    checksums of every table on both sides, foreign keys and sequences."""
    return Outcome(run_module(ctx, "sqlite_to_postgres_validate", {**module_connection(ctx, database),
                                                                   "jobs": ctx.module_jobs}))


def pgloader_missing() -> str | None:
    return None if shutil.which("pgloader") else "pgloader is not on PATH"


# pgloader 3.6 runs out of heap (1.1 GB) on the 1M-file sample at its
# defaults; with these settings it finishes at about 350 MB.
PGLOADER_SETTINGS = "batch rows = 10000, prefetch rows = 10000, workers = 2, concurrency = 1"


def load_pgloader(ctx: Context, database: str) -> Outcome:
    """pgloader into the same pre-created tables: data only, nothing of its own
    (tables, indexes, keys, sequences) so the same post-data section follows."""
    command_file = ctx.run_dir / "pgloader.load"
    tables = ", ".join(f"'{table}'" for table in TABLES)
    command_file.write_text(
        "LOAD DATABASE\n"
        f"  FROM sqlite://{ctx.sample.path}\n"
        f"  INTO postgresql://postgres@127.0.0.1:{ctx.server.port}/{database}\n"
        "  WITH data only, create no tables, include no drop, create no indexes, no foreign keys,\n"
        f"       reset no sequences, truncate, {PGLOADER_SETTINGS}\n"
        "  SET timezone TO 'UTC'\n"
        f"  INCLUDING ONLY TABLE NAMES LIKE {tables};\n"
    )
    work = ctx.run_dir / "pgloader"
    work.mkdir(exist_ok=True)
    usage = run_processes([["pgloader", "--root-dir", str(work), "--on-error-stop", str(command_file)]],
                          ctx.run_dir / "pgloader.log", ctx.deadline, env=ctx.server.env,
                          server=ctx.server.watch(database))
    return Outcome(usage, {"settings": PGLOADER_SETTINGS})


# DuckDB with its sqlite and postgres extensions, as PyPI's duckdb-ext-sqlite and duckdb-ext-postgres ship them
# (under the duckdb_ext package's extensions/ folder): loaded from there, nothing downloaded. Each table is one
# INSERT ... SELECT from the attached SQLite file into the attached PostgreSQL database, which DuckDB writes with
# binary COPY. Arguments: the sample, a libpq connection string, then [[table, [columns]], ...] as JSON.
DUCKDB_LOAD = """\
import json, os, sys
import duckdb, duckdb_ext
sample, conninfo, tables = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
literal = lambda text: "'" + text.replace("'", "''") + "'"
db = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
db.execute("SET extension_directory = " + literal(os.path.join(next(iter(duckdb_ext.__path__)), "extensions")))
db.execute("LOAD sqlite_scanner")
db.execute("LOAD postgres_scanner")
db.execute("SET TimeZone = 'UTC'")
db.execute("ATTACH " + literal(sample) + " AS s (TYPE sqlite, READ_ONLY)")
db.execute("ATTACH " + literal(conninfo) + " AS p (TYPE postgres)")
for table, columns in tables:
    names = ", ".join('"' + column + '"' for column in columns)
    try:
        db.execute(f'INSERT INTO p.public."{table}" ({names}) SELECT {names} FROM s."{table}"')
    except duckdb.Error as error:  # its first line names the column and the value; a hint follows
        sys.exit(f"table {table}: {str(error).splitlines()[0]}")
"""


def duckdb_missing() -> str | None:
    for package in ("duckdb", "duckdb_ext"):
        if importlib.util.find_spec(package) is None:
            return f"the {package} package is not installed (pip install -r requirements-dev.txt)"
    return None


def load_duckdb(ctx: Context, database: str) -> Outcome:
    """DuckDB into the same pre-created tables, table after table (parents first): it copies no key, index
    or sequence, so the same post-data section follows. It reads values by their declared types and stops at
    the first value whose storage class does not match (a Mismatch Type Error)."""
    conninfo = f"host=127.0.0.1 port={ctx.server.port} user=postgres dbname={database}"
    tables = json.dumps([[table, ctx.sample.columns[table]] for table in TABLES])
    usage = run_processes([[sys.executable, "-c", DUCKDB_LOAD, str(ctx.sample.path), conninfo, tables]],
                          ctx.run_dir / "duckdb.log", ctx.deadline, env=ctx.server.env, labels=["duckdb"],
                          server=ctx.server.watch(database))
    return Outcome(usage, {"version": duckdb_version()})


def duckdb_version() -> str | None:
    return importlib.metadata.version("duckdb") if importlib.util.find_spec("duckdb") else None


def runbook_missing() -> str | None:
    if os.geteuid() != 0:
        return "the lab cluster needs root (its daemons run as postgres through runuser)"
    absent = [tool for tool in ("patroni", "etcd", "pgbouncer") if not shutil.which(tool)
              and not Path("/usr/sbin", tool).exists()]
    if absent:
        return f"the lab cluster needs {', '.join(absent)} (apt-get install patroni etcd-server pgbouncer)"
    return None


RUNBOOK_DATABASE = "bench_runbook"


def run_runbook(ctx: Context) -> dict:
    """One round of the operator's window: the plain pipeline into the lab's leader, then the whole
    `ansible-playbook migrate.yml` against the lab into a fresh database, with the stages of its report."""
    result = {"load_average": round(os.getloadavg()[0], 2)}
    leader = None
    work = ctx.run_dir / "runbook"
    try:
        if not ctx.lab.started:
            progress(f"runbook: bringing up the lab cluster in {ctx.lab.root}")
            ctx.lab.up(time.monotonic() + ctx.timeout)
        leader = ctx.lab.leader()
        progress(f"runbook: the plain pipeline into the lab's leader (127.0.0.1:{leader.port}), as a baseline")
        pipeline = run_once(replace(ctx, server=leader), BASELINE)
        if pipeline["status"] != "passed":
            raise BenchError(f"the pipeline into the lab's leader failed: {pipeline['error']}")
        result["pipeline_into_leader"] = {key: pipeline[key] for key in ("wall_s", "load_s", "post_data_s")}
        leader.admin(f'DROP DATABASE IF EXISTS "{RUNBOOK_DATABASE}" WITH (FORCE)')
        leader.admin(f'CREATE DATABASE "{RUNBOOK_DATABASE}" TEMPLATE template0')
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        progress(f"runbook: ansible-playbook migrate.yml, {ctx.sample.rows:,} rows into the lab")
        command = [ansible_tool("ansible-playbook"), "-i", str(ctx.lab.inventory), str(MIGRATE_PLAYBOOK),
                   "-e", f"fileshare_db_name={RUNBOOK_DATABASE}", "-e", f"sqlite_path={ctx.sample.path}",
                   "-e", f"backup_dir={work / 'backups'}", "-e", f"report_dir={work / 'reports'}"]
        started = time.monotonic()
        run_processes([command], ctx.run_dir / "runbook.log", started + ctx.timeout, env=ansible_environment(),
                      cwd=REPO)
        wall = time.monotonic() - started
        reports = list((work / "reports").glob("*/report.json"))
        if len(reports) != 1:
            raise BenchError(f"migrate.yml wrote {len(reports)} reports, expected one (see {ctx.run_dir})")
        report = json.loads(reports[0].read_text())
        if report["status"] != "completed":
            raise BenchError(f"migrate.yml reported {report['status']}: {(report.get('failure') or {}).get('message')}")
        counts = leader.counts(RUNBOOK_DATABASE)
        check = {t: {"sqlite": ctx.sample.counts[t], "postgresql": counts[t]} for t in TABLES}
        passed = all(c["sqlite"] == c["postgresql"] for c in check.values())
        result.update({
            "status": "passed" if passed else "failed", "wall_s": round(wall, 3),
            "stages_s": {stage["name"]: stage["seconds"] for stage in report["stages"]},
            "report_s": report["seconds"], "outside_report_s": round(wall - report["seconds"], 2),
            "vs_pipeline_into_leader": round(wall / pipeline["wall_s"], 2),
            "row_check": {"passed": passed, "tables": check},
        })
        if not passed:
            result["error"] = "row counts differ: " + ", ".join(
                f"{t} sqlite={c['sqlite']} postgresql={c['postgresql']}" for t, c in check.items()
                if c["sqlite"] != c["postgresql"])
    except (BenchError, psycopg2.Error) as error:
        result.update({"status": "failed", "error": one_line(error)})
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the run's backups: a copy of the sample and a dump
        if leader is not None:
            # FORCE: PgBouncer keeps the server connection of the post-migration checks open.
            with contextlib.suppress(psycopg2.Error):
                leader.admin(f'DROP DATABASE IF EXISTS "{RUNBOOK_DATABASE}" WITH (FORCE)')
    if result["status"] == "failed":
        progress(f"runbook: FAILED: {result['error']}")
    else:
        progress(f"runbook: {result['wall_s']:.1f} s = {result['vs_pipeline_into_leader']:.2f} x the pipeline "
                 f"into the leader; stages {stage_line(result['stages_s'])}")
    return result


def stage_line(stages: dict[str, float]) -> str:
    return " | ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())


def summary_head(name: str, runs: list[dict]) -> tuple[dict, dict | None]:
    """What every system's summary starts with, and the whole summary when one of its rounds failed."""
    summary = {"system": name, "description": SYSTEMS[name].description, "runs": runs}
    failed = [run for run in runs if run["status"] == "failed"]
    return summary, {**summary, "status": "failed", "error": failed[0]["error"]} if failed else None


def summarize_runbook(ctx: Context, name: str, runs: list[dict]) -> dict:
    """Medians over the rounds: of migrate.yml's wall time, of the pipeline into the same leader, of each stage."""
    summary, failure = summary_head(name, runs)
    if failure:
        return failure
    wall = statistics.median(run["wall_s"] for run in runs)
    pipeline = statistics.median(run["pipeline_into_leader"]["wall_s"] for run in runs)
    return {
        **summary, "status": "passed", "wall_s": round(wall, 3),
        "rows_per_s": round(ctx.sample.rows / wall), "source_mb_per_s": round(ctx.sample.size_bytes / 1e6 / wall, 2),
        "pipeline_into_leader_wall_s": round(pipeline, 3), "vs_pipeline_into_leader": round(wall / pipeline, 2),
        "stages_s": {stage: round(statistics.median(run["stages_s"][stage] for run in runs), 2)
                     for stage in runs[0]["stages_s"]},
        "report_s": round(statistics.median(run["report_s"] for run in runs), 2),
        "outside_report_s": round(statistics.median(run["outside_report_s"] for run in runs), 2),
        "row_check": {"passed": True, "tables": runs[-1]["row_check"]["tables"]},
    }


SYNC_DATABASE = "bench_sync"
SYNC_FRACTION = 0.01  # of each table's rows inserted, updated and deleted (a third each) before the sync


def sample_changes():
    """scripts/measure_sync.py's add_spare_nodes, change_rows and touch_without_change (change_rows is also
    what the sync tests change a sample with)."""
    spec = importlib.util.spec_from_file_location("measure_sync", REPO / "scripts" / "measure_sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.add_spare_nodes, module.change_rows, module.touch_without_change


def run_sync(ctx: Context) -> dict:
    """One round of the nights before a cutover, through the module as the runbook calls it: a full migration
    (load, then the schema's post-data) of a copy of the sample, then 1 % of its rows changed and synced, then
    a write that changes no row and a sync, then a rerun on the same file; the validation then compares the
    whole content of both sides."""
    add_spare_nodes, change_rows, touch_without_change = sample_changes()
    result = {"load_average": round(os.getloadavg()[0], 2)}
    copy = ctx.run_dir / "sync-source.db"  # changed by the round: the shared sample stays as it was built
    ctx.server.admin(f'DROP DATABASE IF EXISTS "{SYNC_DATABASE}"')
    ctx.server.admin(f'CREATE DATABASE "{SYNC_DATABASE}" TEMPLATE template0')
    try:
        shutil.copyfile(ctx.sample.path, copy)
        # A node without files is the one that retires: every node of the sample holds about 1/12 of the files,
        # and moving those would change far more than 1 % of the rows.
        add_spare_nodes(str(copy), 1)
        ctx.server.execute(SYNC_DATABASE, ctx.pre_data)
        arguments = {**module_connection(ctx, SYNC_DATABASE), "src": str(copy), "create_tables": False,
                     "jobs": ctx.module_jobs, "post_data": False, "integrity_check": ctx.module_integrity_check}
        ctx.deadline = time.monotonic() + ctx.timeout

        def timed(key, step, after=None):
            """``f"{key}_s"``: the seconds of step() (and after()); beside it the CPU and memory of step()'s
            processes, and the WAL the server wrote."""
            started, wal = time.monotonic(), ctx.server.wal_position()
            usage = step()
            if after:
                after()
            result[f"{key}_s"] = round(time.monotonic() - started, 3)
            figures = usage.figures()
            result.update({f"{key}_cpu_s": figures["cpu_s"], f"{key}_peak_rss_process_mb": figures[
                "peak_rss_process_mb"], f"{key}_peak_rss_process_role": figures["peak_rss_process_role"],
                f"{key}_wal_mb": round(ctx.server.wal_since(wal) / 1e6, 1)})

        progress(f"sync: full migration of {ctx.sample.rows:,} rows")
        timed("full", lambda: run_module(ctx, "sqlite_to_postgres", arguments),
              after=lambda: ctx.server.execute(SYNC_DATABASE, ctx.post_data))
        result["changed_rows"] = change_rows(str(copy), SYNC_FRACTION, seed=len(ctx.run_dir.name))
        progress(f"sync: {sum(result['changed_rows'].values()):,} rows changed; syncing")
        timed("sync_changed", lambda: run_module(ctx, "sqlite_to_postgres", arguments))
        touch_without_change(str(copy))
        timed("sync_unchanged", lambda: run_module(ctx, "sqlite_to_postgres", arguments))
        timed("rerun_same_file", lambda: run_module(ctx, "sqlite_to_postgres", arguments))
        progress("sync: validating both sides")
        timed("validate", lambda: run_module(ctx, "sqlite_to_postgres_validate", {
            **module_connection(ctx, SYNC_DATABASE), "src": str(copy), "jobs": ctx.module_jobs}))
        with sqlite3.connect(f"file:{copy}?mode=ro", uri=True) as source:
            expected = {t: source.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in TABLES}  # noqa: S608
        counts = ctx.server.counts(SYNC_DATABASE)
        check = {t: {"sqlite": expected[t], "postgresql": counts[t]} for t in TABLES}
        passed = all(c["sqlite"] == c["postgresql"] for c in check.values())
        result.update(status="passed" if passed else "failed", content_check="validation passed",
                      row_check={"passed": passed, "tables": check},
                      **{f"{name}_vs_full": round(result[f"{name}_s"] / result["full_s"], 3)
                         for name in ("sync_changed", "sync_unchanged", "rerun_same_file")})
        if not passed:
            result["error"] = "row counts differ after the sync"
    except (BenchError, psycopg2.Error) as error:
        result.update({"status": "failed", "error": one_line(error)})
    finally:
        ctx.server.admin(f'DROP DATABASE IF EXISTS "{SYNC_DATABASE}"')
        copy.unlink(missing_ok=True)
    if result["status"] == "failed":
        progress(f"sync: FAILED: {result['error']}")
    else:
        progress(f"sync: full {result['full_s']:.1f} s; 1 % changed {result['sync_changed_s']:.1f} s "
                 f"({result['sync_changed_vs_full']:.2f}); nothing changed {result['sync_unchanged_s']:.1f} s "
                 f"({result['sync_unchanged_vs_full']:.2f})")
    return result


def summarize_sync(ctx: Context, name: str, runs: list[dict]) -> dict:
    summary, failure = summary_head(name, runs)
    if failure:
        return failure
    steps = ("full", "sync_changed", "sync_unchanged", "rerun_same_file", "validate")
    medians = {f"{key}_s": round(statistics.median(run[f"{key}_s"] for run in runs), 3) for key in steps}
    for key in steps:
        medians[f"{key}_cpu_s"] = {side: round(statistics.median(run[f"{key}_cpu_s"][side] for run in runs), 2)
                                   for side in ("client", "server")}
        largest = max(runs, key=lambda run: run[f"{key}_peak_rss_process_mb"])
        medians[f"{key}_peak_rss_process_mb"] = largest[f"{key}_peak_rss_process_mb"]
        medians[f"{key}_peak_rss_process_role"] = largest[f"{key}_peak_rss_process_role"]
        medians[f"{key}_wal_mb"] = round(statistics.median(run[f"{key}_wal_mb"] for run in runs), 1)
    return {**summary, "status": "passed", "wall_s": medians["sync_changed_s"], **medians,
            **{f"{key}_vs_full": round(statistics.median(run[f"{key}_vs_full"] for run in runs), 3)
               for key in ("sync_changed", "sync_unchanged", "rerun_same_file")},
            "row_check": {"passed": True, "tables": runs[-1]["row_check"]["tables"]}}


CUTOVER_DATABASE = "bench_cutover"
# Disk the cutover's night takes, in sample sizes: the source's copy, its backup and its copy at rest, and on
# each of the lab's three nodes the target with its indexes (1.05 x) and its WAL (1.1 x), as measured at 10M.
CUTOVER_DISK_SAMPLES = 3 + 3 * (1.05 + 1.1)
# The maintenance-on hook: the application stops writing. It waits until the stand-in application (a thread of
# this process, which writes 1 % of the rows once the pre-sync has committed, while cutover.yml validates) has
# made its last write, and fails if the stand-in failed. So the final sync carries 1 % of the rows, written while
# the application was live, as they would be: the window holds the cutover's own work, not the application's.
STOP_WRITING = ("import pathlib, sys, time; flag = pathlib.Path(sys.argv[1]); deadline = time.monotonic() + 600\n"
                "while not flag.exists() and time.monotonic() < deadline: time.sleep(0.1)\n"
                "sys.exit(0 if flag.exists() and flag.read_text() == 'done' else f'stand-in: {flag.read_text()}' "
                "if flag.exists() else 'the stand-in application did not stop writing within 600 s')")


def write_while_live(leader, change, flag, cancelled, result):
    """The stand-in application: once the target's state rows no longer name the migrated snapshot (the cutover's
    pre-sync committed), ``change()`` the live source (its counts go to ``result``); then write ``flag`` (done,
    or the error)."""
    try:
        [(migrated,)] = leader.rows(CUTOVER_DATABASE, "SELECT DISTINCT source_id FROM sqlite_to_postgres_state")
        while leader.rows(CUTOVER_DATABASE, "SELECT count(*) FROM sqlite_to_postgres_state WHERE source_id = %s",
                          (migrated,))[0][0]:
            if cancelled.wait(0.5):
                return
        result["changed_while_live"] = change()
        flag.write_text("done")
    except Exception as error:  # noqa: BLE001 - the hook reports it and the cutover fails
        flag.write_text(one_line(error))


def run_cutover(ctx: Context) -> dict:
    """One night of the move on the lab: migrate.yml (the full migration, the window it would take without a
    sync), 1 % of the rows changed, then cutover.yml with file hooks while the stand-in application changes
    another 1 % after the pre-sync (so the final sync in the window carries it) and stops writing when the
    maintenance-on hook asks; afterwards a full validation of the final copy."""
    add_spare_nodes, change_rows, _touch = sample_changes()
    result = {"load_average": round(os.getloadavg()[0], 2)}
    work = ctx.run_dir / "cutover"
    leader = None
    try:
        needed, free = CUTOVER_DISK_SAMPLES * ctx.sample.path.stat().st_size, shutil.disk_usage(ctx.run_dir).free
        if needed > free:
            raise BenchError(f"not run: the lab's three nodes and the source's copies need about {needed / 1e9:.0f} "
                             f"GB of disk, {free / 1e9:.0f} GB are free")
        if not ctx.lab.started:
            progress(f"cutover: bringing up the lab cluster in {ctx.lab.root}")
            ctx.lab.up(time.monotonic() + ctx.timeout)
        leader = ctx.lab.leader()
        leader.admin(f'DROP DATABASE IF EXISTS "{CUTOVER_DATABASE}" WITH (FORCE)')
        leader.admin(f'CREATE DATABASE "{CUTOVER_DATABASE}" TEMPLATE template0')
        shutil.rmtree(work, ignore_errors=True)
        (work / "state").mkdir(parents=True)
        source = work / "fileshare.db"
        shutil.copyfile(ctx.sample.path, source)
        add_spare_nodes(str(source), 2)  # one retires before the cutover, one in the window
        common = ["-i", str(ctx.lab.inventory), "-e", f"fileshare_db_name={CUTOVER_DATABASE}",
                  "-e", f"sqlite_path={source}", "-e", f"backup_dir={work / 'backups'}",
                  "-e", f"report_dir={work / 'reports'}"]

        def playbook(path, *extra):
            before = set((work / "reports").glob("*/report.json"))
            started = time.monotonic()
            run_processes([[ansible_tool("ansible-playbook"), *common, *extra, str(path)]],
                          ctx.run_dir / "cutover.log", started + ctx.timeout, env=ansible_environment(), cwd=REPO)
            wall = time.monotonic() - started
            [report] = set((work / "reports").glob("*/report.json")) - before
            report = json.loads(report.read_text())
            if report["status"] != "completed":
                raise BenchError(f"{path.name} reported {report['status']}: "
                                 f"{(report.get('failure') or {}).get('message')}")
            return wall, report

        progress(f"cutover: migrate.yml, {ctx.sample.rows:,} rows into the lab (the full migration)")
        result["full_migrate_yml_s"], report = playbook(MIGRATE_PLAYBOOK)
        result["full_migrate_stage_s"] = next(s["seconds"] for s in report["stages"] if s["name"] == "migrate")
        result["changed_before"] = change_rows(str(source), SYNC_FRACTION, seed=1)
        flag, cancelled = work / "state" / "stopped-writing", threading.Event()
        hooks = {"cutover_maintenance_on_command": [sys.executable, "-c", STOP_WRITING, str(flag)],
                 "cutover_maintenance_off_command": ["/usr/bin/touch", str(work / "state" / "maintenance-off")],
                 "cutover_switch_command": ["/usr/bin/touch", str(work / "state" / "on-postgresql")],
                 "cutover_switch_back_command": ["/usr/bin/rm", "-f", str(work / "state" / "on-postgresql")]}
        progress(f"cutover: {sum(result['changed_before'].values()):,} rows changed; cutover.yml, while the "
                 "application changes 1 % more once the pre-sync committed")
        change = functools.partial(change_rows, str(source), SYNC_FRACTION, seed=2)
        application = threading.Thread(target=write_while_live, args=(leader, change, flag, cancelled, result))
        application.start()
        try:
            result["cutover_yml_s"], report = playbook(CUTOVER_PLAYBOOK, "-e", json.dumps(hooks))
        finally:
            cancelled.set()
            application.join()
        cutover = report["cutover"]
        stages = {stage["name"]: stage["seconds"] for stage in report["stages"]}
        result.update(
            downtime_s=cutover["downtime_seconds"],
            # the hooks record when they returned; the downtime began as the maintenance-on hook was called
            stop_writing_hook_s=round(cutover["hooks"]["maintenance_on"]["at"] + cutover["downtime_seconds"]
                                     - cutover["hooks"]["maintenance_off"]["at"], 2),
            window_stages_s={name: stages[name] for name in ("maintenance_on", "final_sync", "validate", "switch",
                                                              "maintenance_off") if name in stages},
            cutover_stages_s=stages,
            final_sync={table: {key: entry.get(key) for key in ("inserted", "updated", "deleted")}
                        for table, entry in report["migration"]["tables"].items()},
            window_validation_compared={table: entry["compared"]
                                        for table, entry in report["validation"]["tables"].items()})
        progress("cutover: validating the final copy against the target in full")
        started = time.monotonic()
        on_leader = replace(ctx, server=leader, deadline=time.monotonic() + ctx.timeout)
        run_module(on_leader, "sqlite_to_postgres_validate", {**module_connection(on_leader, CUTOVER_DATABASE),
                                                              "src": cutover["final_copy"], "jobs": ctx.module_jobs})
        result["full_validation_after_s"] = round(time.monotonic() - started, 3)
        result.update(status="passed", content_check="full validation of the final copy passed",
                      downtime_vs_full_migrate_stage=round(result["downtime_s"] / result["full_migrate_stage_s"], 3),
                      downtime_vs_full_migrate_yml=round(result["downtime_s"] / result["full_migrate_yml_s"], 3))
    except (BenchError, psycopg2.Error, KeyError, ValueError) as error:
        result.update({"status": "failed", "error": one_line(error)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if leader is not None:
            with contextlib.suppress(psycopg2.Error):
                leader.admin(f'DROP DATABASE IF EXISTS "{CUTOVER_DATABASE}" WITH (FORCE)')
    if result["status"] == "failed":
        progress(f"cutover: FAILED: {result['error']}")
    else:
        progress(f"cutover: downtime {result['downtime_s']:.1f} s = {result['downtime_vs_full_migrate_stage']:.2f} x "
                 f"the full migration's load ({result['full_migrate_stage_s']:.1f} s), "
                 f"{result['downtime_vs_full_migrate_yml']:.2f} x migrate.yml; window "
                 f"{stage_line(result['window_stages_s'])}")
    return result


def summarize_cutover(ctx: Context, name: str, runs: list[dict]) -> dict:
    summary, failure = summary_head(name, runs)
    if failure:
        return failure
    keys = ("downtime_s", "stop_writing_hook_s", "full_migrate_stage_s", "full_migrate_yml_s", "cutover_yml_s",
            "full_validation_after_s", "downtime_vs_full_migrate_stage", "downtime_vs_full_migrate_yml")
    return {**summary, "status": "passed", "wall_s": statistics.median(run["downtime_s"] for run in runs),
            **{key: round(statistics.median(run[key] for run in runs), 3) for key in keys},
            "window_stages_s": {stage: round(statistics.median(run["window_stages_s"][stage] for run in runs), 2)
                                for stage in runs[0]["window_stages_s"]}}


@dataclass
class System:
    load: Callable[[Context, str], Outcome] | None
    missing: Callable[[], str | None] | None = None  # why it cannot run here, or None
    description: str = ""
    validate: Callable[[Context, str], Outcome] | None = None  # timed after the load and post-data
    # A system with a round of its own (not load + post-data into the bench's server), and its summary.
    run: Callable[[Context], dict] | None = None
    summarize: Callable[[Context, str, list[dict]], dict] | None = None
    opt_in: bool = False  # only when named in --systems


# One entry per system: add a system by writing its
# load function and registering it here.
SYSTEMS = {
    "pipeline": System(load_pipeline, description="sqlite3 -csv | psql \\copy, table after table (baseline)"),
    "module": System(load_module, module_missing, "the runbook's sqlite_to_postgres module via ansible",
                     validate_module),
    "duckdb": System(load_duckdb, duckdb_missing, "DuckDB with its sqlite and postgres extensions, "
                     "INSERT ... SELECT table after table (binary COPY)"),
    "pgloader": System(load_pgloader, pgloader_missing, f"pgloader ({PGLOADER_SETTINGS})"),
    "sync": System(None, module_missing, "the module's sync after 1 % of the rows changed, beside a full migration "
                   "through it", run=run_sync, summarize=summarize_sync, opt_in=True),
    "runbook": System(None, runbook_missing, "the whole ansible-playbook migrate.yml on the lab cluster, beside the "
                      "pipeline into the same leader", run=run_runbook, summarize=summarize_runbook, opt_in=True),
    "cutover": System(None, runbook_missing, "cutover.yml on the lab after migrate.yml and 1 % changed, 1 % more "
                      "changed by the live application after the pre-sync: the downtime", run=run_cutover,
                      summarize=summarize_cutover, opt_in=True),
}


def run_once(ctx: Context, name: str) -> dict:
    """One timed load of one system into a fresh database, checked and dropped."""
    if SYSTEMS[name].run:
        return SYSTEMS[name].run(ctx)
    database = f"bench_{name}"
    result = {"load_average": round(os.getloadavg()[0], 2)}
    ctx.server.admin(f'DROP DATABASE IF EXISTS "{database}"')
    ctx.server.admin(f'CREATE DATABASE "{database}" TEMPLATE template0')
    try:
        ctx.server.execute(database, ctx.pre_data)
        wal_before = ctx.server.wal_position()
        progress(f"{name}: loading {ctx.sample.rows:,} rows")
        started = time.monotonic()
        ctx.deadline = started + ctx.timeout
        outcome = SYSTEMS[name].load(ctx, database)
        loaded = time.monotonic()
        progress(f"{name}: loaded in {loaded - started:.1f} s; building indexes, keys and sequences")
        with ProcessAccount([], server=ctx.server.watch(database)) as post_data:
            ctx.server.execute(database, ctx.post_data)
        finished = time.monotonic()
        counts = ctx.server.counts(database)
        check = {t: {"sqlite": ctx.sample.counts[t], "postgresql": counts[t]} for t in TABLES}
        passed = all(c["sqlite"] == c["postgresql"] for c in check.values())
        result.update({
            "status": "passed" if passed else "failed",
            "wall_s": round(finished - started, 3), "load_s": round(loaded - started, 3),
            "post_data_s": round(finished - loaded, 3), "peak_rss_mb": round(outcome.usage.rss_bytes / 1e6, 1),
            "peak_pss_mb": round(outcome.usage.pss_bytes / 1e6, 1), **outcome.usage.figures(),
            "post_data_cpu_s": post_data.usage().cpu(server=True),
            "disk_mb": {"target": round(ctx.server.database_size(database) / 1e6, 1),
                        "wal": round(ctx.server.wal_since(wal_before) / 1e6, 1)},
            "row_check": {"passed": passed, "tables": check}, **outcome.details,
        })
        if not passed:
            wrong = ", ".join(f"{t} sqlite={c['sqlite']} postgresql={c['postgresql']}"
                              for t, c in check.items() if c["sqlite"] != c["postgresql"])
            result["error"] = f"row counts differ: {wrong}"
        elif SYSTEMS[name].validate:
            progress(f"{name}: validating")
            started = time.monotonic()
            validation = SYSTEMS[name].validate(ctx, database).usage
            result.update({"validate_s": round(time.monotonic() - started, 3),
                           "validate_peak_pss_mb": round(validation.pss_bytes / 1e6, 1),
                           **{f"validate_{key}": value for key, value in validation.figures().items()}})
            if name == "module":
                progress(f"{name}: the runbook's backup of the source")
                result["backup"] = backup_source(ctx)
    except (BenchError, psycopg2.Error) as error:
        result.update({"status": "failed", "error": one_line(error)})
    finally:
        ctx.server.admin(f'DROP DATABASE IF EXISTS "{database}"')
    if result["status"] == "failed":
        progress(f"{name}: FAILED: {result['error']}")
    else:
        progress(f"{name}: {result['wall_s']:.1f} s, row counts match SQLite")
    return result


def summarize(ctx: Context, name: str, runs: list[dict]) -> dict:
    """One entry per system: the median run's times (rounds interleave the
    systems, so a change in machine load touches all of them), the highest RSS."""
    summary, failure = summary_head(name, runs)
    if failure:
        return failure
    wall = statistics.median(run["wall_s"] for run in runs)
    return {
        **summary, "status": "passed", "wall_s": round(wall, 3),
        "load_s": round(statistics.median(run["load_s"] for run in runs), 3),
        "post_data_s": round(statistics.median(run["post_data_s"] for run in runs), 3),
        "rows_per_s": round(ctx.sample.rows / wall), "source_mb_per_s": round(ctx.sample.size_bytes / 1e6 / wall, 2),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "peak_pss_mb": max(run["peak_pss_mb"] for run in runs),
        **process_figures(runs),
        "post_data_cpu_s": round(statistics.median(run["post_data_cpu_s"] for run in runs), 2),
        "disk_mb": {key: max(run["disk_mb"][key] for run in runs) for key in runs[0]["disk_mb"]},
        **({"backup": {"seconds": round(statistics.median(run["backup"]["seconds"] for run in runs), 3),
                       "sqlite_copy_mb": runs[-1]["backup"]["sqlite_copy_mb"],
                       "peak_rss_process_mb": max(run["backup"]["peak_rss_process_mb"] for run in runs)}}
           if "backup" in runs[0] else {}),
        "row_check": {"passed": True, "tables": runs[-1]["row_check"]["tables"]},
        **({"validate_s": round(statistics.median(run["validate_s"] for run in runs), 3),
            "validate_vs_migrate": round(statistics.median(run["validate_s"] / run["wall_s"] for run in runs), 2),
            "validate_peak_pss_mb": max(run["validate_peak_pss_mb"] for run in runs),
            **process_figures(runs, "validate_")}
           if "validate_s" in runs[0] else {}),
    }


def process_figures(runs: list[dict], prefix: str = "") -> dict:
    """Usage.figures() over several rounds: CPU seconds as medians, peak memory as the highest of any round."""
    roles = {role for run in runs for role in run[f"{prefix}processes"]}
    processes = {}
    for role in roles:
        entries = [run[f"{prefix}processes"].get(role) for run in runs]
        present = [entry for entry in entries if entry]
        processes[role] = {"processes": max(entry["processes"] for entry in present),
                           "cpu_s": round(statistics.median(entry["cpu_s"] if entry else 0.0 for entry in entries), 2),
                           "peak_rss_mb": max(entry["peak_rss_mb"] for entry in present)}
    largest = max(runs, key=lambda run: run[f"{prefix}peak_rss_process_mb"])
    return {f"{prefix}cpu_s": {side: round(statistics.median(run[f"{prefix}cpu_s"][side] for run in runs), 2)
                               for side in ("client", "server")},
            f"{prefix}processes": dict(sorted(processes.items(), key=lambda item: -item[1]["cpu_s"])),
            f"{prefix}peak_rss_process_mb": largest[f"{prefix}peak_rss_process_mb"],
            f"{prefix}peak_rss_process_role": largest[f"{prefix}peak_rss_process_role"]}


def run_systems(ctx: Context, names: list[str], rounds: int) -> list[dict]:
    skipped = {}
    for name in names:
        reason = SYSTEMS[name].missing() if SYSTEMS[name].missing else None
        if reason:
            progress(f"{name}: skipped: {reason}")
            skipped[name] = {"system": name, "description": SYSTEMS[name].description, "status": "skipped",
                             "reason": reason}
    runs = {name: [] for name in names if name not in skipped}
    for round_number in range(1, rounds + 1):
        if rounds > 1:
            progress(f"round {round_number} of {rounds}")
        for name in runs:
            try:
                result = run_once(ctx, name)
            # An error no system foresaw (a bug, an OSError) fails this round, not the hours of the whole run:
            # the round's own finally has already dropped its database and stopped its processes. Ctrl-C and
            # SIGTERM (KeyboardInterrupt, no Exception) still stop the run.
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                result = {"status": "failed", "error": f"{type(error).__name__}: {one_line(error)}"}
                progress(f"{name}: FAILED: {result['error']}")
            runs[name].append(result)
    return [skipped[name] if name in skipped else (SYSTEMS[name].summarize or summarize)(ctx, name, runs[name])
            for name in names]


# ---------------------------------------------------------------- reporting


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def progress(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def schema_sections() -> tuple[str, str]:
    """The pre-data and post-data sections of the runbook's schema file."""
    if not SCHEMA_FILE.exists():
        raise BenchError(f"schema file {SCHEMA_FILE.relative_to(REPO)} not found")
    text = SCHEMA_FILE.read_text()
    if "-- section: pre-data" not in text or "-- section: post-data" not in text:
        raise BenchError(f"{SCHEMA_FILE.relative_to(REPO)} lacks a '-- section: pre-data' "
                         "or '-- section: post-data' line")
    before_post, post_data = text.split("-- section: post-data", 1)
    return before_post.split("-- section: pre-data", 1)[1], post_data


def command_version(command: list[str]) -> str | None:
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return output.splitlines()[0] if output else None


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))
    return {
        "cpu_model": cpu, "cores": os.cpu_count(), "memory_mb": memory_kb // 1024,
        "kernel": platform.release(), "python": platform.python_version(),
        "sqlite_cli": command_version(["sqlite3", "--version"]), "sqlite_library": sqlite3.sqlite_version,
        "load_average_before": os.getloadavg(),
    }


def print_table(results: list[dict]):
    header = (f"{'system':<10} {'wall s':>8} {'rows/s':>10} {'MB/s':>7} {'peak RSS MB':>12} {'peak PSS MB':>12} "
              f"{'1 process MB':>13} {'CPU s client':>13} {'CPU s server':>13} {'vs pipeline':>12}  status")
    print(header)
    print("-" * len(header))
    for r in results:
        if r["status"] == "passed" and "sync_changed_vs_full" in r:
            print(f"{r['system']:<10} {r['wall_s']:>8.1f}  after 1 % changed: {r['sync_changed_vs_full']:.3f} x the "
                  f"full migration ({r['full_s']:.1f} s); nothing changed: {r['sync_unchanged_vs_full']:.3f} x  passed")
        elif r["status"] == "passed" and "downtime_vs_full_migrate_stage" in r:
            print(f"{r['system']:<10} {r['wall_s']:>8.1f}  downtime: {r['downtime_vs_full_migrate_stage']:.3f} x the "
                  f"full migration's load ({r['full_migrate_stage_s']:.1f} s), "
                  f"{r['downtime_vs_full_migrate_yml']:.3f} x migrate.yml  passed")
        elif r["status"] == "passed":
            ratio = f"{r['speedup_vs_baseline']:.2f}x" if r.get("speedup_vs_baseline") else "-"
            # The runbook's module runs detached (async), outside any tree measured here: no memory figures.
            rss, pss = (f"{r[key]:>12.1f}" if key in r else f"{'-':>12}" for key in ("peak_rss_mb", "peak_pss_mb"))
            largest = f"{r['peak_rss_process_mb']:>13.1f}" if "peak_rss_process_mb" in r else f"{'-':>13}"
            cpu = (f"{r['cpu_s'][side]:>13.1f}" if "cpu_s" in r else f"{'-':>13}" for side in ("client", "server"))
            print(f"{r['system']:<10} {r['wall_s']:>8.1f} {r['rows_per_s']:>10,} {r['source_mb_per_s']:>7.1f} "
                  f"{rss} {pss} {largest} {' '.join(cpu)} {ratio:>12}  passed")
        else:
            print(f"{r['system']:<10} {'':>8} {'':>10} {'':>7} {'':>12} {'':>12} {'':>13} {'':>13} {'':>13} {'':>12}  "
                  f"{r['status']}: {r.get('error') or r.get('reason')}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv):
    parser = OneLineParser(
        description="Time SQLite -> PostgreSQL loads of the FileShareSystem sample, several systems in one run.",
        epilog=f"Systems: {', '.join(f'{n} = {s.description}' for n, s in SYSTEMS.items())}. "
               f"The baseline ({BASELINE}) always runs.",
    )
    parser.add_argument("--files", default=str(DEFAULT_FILES),
                        help=f"sample size in files rows (default {DEFAULT_FILES} = 2.44M rows in all); several, "
                             "comma-separated (e.g. 100000,1000000), also compare how time and memory grow")
    parser.add_argument("--seed", type=int, default=None, help="sample seed (default: make_sample_db.py's)")
    default_systems = ",".join(name for name, system in SYSTEMS.items() if not system.opt_in)
    parser.add_argument("--systems", default=default_systems,
                        help=f"comma-separated systems to time (default: {default_systems}; "
                             "runbook only when named: it brings up a lab cluster)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "bench" / "data",
                        help="samples, the server and logs (default bench/data)")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results",
                        help="where the JSON result goes (default bench/results)")
    parser.add_argument("--pg-bin", type=Path, default=Path(DEFAULT_PG_BIN), help=f"default {DEFAULT_PG_BIN}")
    parser.add_argument("--module-jobs", type=int, default=2,
                        help="jobs option of the module (default 2, the runbook's)")
    parser.add_argument("--module-integrity-check", choices=("full", "quick"), default="quick",
                        help="integrity_check option of the module (default quick, the runbook's)")
    parser.add_argument("--rounds", default="1",
                        help="run every system this many times, interleaved, and report the median (default 1); "
                             "one count per sample size, comma-separated, in the order of --files (e.g. 3,1)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one system may take (default 3600)")
    parser.add_argument("--lab-port-offset", type=int, default=DEFAULT_LAB_PORT_OFFSET,
                        help=f"runbook: the lab's ports are inventory/lab's plus this "
                             f"(default {DEFAULT_LAB_PORT_OFFSET})")
    parser.add_argument("--lab-root", type=Path, default=None,
                        help="runbook: the lab's directory, which must not exist "
                             "(default /var/tmp/fileshare-bench-lab-<pid>)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the run's directory with its logs (runbook.log, cutover.log, ...) when every "
                             "system passed too; a failed run's is always kept")
    args = parser.parse_args(argv)
    args.data_dir, args.results_dir = args.data_dir.resolve(), args.results_dir.resolve()
    if args.seed is None:
        args.seed = sample_script_default_seed()
    chosen = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system {', '.join(unknown)} in --systems (known: {', '.join(SYSTEMS)})")
    try:
        given = [int(size) for size in args.files.split(",") if size.strip()]
    except ValueError:
        parser.error(f"--files takes whole numbers separated by commas, got {args.files!r}")
    args.files = sorted(set(given))
    if not args.files or args.files[0] < 1:
        parser.error("--files must be at least 1")
    try:
        rounds = [int(count) for count in args.rounds.split(",")]
    except ValueError:
        parser.error(f"--rounds takes whole numbers separated by commas, got {args.rounds!r}")
    if len(rounds) == 1:
        rounds *= len(given)
    if len(rounds) != len(given) or min(rounds) < 1:
        parser.error(f"--rounds needs one count of at least 1 for every size of --files, got {args.rounds!r}")
    args.rounds = dict(zip(given, rounds))
    args.systems = [BASELINE] + [name for name in dict.fromkeys(chosen) if name != BASELINE]
    return args


def preflight(args):
    for tool in ("initdb", "pg_ctl", "psql"):
        if not (args.pg_bin / tool).exists():
            raise BenchError(f"{args.pg_bin / tool} not found (set --pg-bin)")
    if not shutil.which("sqlite3"):
        raise BenchError("the sqlite3 command-line shell is not on PATH (apt-get install sqlite3)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise BenchError("running as root needs a 'postgres' account to run the server as") from None


def write_report(args, stamp: str, machine: dict, sample: Sample, results: list[dict]) -> Path:
    baseline = next(r for r in results if r["system"] == BASELINE)
    for r in results:
        # A system with a round of its own has its own baseline (the runbook: the pipeline into the lab's leader).
        if r["status"] == "passed" and baseline["status"] == "passed" and not SYSTEMS[r["system"]].run:
            r["speedup_vs_baseline"] = round(baseline["wall_s"] / r["wall_s"], 2)
    report = {
        "started_utc": stamp, "machine": machine,
        "sample": {"path": str(sample.path), "files": sample.files, "seed": sample.seed, "rows": sample.rows,
                   "size_bytes": sample.size_bytes, "counts": sample.counts},
        "server": {"initdb": INITDB_OPTIONS, "settings": SERVER_SETTINGS},
        "baseline": BASELINE, "rounds": args.rounds[sample.files], "rss_sample_seconds": RSS_SAMPLE_SECONDS,
        "systems": results,
    }
    passed = {r["system"]: r for r in results if r["status"] == "passed"}
    if "module" in passed and "pgloader" in passed:
        report["module_speedup_vs_pgloader"] = round(passed["pgloader"]["wall_s"] / passed["module"]["wall_s"], 2)
    report["module_ratios"] = module_ratios(passed)
    out = args.results_dir / f"{stamp}-{sample.files}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{sample.rows:,} rows, {sample.size_bytes / 1e6:.0f} MB of SQLite; PostgreSQL {machine['postgresql']}; "
          f"{machine['cores']} cores, load average {machine['load_average_before'][0]:.2f} before, "
          f"{machine['load_average_after'][0]:.2f} after")
    print_table(results)
    for name, ratio in report["module_ratios"].items():
        print(f"{name.replace('_', ' ')}: {ratio:.2f} (median of the rounds' ratios)")
    if "module_speedup_vs_pgloader" in report:
        print(f"module vs pgloader: {report['module_speedup_vs_pgloader']:.2f}x")
    for r in results:
        if "vs_pipeline_into_leader" in r:
            print(f"{r['system']}: the whole migrate.yml on the lab cluster, {r['wall_s']:.1f} s = "
                  f"{r['vs_pipeline_into_leader']:.2f} x the plain pipeline into the same leader "
                  f"({r['pipeline_into_leader_wall_s']:.1f} s, load and post-data), "
                  f"medians of {args.rounds[sample.files]}")
            print(f"  stages from its report, back to back: {stage_line(r['stages_s'])} = {r['report_s']:.1f} s; "
                  f"ansible-playbook start-up and exit around them: {r['outside_report_s']:.1f} s")
        if "validate_vs_migrate" in r:
            print(f"{r['system']} validation (checksums of every table, both sides): {r['validate_s']:.1f} s = "
                  f"{r['validate_vs_migrate']:.2f} x its migrate time, peak PSS {r['validate_peak_pss_mb']:.1f} MB")
    print(f"results: {out}")
    return out


def module_ratios(passed: dict[str, dict]) -> dict:
    """The module against its peers, each the median of the per-round ratios (rounds interleave the systems):
    module / pipeline, module / DuckDB, module / the faster of the two in that round, (module + its
    validation) / pipeline, and its validation / its load."""
    module = passed.get("module")
    if not module:
        return {}
    peers = {name: passed[name]["runs"] for name in (BASELINE, "duckdb") if name in passed}
    rounds = range(len(module["runs"]))
    ratios = {f"module_vs_{name}": [module["runs"][i]["wall_s"] / runs[i]["wall_s"] for i in rounds]
              for name, runs in peers.items()}
    if len(peers) == 2:
        ratios["module_vs_faster_peer"] = [module["runs"][i]["wall_s"] / min(runs[i]["wall_s"] for runs in
                                                                              peers.values()) for i in rounds]
    if "validate_s" in module and BASELINE in peers:
        ratios["module_and_validation_vs_pipeline"] = [
            (module["runs"][i]["wall_s"] + module["runs"][i]["validate_s"]) / peers[BASELINE][i]["wall_s"]
            for i in rounds]
    if "validate_s" in module:
        ratios["validation_vs_module"] = [run["validate_s"] / run["wall_s"] for run in module["runs"]]
    return {name: round(statistics.median(values), 2) for name, values in ratios.items()}


# The figures whose growth the scaling report gives, where a system has them: times, then memory, CPU and disk.
SCALING_FIGURES = (
    "wall_s", "load_s", "post_data_s", "validate_s", "full_s", "sync_changed_s", "sync_unchanged_s",
    "rerun_same_file_s", "downtime_s", "peak_pss_mb", "peak_rss_process_mb", "validate_peak_rss_process_mb",
    "sync_changed_peak_rss_process_mb", "cpu_s.client", "cpu_s.server", "validate_cpu_s.client",
    "validate_cpu_s.server", "post_data_cpu_s", "disk_mb.target", "disk_mb.wal", "backup.sqlite_copy_mb",
)


def figure(entry: dict, path: str):
    """``entry``'s figure at a dotted path (cpu_s.client), or None."""
    for key in path.split("."):
        entry = entry.get(key) if isinstance(entry, dict) else None
    return entry


def write_scaling(args, stamp: str, samples: list[Sample], results: dict[int, list[dict]]) -> Path:
    """How each system's figures (time, memory, CPU, disk) grow from the smallest sample to the largest."""
    small, large = samples[0], samples[-1]
    by_system = {size: {r["system"]: r for r in runs if r["status"] == "passed"} for size, runs in results.items()}
    scaling = {}
    for name in args.systems:
        if name in by_system[small.files] and name in by_system[large.files]:
            measured = [s.files for s in samples if name in by_system[s.files]]
            entry = {}
            for path in SCALING_FIGURES:
                values = {str(files): figure(by_system[files][name], path) for files in measured}
                first, last = values[str(small.files)], values[str(large.files)]
                if first is None or last is None:
                    continue
                entry[path] = {"values": values, "growth": round(last / first, 2) if first else None}
            entry["time_growth"] = entry["wall_s"]["growth"]
            if "peak_pss_mb" in entry:
                entry["memory_growth"] = entry["peak_pss_mb"]["growth"]
            scaling[name] = entry
    report = {"started_utc": stamp, "files": [s.files for s in samples], "rows": [s.rows for s in samples],
              "sample_mb": [round(s.size_bytes / 1e6, 1) for s in samples],
              "data_growth": round(large.rows / small.rows, 2), "systems": scaling}
    out = args.results_dir / f"{stamp}-scaling.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfrom {small.files:,} to {large.files:,} files ({report['data_growth']}x the rows), growth of:")
    for name, entry in scaling.items():
        print(f"{name:<10} " + ", ".join(f"{path} {found['growth']:.2f}x" for path, found in entry.items()
                                        if isinstance(found, dict) and found["growth"] is not None))
    print(f"scaling: {out}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM stops the run like Ctrl-C does: through the finally that stops the server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = run_dir = lab = None
    failed = False
    try:
        preflight(args)
        pre_data, post_data = schema_sections()
        args.results_dir.mkdir(parents=True, exist_ok=True)
        machine = machine_info()
        samples = [build_sample(args.data_dir, files, args.seed) for files in args.files]
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        run_dir = args.data_dir / f"run-{stamp}-{os.getpid()}"
        run_dir.mkdir(mode=0o755)  # the server's directory inside it must be reachable by `postgres`
        server = Server(args.pg_bin, run_dir / "pg", run_dir / "server.log")
        progress(f"starting PostgreSQL on 127.0.0.1:{server.port} in {server.directory}")
        server.start()
        machine["postgresql"] = server.version()
        machine["pgloader"] = command_version(["pgloader", "--version"]) if "pgloader" in args.systems else None
        machine["duckdb"] = duckdb_version() if "duckdb" in args.systems else None
        if {"runbook", "cutover"} & set(args.systems) and not runbook_missing():
            lab = Lab(run_dir, args.pg_bin, args.lab_port_offset, args.lab_root)
        results = {}
        for sample in samples:
            ctx = Context(sample, server, run_dir, args.timeout, 0.0, pre_data, post_data, args.module_jobs,
                          args.module_integrity_check, lab)
            results[sample.files] = run_systems(ctx, args.systems, args.rounds[sample.files])
            # Each size's report as soon as it is measured: a larger size that fails keeps the smaller's.
            machine["load_average_after"] = os.getloadavg()
            write_report(args, stamp, machine, sample, results[sample.files])
        failed = any(r["status"] == "failed" for size in results.values() for r in size)
    except (BenchError, psycopg2.Error) as error:
        print(f"bench: error: {one_line(error)}", file=sys.stderr)
        failed = True
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        stops = [("tearing the lab cluster down", lab.down)] if lab is not None and lab.started else []
        stops += [("stopping PostgreSQL", server.stop)] if server is not None else []
        for what, stop in stops:
            progress(what)
            try:
                stop()
            except BenchError as error:
                print(f"bench: error: {one_line(error)}", file=sys.stderr)
                failed = True
        if run_dir is not None:
            if failed or args.keep_logs:
                print(f"bench: logs kept in {run_dir}", file=sys.stderr)
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
    if len(samples) > 1:
        write_scaling(args, stamp, samples, results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
