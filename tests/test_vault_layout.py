"""The runbook on a real Patroni lab, with its secrets in Ansible Vault the way inventory/production.example keeps them.

Brings up a lab of its own (inventory/lab with every port moved by PORT_SHIFT,
its own lab_root under /var/tmp, torn down at the end) whose users have
passwords that differ per user, then writes an inventory in the production
example's layout (group_vars/all/vars.yml and a vault.yml encrypted with
ansible-vault) that points at the lab and names no pgpass file. Each password
must reach only its own user (the migration role, PgBouncer's console) and
never any output, report or backup.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg2
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_BIN = Path(sys.executable).parent
PORT_SHIFT = 200
LOCK_KEY = 4608230915
GUIDE_VARIABLES = ("DATABASE_URL", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_PORT", "SQLITE_PATH")
RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[a-z0-9-]+-[0-9a-f]{8}$")

LAB_PROGRAMS = ("/usr/bin/patroni", "/usr/bin/etcd", "/usr/sbin/pgbouncer")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not all(Path(p).exists() for p in LAB_PROGRAMS),
                                reason="the lab needs root, Patroni, etcd and PgBouncer")


def words(output: str) -> str:
    """Output with whitespace collapsed: the default callback wraps long messages."""
    return " ".join(output.split())


def ansible_env(**extra) -> dict:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1", **extra)
    for name in GUIDE_VARIABLES:
        env.pop(name, None)
    return env


def shifted_lab_inventory(path: Path, lab_root: Path) -> dict:
    """inventory/lab with every port moved by PORT_SHIFT; returns its hosts.yml as data."""
    hosts = yaml.safe_load((ROOT / "inventory/lab/hosts.yml").read_text())
    for group in hosts["all"]["children"].values():
        for host in group["hosts"].values():
            for key in list(host):
                if key.endswith("_port"):
                    host[key] += PORT_SHIFT
    path.mkdir()
    (path / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
    (path / "group_vars").mkdir()
    lab_vars = yaml.safe_load((ROOT / "inventory/lab/group_vars/all.yml").read_text())
    lab_vars.update(lab_root=str(lab_root), patroni_scope=lab_root.name,
                    pg_pgpass_file=str(lab_root / "pgpass"))
    (path / "group_vars/all.yml").write_text(yaml.safe_dump(lab_vars, sort_keys=False))
    return hosts


def run_lab(inventory: Path, *extra, check=True):
    result = subprocess.run([str(ANSIBLE_BIN / "ansible-playbook"), "-i", str(inventory),
                             str(ROOT / "playbooks/lab.yml"), *extra],
                            cwd=ROOT, env=ansible_env(), capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result


class Lab:
    def __init__(self, base: Path, lab_root: Path):
        self.base, self.root = base, lab_root
        # Alphanumeric, so they need no quoting anywhere; different for every user.
        self.passwords = {name: f"{name}-{secrets.token_hex(12)}"
                          for name in ("superuser", "replication", "pgbouncer_admin")}
        self.inventory = base / "lab-inventory"
        self.hosts = shifted_lab_inventory(self.inventory, lab_root)
        children = self.hosts["all"]["children"]
        self.members = children["postgres_cluster"]["hosts"]
        self.pgbouncer_port = children["pgbouncer"]["hosts"]["pgb1"]["pgbouncer_port"]

    def seed_passwords(self):
        """The lab reads each user's password from <lab_root>/secrets/<name> when the file exists."""
        secrets_dir = self.root / "secrets"
        secrets_dir.mkdir(parents=True, mode=0o700)
        self.root.chmod(0o755)
        for name, password in self.passwords.items():
            path = secrets_dir / name
            path.write_text(password + "\n")
            path.chmod(0o600)

    def cluster(self) -> dict:
        port = self.members["pg1"]["patroni_restapi_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/cluster", timeout=5) as answer:
            return json.load(answer)

    def leader(self) -> str:
        return next(m["name"] for m in self.cluster()["members"] if m["role"] == "leader")

    def connect(self, member: str, dbname="fileshare"):
        connection = psycopg2.connect(host="127.0.0.1", port=self.members[member]["postgresql_port"], user="postgres",
                                      password=self.passwords["superuser"], dbname=dbname)
        connection.autocommit = True
        return connection

    def query(self, member: str, statement: str, parameters=None, dbname="fileshare"):
        connection = self.connect(member, dbname)
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement, parameters)
                return cursor.fetchall()
        finally:
            connection.close()

    def recorded_pid(self, pidfile: Path, must_contain: str) -> int | None:
        """The pid in a lab pid file while it still runs the lab's own program (as process_find.yml decides)."""
        try:
            pid = int(pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        return pid if must_contain.encode() in cmdline else None

    def stop_member(self, member: str):
        """SIGTERM to the member's Patroni, which shuts its PostgreSQL down; waits for both."""
        patroni = self.recorded_pid(self.root / "run" / f"{member}.pid", str(self.root / "patroni" / f"{member}.yml"))
        postmaster = self.recorded_pid(self.root / "data" / member / "postmaster.pid", str(self.root / "data" / member))
        assert patroni, f"Patroni of {member} is not running"
        os.kill(patroni, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not any(Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes()
                       for pid in (patroni, postmaster) if pid):
                return
            time.sleep(0.5)
        raise AssertionError(f"{member} did not stop within 120 s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("vault-layout")
    lab_root = Path("/var/tmp") / f"fileshare-lab-vault-{secrets.token_hex(4)}"
    lab = Lab(base, lab_root)
    lab.seed_passwords()
    try:
        run_lab(lab.inventory)
        yield lab
    finally:
        run_lab(lab.inventory, "-e", "lab_state=absent", check=False)
        shutil.rmtree(lab_root, ignore_errors=True)


class VaultInventory:
    """An inventory in inventory/production.example's layout pointing at the lab; no pgpass file."""

    def __init__(self, lab: Lab, path: Path):
        self.lab, self.path = lab, path
        inventory = path / "inventory"
        (inventory / "group_vars/all").mkdir(parents=True)
        hosts = json.loads(json.dumps(lab.hosts))
        hosts["all"]["vars"] = {"ansible_connection": "local",
                                "ansible_python_interpreter": "{{ ansible_playbook_python }}"}
        (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
        (inventory / "group_vars/all/vars.yml").write_text(yaml.safe_dump({
            "patroni_scope": lab.root.name,
            "pg_superuser": "postgres",
            "pg_replication_user": "replicator",
            "pgbouncer_admin_user": "pgbouncer_admin",
            "pg_replication_password": "{{ vault_pg_replication_password }}",
        }, sort_keys=False))
        vault = inventory / "group_vars/all/vault.yml"
        vault.write_text(yaml.safe_dump({
            "vault_pg_login_password": lab.passwords["superuser"],
            "vault_pg_replication_password": lab.passwords["replication"],
            "vault_pgbouncer_admin_password": lab.passwords["pgbouncer_admin"],
        }))
        self.vault_password_file = path / "vault-pass"
        self.vault_password_file.write_text(secrets.token_hex(16) + "\n")
        self.vault_password_file.chmod(0o600)
        subprocess.run([str(ANSIBLE_BIN / "ansible-vault"), "encrypt", "--vault-password-file",
                        str(self.vault_password_file), str(vault)], check=True, capture_output=True, env=ansible_env())
        assert vault.read_text().startswith("$ANSIBLE_VAULT;")
        self.inventory = inventory
        self.source = path / "fileshare.db"
        subprocess.run([sys.executable, str(ROOT / "scripts/make_sample_db.py"), "--out", str(self.source), "--quiet"],
                       check=True)
        self.backups, self.reports = path / "backups", path / "reports"

    def command(self, *extra) -> list[str]:
        return [str(ANSIBLE_BIN / "ansible-playbook"), "-i", str(self.inventory), str(ROOT / "migrate.yml"),
                "--vault-password-file", str(self.vault_password_file), "-e", f"backup_dir={self.backups}",
                "-e", f"report_dir={self.reports}", "-e", f"sqlite_path={self.source}", *extra]

    def env(self) -> dict:
        # No pgpass file anywhere: a password that is not in the vault is not found.
        return ansible_env(PGPASSFILE=str(self.path / "no-such-pgpass"), PWD=str(self.path))

    def run(self, *extra):
        return subprocess.run(self.command(*extra), cwd=self.path, env=self.env(), capture_output=True, text=True,
                              timeout=900)

    def start(self, *extra):
        return subprocess.Popen(self.command(*extra), cwd=self.path, env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)


def lock_held(lab: Lab) -> bool:
    rows = lab.query(lab.leader(), "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                                   "AND (classid::bigint << 32) + objid::bigint = %s", (LOCK_KEY,))
    return rows[0][0] > 0


def test_each_secret_reaches_only_its_own_user(lab, tmp_path):
    inventory = VaultInventory(lab, tmp_path)
    assert not (tmp_path / "no-such-pgpass").exists()
    winner = inventory.start("-v")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and winner.poll() is None and not lock_held(lab):
            time.sleep(0.2)
        assert winner.poll() is None, "the first run ended before a second one could start"
        refused = inventory.run("-v")
    finally:
        output, _ = winner.communicate(timeout=900)
    assert winner.returncode == 0, output[-6000:]
    assert "Validation status: completed" in output
    assert "SASL authentication failed" not in output

    # The refused run says who holds the lock and how to stop it, and reports apart from the winner.
    assert refused.returncode != 0
    refusal = words(refused.stdout)
    assert re.search(r"a migration is already running: advisory lock \d+ on 127\.0\.0\.1:\d+/fileshare is held by "
                     r"backend pid \d+ \(fileshare-migration-lock \d{8}T\d{6}Z-[a-z0-9-]+-[0-9a-f]{8}\) from "
                     r"127\.0\.0\.1, connected since [^;]+; to stop that run", refusal), refusal[-3000:]
    print(re.search(r"a migration is already running.*?(?= Origin:|$)", refusal).group(0))
    runs = {json.loads((d / "report.json").read_text())["status"]: d.name for d in inventory.reports.iterdir()}
    assert set(runs) == {"completed", "failed"}, runs
    assert all(RUN_ID.match(name) for name in runs.values()), runs
    winner_report = json.loads((inventory.reports / runs["completed"] / "report.json").read_text())
    assert winner_report["stages"][-1]["name"] == "post_checks"
    refused_report = json.loads((inventory.reports / runs["failed"] / "report.json").read_text())
    assert "a migration is already running" in refused_report["failure"]["message"]

    # The winner's backup records its outcome for retention.
    [backup] = inventory.backups.iterdir()
    assert backup.name == runs["completed"]
    record = json.loads((backup / "backup.json").read_text())
    assert record["outcome"] == "completed" and record["pre_migration"] is True and record["validated"] is True

    assert lab.query(lab.leader(), "SELECT count(*) FROM files")[0][0] == 50

    outputs = [output, refused.stdout, refused.stderr]
    files = [p for d in (inventory.reports, inventory.backups) for p in d.rglob("*") if p.is_file()]
    assert files
    for name, password in lab.passwords.items():
        for text in outputs:
            assert password not in text, f"the {name} password appears in the output"
        for path in files:
            assert password.encode() not in path.read_bytes(), f"the {name} password appears in {path}"


def test_readiness_names_a_stopped_replica(lab, tmp_path):
    inventory = VaultInventory(lab, tmp_path)
    leader = lab.leader()
    stopped = next(name for name in ("pg3", "pg2") if name != leader)
    lab.stop_member(stopped)
    try:
        result = inventory.run("--tags", "readiness")
        assert result.returncode != 0, result.stdout[-4000:]
        text = words(result.stdout)
        named = re.search(rf"readiness: Patroni cluster \S+: {stopped} is down: .*?(?= Origin:|$)", text)
        assert named, text[-3000:]
        print(named.group(0))  # shown with pytest -rP: what the operator reads
        assert not re.search(r"Patroni cluster \S+ ok", text), text[-3000:]
    finally:
        run_lab(lab.inventory)
    streaming = {row[0] for row in lab.query(lab.leader(), "SELECT application_name FROM pg_stat_replication "
                                                           "WHERE state = 'streaming'", dbname="postgres")}
    assert stopped in streaming
