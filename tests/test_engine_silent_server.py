"""A server whose host falls silent (it dies or drops off the network: no reset, no answer) ends the run in one
line within minutes, whether the run was waiting on it or sending to it, instead of hanging for libpq's and the
kernel's defaults (more than two hours, or about fifteen minutes); see target.LIVENESS_OPTIONS.

Each case runs this file as a script in a network namespace of its own (``unshare -n``, root only), with a
server of its own there; the namespace's loopback going down is the silence.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import running_server, wait_until  # noqa: E402
from sqlite_pg import STATE_TABLE, migrate  # noqa: E402
from test_engine_connection_lost import EXCEPTION_NAME, STREAMING, start_run  # noqa: E402
from test_engine_crash import build  # noqa: E402

# The plan's read of the state rows, which waits for a lock without a lock_timeout (the run's earlier reads of
# that table give up after theirs and go on).
READING_STATE = ("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                 "AND query LIKE 'SELECT table_name, source_id%'")
RUN_BOUND = 300  # seconds the run is given once its server is silent; the options end it in about one


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
        silent_since = time.monotonic()
        try:
            reached = wait_until(lambda: rows(conninfo, READING_STATE if scenario == "waiting" else STREAMING)
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
    return {"reached": bool(reached) and not ended_before, "address": f"{server.host}:{server.port}",
            "seconds_silent": round(time.monotonic() - silent_since, 1),
            "outcome": json.loads(output.read_text()) if output.exists() else None,
            "stderr": output.with_suffix(".stderr").read_text()}


def rows(conninfo, statement):
    connection = psycopg2.connect(**conninfo)
    try:
        cursor = connection.cursor()
        cursor.execute(statement)
        return cursor.fetchall()
    finally:
        connection.close()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")
@pytest.mark.parametrize("scenario", ["waiting", "sending"])
def test_a_server_fallen_silent_ends_the_run_in_one_line(tmp_path, scenario):
    finished = subprocess.run(["unshare", "-n", sys.executable, __file__, str(tmp_path), scenario],
                              capture_output=True, text=True, timeout=RUN_BOUND + 300)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert report["reached"], "the run ended before its server fell silent"
    outcome = report["outcome"]
    assert outcome is not None, f"the run still waited {RUN_BOUND} s after its server fell silent"
    assert outcome["status"] == "failed", report
    message = outcome["msg"]
    assert "\n" not in message and not re.search(r"Traceback", message), message
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


if __name__ == "__main__":
    print(json.dumps(silent_server_run(Path(sys.argv[1]), sys.argv[2])))
