"""cutover.yml on a lab cluster of its own, with a stand-in for the application writing all the while.

The module brings up a lab (inventory/lab with every port CUTOVER_LAB_PORT_SHIFT
higher, its own lab_root, torn down at the end), migrates the sample once as
the nightly sync would and keeps that state (a pg_dump of the target and a
copy of the SQLite file), which every case starts from. Each case runs
cutover.yml (and switchback.yml) while tests/app_standin.py inserts, updates
and deletes rows of the SQLite file until its maintenance hook stops it, and
writes to PostgreSQL through PgBouncer once switched. The hooks are the
stand-in's own commands, or its URLs. The stand-in logs every commit it
believes it made; every case ends by checking that none of them is missing
from the database the application ends on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
import warnings
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import psycopg2
import pytest
import yaml
from app_standin import missing_commits, postgresql_reader, sqlite_reader
from conftest import kill_processes_with, wait_until

ROOT = Path(__file__).resolve().parent.parent
STANDIN = Path(__file__).resolve().parent / "app_standin.py"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))
# Above the other labs' shifts (100 to 500) and apart from the fault suite's (300).
LAB_PORT_SHIFT = int(os.environ.get("CUTOVER_LAB_PORT_SHIFT", "1200"))
LAB_PROGRAMS = ("/usr/bin/etcd", "/usr/bin/patroni", "/usr/sbin/pgbouncer", "/usr/lib/postgresql/15/bin/postgres")
GUIDE_VARIABLES = ("DATABASE_URL", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_PORT", "SQLITE_PATH")
TABLES = ("storage_nodes", "files", "tasks", "replication_logs")
# Every process a case starts (its playbooks, the hooks and lock holder they start, the stand-in) inherits this
# variable and the lab's daemons do not, so what a failed case left running can be found and ended.
RUN_VARIABLE = "FILESHARE_CUTOVER_RUN"
# The sessions of a run: the load and the migration lock's holder.
RUN_SESSIONS = ("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'sqlite_to_postgres%' "
                "OR application_name LIKE 'fileshare-migration-lock%'")
# Generous: the machine may be busy; every wait below ends as soon as its condition holds.
WAIT = 120

RELIABILITY_SECTION = (
    "cutover.yml with the application writing (tests/test_cutover.py)",
    f"On the suite's own lab cluster (three Patroni members, etcd, PgBouncer; ports {LAB_PORT_SHIFT} above the bundled "
    "lab's), the guide's sample migrated first, with tests/app_standin.py writing to all four tables",
    "(about 20 commits a second) and logging every commit it believes it made; every case ends by checking that "
    "no logged commit is missing from the database the application ends on.",
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab starts its daemons as postgres with runuser: needs root"),
    pytest.mark.skipif(not all(Path(program).exists() for program in LAB_PROGRAMS),
                       reason="etcd, Patroni, PgBouncer or PostgreSQL 15 not installed"),
]


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
        self.backups = workdir / "backups"
        self.record = self.reports / "cutover-state.json"
        # The runs' temporary directory (the load's progress file goes there), so nothing lands in /tmp.
        self.tmp = workdir / "tmp"
        self.tmp.mkdir()

    def environment(self):
        env = {k: v for k, v in os.environ.items() if k not in GUIDE_VARIABLES and not k.startswith("PG")}
        env.update(PGPASSFILE=str(self.root / "pgpass"), ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
                   PWD=str(self.workdir), TMPDIR=str(self.tmp))
        return env

    def run_environment(self):
        """The environment of what a case starts: the lab's, marked with RUN_VARIABLE."""
        return {**self.environment(), RUN_VARIABLE: str(self.root)}

    def end_leftover_runs(self, timeout=WAIT):
        """Kill what the case's runs left running and wait until their sessions are gone; what was killed.

        A case that failed while its run or the stand-in hung would otherwise leave the migration lock held or
        the stand-in writing, and every case after it would fail for that, hiding the one real failure.
        """
        killed = kill_processes_with(f"{RUN_VARIABLE}={self.root}")
        if killed:
            assert wait_until(lambda: self.sql(RUN_SESSIONS) == [(0,)], timeout, 0.5), (
                "the load or the lock outlived the processes of the runs")
        return killed

    def command(self, playbook, *extra):
        return [ANSIBLE_PLAYBOOK, "-i", str(self.inventory), str(ROOT / playbook), "-e", f"sqlite_path={self.source}",
                "-e", f"backup_dir={self.backups}", "-e", f"report_dir={self.reports}", *extra]

    def playbook(self, playbook, *extra):
        result = subprocess.run(self.command(playbook, *extra), cwd=self.workdir, env=self.run_environment(),
                                capture_output=True, text=True, timeout=900)
        return result

    def start(self, playbook, *extra):
        """The playbook in a process group of its own, as an operator's shell starts it."""
        log = (self.workdir / f"{playbook}-{time.monotonic_ns()}.log").open("w")
        return subprocess.Popen(self.command(playbook, *extra), cwd=self.workdir, env=self.run_environment(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True), Path(log.name)

    def hook(self, *arguments):
        return [sys.executable, str(STANDIN), "--state-dir", str(self.state), "--pg-port", str(self.pgbouncer_port),
                *arguments]

    def hooks(self, **overrides):
        """The stand-in's commands as the cutover's hooks; overrides replace (or, None, remove) some."""
        hooks = {"cutover_maintenance_on_command": self.hook("maintenance", "on"),
                 "cutover_maintenance_off_command": self.hook("maintenance", "off"),
                 "cutover_switch_command": self.hook("switch", "postgresql"),
                 "cutover_switch_back_command": self.hook("switch", "sqlite"),
                 "cutover_pgbouncer_pause": True}
        hooks.update(overrides)
        return ["-e", json.dumps({key: value for key, value in hooks.items() if value is not None})]

    def run(self, playbook="cutover.yml", *extra, hooks=None):
        """A playbook with the hooks; (result, its report) of the report directory it added."""
        before = set(self.reports.iterdir()) if self.reports.exists() else set()
        result = self.playbook(playbook, *(hooks or self.hooks()), *extra)
        [run_dir] = [path for path in set(self.reports.iterdir()) - before if path.is_dir()]
        self.last_run_dir = run_dir
        return result, json.loads((run_dir / "report.json").read_text())

    def cutover(self, *extra, hooks=None):
        return self.run("cutover.yml", *extra, hooks=hooks)

    def junit_cutover(self):
        """{case: (outcome, message)} of the last run's JUnit suite "cutover"."""
        root = ElementTree.parse(self.last_run_dir / "junit.xml").getroot()
        suites = [suite for suite in root.iter("testsuite") if suite.get("name") == "cutover"]
        cases = {}
        for suite in suites:
            for case in suite.iter("testcase"):
                failure = case.find("failure")
                cases[case.get("name")] = ("failure", failure.get("message")) if failure is not None else \
                    ("passed", case.findtext("system-out"))
        return cases

    def recorded(self):
        return json.loads(self.record.read_text()) if self.record.exists() else None

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

    def connect(self):
        return psycopg2.connect(host="127.0.0.1", port=self.leader_port(), user="postgres", dbname="fileshare",
                                passfile=str(self.root / "pgpass"), connect_timeout=10)

    def sql(self, statement, parameters=None):
        connection = self.connect()
        try:
            with connection, connection.cursor() as cursor:
                cursor.execute(statement, parameters)
                return cursor.fetchall()
        finally:
            connection.close()

    def dump(self):
        """The target's rows as pg_dump writes them, the state table's and the sequences' included. (Not the
        schema: a restored CHECK constraint is deparsed differently from the one the schema stage created.)"""
        result = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-p", str(self.leader_port()), "-U", "postgres",
                                 "--data-only", "fileshare"], env=self.environment(), capture_output=True, text=True,
                                check=True)
        # pg_dump 15.14 and later write a random \restrict key per dump: not part of the database.
        return "".join(line for line in result.stdout.splitlines(keepends=True)
                       if not line.startswith(("\\restrict ", "\\unrestrict ")))

    # The state every case starts from -----------------------------------------------------

    def keep_baseline(self):
        """The migrated target and its source, as the nightly sync left them."""
        subprocess.run(["pg_dump", "-Fc", "-h", "127.0.0.1", "-p", str(self.leader_port()), "-U", "postgres",
                        "-f", str(self.workdir / "baseline.pgc"), "fileshare"], env=self.environment(), check=True)
        shutil.copyfile(self.source, self.workdir / "baseline.db")

    def reset(self):
        """Back to the baseline: the source, the target, no record of a cutover, a fresh stand-in state."""
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{self.source}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(self.workdir / "baseline.db", self.source)
        subprocess.run(["pg_restore", "--clean", "--if-exists", "--single-transaction", "--exit-on-error",
                        "-h", "127.0.0.1", "-p", str(self.leader_port()), "-U", "postgres", "-d", "fileshare",
                        str(self.workdir / "baseline.pgc")], env=self.environment(), check=True)
        self.record.unlink(missing_ok=True)
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir()


class StandIn:
    """tests/app_standin.py running as the application (and, when asked, serving its hooks as URLs)."""

    def __init__(self, lab: CutoverLab, serve=False, answer_500=()):
        self.lab = lab
        self.log = (lab.workdir / "standin.log").open("a")
        self.processes = [subprocess.Popen(lab.hook("run", "--sqlite", str(lab.source)), stdout=self.log,
                                           stderr=subprocess.STDOUT, env=lab.run_environment())]
        if serve:
            arguments = [word for path in answer_500 for word in ("--answer-500", path)]
            self.processes.append(subprocess.Popen(lab.hook("serve", *arguments), stdout=self.log,
                                                   stderr=subprocess.STDOUT, env=lab.run_environment()))
            port = wait_until(lambda: (lab.state / "http_port").exists() and (lab.state / "http_port").read_text(),
                              WAIT, 0.1)
            assert port, "the stand-in's hook server did not start"
            self.base_url = f"http://127.0.0.1:{port}"

    def url(self, path):
        return self.base_url + path

    def stats(self):
        path = self.lab.state / "stats.json"
        return json.loads(path.read_text()) if path.exists() else None

    def writes(self, backend):
        stats = self.stats()
        return sum(stats[backend].values()) if stats else 0

    def writing(self, backend, more_than=0):
        """Wait until the stand-in has written more than ``more_than`` changes to ``backend``."""
        return wait_until(lambda: self.writes(backend) > more_than, WAIT, 0.1)

    def backend(self):
        path = self.lab.state / "backend"
        return path.read_text().strip() if path.exists() else "sqlite"

    def in_maintenance(self):
        return (self.lab.state / "maintenance").exists()

    def hooks_called(self):
        path = self.lab.state / "hooks.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def measured_downtime(self):
        """From the first maintenance-on to the last maintenance-off, as the stand-in saw them."""
        first = float((self.lab.state / "maintenance_first_on").read_text())
        return float((self.lab.state / "maintenance_last_off").read_text()) - first

    def stop(self):
        (self.lab.state / "stop").write_text("")
        for process in self.processes:
            process.wait(timeout=60)
        self.log.close()
        assert [process.returncode for process in self.processes] == [0] * len(self.processes), \
            (self.lab.workdir / "standin.log").read_text()[-2000:]

    def commits(self):
        return [json.loads(line) for line in (self.lab.state / "commits.jsonl").read_text().splitlines()]

    def assert_no_commit_lost(self, ends_on):
        """Every commit the stand-in logged is in the database it ends on (``ends_on``)."""
        assert self.backend() == ends_on
        commits = self.commits()
        assert any(commit["backend"] == "sqlite" for commit in commits)
        if ends_on == "sqlite":
            missing = missing_commits(self.lab.state, sqlite_reader(str(self.lab.source)))
        else:
            assert any(commit["backend"] == "postgresql" for commit in commits), "no commit to PostgreSQL logged"
            connection = self.lab.connect()
            try:
                missing = missing_commits(self.lab.state, postgresql_reader(connection))
            finally:
                connection.close()
        assert missing == [], f"{len(missing)} logged rows missing from {ends_on}, first: {missing[:5]}"


@contextlib.contextmanager
def application_writing(lab, ends_on, serve=False, answer_500=()):
    """The stand-in writing to SQLite while the case's runs go on (the body of the ``with``).

    The application must end out of maintenance on ``ends_on`` and writing there; once it is stopped,
    every commit it logged must be in that database and, when it ends on SQLite, the target must equal
    its dump from before the runs.
    """
    app = StandIn(lab, serve=serve, answer_500=answer_500)
    try:
        assert app.writing("sqlite", 30), "the stand-in does not write"
        before = lab.dump() if ends_on == "sqlite" else None
        yield app
        assert not app.in_maintenance() and app.backend() == ends_on, (app.in_maintenance(), app.backend())
        assert app.writing(ends_on, app.writes(ends_on)), f"the stand-in did not go on writing to {ends_on}"
    finally:
        app.stop()
    app.assert_no_commit_lost(ends_on)
    if before is not None:
        assert lab.dump() == before


def closing_lines(result):
    """The run's last lines before the recap, without blank lines."""
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    recap = max(i for i, line in enumerate(lines) if line.startswith("PLAY RECAP"))
    return lines[:recap]


def cutover_line(result):
    return next(line for line in reversed(closing_lines(result)) if line.startswith("Cutover: "))


def assert_true_messages(result):
    """Messages of a cutover that failed before its switch: nothing that is false at that moment."""
    assert "CHANGED DURING THE RUN" not in result.stdout
    assert "stay synced" not in result.stdout
    assert "downtime none" not in result.stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = CutoverLab(tmp_path_factory.mktemp("cutover"))
    up = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(lab.inventory), str(ROOT / "playbooks/lab.yml")],
                        env=lab.environment(), capture_output=True, text=True, timeout=900)
    try:
        assert up.returncode == 0, up.stdout[-3000:]
        subprocess.run([sys.executable, str(ROOT / "scripts/make_sample_db.py"), "--out", str(lab.source), "--quiet"],
                       check=True)
        # The nightly sync before the night of the move: the target holds the source already.
        migrated = lab.playbook("migrate.yml")
        assert migrated.returncode == 0, migrated.stdout[-3000:]
        lab.keep_baseline()
        yield lab
    finally:
        subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(lab.inventory), str(ROOT / "playbooks/lab.yml"),
                        "-e", "lab_state=absent"], env=lab.environment(), capture_output=True, text=True, timeout=600)
        shutil.rmtree(lab.root, ignore_errors=True)


@pytest.fixture
def fresh(lab):
    """The lab as the baseline left it, before each case; after it, nothing of its runs running."""
    lab.reset()
    yield lab
    killed = lab.end_leftover_runs()
    if killed:
        warnings.warn(f"the case left {len(killed)} processes of its runs running, killed: {killed}", stacklevel=1)


def sqlite_counts(path):
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        return {table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
                for table in TABLES}


def test_drift_names_what_the_live_source_changed_and_writes_nothing(fresh):
    """drift.yml on the lab the nights before the cutover: the application has written to SQLite since the sync."""
    lab = fresh
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


@pytest.mark.fault(done="a second instance already on PostgreSQL changes a row there once maintenance began",
                   checked="the window's validation finds it; no switch; the application back on SQLite out of "
                           "maintenance with every logged commit; target equal to its dump from before; the summary "
                           "shows the restored counts; no \"CHANGED DURING THE RUN\"")
def test_a_cutover_whose_validation_fails_leaves_the_application_on_sqlite_and_postgresql_as_before(fresh):
    lab = fresh
    with application_writing(lab, ends_on="sqlite") as app:
        [(files_before,)] = lab.sql("SELECT count(*) FROM files")
        # A second instance already on PostgreSQL changes a row there once maintenance begins:
        # the final validation must see it and the cutover must not switch.
        result, report = lab.cutover(hooks=lab.hooks(
            cutover_maintenance_on_command=lab.hook("maintenance", "on", "--also-write-postgresql")))
        assert result.returncode != 0, result.stdout[-4000:]
    assert app.writes("postgresql") == 0
    assert lab.recorded() is None, "a cutover that ended on SQLite out of maintenance left its record"
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
    lines = closing_lines(result)
    assert lines[-2].startswith("Cutover: the application is on SQLite, maintenance off; downtime "), lines[-2]
    assert lines[-3].startswith("Rollback: target restored from "), lines[-3]
    # The summary tells what the target holds after the restore, not only what the failed run had written.
    restored = report["rollback"]["rows"]
    assert restored["files"] == files_before < report["validation"]["tables"]["files"]["postgres_rows"]
    files_line = next(line for line in lines if line.startswith("✗ files: "))
    assert files_line.endswith(f" before the rollback, {restored['files']} after it"), files_line
    assert_true_messages(result)
    assert {case: outcome for case, (outcome, _message) in lab.junit_cutover().items()} == {
        "hook maintenance_on": "passed", "hook maintenance_off": "passed", "application back in service": "passed"}


@pytest.mark.fault(done="cutover.yml while the stand-in writes about 20 commits a second, hooks as commands, "
                        "PgBouncer paused around the switch; then migrate.yml, as a nightly timer left on would run it",
                   checked="exit 0, the application on PostgreSQL with every logged commit (those to SQLite before "
                           "maintenance and those to PostgreSQL after), the downtime, the record says completed; "
                           "migrate.yml refuses and leaves the target as it was")
def test_a_cutover_with_the_application_writing_ends_on_postgresql(fresh):
    lab = fresh
    with application_writing(lab, ends_on="postgresql") as app:
        result, report = lab.cutover()
        assert result.returncode == 0, result.stdout[-4000:]
    stats = app.stats()
    assert stats["backend"] == "postgresql" and stats["maintenance_seen"] == 1
    cutover = report["cutover"]
    assert cutover["status"] == "completed"
    assert cutover["application_on"] == "postgresql" and cutover["maintenance"] == "off"
    hooks = cutover["hooks"]
    assert set(hooks) == {"maintenance_on", "switch", "maintenance_off"}
    assert all(hook["rc"] == 0 and hook["error"] is None for hook in hooks.values())
    assert 0 < cutover["downtime_seconds"] < report["seconds"]
    assert cutover["downtime_seconds"] >= app.measured_downtime() - 0.05
    assert hooks["maintenance_on"]["at"] < hooks["switch"]["at"] < hooks["maintenance_off"]["at"]
    assert cutover["source_written_after_copy"] is False, cutover["source_check"]
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
    assert cutover_line(result).startswith("Cutover: the application is on PostgreSQL, maintenance off; downtime ")
    assert "check mode" not in result.stdout.lower()
    assert {case: outcome for case, (outcome, _message) in lab.junit_cutover().items()} == {
        "hook maintenance_on": "passed", "hook switch": "passed", "hook maintenance_off": "passed",
        "source unchanged since the copy at rest": "passed", "application back in service": "passed"}
    assert lab.recorded()["status"] == "completed" and lab.recorded()["application"] == "postgresql"

    # A nightly sync left scheduled would now write SQLite's old state over what the application writes.
    before = lab.dump()
    refused = lab.playbook("migrate.yml")
    assert refused.returncode != 0
    assert "migrate.yml refuses to sync SQLite into PostgreSQL" in refused.stdout, refused.stdout[-3000:]
    assert "the application has been on PostgreSQL since" in refused.stdout
    assert lab.dump() == before


@pytest.mark.fault(done="the switch hook is a URL that answers HTTP 500 (the application stays on SQLite); the "
                        "switch-back hook a URL too",
                   checked="the switch hook fails with its status in the report and JUnit; maintenance stays on "
                           "while the switch-back hook is called, then ends; the application on SQLite with every "
                           "logged commit; target equal to its dump from before; exit code")
def test_a_switch_url_that_answers_500_fails_and_the_application_stays_on_sqlite(fresh):
    lab = fresh
    with application_writing(lab, ends_on="sqlite", serve=True, answer_500=["/switch/postgresql"]) as app:
        result, report = lab.cutover(hooks=lab.hooks(cutover_switch_command=None,
                                                     cutover_switch_url=app.url("/switch/postgresql"),
                                                     cutover_switch_back_command=None,
                                                     cutover_switch_back_url=app.url("/switch/sqlite")))
        assert result.returncode != 0, result.stdout[-4000:]
    cutover = report["cutover"]
    switch = cutover["hooks"]["switch"]
    assert switch["status"] == 500 and "answered HTTP 500" in switch["error"], switch
    assert report["failure"]["stage"] == "switch" and "answered HTTP 500" in report["failure"]["message"]
    assert cutover["application_on"] == "sqlite" and cutover["maintenance"] == "off"
    outcome, message = lab.junit_cutover()["hook switch"]
    assert outcome == "failure" and "HTTP 500" in message
    # Switched back while still in maintenance, and only then out of it.
    steps = [call["step"] for call in app.hooks_called()]
    assert steps == ["maintenance on", "switch postgresql", "switch sqlite", "maintenance off"], steps
    assert cutover_line(result).startswith("Cutover: the application is on SQLite, maintenance off; downtime ")
    assert "Rollback: target restored from " in result.stdout
    assert_true_messages(result)


@pytest.mark.fault(done="the maintenance-on hook is a URL that answers HTTP 500 (the application never stops)",
                   checked="the hook fails with its status; nothing claims maintenance began; no switch; the "
                           "maintenance-off hook is called; the application on SQLite with every logged commit; "
                           "target equal to its dump from before; exit code")
def test_a_maintenance_url_that_answers_500_fails_before_anything_is_switched(fresh):
    lab = fresh
    with application_writing(lab, ends_on="sqlite", serve=True, answer_500=["/maintenance/on"]) as app:
        result, report = lab.cutover(hooks=lab.hooks(cutover_maintenance_on_command=None,
                                                     cutover_maintenance_on_url=app.url("/maintenance/on")))
        assert result.returncode != 0, result.stdout[-4000:]
    assert app.stats()["maintenance_seen"] == 0
    cutover = report["cutover"]
    assert cutover["hooks"]["maintenance_on"]["status"] == 500
    assert report["failure"]["stage"] == "maintenance_on", report["failure"]
    assert "switch" not in cutover["hooks"]
    assert [call["step"] for call in app.hooks_called()] == ["maintenance on", "maintenance off"]
    outcome, message = lab.junit_cutover()["hook maintenance_on"]
    assert outcome == "failure" and "HTTP 500" in message
    assert "the maintenance hook has answered" not in result.stdout
    assert cutover["application_on"] == "sqlite" and cutover["maintenance"] == "off"
    assert_true_messages(result)


@pytest.mark.fault(done="a maintenance-on hook that returns at once, while the application goes on writing until "
                        "the copy at rest exists and a few commits after it (it notices the flag late)",
                   checked="the switch is not made: the source is found written after the copy; the last line "
                           "says so and names the maintenance hook; the application on SQLite out of maintenance "
                           "with every logged commit (the late ones included); target equal to its dump from before")
def test_a_maintenance_hook_that_returns_before_the_application_stopped_is_caught(fresh):
    lab = fresh
    lying = lab.hook("maintenance", "on", "--lie-until-copy", str(lab.backups / "*" / "final-fileshare.db"))
    with application_writing(lab, ends_on="sqlite") as app:
        result, report = lab.cutover(hooks=lab.hooks(cutover_maintenance_on_command=lying))
        assert result.returncode != 0, result.stdout[-4000:]
    assert app.stats()["maintenance_seen"] == 1, "the stand-in never noticed maintenance: the lie was not tested"
    cutover = report["cutover"]
    assert cutover["source_written_after_copy"] is True
    assert "switch" not in cutover["hooks"], "the application was switched"
    assert cutover["application_on"] == "sqlite" and cutover["maintenance"] == "off"
    line = cutover_line(result)
    assert "the SQLite source was written after maintenance began" in line, line
    assert "maintenance_on hook (command " in line and "--lie-until-copy" in line, line
    assert closing_lines(result)[-2] == line
    assert lab.junit_cutover()["source unchanged since the copy at rest"][0] == "failure"
    assert_true_messages(result)


@pytest.mark.fault(done="after a successful switch, the maintenance-off hook ends maintenance and then exits 1, "
                        "every time it is called; then switchback.yml",
                   checked="nothing is rolled back or switched back: the application on PostgreSQL, maintenance "
                           "unknown, the hook called again, exit code non-zero; switchback.yml puts maintenance on, "
                           "lists the rows the application wrote to PostgreSQL and refuses; every logged commit in "
                           "PostgreSQL")
def test_a_failing_maintenance_off_after_the_switch_keeps_the_application_and_its_writes_on_postgresql(fresh):
    lab = fresh
    with application_writing(lab, ends_on="postgresql") as app:
        result, report = lab.cutover("-e", "cutover_maintenance_off_retries=1", "-e", "cutover_hook_retry_delay=1",
                                     hooks=lab.hooks(cutover_maintenance_off_command=lab.hook(
                                         "maintenance", "off", "--then-fail")))
        assert result.returncode != 0, result.stdout[-4000:]
        assert app.backend() == "postgresql" and not app.in_maintenance()
        assert app.writing("postgresql", 30), "the stand-in does not write to PostgreSQL"

        # Going back: maintenance first, then the rows the application wrote to PostgreSQL are found.
        refused, switchback = lab.run("switchback.yml")
        assert refused.returncode != 0, refused.stdout[-4000:]
    assert report["rollback"] is None, "a rollback ran after the switch"
    cutover = report["cutover"]
    assert cutover["application_on"] == "postgresql" and cutover["maintenance"] == "unknown"
    assert cutover["hooks"]["maintenance_off"]["calls"] == 2
    assert report["failure"]["stage"] == "maintenance_off", report["failure"]
    line = cutover_line(result)
    assert line.startswith("Cutover: the application is on PostgreSQL, maintenance unknown (on since "), line
    assert "nothing was rolled back" in line and "end maintenance by hand" in line, line
    assert "downtime none" not in result.stdout and "Rollback:" not in result.stdout
    assert [call["step"] for call in app.hooks_called()] == [
        "maintenance on", "switch postgresql", "maintenance off", "maintenance off",  # the cutover, one retry
        "maintenance on", "maintenance off"]  # switchback.yml: maintenance first; refused, back in service
    first_on_postgresql = next(op[1] for commit in app.commits() if commit["backend"] == "postgresql"
                               for op in commit["ops"] if op[0] == "files")
    message = switchback["failure"]["message"]
    assert "the application wrote to PostgreSQL since the switch" in message, message
    assert f"first differing: {first_on_postgresql}" in message, message
    assert switchback["cutover"]["application_on"] == "postgresql"
    assert lab.recorded()["application"] == "postgresql"


def kill_in_the_final_sync(lab, app):
    """cutover.yml killed with SIGKILL to its process group once its record says the final sync began."""
    process, log = lab.start("cutover.yml", *lab.hooks())
    reached = wait_until(lambda: (lab.recorded() or {}).get("stage") == "final_sync" or process.poll() is not None,
                         timeout=600, interval=0.05)
    assert reached and process.poll() is None, f"the run ended before the final sync:\n{log.read_text()[-3000:]}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert app.in_maintenance() and app.backend() == "sqlite"
    # The load it had started stops once the run's lock session is gone (its lease).
    assert wait_until(lambda: lab.sql(RUN_SESSIONS) == [(0,)], WAIT, 0.1), "the killed run's load or lock outlived it"
    recorded = lab.recorded()
    assert recorded["status"] == "in_progress" and recorded["stage"] == "final_sync"
    assert recorded["maintenance"] == "on" and recorded["application"] == "sqlite"
    return recorded


@pytest.mark.fault(done="`kill -9` of the controller's process group once the final sync began; then cutover.yml "
                        "again",
                   checked="the rerun says first what it found (interrupted at stage final_sync, maintenance on "
                           "since), finishes the cutover and counts the downtime from the first maintenance-on; the "
                           "application on PostgreSQL with every logged commit")
def test_a_cutover_killed_in_the_final_sync_is_finished_by_the_next_run(fresh):
    lab = fresh
    with application_writing(lab, ends_on="postgresql") as app:
        recorded = kill_in_the_final_sync(lab, app)
        result, report = lab.cutover()
        assert result.returncode == 0, result.stdout[-4000:]
    said = next(line for line in result.stdout.splitlines() if "cutover: " in line)
    assert "a cutover was interrupted at stage final_sync" in said, said
    assert f"maintenance on since {recorded['maintenance_since_at']}" in said, said
    assert result.stdout.index(said) < result.stdout.index("Take the migration lock")
    cutover = report["cutover"]
    assert cutover["resumed"] == {"run_id": recorded["last_run_id"], "stage": "final_sync"}
    assert cutover["maintenance_since"] == recorded["maintenance_since_at"]
    assert cutover["downtime_seconds"] >= app.measured_downtime() - 0.05, (cutover, app.measured_downtime())
    assert cutover["application_on"] == "postgresql" and cutover["maintenance"] == "off"
    assert app.stats()["maintenance_seen"] == 1
    assert lab.recorded()["status"] == "completed"


@pytest.mark.fault(done="`kill -9` of the controller's process group once the final sync began; then "
                        "switchback.yml",
                   checked="the application back on SQLite out of maintenance with every logged commit, the target "
                           "restored to its dump from before the cutover, the record removed")
def test_a_cutover_killed_in_the_final_sync_is_undone_by_switchback(fresh):
    lab = fresh
    with application_writing(lab, ends_on="sqlite") as app:
        kill_in_the_final_sync(lab, app)
        result, report = lab.run("switchback.yml")
        assert result.returncode == 0, result.stdout[-4000:]
    assert lab.recorded() is None
    assert "a cutover was interrupted at stage final_sync" in result.stdout
    assert report["status"] == "completed"
    assert report["cutover"]["application_on"] == "sqlite" and report["cutover"]["maintenance"] == "off"
    assert [call["step"] for call in app.hooks_called()] == ["maintenance on", "maintenance on", "maintenance off"]
    assert closing_lines(result)[-2].startswith("Switchback: the application is on SQLite, maintenance off; downtime ")


@pytest.mark.fault(done="`cutover.yml --check` while the stand-in writes; hooks with a token in an argument, a "
                        "URL with a password and a token in its query, an Authorization header",
                   checked="exit 0; no hook called, the application never in maintenance; nothing written (target "
                           "dump, no backup, no record); each hook named with its arguments or URL, every secret "
                           "masked, in the output and the report")
def test_a_check_mode_cutover_while_the_application_writes_calls_no_hook_and_writes_nothing(fresh):
    lab = fresh
    secrets = {"argument": "s3cret-argument", "password": "s3cret-password", "query": "s3cret-query",
               "header": "s3cret-header"}
    maintenance_on = lab.hook("maintenance", "on", "--token", secrets["argument"])
    switch_back = f"http://admin:{secrets['password']}@127.0.0.1:9/switch/sqlite?token={secrets['query']}&x=1"
    with application_writing(lab, ends_on="sqlite") as app:
        backups = set(lab.backups.iterdir())
        result, report = lab.cutover("--check", hooks=lab.hooks(
            cutover_maintenance_on_command=maintenance_on, cutover_switch_back_command=None,
            cutover_switch_back_url=switch_back, cutover_hook_headers={"Authorization": f"Bearer {secrets['header']}"}))
        assert result.returncode == 0, result.stdout[-4000:]
    assert app.hooks_called() == [] and app.stats()["maintenance_seen"] == 0
    assert set(lab.backups.iterdir()) == backups
    assert lab.recorded() is None
    assert "cutover: check mode: would back up the target" in result.stdout
    standin = f"{sys.executable} {STANDIN} --state-dir {lab.state} --pg-port {lab.pgbouncer_port}"
    assert f"maintenance_on: would call command {standin} maintenance on --token ***" in result.stdout
    assert f"switch: would call command {standin} switch postgresql" in result.stdout
    assert "URL http://***@127.0.0.1:9/switch/sqlite?token=***&x=***" in result.stdout
    assert "called with the headers Authorization (values not shown)" in result.stdout
    written = result.stdout + "".join(path.read_text() for path in lab.last_run_dir.iterdir())
    assert [name for name, secret in secrets.items() if secret in written] == []
    assert report["cutover"] is None
