"""cutover.yml on a lab cluster of its own, with a stand-in for the application writing all the while.

The module brings up a lab (inventory/lab with every port CUTOVER_LAB_PORT_SHIFT
higher, its own lab_root, torn down at the end), migrates the sample once as
the nightly sync would, and then runs cutovers while tests/app_standin.py
inserts, updates and deletes rows of the SQLite file until the maintenance
hook stops it, and writes to PostgreSQL through PgBouncer once switched. The
hooks are the stand-in's own commands.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import psycopg2
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
STANDIN = Path(__file__).resolve().parent / "app_standin.py"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))
# Above the other labs' shifts (100 to 500) and apart from the fault suite's (300).
LAB_PORT_SHIFT = int(os.environ.get("CUTOVER_LAB_PORT_SHIFT", "1200"))
LAB_PROGRAMS = ("/usr/bin/etcd", "/usr/bin/patroni", "/usr/sbin/pgbouncer", "/usr/lib/postgresql/15/bin/postgres")
GUIDE_VARIABLES = ("DATABASE_URL", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_PORT", "SQLITE_PATH")
TABLES = ("storage_nodes", "files", "tasks", "replication_logs")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab starts its daemons as postgres with runuser: needs root"),
    pytest.mark.skipif(not all(Path(program).exists() for program in LAB_PROGRAMS),
                       reason="etcd, Patroni, PgBouncer or PostgreSQL 15 not installed"),
]


def wait_until(predicate, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class CutoverLab:
    """The lab, the source, the stand-in's state directory, and the runs against them."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.root = Path("/var/tmp") / f"fileshare-lab-cutover-{uuid.uuid4().hex[:8]}"
        self.inventory = workdir / "inventory"
        hosts = yaml.safe_load((ROOT / "inventory/lab/hosts.yml").read_text())
        for group in hosts["all"]["children"].values():
            for host in group["hosts"].values():
                for key in [key for key in host if key.endswith("_port")]:
                    host[key] += LAB_PORT_SHIFT
        self.members = hosts["all"]["children"]["postgres_cluster"]["hosts"]
        self.pgbouncer_port = next(iter(hosts["all"]["children"]["pgbouncer"]["hosts"].values()))["pgbouncer_port"]
        settings = yaml.safe_load((ROOT / "inventory/lab/group_vars/all.yml").read_text())
        settings.update(lab_root=str(self.root), patroni_scope=self.root.name, pg_pgpass_file=str(self.root / "pgpass"))
        (self.inventory / "group_vars").mkdir(parents=True)
        (self.inventory / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
        (self.inventory / "group_vars/all.yml").write_text(yaml.safe_dump(settings, sort_keys=False))
        self.source = workdir / "fileshare.db"
        self.state = workdir / "app"
        self.reports = workdir / "reports"

    def environment(self):
        env = {k: v for k, v in os.environ.items() if k not in GUIDE_VARIABLES and not k.startswith("PG")}
        env.update(PGPASSFILE=str(self.root / "pgpass"), ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
                   PWD=str(self.workdir))
        return env

    def playbook(self, playbook, *extra):
        return subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(self.inventory), str(ROOT / playbook),
                               "-e", f"sqlite_path={self.source}", "-e", f"backup_dir={self.workdir / 'backups'}",
                               "-e", f"report_dir={self.reports}", *extra],
                              cwd=self.workdir, env=self.environment(), capture_output=True, text=True, timeout=900)

    def hook(self, *arguments):
        return [sys.executable, str(STANDIN), "--state-dir", str(self.state), "--pg-port", str(self.pgbouncer_port),
                *arguments]

    def cutover(self, maintenance_on=None, *extra):
        hooks = {"cutover_maintenance_on_command": maintenance_on or self.hook("maintenance", "on"),
                 "cutover_maintenance_off_command": self.hook("maintenance", "off"),
                 "cutover_switch_command": self.hook("switch", "postgresql"),
                 "cutover_switch_back_command": self.hook("switch", "sqlite"),
                 "cutover_pgbouncer_pause": True}
        before = set(self.reports.iterdir()) if self.reports.exists() else set()
        result = self.playbook("cutover.yml", "-e", json.dumps(hooks), *extra)
        [run_dir] = set(self.reports.iterdir()) - before
        self.last_run_dir = run_dir
        return result, json.loads((run_dir / "report.json").read_text())

    def junit_cutover(self):
        """{case: outcome} of the last run's JUnit suite "cutover"."""
        root = ElementTree.parse(self.last_run_dir / "junit.xml").getroot()
        suites = [suite for suite in root.iter("testsuite") if suite.get("name") == "cutover"]
        return {case.get("name"): "failure" if case.find("failure") is not None else "passed"
                for suite in suites for case in suite.iter("testcase")}

    # PostgreSQL ---------------------------------------------------------------------------

    def leader_port(self):
        for member in self.members.values():
            try:
                connection = psycopg2.connect(host="127.0.0.1", port=member["postgresql_port"], user="postgres",
                                              dbname="fileshare", passfile=str(self.root / "pgpass"), connect_timeout=3)
            except psycopg2.OperationalError:
                continue
            with connection, connection.cursor() as cursor:
                cursor.execute("SELECT pg_is_in_recovery()")
                in_recovery = cursor.fetchone()[0]
            connection.close()
            if not in_recovery:
                return member["postgresql_port"]
        raise AssertionError("no PostgreSQL member of the lab accepts writes")

    def dump(self):
        """The target's rows as pg_dump writes them, the state table's and the sequences' included. (Not the
        schema: a restored CHECK constraint is deparsed differently from the one the schema stage created.)"""
        result = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-p", str(self.leader_port()), "-U", "postgres",
                                 "--data-only", "fileshare"], env=self.environment(), capture_output=True, text=True,
                                check=True)
        # pg_dump 15.14 and later write a random \restrict key per dump: not part of the database.
        return "".join(line for line in result.stdout.splitlines(keepends=True)
                       if not line.startswith(("\\restrict ", "\\unrestrict ")))


class StandIn:
    """tests/app_standin.py running as the application, from a fresh state directory."""

    def __init__(self, lab: CutoverLab):
        self.lab = lab
        shutil.rmtree(lab.state, ignore_errors=True)
        lab.state.mkdir()
        self.log = (lab.workdir / "standin.log").open("a")
        self.process = subprocess.Popen(lab.hook("run", "--sqlite", str(lab.source)), stdout=self.log,
                                        stderr=subprocess.STDOUT, env=lab.environment())

    def stats(self):
        path = self.lab.state / "stats.json"
        return json.loads(path.read_text()) if path.exists() else None

    def writes(self, backend):
        stats = self.stats()
        return sum(stats[backend].values()) if stats else 0

    def stop(self):
        (self.lab.state / "stop").write_text("")
        self.process.wait(timeout=30)
        self.log.close()
        assert self.process.returncode == 0, (self.lab.workdir / "standin.log").read_text()[-2000:]


def sqlite_counts(path):
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        return {table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
                for table in TABLES}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = CutoverLab(tmp_path_factory.mktemp("cutover"))
    up = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(lab.inventory), str(ROOT / "playbooks/lab.yml")],
                        env=lab.environment(), capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout[-3000:]
        subprocess.run([sys.executable, str(ROOT / "scripts/make_sample_db.py"), "--out", str(lab.source), "--quiet"],
                       check=True)
        # The nightly sync before the night of the move: the target holds the source already.
        migrated = lab.playbook("migrate.yml")
        assert migrated.returncode == 0, migrated.stdout[-3000:]
        yield lab
    finally:
        subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(lab.inventory), str(ROOT / "playbooks/lab.yml"),
                        "-e", "lab_state=absent"], env=lab.environment(), capture_output=True, text=True, timeout=600)
        shutil.rmtree(lab.root, ignore_errors=True)


def test_drift_names_what_the_live_source_changed_and_writes_nothing(lab):
    """drift.yml on the lab the nights before the cutover: the application has written to SQLite since the sync."""
    with sqlite3.connect(lab.source) as connection:
        connection.execute("UPDATE files SET download_count = download_count + 7 WHERE id = 5")
        connection.execute("DELETE FROM replication_logs WHERE id = 3")
    before = lab.dump()
    reports = set(lab.reports.iterdir())
    result = lab.playbook("drift.yml")
    assert result.returncode != 0, result.stdout[-3000:]
    assert "drift found in 2 of 4 tables" in result.stdout[-3000:], result.stdout[-3000:]
    [run_dir] = set(lab.reports.iterdir()) - reports
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "drift"
    drift = report["validation"]["drift"]
    assert {table: entry["status"] for table, entry in drift.items()} == {
        "storage_nodes": "ok", "files": "drift", "tasks": "ok", "replication_logs": "drift"}
    assert {"key": {"id": 5}, "problem": "values differ", "columns": ["download_count"]} in \
        drift["files"]["first_differing_keys"], drift["files"]
    assert [entry["key"] for entry in drift["replication_logs"]["first_differing_keys"]] == [{"id": 3}]
    assert drift["replication_logs"]["source_rows"] + 1 == drift["replication_logs"]["target_rows"]
    assert lab.dump() == before


def test_a_cutover_whose_validation_fails_leaves_the_application_on_sqlite_and_postgresql_as_before(lab):
    app = StandIn(lab)
    try:
        assert wait_until(lambda: app.writes("sqlite") > 30, 30), "the stand-in does not write"
        before = lab.dump()
        # A second instance already on PostgreSQL changes a row there once maintenance begins:
        # the final validation must see it and the cutover must not switch.
        result, report = lab.cutover(lab.hook("maintenance", "on", "--also-write-postgresql"))
        assert result.returncode != 0, result.stdout[-4000:]
        # back on SQLite, out of maintenance, and writing there again
        assert not (lab.state / "maintenance").exists()
        assert not (lab.state / "backend").exists()
        writes = app.writes("sqlite")
        assert wait_until(lambda: app.writes("sqlite") > writes, 10), "the stand-in did not resume on SQLite"
    finally:
        app.stop()
    assert app.writes("postgresql") == 0
    assert lab.dump() == before
    assert report["status"] == "failed"
    assert report["failure"]["stage"] == "validate", report["failure"]
    assert report["rollback"]["restored"] is True
    cutover = report["cutover"]
    assert cutover["application_on"] == "sqlite" and cutover["maintenance"] == "off"
    assert set(cutover["hooks"]) == {"maintenance_on", "maintenance_off"}, "the switch hook must not have run"
    assert cutover["downtime_seconds"] > 0
    assert [table for table, result in report["validation"]["tables"].items() if not result["match"]] == ["files"]
    # The row was written behind the sync's back: found by its row version, not by a change in SQLite.
    assert report["validation"]["tables"]["files"]["compared"]["keys"] == "changed since the baseline"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    recap = max(i for i, line in enumerate(lines) if line.startswith("PLAY RECAP"))
    assert lines[recap - 2].startswith("Cutover: the application is on SQLite, maintenance off; downtime ")
    assert lines[recap - 3].startswith("Rollback: target restored from ")
    assert lab.junit_cutover() == {"hook maintenance_on": "passed", "hook maintenance_off": "passed",
                                   "application back in service": "passed"}


def test_a_cutover_with_the_application_writing_ends_on_postgresql(lab):
    app = StandIn(lab)
    try:
        assert wait_until(lambda: app.writes("sqlite") > 30, 30), "the stand-in does not write"
        result, report = lab.cutover()
        assert result.returncode == 0, result.stdout[-4000:]
        assert wait_until(lambda: app.writes("postgresql") > 0, 20), "the stand-in does not write to PostgreSQL"
    finally:
        app.stop()
    stats = app.stats()
    assert stats["backend"] == "postgresql" and stats["maintenance_seen"] == 1
    cutover = report["cutover"]
    assert cutover["status"] == "completed"
    assert cutover["application_on"] == "postgresql" and cutover["maintenance"] == "off"
    hooks = cutover["hooks"]
    assert set(hooks) == {"maintenance_on", "switch", "maintenance_off"}
    assert 0 < cutover["downtime_seconds"] < report["seconds"]
    assert hooks["maintenance_on"]["at"] < hooks["switch"]["at"] < hooks["maintenance_off"]["at"]
    stages = [stage["name"] for stage in report["stages"]]
    assert stages[stages.index("pre_sync"):] == ["pre_sync", "post_data", "pre_validate", "maintenance_on",
                                                 "final_sync", "validate", "switch", "maintenance_off", "post_checks"]
    assert report["validation"]["status"] == "completed"
    assert all(table["match"] for table in report["validation"]["tables"].values())
    # In the window, only what the final sync found changed since the first validation was compared.
    assert {table["compared"]["keys"] for table in report["validation"]["tables"].values()} == {
        "changed since the baseline"}
    # Both syncs carried the stand-in's writes, and nothing was written to SQLite after the final copy.
    assert report["migration"]["tables"]["files"]["action"] == "synced"
    assert sqlite_counts(lab.source) == sqlite_counts(cutover["final_copy"])
    assert "downtime " in result.stdout and "check mode" not in result.stdout.lower()
    assert lab.junit_cutover() == {"hook maintenance_on": "passed", "hook switch": "passed",
                                   "hook maintenance_off": "passed", "application back in service": "passed"}


def test_a_check_mode_cutover_calls_no_hook_and_writes_nothing(lab):
    before = lab.dump()
    shutil.rmtree(lab.state, ignore_errors=True)
    lab.state.mkdir()
    result, report = lab.cutover(None, "--check")
    assert result.returncode == 0, result.stdout[-4000:]
    assert list(lab.state.iterdir()) == []
    assert lab.dump() == before
    assert "cutover: check mode: would back up the target" in result.stdout
    assert "cutover: check mode: switch: would call command " in result.stdout
    assert report["cutover"] is None
