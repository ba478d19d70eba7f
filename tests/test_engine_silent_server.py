"""A server whose host falls silent (it dies or drops off the network: no reset, no answer) ends the run in one
line within minutes, whether the run was waiting on it or sending to it, instead of hanging for libpq's and the
kernel's defaults (more than two hours, or about fifteen minutes); and the server, which hears nothing either,
ends the run's sessions and lets their locks go (target.LIVENESS_OPTIONS and SERVER_LIVENESS), as it ends the
session of the runbook's lock holder (library/pg_session_lock.py).

Each case runs this file as a script in a network namespace of its own (``unshare -n``, root only), with a
server of its own there; the namespace's loopback going down is the silence.
"""

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, running_server, wait_until  # noqa: E402
from sqlite_pg import STATE_TABLE, migrate  # noqa: E402
from test_engine_connection_lost import EXCEPTION_NAME, STREAMING, start_run  # noqa: E402
from test_engine_crash import build, query  # noqa: E402

# The plan's read of the state rows, which waits for a lock without a lock_timeout (the run's earlier reads of
# that table give up after theirs and go on).
READING_STATE = ("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                 "AND query LIKE 'SELECT table_name, source_id%'")
RUN_SESSIONS = "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'sqlite_to_postgres%'"
RUN_BOUND = 300  # seconds the run is given once its server is silent; the options end it in about one
SERVER_BOUND = 180  # seconds the server is given, once the run ended, to end the run's sessions
IN_A_NAMESPACE = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                    reason="needs root and unshare(1)")


def silent_server_run(workdir, scenario):
    """In the namespace: a run that is ``waiting`` on its server (a lock; its query sent and acknowledged) or
    ``sending`` to it (a COPY streaming), and then the silence. Returns what the test checks."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with running_server() as server:
        conninfo = server.conninfo()
        src = workdir / "source.db"
        build(src)
        if scenario == "waiting":
            migrate(str(src), conninfo, jobs=1)
            holder = server.connect(autocommit=False)  # a session in the way of the rerun's plan
            holder.cursor().execute(f"LOCK TABLE {STATE_TABLE} IN ACCESS EXCLUSIVE MODE")
        output = workdir / "outcome.json"
        run = start_run(src, conninfo, output)
        try:
            reached = wait_until(lambda: query(conninfo, READING_STATE if scenario == "waiting" else STREAMING)
                                 or run.poll() is not None, timeout=120)
            ended_before = run.poll() is not None
            subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
            silent_since = time.monotonic()
            run.wait(timeout=RUN_BOUND)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        seconds_silent = round(time.monotonic() - silent_since, 1)
        # The run's sessions, seen from the server's side through its Unix socket: nothing told the server that
        # their client is gone, so they hold their locks until the server finds out by itself.
        local = dict(conninfo, host=server.directory)
        server_let_go = wait_until(lambda: not query(local, RUN_SESSIONS), timeout=SERVER_BOUND) is not None
        server_seconds = round(time.monotonic() - silent_since, 1)
    return {"reached": bool(reached) and not ended_before, "address": f"{server.host}:{server.port}",
            "seconds_silent": seconds_silent, "server_let_go": server_let_go, "server_seconds": server_seconds,
            "outcome": json.loads(output.read_text()) if output.exists() else None,
            "stderr": output.with_suffix(".stderr").read_text()}


def silent_lock_holder():
    """In the namespace: the runbook's lock holder holds its advisory lock, and then the silence. Returns whether
    and when the server let the lock go."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    spec = importlib.util.spec_from_file_location("pg_session_lock", ROOT / "library" / "pg_session_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with running_server() as server:
        params = {"login_host": server.host, "login_port": server.port, "login_user": server.user,
                  "login_password": server.password, "login_db": "postgres", "ssl_mode": "prefer", "ca_cert": None,
                  "application_name": "migration lock", "key": 1234, "max_hold_seconds": 3600}
        report = module.start_holder(params, os.getpid())  # held while this process lives
        try:
            subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
            silent_since = time.monotonic()
            local = dict(server.conninfo(), host=server.directory)
            server_let_go = wait_until(lambda: not query(local, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"),
                                       timeout=SERVER_BOUND) is not None
            server_seconds = round(time.monotonic() - silent_since, 1)
        finally:
            if report.get("holder_pid"):
                with contextlib.suppress(ProcessLookupError):  # it may have given up by itself
                    os.kill(report["holder_pid"], signal.SIGKILL)
    return {"acquired": report.get("acquired"), "server_let_go": server_let_go, "server_seconds": server_seconds}


@IN_A_NAMESPACE
@pytest.mark.parametrize("scenario", ["waiting", "sending"])
def test_a_server_fallen_silent_ends_the_run_in_one_line(tmp_path, scenario):
    finished = subprocess.run(["unshare", "-n", sys.executable, __file__, str(tmp_path), scenario],
                              capture_output=True, text=True, timeout=RUN_BOUND + 300)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert report["reached"], "the run ended before its server fell silent"
    assert report["server_let_go"], f"the server still held the run's sessions {SERVER_BOUND} s after the run ended"
    outcome = report["outcome"]
    assert outcome is not None, f"the run still waited {RUN_BOUND} s after its server fell silent"
    assert outcome["status"] == "failed", report
    message = outcome["msg"]
    assert "\n" not in message and not EXCEPTION_NAME.search(message), message
    assert not EXCEPTION_NAME.search(report["stderr"]), report["stderr"]
    lost = f"the connection to {report['address']} was lost while"
    causes = "(server restart, failover or network)"
    if scenario == "waiting":
        assert message == f"{lost} the target was read {causes}"
    else:
        # alpha had committed; the undo cannot reach the server either, so it says what is left and what to do.
        assert message.startswith(f"table zeta: {lost} the table was loading {causes}; what this run wrote "
                                  "could not be undone (the server did not accept a connection for 30 s "), message
        assert message.endswith("tables alpha are left as loaded (each table complete, with its state row); "
                                "the runbook's rollback restores the backup, and a rerun continues with what is "
                                "missing"), message


@IN_A_NAMESPACE
def test_a_server_fallen_silent_lets_the_runbook_lock_go(tmp_path):
    finished = subprocess.run(["unshare", "-n", sys.executable, __file__, str(tmp_path), "holding"],
                              capture_output=True, text=True, timeout=SERVER_BOUND + 300)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert report["acquired"], report
    assert report["server_let_go"], f"the server still held the lock {SERVER_BOUND} s after its holder fell silent"


if __name__ == "__main__":
    workdir, scenario = Path(sys.argv[1]), sys.argv[2]
    print(json.dumps(silent_lock_holder() if scenario == "holding" else silent_server_run(workdir, scenario)))
