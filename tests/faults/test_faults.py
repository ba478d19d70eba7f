"""The rollback holds in the events it exists for: each fault done for real on the suite's lab.

Each case starts from an empty target, takes its dump, starts
`ansible-playbook migrate.yml` as an operator would, does the fault at a
moment it observes on the leader (a COPY into a given table, an index build),
then checks what the fault must leave: the target exactly as its dump (a
failed run) or each table loaded or as it was (a killed run), the SQLite
source's sha256, the exit code and the last lines, and that the next normal
run completes and validates.
"""

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import processes_with, wait_until

from faults.lab import ROOT, SAMPLE_FILES, sha256

RELIABILITY_SECTION = (
    "migrate.yml under faults (tests/faults)",
    f"On the suite's own lab cluster (three Patroni members, etcd, PgBouncer; ports 300 above the bundled lab's), with "
    f"a sample of {SAMPLE_FILES:,} files.",
    "Every fault is done for real: signals to the controller's process group, a killed postmaster, a Patroni "
    "switchover, a full filesystem, a paused standby.",
)

# How long a killed run may go on writing: the load checks its lease once a second.
STOP_SECONDS = 15


def start_and_wait_for(lab, source, moment, *args, timeout=240):
    run = lab.migrate(source, *args)
    reached = wait_until(lambda: moment() or run.process.poll() is not None, timeout, 0.1)
    assert reached and run.process.poll() is None, f"the run ended before the fault:\n{run.last_lines()}"
    return run


def assert_stopped_within_seconds(lab):
    started = time.monotonic()
    assert wait_until(lambda: lab.migration_sessions() == 0, STOP_SECONDS, interval=0.2), (
        "the load kept running after its run was gone")
    assert wait_until(lambda: lab.lock_holders() == 0, STOP_SECONDS, interval=0.2), "the run's lock outlived it"
    return time.monotonic() - started


def assert_each_table_loaded_or_as_it_was(lab, counts):
    found = lab.table_counts()
    for table, rows in found.items():
        assert rows in (None, 0, counts[table]), f"{table} holds {rows} of {counts[table]} rows: half a table"
    return found


def assert_failed_and_restored(lab, run, before, source, source_sha, *expected):
    assert run.rc not in (0, None), "the run reported success"
    tail = run.last_lines()
    assert "target restored from" in tail, tail
    for text in expected:
        assert re.search(text, run.output), f"{text!r} not in the output:\n{tail}"
    assert lab.dump() == before, "the target is not as it was before the run"
    assert sha256(source) == source_sha
    assert "Traceback" not in run.output and "Error: " not in tail, tail


def kill_controller(lab, big_source, moment, signum=signal.SIGKILL):
    source, counts = big_source
    source_sha = sha256(source)
    run = start_and_wait_for(lab, source, moment)
    run.signal_group(signum)
    run.wait(timeout=60)
    stopped = assert_stopped_within_seconds(lab)
    left = assert_each_table_loaded_or_as_it_was(lab, counts)
    assert sha256(source) == source_sha
    # The killed load's WAL may still be replaying on the replicas: readiness would wait for it, but this case
    # is about the rerun, not about that wait (test_run_started_while_the_standbys_still_replay).
    lab.wait_healthy()
    rerun = lab.assert_completes(source, counts)
    assert "no backup needed" not in rerun.output
    assert re.search(r"backup: \S+\.pgc", rerun.output), "the rerun took no backup"
    if any(left.values()):
        assert "an earlier run of this source stopped before its validation" in rerun.output, rerun.last_lines()
    return stopped


@pytest.mark.fault(done="`kill -9` of the controller's process group during the first big table's COPY (files)",
                   checked="load stopped, lock released, each table loaded or as it was, source sha256; the rerun "
                           "explains, backs up, completes and validates")
def test_kill_9_of_the_controller_during_the_first_tables_copy(lab, big_source):
    kill_controller(lab, big_source, lambda: lab.loading("files"))


@pytest.mark.fault(done="`kill -9` of the controller's process group during a later table's COPY (tasks)",
                   checked="as above")
def test_kill_9_of_the_controller_during_a_later_tables_copy(lab, big_source):
    kill_controller(lab, big_source, lambda: lab.loading("tasks") or lab.loading("replication_logs"))


@pytest.mark.fault(done="`kill -9` of the controller's process group during the index build (post-data)",
                   checked="the index build rolled back within seconds, tables whole; the rerun builds and validates")
def test_kill_9_of_the_controller_during_the_index_build(lab, big_source):
    kill_controller(lab, big_source, lab.building_indexes)
    # Post-data is one transaction: the killed one left none of its objects, the rerun built them all.
    assert lab.sql("SELECT count(*) FROM pg_indexes WHERE tablename = 'files'")[0][0] > 1


@pytest.mark.fault(done="Ctrl-C (SIGINT to the controller's process group) during the files COPY",
                   checked="as for `kill -9`")
def test_ctrl_c_during_the_load(lab, big_source):
    kill_controller(lab, big_source, lambda: lab.loading("files"), signal.SIGINT)


def leader_fault(lab, big_source, fault, *expected):
    source, counts = big_source
    source_sha = sha256(source)
    before = lab.dump()
    first = lab.leader()
    run = start_and_wait_for(lab, source, lambda: lab.loading("files"))
    fault(first)
    run.wait(timeout=600)
    lab.wait_healthy()
    assert_failed_and_restored(lab, run, before, source, source_sha, *expected)
    lab.assert_completes(source, counts)
    return first


@pytest.mark.fault(done="the leader's postmaster killed (`kill -9`) during the files COPY; Patroni restarts it",
                   checked="the rescue finds the leader again and restores the pre-run dump exactly; exit code, "
                           "last lines, source sha256; the rerun completes")
def test_leader_postmaster_killed_and_restarted_mid_load(lab, big_source):
    leader_fault(lab, big_source, lambda leader: os.kill(lab.postmaster_pid(leader), signal.SIGKILL))


@pytest.mark.fault(done="the leader's postmaster killed during the files COPY with `primary_start_timeout: 0`: "
                        "Patroni fails over to a replica",
                   checked="the rescue restores on the new leader, names it; the target equals its pre-run dump; "
                           "the rerun completes there")
def test_leader_postmaster_killed_with_a_failover_mid_load(lab, big_source):
    leader = lab.leader()
    status, _ = lab.patroni(leader, "/config", "PATCH", {"primary_start_timeout": 0})
    assert status == 200
    try:
        first = leader_fault(lab, big_source, lambda leader: os.kill(lab.postmaster_pid(leader), signal.SIGKILL),
                             r"rollback: the leader is now pg\d \(the run started on pg\d\)")
        assert lab.leader() != first
    finally:
        lab.patroni(lab.leader(), "/config", "PATCH", {"primary_start_timeout": 300})


@pytest.mark.fault(done="a Patroni switchover (`POST /switchover`) during the files COPY",
                   checked="the rescue restores on the new leader; target equals its pre-run dump; the rerun "
                           "completes")
def test_patroni_switchover_mid_load(lab, big_source):
    def switch_over(leader):
        candidate = next(m for m in lab.members if m != leader)
        status, body = lab.patroni(leader, "/switchover", "POST", {"leader": leader, "candidate": candidate},
                                   timeout=60)
        assert status == 200, body

    first = leader_fault(lab, big_source, switch_over, r"rollback: the leader is now pg\d")
    assert lab.leader() != first


@pytest.mark.fault(done="two runs started in the same instant",
                   checked="one completes, the other is refused at the lock naming the holder, touches nothing, and "
                           "writes its report under its own run id")
def test_two_runs_started_together(lab, big_source):
    source, counts = big_source
    runs = [lab.migrate(source, name="together-a"), lab.migrate(source, name="together-b")]
    for run in runs:
        run.wait()
    winners = [r for r in runs if r.rc == 0]
    losers = [r for r in runs if r.rc != 0]
    assert len(winners) == 1 and len(losers) == 1, [r.rc for r in runs]
    assert re.search(r"lock.*held by|another .*run", losers[0].output), losers[0].last_lines()
    ids = [re.search(r"Run (\S+): leader", r.output).group(1) for r in runs]
    assert ids[0] != ids[1]
    reports = sorted(p.name for p in (lab.workdir / "reports").iterdir() if p.name in ids)
    assert reports == sorted(ids), "the refused run's report went into the winner's directory"
    assert lab.table_counts() == counts


@pytest.mark.fault(done="`kill -9` of the controller and of the lock holder itself during the load (a stale lock)",
                   checked="no lock is left behind: the next run, started at once, takes the lock and completes")
def test_stale_lock_after_kill_9_of_its_holder(lab, big_source):
    source, counts = big_source
    run = start_and_wait_for(lab, source, lambda: lab.loading("files"))
    run.signal_group(signal.SIGKILL)
    for pid in processes_with("AnsiballZ_pg_session_lock", f"PGPASSFILE={lab.pgpass}"):  # this lab's holder only
        os.kill(pid, signal.SIGKILL)
    run.wait(timeout=60)
    rerun = lab.assert_completes(source, counts)
    assert "another" not in rerun.output.split("Take the migration lock", 1)[-1][:2000]


@pytest.fixture
def full_filesystem(lab):
    mount = lab.workdir / "full-backups"
    mount.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.fault(done="the backup directory on a full filesystem (a 4 MB tmpfs; the free-space check turned off "
                        "so that the copy really hits ENOSPC)",
                   checked="the run fails in stage backup naming the directory, the target is as before, source "
                           "sha256, exit code")
def test_backup_directory_on_a_full_filesystem(lab, big_source, full_filesystem):
    source, _counts = big_source
    source_sha = sha256(source)
    before = lab.dump()
    run = lab.migrate(source, "-e", f"backup_dir={full_filesystem}", "-e", "readiness_backup_space_factor=0").wait()
    assert run.rc != 0
    tail = run.last_lines()
    assert "backup failed" in tail and "The target was not changed" in tail, tail
    assert re.search(r"[Nn]o space left on device|disk is full", tail), tail
    assert list(full_filesystem.iterdir()) == [], "the partial backup was left on the full filesystem"
    assert lab.dump() == before
    assert sha256(source) == source_sha


@pytest.mark.fault(done="one standby's replay paused (`pg_wal_replay_pause()`, Patroni in maintenance mode so that "
                        "it does not resume it) once the load has begun",
                   checked="the run does not report success while that standby lacks the commit: it fails "
                           "naming it and restores the pre-run dump; exit code, source sha256")
def test_standby_with_paused_replay(lab, big_source):
    source, counts = big_source
    source_sha = sha256(source)
    before = lab.dump()
    leader = lab.leader()
    standby = next(m for m in lab.members if m != leader)
    run = start_and_wait_for(lab, source, lambda: lab.loading("files"), "-e", "replay_wait_timeout=20")
    try:
        # Patroni resumes a paused replay on its next loop unless the cluster is paused.
        assert lab.patroni(leader, "/config", "PATCH", {"pause": True})[0] == 200
        assert wait_until(lambda: lab.cluster().get("pause"), 30, 0.1)
        lab.sql("SELECT pg_wal_replay_pause()", member=standby, dbname="postgres")
        run.wait()
    finally:
        lab.sql("SELECT pg_wal_replay_resume()", member=standby, dbname="postgres")
        lab.patroni(leader, "/config", "PATCH", {"pause": False})
    lab.wait_healthy()
    assert_failed_and_restored(lab, run, before, source, source_sha, rf"\b{standby}\b")
    assert "Validation status: completed" not in run.output


# readiness's largest lag (group_vars: max_replication_lag_bytes)
LAG_LIMIT = 16 * 1024 * 1024


def replay_lags(lab):
    """{standby: bytes of WAL the leader wrote that it has not replayed} (pg_stat_replication)."""
    return dict(lab.sql("SELECT application_name, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint "
                        "FROM pg_stat_replication", dbname="postgres"))


def set_apply_delay(lab, delay):
    """recovery_min_apply_delay on the standbys, through Patroni's dynamic configuration (Patroni puts back
    what ALTER SYSTEM sets); None: the default. Returns the standbys' names."""
    leader = lab.leader()
    standbys = [m for m in lab.members if m != leader]
    body = {"postgresql": {"parameters": {"recovery_min_apply_delay": delay}}}
    assert lab.patroni(leader, "/config", "PATCH", body)[0] == 200
    expected = delay or "0"
    assert wait_until(lambda: all(lab.sql("SHOW recovery_min_apply_delay", member=m, dbname="postgres")[0][0]
                                  == expected for m in standbys), 60, 0.2), f"Patroni did not set {expected}"
    return standbys


def leave_replay_lag(lab):
    """Leave the standbys more than readiness's largest lag behind, their replay held back at a commit: what
    the WAL of a run stopped a moment ago leaves. Returns the standbys' names."""
    standbys = set_apply_delay(lab, "1h")
    lab.sql("CREATE TABLE IF NOT EXISTS lag_filler (t text)", dbname="postgres")
    for _ in range(32):
        lab.sql("INSERT INTO lag_filler SELECT repeat('x', 1000) FROM generate_series(1, 4000)", dbname="postgres")
        if min(replay_lags(lab).values()) > 2 * LAG_LIMIT:
            return standbys
    pytest.fail(f"the standbys kept replaying: {replay_lags(lab)}")


def release_replay(lab):
    set_apply_delay(lab, None)
    lab.sql("DROP TABLE IF EXISTS lag_filler", dbname="postgres")


@pytest.mark.fault(done="a run started while the standbys are more than readiness's largest lag behind (their "
                        "replay held back at a commit by recovery_min_apply_delay), their replay released once "
                        "readiness waits",
                   checked="readiness waits for the lag to drain instead of refusing at once; the run completes and "
                           "validates")
def test_run_started_while_the_standbys_still_replay(lab, big_source):
    source, counts = big_source
    try:
        leave_replay_lag(lab)
        run = lab.migrate(source)
        assert wait_until(lambda: "RETRYING" in run.output or run.process.poll() is not None, 120, 0.2)
        assert run.process.poll() is None, f"readiness did not wait:\n{run.last_lines()}"
        assert re.search(r"readiness: .+ behind the leader, more than 16.00 MB: reading their lag again every 5 s "
                         r"for at most 60 s", run.output), run.last_lines()
    finally:
        release_replay(lab)
    run.wait()
    assert run.rc == 0 and "Validation status: completed" in run.output, run.last_lines()
    assert lab.table_counts() == counts


@pytest.mark.fault(done="a run started while the standbys' replay is held back and stays so",
                   checked="readiness waits the time it is given (10 s), then refuses, naming the standbys, their "
                           "lag and the wait; the target as it was, the source unchanged")
def test_run_started_while_the_standbys_stay_behind(lab, big_source):
    source, _ = big_source
    source_sha = sha256(source)
    before = lab.dump()
    try:
        standbys = leave_replay_lag(lab)
        run = lab.migrate(source, "-e", "replication_lag_wait_seconds=10").wait()
    finally:
        release_replay(lab)
    assert run.rc not in (0, None), run.last_lines()
    refusal = re.search(rf"replay lag above {LAG_LIMIT} bytes \([^)]+\) on (.+) after waiting 10 s for it to drain",
                        run.output)
    assert refusal and sorted(refusal.group(1).split(", ")) == sorted(standbys), run.last_lines()
    assert lab.dump() == before
    assert sha256(source) == source_sha


def files_written_since(bases, started):
    """The files under ``bases`` modified since ``started``; a file that vanishes while they are listed is
    skipped (another process may remove its own files meanwhile)."""
    found = []
    for base in bases:
        for path in base.rglob("*"):
            try:
                if path.is_file() and path.stat().st_mtime >= started:
                    found.append(path)
            except FileNotFoundError:
                continue
    return found


@pytest.mark.fault(done="the whole runbook with `-vvv`, the superuser's password given as POSTGRES_PASSWORD "
                        "(the guide's way), every temporary directory of the run (TMPDIR, Ansible's local, remote and "
                        "async directories) in the case's own folder, the process list sampled every 0.2 s",
                   checked="no password of the lab in the output, in any file the run wrote (reports, backups, "
                           "its temporary directories; the background jobs' results, removed as each job ends, are "
                           "in the output), or in any command line")
def test_no_password_in_output_files_or_process_list(lab, big_source):
    source, counts = big_source
    passwords = lab.passwords()
    # Everything the run writes goes under the case's own folder, so the search reads only that:
    # no shared folder (/tmp, the home directory) is walked.
    scratch = lab.workdir / "leak-search"
    temporary = {name: scratch / name for name in ("tmp", "ansible-local", "ansible-remote", "ansible-async")}
    for directory in temporary.values():
        directory.mkdir(parents=True, exist_ok=True)
    started = time.time()
    run = lab.migrate(source, "-vvv", env={"POSTGRES_PASSWORD": passwords["superuser"],
                                           "TMPDIR": str(temporary["tmp"]),
                                           "ANSIBLE_LOCAL_TEMP": str(temporary["ansible-local"]),
                                           "ANSIBLE_REMOTE_TEMP": str(temporary["ansible-remote"]),
                                           "ANSIBLE_ASYNC_DIR": str(temporary["ansible-async"])})
    command_lines = []
    while run.process.poll() is None:
        command_lines.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)
        time.sleep(0.2)
    assert run.rc == 0, run.last_lines()
    written = files_written_since([lab.workdir / "reports", lab.workdir / "backups", *temporary.values()], started)
    # Each background job's result file is removed once the job has ended; -vvv prints its content in full, in
    # the output searched below, and names where it was.
    assert f"{temporary['ansible-async']}/j" in run.output, "the run's async results went elsewhere"
    assert not list(temporary["ansible-async"].iterdir()), "a background job's result file was left behind"
    haystacks = {"output": run.output, "process list": "\n".join(command_lines)}
    for path in written:
        try:
            haystacks[str(path)] = path.read_bytes().decode("latin-1")
        except FileNotFoundError:
            continue
    leaks = [(user, where) for user, secret in passwords.items() for where, text in haystacks.items()
             if secret in text]
    assert leaks == [], f"passwords found: {leaks}"
    assert lab.table_counts() == counts


@pytest.fixture
def bad_uuid_source(tmp_path):
    path = tmp_path / "bad-uuid.db"
    subprocess.run([sys.executable, str(ROOT / "scripts/make_sample_db.py"), "--out", str(path), "--quiet"],
                   check=True)
    subprocess.run(["sqlite3", str(path), "UPDATE files SET file_uuid = 'not-a-uuid' WHERE id = 7"], check=True)
    return path


@pytest.mark.fault(done="`--check` against an empty target, one source row with `file_uuid = 'not-a-uuid'`",
                   checked="check mode fails naming table, column, rowid and value, before any backup; the target "
                           "is as before, no backup or report written")
def test_check_mode_finds_a_value_the_schema_refuses(lab, bad_uuid_source):
    before = lab.dump()
    source_sha = sha256(bad_uuid_source)
    backups = set((lab.workdir / "backups").glob("*"))
    run = lab.migrate(bad_uuid_source, "--check").wait()
    assert run.rc != 0, run.last_lines()
    assert re.search(r"table files, column file_uuid, rowid 7: value 'not-a-uuid'", run.last_lines()), run.last_lines()
    assert len(run.output.splitlines()) < 400, "the failure printed the whole profile"
    assert lab.dump() == before
    assert sha256(bad_uuid_source) == source_sha
    assert set((lab.workdir / "backups").glob("*")) == backups, "check mode wrote a backup"


@pytest.mark.fault(done="one replica's Patroni and PostgreSQL stopped (within Patroni's TTL, so /cluster still "
                        "lists it) before the run",
                   checked="readiness fails naming the missing member, never reports the cluster ok; nothing "
                           "written")
def test_one_replica_down(lab, big_source):
    source, _counts = big_source
    before = lab.dump()
    replica = next(m for m in lab.members if m != lab.leader())
    patroni_pid = int((lab.root / "run" / f"{replica}.pid").read_text().split()[0])
    os.kill(patroni_pid, signal.SIGKILL)
    os.kill(lab.postmaster_pid_from_disk(replica), signal.SIGKILL)
    try:
        run = lab.migrate(source).wait()
        assert run.rc != 0
        failed = [line for line in run.output.splitlines() if replica in line and "readiness" in line]
        assert failed, run.last_lines()
        assert not re.search(r"Patroni cluster .* ok", run.output), "the cluster was reported ok with a member down"
        assert lab.dump() == before
    finally:
        lab.up()
        lab.wait_healthy()


@pytest.fixture
def changed_source(lab, big_source, tmp_path):
    """A migrated copy of the big source, then changed by the application: (path, counts before, counts after)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from measure_sync import change_rows

    source, counts = big_source
    copy = tmp_path / "fileshare.db"
    shutil.copyfile(source, copy)
    lab.assert_completes(copy, counts)
    change_rows(str(copy), fraction=0.2)  # inserts, updates and deletes in all four tables
    with sqlite3.connect(f"file:{copy}?mode=ro", uri=True) as connection:
        after = {t: connection.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in counts}  # noqa: S608
    return copy, counts, after


@pytest.mark.fault(done="`kill -9` of the controller's process group during a sync, once the sync's transaction has "
                        "written to files, while another session holds the state table in SHARE mode so that the "
                        "transaction is still open (the source had inserted, updated and deleted 20 % of its rows)",
                   checked="the sync stopped, lock released, nothing of it committed (row counts and state rows as "
                           "before); the rerun finishes the sync (Synced: ...) and validates both sides equal")
def test_kill_9_of_the_controller_during_a_sync(lab, changed_source):
    source, before, after = changed_source
    source_sha = sha256(source)
    [(earlier,)] = lab.sql("SELECT DISTINCT source_id FROM sqlite_to_postgres_state")

    def sync_writing_files():
        """A sync session holds the lock its inserts, updates and deletes of files take (one transaction)."""
        rows = lab.try_sql("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                           "WHERE l.relation = to_regclass('files') AND l.mode = 'RowExclusiveLock' "
                           "AND a.application_name LIKE 'sqlite_to_postgres%%'")
        return rows and rows[0][0]

    # The sync writes its state rows last, in the transaction that wrote files: a session holding the state table
    # in SHARE mode keeps that transaction open until the run is gone, so the kill always lands mid-way (without
    # it, the sync could commit in the second the lease takes to notice).
    holder = lab.connect()
    holder.autocommit = False
    holder.cursor().execute("LOCK TABLE sqlite_to_postgres_state IN SHARE MODE")
    try:
        run = start_and_wait_for(lab, source, sync_writing_files)
        run.signal_group(signal.SIGKILL)
        run.wait(timeout=60)
        assert_stopped_within_seconds(lab)
    finally:
        holder.rollback()
        holder.close()
    unfinished = lab.sql("SELECT count(*) FROM sqlite_to_postgres_state WHERE source_id = %s", (earlier,))[0][0]
    assert unfinished > 0, "the sync had finished before the kill: nothing was killed mid-way"
    assert lab.table_counts() == before, "part of the sync's transaction committed"
    assert sha256(source) == source_sha
    rerun = lab.assert_completes(source, after)
    assert "Synced: " in rerun.output, rerun.last_lines()
