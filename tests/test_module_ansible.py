"""The real module through Ansible: AnsiballZ packaging, pgpass, check mode, no_log, failures."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, break_index_page, file_digests, target_snapshot

BIN = Path(sys.executable).parent  # the virtualenv's ansible, whatever PATH says


def ansible(args, env=None, as_json=True, check=False, module="sqlite_to_postgres"):
    """Run `ansible localhost -m sqlite_to_postgres` from the repository (its ansible.cfg finds library/)."""
    environment = dict(os.environ, ANSIBLE_DEPRECATION_WARNINGS="false", ANSIBLE_NOCOLOR="1", **(env or {}))
    if as_json:
        # JSON alone on stdout: the enabled callbacks replaced, so no profile_tasks timing (ansible.cfg) follows it.
        environment.update(ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
                           ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json")
    command = [str(BIN / "ansible"), "localhost", "-m", module] + args + (["--check"] if check else [])
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    if not as_json:
        return done, None
    output = json.loads(done.stdout)
    return done, output["plays"][0]["tasks"][0]["hosts"]["localhost"]


def module_args(src, conninfo, **extra):
    args = {"src": str(src), "login_host": conninfo["host"], "login_port": conninfo["port"],
            "login_user": conninfo["user"], "login_db": conninfo["dbname"], **extra}
    return ["-a", json.dumps(args)]


def test_module_runs_through_ansible_with_pgpass_and_is_idempotent(sample_db, pg_database, pgpass_file):
    env = {"PGPASSFILE": str(pgpass_file)}

    done, result = ansible(module_args(sample_db, pg_database), env)

    assert done.returncode == 0, done.stdout[-2000:]
    assert result["changed"] is True and result["status"] == "completed"
    assert result["total_tables"] == 4 and result["total_rows"] == 125
    assert {t: e["migrated"] for t, e in result["tables"].items()} == {
        "files": 50, "storage_nodes": 3, "tasks": 45, "replication_logs": 27}

    done, again = ansible(module_args(sample_db, pg_database), env)
    assert done.returncode == 0 and again["changed"] is False and again["total_rows"] == 125


def test_check_mode_through_ansible_writes_nothing(sample_db, pg_database, pgpass_file, tmp_path):
    snapshot = target_snapshot(pg_database)
    progress = tmp_path / "progress.json"

    done, result = ansible(module_args(sample_db, pg_database, progress_file=str(progress)),
                           {"PGPASSFILE": str(pgpass_file)}, check=True)

    assert done.returncode == 0
    assert result["changed"] is True and "nothing was written" in result["msg"]
    assert target_snapshot(pg_database) == snapshot
    assert not progress.exists()


def test_password_never_appears_even_with_vvv(sample_db, pg_database, tmp_path):
    secrets_file = tmp_path / "vault.yml"
    secrets_file.write_text(yaml.safe_dump({"db_password": pg_database["password"]}))
    args = module_args(sample_db, pg_database)
    args[1] = json.dumps(dict(json.loads(args[1]), login_password="{{ db_password }}"))

    done, _ = ansible(args + ["-e", f"@{secrets_file}", "-vvv"], as_json=False)

    assert done.returncode == 0, done.stdout[-2000:]
    assert "total_rows: 125" in done.stdout
    assert pg_database["password"] not in done.stdout + done.stderr

    wrong = "Not-The-Right-Pa55word"
    secrets_file.write_text(yaml.safe_dump({"db_password": wrong}))
    done, _ = ansible(args + ["-e", f"@{secrets_file}", "-vvv"], as_json=False)
    assert done.returncode != 0
    assert "password authentication failed" in done.stdout + done.stderr
    assert wrong not in done.stdout + done.stderr


def test_failure_is_one_line_and_non_zero(tmp_path, pg_database, pgpass_file):
    missing = tmp_path / "missing.db"

    done, result = ansible(module_args(missing, pg_database), {"PGPASSFILE": str(pgpass_file)})

    assert done.returncode != 0
    assert result["failed"] is True and result["status"] == "failed"
    assert result["msg"] == f"source {missing} does not exist"


def test_ansible_doc_shows_the_module():
    done = subprocess.run([str(BIN / "ansible-doc"), "-M", "library", "sqlite_to_postgres"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("src", "jobs", "on_invalid", "max_rejects", "reject_file", "source_timezone", "progress_file",
                   "post_data", "login_password", "tables", "create_tables"):
        assert option in done.stdout


@pytest.mark.parametrize("module", sorted(path.stem for path in (ROOT / "library").glob("*.py")))
def test_every_module_documentation_parses(module):
    done = subprocess.run([str(BIN / "ansible-doc"), "-M", "library", module], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "[ERROR]" not in done.stderr, done.stderr


def test_check_mode_profiles_against_target_ddl_and_leaves_nothing(sample_db, pg_database, pgpass_file):
    ddl = (ROOT / "roles" / "schema_init" / "files" / "postgres_init_schema.sql").read_text()
    ddl = ddl.split("-- section: post-data")[0]
    connection = sqlite3.connect(sample_db)
    connection.execute("UPDATE files SET file_uuid = 'not-a-uuid' WHERE id = 7")
    connection.commit()
    connection.close()
    snapshot = target_snapshot(pg_database)

    done, result = ansible(module_args(sample_db, pg_database, target_ddl=ddl), {"PGPASSFILE": str(pgpass_file)},
                           check=True)

    assert done.returncode != 0
    assert result["failed"] is True and result["status"] == "failed"
    assert result["msg"].startswith("table files, column file_uuid, ") and "'not-a-uuid'" in result["msg"]
    assert len(result["findings"]) == 1 and result["findings"][0] in result["msg"]
    assert "profile" not in result  # its hundreds of lines would bury the message
    assert target_snapshot(pg_database) == snapshot
    done, _ = ansible(module_args(sample_db, pg_database, target_ddl=ddl), {"PGPASSFILE": str(pgpass_file)},
                      as_json=False, check=True)
    assert done.returncode != 0 and result["msg"] in done.stdout
    assert len(done.stdout.splitlines()) < 25, done.stdout


def test_a_copy_of_a_broken_source_fails_in_one_line_and_leaves_no_file(sample_db, tmp_path, pg_database,
                                                                          pgpass_file):
    # An index wider than the one count(*) reads, so that only PRAGMA quick_check meets the broken page.
    with sqlite3.connect(sample_db) as connection:
        connection.execute("CREATE INDEX ix_files_names ON files(filename, original_name, checksum_sha256)")
    connection.close()
    page = break_index_page(sample_db, "ix_files_names")
    digests, dest = file_digests(sample_db), tmp_path / "copy.db"

    done, result = ansible(["-a", json.dumps({"src": str(sample_db), "dest": str(dest)})], module="sqlite_backup")

    assert done.returncode != 0 and result["failed"]
    assert result["msg"].startswith(f"SQLite copy of {sample_db} failed its quick_check: Page {page}: ")
    assert "\n" not in result["msg"]
    assert not dest.exists() and not Path(f"{dest}.partial").exists() and file_digests(sample_db) == digests

    # Without its check (the cutover's copy in the window) the copy is made; the migration that reads it
    # next finds the page and leaves the target as it was.
    done, result = ansible(["-a", json.dumps({"src": str(sample_db), "dest": str(dest), "quick_check": False})],
                           module="sqlite_backup")
    assert done.returncode == 0 and dest.exists(), result
    snapshot = target_snapshot(pg_database)
    done, result = ansible(module_args(dest, pg_database), {"PGPASSFILE": str(pgpass_file)})
    assert done.returncode != 0 and f"fails PRAGMA quick_check: Page {page}: " in result["msg"], result["msg"]
    assert target_snapshot(pg_database) == snapshot
