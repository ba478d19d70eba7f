"""Scheduled runs: scripts/scheduled-run under ansible-runner, its exit codes, and the JUnit file of every run.

Most cases run against the plain PostgreSQL of tests/test_runbook_plain.py
(one server, no Patroni). The last one brings up a lab cluster of its own
(inventory/lab with every port LAB_PORT_SHIFT higher, its own lab_root,
torn down at the end) and runs the runbook from the runner/ private data
directory with ansible-runner, as a systemd timer does.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import psycopg2
import pytest
import yaml
from test_runbook_plain import GUIDE_VARIABLES, LOCK_KEY, PASSWORD, Workspace, free_port, server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = ROOT / "scripts" / "scheduled-run"
# Above the other lab tests' shifts (100, 200, 300) and Molecule's (500).
LAB_PORT_SHIFT = int(os.environ.get("SCHEDULED_RUN_LAB_PORT_SHIFT", "400"))
LAB_PROGRAMS = ("/usr/bin/etcd", "/usr/bin/patroni", "/usr/sbin/pgbouncer", "/usr/lib/postgresql/15/bin/postgres")


def load_wrapper():
    loader = importlib.machinery.SourceFileLoader("scheduled_run", str(WRAPPER))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("scheduled_run", loader))
    loader.exec_module(module)
    return module


def scheduled_run(cwd: Path, inventory: Path, *extra, env=None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in GUIDE_VARIABLES}
    environment.update(PWD=str(cwd), **(env or {}))
    return subprocess.run([sys.executable, str(WRAPPER), "--inventory", str(inventory),
                           "--artifact-dir", str(cwd / "artifacts"), *extra],
                          cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)


def junit(run_dir: Path) -> dict:
    """{suite: {case name: (outcome, message)}} of a run's junit.xml."""
    root = ElementTree.parse(run_dir / "junit.xml").getroot()
    assert root.tag == "testsuites"
    suites = {}
    for suite in root.iter("testsuite"):
        cases = {}
        for case in suite.iter("testcase"):
            failure, skipped, out = case.find("failure"), case.find("skipped"), case.find("system-out")
            cases[case.get("name")] = (("failure", failure.get("message")) if failure is not None
                                       else ("skipped", skipped.get("message")) if skipped is not None
                                       else ("passed", out.text))
        assert int(suite.get("tests")) == len(cases)
        suites[suite.get("name")] = cases
    return suites


def plain_run(workspace: Workspace, *extra):
    return scheduled_run(workspace.path, workspace.inventory, "-e", f"fileshare_db_name={workspace.db}",
                         "-e", f"backup_dir={workspace.backups}", "-e", f"report_dir={workspace.reports}",
                         "-e", "sqlite_path=fileshare.db", *extra,
                         env={"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")})


@pytest.fixture
def workspace(server, tmp_path, request):  # noqa: F811 - the plain server fixture imported above
    return Workspace(server, tmp_path, "sched_" + uuid.uuid4().hex[:12])


def test_exit_codes_follow_the_report():
    wrapper = load_wrapper()
    assert wrapper.exit_code({"status": "completed"}, 0) == 0
    assert wrapper.exit_code({"status": "completed"}, 2) == 1
    assert wrapper.exit_code({"status": "failed", "failure": {"lock_held": False}}, 2) == 1
    assert wrapper.exit_code(None, 0) == 1
    assert wrapper.exit_code({"status": "drift"}, 2) == 2
    assert wrapper.exit_code({"status": "failed", "failure": {"lock_held": True}}, 2) == 3


def test_a_failing_post_check_is_a_junit_failure_and_exit_1(workspace):
    # An application URL that answers nothing fails the post-migration checks, after the validation.
    old_runs = [workspace.reports / f"2020010{day}T000000Z-old-0000000{day}" for day in (1, 2, 3)]
    for old in old_runs:
        old.mkdir(parents=True)
    result = plain_run(workspace, "-e", f"fileshare_api_url=http://127.0.0.1:{free_port()}", "-e", "report_keep=2")
    assert result.returncode == 1, result.stdout[-3000:]
    assert result.stdout.rstrip().splitlines()[-1].startswith("scheduled-run: the run failed (exit 1); report ")
    # the newest two runs are kept: this one and the newest older one
    assert sorted(path.name for path in workspace.reports.iterdir())[0] == old_runs[-1].name
    [run_dir] = [path for path in workspace.reports.iterdir() if path not in old_runs]
    assert len(list(workspace.reports.iterdir())) == 2
    suites = junit(run_dir)
    assert {name: outcome for name, (outcome, _) in suites["validation"].items() if name.startswith("table ")} == {
        "table files": "passed", "table storage_nodes": "passed", "table tasks": "passed",
        "table replication_logs": "passed"}
    failures = {name: message for name, (outcome, message) in suites["post_checks"].items() if outcome == "failure"}
    assert len(failures) == 1, suites["post_checks"]
    assert "Connection refused" in next(iter(failures.values()))
    assert suites["readiness"]["migration lock"] == ("passed", "held by this run")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "failed" and report["failure"]["lock_held"] is False
    assert [c for c in report["checks"] if c["status"] == "failed"][0]["suite"] == "post_checks"
    # the run's output ends with its summary: what failed, what was rolled back, where the report is
    closing = [line for line in result.stdout.splitlines() if line.strip()]
    report_line = max(i for i, line in enumerate(closing) if line.lstrip().startswith("Report: "))
    assert closing[report_line - 2].lstrip().startswith("FAILED in stage post_checks")
    assert closing[report_line - 1].lstrip().startswith("Rollback: target restored from")
    assert closing[report_line + 1].startswith("PLAY RECAP")
    assert PASSWORD not in result.stdout + (run_dir / "junit.xml").read_text()


def test_a_run_refused_by_the_lock_exits_3_and_touches_nothing(workspace):
    before = workspace.snapshot()
    holder = psycopg2.connect(host="127.0.0.1", port=workspace.server["port"], user="postgres", password=PASSWORD,
                              dbname=workspace.db)
    try:
        holder.autocommit = True
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        result = plain_run(workspace)
    finally:
        holder.close()
    assert result.returncode == 3, result.stdout[-3000:]
    assert "scheduled-run: another run holds the migration lock; this run touched nothing (exit 3)" in result.stdout
    assert workspace.snapshot() == before
    assert not workspace.backups.exists()
    [run_dir] = workspace.reports.iterdir()
    assert json.loads((run_dir / "report.json").read_text())["failure"]["lock_held"] is True
    [(name, (outcome, message))] = junit(run_dir)["readiness"].items()
    assert outcome == "failure" and "a migration is already running" in message


# The lab ---------------------------------------------------------------------------------


def shifted_lab_inventory(directory: Path, lab_root: Path) -> None:
    hosts = yaml.safe_load((ROOT / "inventory/lab/hosts.yml").read_text())
    for group in hosts["all"]["children"].values():
        for host in group["hosts"].values():
            for key in [key for key in host if key.endswith("_port")]:
                host[key] += LAB_PORT_SHIFT
    settings = yaml.safe_load((ROOT / "inventory/lab/group_vars/all.yml").read_text())
    settings.update(lab_root=str(lab_root), patroni_scope=lab_root.name, pg_pgpass_file=str(lab_root / "pgpass"))
    (directory / "group_vars").mkdir(parents=True)
    (directory / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
    (directory / "group_vars/all.yml").write_text(yaml.safe_dump(settings, sort_keys=False))


@pytest.mark.skipif(os.geteuid() != 0, reason="the lab starts its daemons as postgres with runuser: needs root")
@pytest.mark.skipif(not all(Path(program).exists() for program in LAB_PROGRAMS),
                    reason="etcd, Patroni, PgBouncer or PostgreSQL 15 not installed")
def test_ansible_runner_migrates_the_lab_and_reports_in_junit(tmp_path):
    lab_root = Path("/var/tmp") / f"fileshare-lab-scheduled-{uuid.uuid4().hex[:8]}"
    inventory = tmp_path / "inventory"
    shifted_lab_inventory(inventory, lab_root)
    playbook = [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory),
                str(ROOT / "playbooks/lab.yml")]
    environment = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    try:
        up = subprocess.run(playbook, env=environment, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout[-3000:]
        subprocess.run([sys.executable, str(ROOT / "scripts/make_sample_db.py"), "--out",
                        str(tmp_path / "fileshare.db"), "--quiet"], check=True)
        result = scheduled_run(tmp_path, inventory, "-e", f"sqlite_path={tmp_path / 'fileshare.db'}",
                               "-e", f"backup_dir={tmp_path / 'backups'}", "-e", f"report_dir={tmp_path / 'reports'}",
                               env={"PGPASSFILE": str(lab_root / "pgpass")})
    finally:
        down = subprocess.run([*playbook, "-e", "lab_state=absent"], env=environment, capture_output=True, text=True,
                              timeout=600)
        shutil.rmtree(lab_root, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-4000:]
    assert down.returncode == 0, down.stdout[-3000:]
    assert "check mode" not in result.stdout.lower()
    # ansible-runner kept its own record of the run
    [artifact] = (tmp_path / "artifacts").iterdir()
    assert (artifact / "rc").read_text().strip() == "0"
    [run_dir] = (tmp_path / "reports").iterdir()
    suites = junit(run_dir)
    assert set(suites) == {"readiness", "validation", "post_checks"}
    outcomes = {outcome for cases in suites.values() for outcome, _ in cases.values()}
    assert outcomes == {"passed", "skipped"}, suites
    assert suites["readiness"]["Patroni cluster"][1].count("replica running lag 0 bytes") == 2
    assert {"table files", "table storage_nodes", "table tasks", "table replication_logs",
            "standbys replayed the run"} <= set(suites["validation"])
    assert suites["post_checks"]["replication lag"][1].count(" bytes / ") == 2
    # the summary closes the run: the last lines before the recap
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    recap = max(i for i, line in enumerate(lines) if line.startswith("PLAY RECAP"))
    assert lines[recap - 1].startswith("Report: ") and lines[recap - 2] == "=" * 60
    assert "✓ replication_logs: SQLite=27, PostgreSQL=27" in lines[recap - 3]
