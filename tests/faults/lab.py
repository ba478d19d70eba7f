"""The fault suite's lab: a Patroni cluster of its own, and the runbook run against it as an operator runs it.

The suite brings up a second lab (etcd, three Patroni members, PgBouncer) on
ports 300 above the bundled lab's and under a root of its own, so a lab the
operator brought up with the main command is left as it was. Each case runs
`ansible-playbook migrate.yml` in its own process group, as an operator's
shell would, does its fault (a signal to that group, a killed postmaster, a
Patroni switchover, a full filesystem, a paused standby), and checks the
target against its dump from before the run, the source's sha256, the exit
code, the last lines, and that a following normal run completes and validates.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import yaml
from conftest import kill_processes_with, wait_until

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))
PORT_OFFSET = 300
SAMPLE_FILES = 80_000
DATABASE = "fileshare"
MIGRATION_TABLES = ("storage_nodes", "files", "tasks", "replication_logs", "sqlite_to_postgres_state")
# Every process a case's run starts inherits this variable, the background load and the lock holder too
# (they leave the run's process group), so what a failed case left running can be found and ended.
RUN_VARIABLE = "FILESHARE_FAULT_RUN"
GUIDE_VARIABLES = ("DATABASE_URL", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_PORT", "SQLITE_PATH")


@dataclass
class Run:
    """One ansible-playbook process and what it printed."""

    process: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.monotonic)

    def wait(self, timeout=900):
        self.process.wait(timeout=timeout)
        return self

    @property
    def rc(self):
        return self.process.returncode

    @property
    def output(self):
        return self.log.read_text(errors="replace")

    def last_lines(self, count=40):
        return "\n".join(self.output.rstrip().splitlines()[-count:])

    def signal_group(self, signum):
        """What a terminal (Ctrl-C) or a scheduler's kill does: signal the whole process group."""
        os.killpg(self.process.pid, signum)


class Lab:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.root = Path(tempfile.mkdtemp(prefix="fileshare-faults-", dir="/var/tmp"))
        os.chmod(self.root, 0o755)
        self.inventory = workdir / "inventory"
        self.runs = 0
        lab = yaml.safe_load((ROOT / "inventory/lab/hosts.yml").read_text())
        groups = lab["all"]["children"]
        for group in groups.values():
            for host in group["hosts"].values():
                for key in [k for k in host if k.endswith("_port")]:
                    host[key] += PORT_OFFSET
        self.members = {name: host for name, host in groups["postgres_cluster"]["hosts"].items()}
        self.pgbouncer_port = next(iter(groups["pgbouncer"]["hosts"].values()))["pgbouncer_port"]
        (self.inventory / "group_vars").mkdir(parents=True)
        (self.inventory / "hosts.yml").write_text(yaml.safe_dump(lab, sort_keys=False))
        settings = yaml.safe_load((ROOT / "inventory/lab/group_vars/all.yml").read_text())
        settings.update(lab_root=str(self.root), patroni_scope="fileshare-faults",
                        pg_pgpass_file=str(self.root / "pgpass"))
        (self.inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(settings))
        self.pgpass = self.root / "pgpass"

    # The lab ------------------------------------------------------------------------------

    def playbook(self, *args, check=True):
        result = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(self.inventory), *args], cwd=ROOT,
                                env=self.environment(), capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"ansible-playbook {' '.join(args)} failed:\n{result.stdout[-4000:]}")
        return result

    def up(self):
        self.playbook(str(ROOT / "playbooks/lab.yml"))

    def down(self):
        self.playbook(str(ROOT / "playbooks/lab.yml"), "-e", "lab_state=absent", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def environment(self, **extra):
        env = {k: v for k, v in os.environ.items() if k not in GUIDE_VARIABLES and not k.startswith("PG")}
        env.update(PGPASSFILE=str(self.pgpass), ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), **extra)
        return env

    def passwords(self):
        return {path.name: path.read_text().strip() for path in (self.root / "secrets").iterdir()}

    # Patroni ------------------------------------------------------------------------------

    def patroni(self, member, path, method="GET", body=None, timeout=3):
        url = f"http://127.0.0.1:{self.members[member]['patroni_restapi_port']}{path}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                text = answer.read().decode()
                return answer.status, (json.loads(text) if text.startswith(("{", "[")) else text)
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, None

    def cluster(self):
        for member in self.members:
            status, body = self.patroni(member, "/cluster")
            if status == 200:
                return body
        return {"members": []}

    def leader(self):
        leaders = [m for m in self.cluster()["members"] if m["role"] == "leader" and m["state"] == "running"]
        return leaders[0]["name"] if len(leaders) == 1 else None

    def healthy(self):
        """One running leader, both replicas streaming with no lag: what readiness demands."""
        members = self.cluster()["members"]
        running = [m for m in members if m["state"] in ("running", "streaming")]
        replicas = [m for m in running if m["role"] != "leader"]
        return (len(running) == 3 and len(replicas) == 2 and all(m.get("lag") in (0, "0") for m in replicas)
                and self.leader() is not None)

    def wait_healthy(self, timeout=180):
        assert wait_until(self.healthy, timeout, interval=1), f"the lab did not heal: {self.cluster()}"

    # SQL ----------------------------------------------------------------------------------

    def connect(self, member=None, dbname=DATABASE):
        member = member or self.leader()
        connection = psycopg2.connect(host="127.0.0.1", port=self.members[member]["postgresql_port"],
                                      user="postgres", dbname=dbname, passfile=str(self.pgpass), connect_timeout=5)
        connection.autocommit = True
        return connection

    def sql(self, statement, parameters=None, member=None, dbname=DATABASE):
        connection = self.connect(member, dbname)
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement, parameters)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def try_sql(self, statement, parameters=None, member=None):
        try:
            return self.sql(statement, parameters, member)
        except psycopg2.Error:
            return None

    def dump(self):
        """The target database as pg_dump writes it (schema and data), from the current leader."""
        member = self.leader()
        result = subprocess.run(
            ["pg_dump", "-h", "127.0.0.1", "-p", str(self.members[member]["postgresql_port"]), "-U", "postgres",
             "--no-owner", DATABASE], env=self.environment(), capture_output=True, text=True, check=True)
        # pg_dump 15.14 and later write a random \restrict key per dump: not part of the database.
        return "".join(line for line in result.stdout.splitlines(keepends=True)
                       if not line.startswith(("\\restrict ", "\\unrestrict ")))

    def reset(self):
        """Back to the empty target the lab creates."""
        self.sql("DROP TABLE IF EXISTS " + ", ".join(MIGRATION_TABLES) + " CASCADE")

    def postmaster_pid(self, member):
        directory = self.sql("SELECT current_setting('data_directory')", member=member)[0][0]
        return int(Path(directory, "postmaster.pid").read_text().splitlines()[0])

    def postmaster_pid_from_disk(self, member):
        """The postmaster's pid without asking it (its Patroni may be gone already)."""
        return int((self.root / "data" / member / "postmaster.pid").read_text().splitlines()[0])

    def loading(self, table):
        """True while a COPY into ``table`` runs on the leader."""
        rows = self.try_sql("SELECT 1 FROM pg_stat_progress_copy p JOIN pg_class c ON c.oid = p.relid "
                            "WHERE c.relname = %s AND p.tuples_processed > 0", (table,))
        return bool(rows)

    def building_indexes(self):
        rows = self.try_sql("SELECT 1 FROM pg_stat_activity WHERE query ILIKE '%%CREATE %%INDEX%%' "
                            "AND state = 'active' AND pid <> pg_backend_pid()")
        return bool(rows)

    def migration_sessions(self):
        rows = self.try_sql("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND "
                            "(application_name LIKE 'sqlite_to_postgres%%' OR query ILIKE '%%CREATE %%INDEX%%'"
                            " OR query ILIKE 'COPY %%')")
        return rows[0][0] if rows else None

    def lock_holders(self):
        rows = self.try_sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        return rows[0][0] if rows else None

    def table_counts(self):
        counts = {}
        for table in MIGRATION_TABLES[:-1]:
            exists = self.sql("SELECT to_regclass(%s)", (table,))[0][0]
            counts[table] = self.sql(f"SELECT count(*) FROM {table}")[0][0] if exists else None  # noqa: S608
        return counts

    # The runbook --------------------------------------------------------------------------

    def migrate(self, source, *args, env=None, name=None):
        """Start `ansible-playbook migrate.yml` in a process group of its own (as a shell does)."""
        self.runs += 1
        name = name or f"run{self.runs}"
        log = self.workdir / f"{name}.log"
        command = [ANSIBLE_PLAYBOOK, "-i", str(self.inventory), str(ROOT / "migrate.yml"),
                   "-e", f"sqlite_path={source}", "-e", f"backup_dir={self.workdir / 'backups'}",
                   "-e", f"report_dir={self.workdir / 'reports'}", "-e", "replay_wait_timeout=60", *args]
        with open(log, "w") as stream:
            process = subprocess.Popen(command, cwd=ROOT, env=self.environment(**{RUN_VARIABLE: str(self.root)},
                                                                               **(env or {})), stdout=stream,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return Run(process, log)

    def end_leftover_runs(self, timeout=60):
        """Kill what this lab's runs left running and wait until the lock and the load's sessions are gone.

        A run a case waits for is over when the case ends. A case that failed while its run hung (a controller
        stuck after Ctrl-C) would otherwise leave the migration lock held, and every case after it would fail
        at the lock, hiding the one real failure. Returns the command lines of what was killed.
        """
        killed = kill_processes_with(f"{RUN_VARIABLE}={self.root}")
        if killed:
            assert wait_until(lambda: self.lock_holders() == 0 and self.migration_sessions() == 0, timeout, 0.5), (
                "the lock or the load's sessions outlived the processes of the runs")
        return killed

    def assert_completes(self, source, expected_counts, **kwargs):
        """A normal run after the fault: exit 0, every table validated, the counts of the source."""
        run = self.migrate(source, **kwargs).wait()
        assert run.rc == 0, f"the run after the fault failed:\n{run.last_lines()}"
        assert "Validation status: completed" in run.output, run.last_lines()
        assert self.table_counts() == expected_counts
        validated = self.sql("SELECT count(*) FILTER (WHERE validated_at IS NOT NULL), count(*) "
                             "FROM sqlite_to_postgres_state")[0]
        assert validated[0] == validated[1] == len(expected_counts)
        return run


def sha256(path):
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
