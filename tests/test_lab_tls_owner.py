"""The runbook over TLS, as the application's owner role, on a lab cluster of its own.

Brings up the lab (etcd, three Patroni members, PgBouncer) with `lab_tls: true`
on the ports of inventory/lab shifted by 100, from an inventory written here,
and tears it down at the end even when a test fails. The runbook then logs in
as the lab's owner role, no superuser, and verifies every server against the
lab's CA (sslmode verify-full); a second run given another CA must stop in
readiness, in one line, before it writes anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import execute, target_snapshot

ROOT = Path(__file__).resolve().parent.parent
PORT_SHIFT = 100
OWNER = "fileshare_owner"
DATABASE = "fileshare"
PROGRAMS = ("/usr/bin/etcd", "/usr/bin/patroni", "/usr/sbin/pgbouncer", "/usr/lib/postgresql/15/bin/postgres")
# The lab's generated password file (<lab_root>/secrets/) of each role the tests log in as.
SECRETS = {"postgres": "superuser", OWNER: "owner"}
GUIDE_VARIABLES = ("DATABASE_URL", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_PORT", "SQLITE_PATH")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab starts its daemons as postgres with runuser: needs root"),
    pytest.mark.skipif(not all(Path(program).exists() for program in PROGRAMS),
                       reason="etcd, Patroni, PgBouncer or PostgreSQL 15 not installed"),
]


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def shifted_inventory(directory: Path, lab_root: str) -> dict:
    """inventory/lab with every port moved by PORT_SHIFT, its own lab_root and scope, and TLS on."""
    hosts = yaml.safe_load((ROOT / "inventory/lab/hosts.yml").read_text())
    ports = {}
    for group in hosts["all"]["children"].values():
        for name, host in group["hosts"].items():
            for key in [key for key in host if key.endswith("_port")]:
                host[key] += PORT_SHIFT
                ports[f"{name}.{key}"] = host[key]
    settings = yaml.safe_load((ROOT / "inventory/lab/group_vars/all.yml").read_text())
    settings.update(lab_root=lab_root, patroni_scope=f"fileshare-lab-tls-{uuid.uuid4().hex[:8]}", lab_tls=True)
    (directory / "group_vars").mkdir(parents=True)
    (directory / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
    (directory / "group_vars/all.yml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return ports


def ansible_playbook(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), PWD=str(cwd), ANSIBLE_NOCOLOR="1")
    for name in GUIDE_VARIABLES:
        env.pop(name, None)
    command = [str(Path(sys.executable).parent / "ansible-playbook"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


class Lab:
    def __init__(self, base: Path):
        self.base = base
        self.inventory = base / "inventory"
        self.root = Path(f"/var/tmp/fileshare-lab-tls-{uuid.uuid4().hex[:12]}")
        self.ports = shifted_inventory(self.inventory, str(self.root))
        self.ca_file = self.root / "tls/ca.crt"
        self.source = base / "fileshare.db"

    def playbook(self, playbook: str, *extra) -> subprocess.CompletedProcess:
        return ansible_playbook("-i", str(self.inventory), str(ROOT / playbook), *extra, cwd=self.base)

    def migrate(self, name: str, *extra) -> subprocess.CompletedProcess:
        return self.playbook("migrate.yml", "-e", f"pg_login_user={OWNER}", "-e", f"sqlite_path={self.source}",
                             "-e", f"backup_dir={self.base / name / 'backups'}",
                             "-e", f"report_dir={self.base / name / 'reports'}", *extra)

    def leader(self) -> tuple[str, int]:
        """The member Patroni names as leader, and its PostgreSQL port."""
        url = f"http://127.0.0.1:{self.ports['pg1.patroni_restapi_port']}/cluster"
        with urllib.request.urlopen(url, timeout=5) as answer:
            members = json.load(answer)["members"]
        leader = next(member for member in members if member["role"] == "leader")
        return leader["name"], int(leader["port"])

    def conninfo(self, user: str = "postgres") -> dict:
        return {"host": "127.0.0.1", "port": self.leader()[1], "user": user, "dbname": DATABASE,
                "password": (self.root / "secrets" / SECRETS[user]).read_text().strip(),
                "sslmode": "verify-full", "sslrootcert": str(self.ca_file)}

    def query(self, statement: str, parameters=None, user: str = "postgres"):
        return execute(self.conninfo(user), statement, parameters)

    def log(self, name: str) -> Path:
        return self.root / "log" / name


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("lab-tls-owner"))
    busy = [port for port in lab.ports.values() if port_in_use(port)]
    if busy:
        pytest.skip(f"ports {busy} are in use: another lab runs with inventory/lab's ports shifted by {PORT_SHIFT}")
    try:
        up = lab.playbook("playbooks/lab.yml")
        assert up.returncode == 0, up.stdout[-4000:]
        subprocess.run([sys.executable, str(ROOT / "scripts/make_sample_db.py"), "--out", str(lab.source), "--quiet"],
                       check=True)
        # Every new session of the leader is logged with its TLS state.
        lab.query("ALTER SYSTEM SET log_connections = on")
        lab.query("SELECT pg_reload_conf()")
        yield lab
    finally:
        down = lab.playbook("playbooks/lab.yml", "-e", "lab_state=absent")
        shutil.rmtree(lab.root, ignore_errors=True)
        assert down.returncode == 0, down.stdout[-4000:]


def words(text: str) -> str:
    return " ".join(text.split())


def test_migrates_as_the_owner_over_verified_tls(lab):
    leader, _ = lab.leader()
    server_log, bouncer_log = lab.log(f"{leader}-postgresql.log"), lab.log("pgb1.log")
    server_start, bouncer_start = server_log.stat().st_size, bouncer_log.stat().st_size

    result = lab.migrate("tls-owner")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Validation status: completed" in result.stdout
    [run_dir] = (lab.base / "tls-owner/reports").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed"
    assert report["validation"]["status"] == "completed"

    assert lab.query("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (OWNER,)) == [(False,)]
    owners = dict(lab.query("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'"))
    assert set(owners) >= {"files", "storage_nodes", "tasks", "replication_logs"}
    assert set(owners.values()) == {OWNER}

    # Every session opened on the leader during the run used TLS, the runbook's
    # own (as the owner) among them; so did every client of PgBouncer.
    with server_log.open(errors="replace") as log:
        log.seek(server_start)
        sessions = [line for line in log if "connection authorized:" in line]
    assert any(f"user={OWNER} database={DATABASE}" in line for line in sessions), sessions
    assert [line for line in sessions if "SSL enabled" not in line] == []
    with bouncer_log.open(errors="replace") as log:
        log.seek(bouncer_start)
        logins = [line for line in log if "login attempt:" in line]
    assert any(f"user={OWNER}" in line for line in logins), logins
    assert [line for line in logins if "tls=TLS" not in line] == []


def test_wrong_ca_fails_readiness_in_one_line_and_writes_nothing(lab):
    other = lab.base / "other-ca"
    other.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(other / "ca.key"), "-out", str(other / "ca.crt"), "-subj", "/CN=another CA",
                    "-days", "2"], check=True, capture_output=True)
    before = target_snapshot(lab.conninfo())
    leader, port = lab.leader()

    result = lab.migrate("wrong-ca", "-e", f"pg_ca_cert={other / 'ca.crt'}")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    # The run's last words, before the recaps (PLAY RECAP, profile_tasks' timing) that close every run.
    tail = words("\n".join(output.split("PLAY RECAP")[0].splitlines()[-12:]))
    line = (f"readiness: TLS verification of the leader {leader} 127.0.0.1:{port} failed with CA file "
            f"{other / 'ca.crt'}: certificate verify failed")
    assert line in tail, output[-3000:]
    assert "Traceback" not in output
    assert not (lab.base / "wrong-ca").exists()
    assert target_snapshot(lab.conninfo()) == before
    assert lab.query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]
    assert re.search(r"failed=1\b", output)
