#!/usr/bin/python
"""Hold a PostgreSQL session advisory lock for the length of a playbook run.

No module of community.postgresql can do this: their connections close when
the task ends, and a session advisory lock dies with its session. This module
starts a small detached process that opens its own connection, takes the lock
with pg_try_advisory_lock() and keeps the session open until it is told to
release it (state=absent), until the ansible-playbook process that started it
is gone (a crashed or killed run never leaves the lock behind), or until
max_hold_seconds have passed. TCP keepalives on both ends make the server drop
the session, and the lock with it, if the controller itself disappears.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from ansible.module_utils.basic import AnsibleModule

try:
    import psycopg2
except ImportError:  # reported by the module
    psycopg2 = None

HOLDER_QUERY = """
SELECT a.pid, a.application_name, coalesce(host(a.client_addr), 'local') AS client,
       to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS TZ') AS since
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %s AND l.objid = %s AND l.objsubid = 1
"""

DOCUMENTATION = r"""
---
module: pg_session_lock
short_description: Hold a PostgreSQL session advisory lock across tasks
description:
  - With O(state=present), starts a detached holder process on the machine
    running the module that connects to PostgreSQL, takes
    C(pg_try_advisory_lock(key)) and keeps its session open.
  - Fails at once, naming the session that holds it, when the lock is taken.
  - The holder exits, and PostgreSQL releases the lock, on O(state=absent),
    when the watched process (by default the ansible-playbook process that
    runs the task) exits, or after O(max_hold_seconds).
  - In check mode it only reports whether the lock is free; nothing is taken.
  - Taking or releasing the lock changes nothing in the database, so the
    module never reports C(changed).
  - Run it on the control node (delegated to C(localhost)) so that the
    ansible-playbook process can be watched.
options:
  state:
    description: V(present) takes the lock, V(absent) releases it.
    type: str
    choices: [present, absent]
    default: present
  key:
    description: The bigint key of the advisory lock.
    type: int
    required: true
  holder_pid:
    description: Process id returned by O(state=present); required for V(absent).
    type: int
  watch_pid:
    description:
      - Process whose end releases the lock. Default is the nearest
        ancestor process running ansible-playbook.
    type: int
  max_hold_seconds:
    description: Upper bound on how long the lock is held.
    type: int
    default: 86400
  application_name:
    description: application_name of the holding session, shown in pg_stat_activity.
    type: str
    default: fileshare-migration-lock
  login_host:
    description: Host of the PostgreSQL server (empty for the local socket).
    type: str
    default: ""
  login_port:
    description: Port of the PostgreSQL server.
    type: int
    default: 5432
  login_user:
    description: Role the holder connects as.
    type: str
    default: postgres
  login_password:
    description: Leave empty to use the pgpass file (PGPASSFILE) or PGPASSWORD.
    type: str
    default: ""
  login_db:
    description: Database whose advisory lock space holds the key.
    type: str
    required: true
  ssl_mode:
    description: libpq C(sslmode) of the holder's connection.
    type: str
    default: prefer
  ca_cert:
    description: CA file that verifies the server's certificate (libpq C(sslrootcert)); empty for none.
    type: str
    default: ""
author:
  - FileShareSystem operations
"""

EXAMPLES = r"""
- name: Take the migration lock
  pg_session_lock:
    key: 4608230915
    login_host: 10.0.0.11
    login_port: 5432
    login_db: fileshare
  delegate_to: localhost
  register: migration_lock

- name: Release the migration lock
  pg_session_lock:
    state: absent
    key: 4608230915
    holder_pid: "{{ migration_lock.holder_pid }}"
    login_db: fileshare
  delegate_to: localhost
"""

RETURN = r"""
acquired:
  description: Whether the lock is held by this run (or, in check mode, is free).
  type: bool
  returned: always
holder_pid:
  description: Process id of the holder process.
  type: int
  returned: when state=present and the lock was taken
backend_pid:
  description: PostgreSQL backend pid of the holding session.
  type: int
  returned: when state=present and the lock was taken
"""


def lock_parts(key):
    """pg_locks shows a bigint advisory key as classid (high half) and objid (low half)."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return str(unsigned >> 32), str(unsigned & 0xFFFFFFFF)


def connect(params):
    kwargs = {
        "dbname": params["login_db"],
        "user": params["login_user"],
        "port": params["login_port"],
        "sslmode": params["ssl_mode"],
        "application_name": params["application_name"],
        # The engine's limits for a silent peer (module_utils/sqlite_pg/target.py: LIVENESS_OPTIONS and
        # SERVER_LIVENESS), which this module does not import the engine for. The server's end matters most here:
        # a controller that vanishes sends nothing, and only the server's own probes let its lock go.
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 60000,
        "options": "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 "
                   "-c tcp_user_timeout=60000",
    }
    if params["login_host"]:
        kwargs["host"] = params["login_host"]
    if params["login_password"]:
        kwargs["password"] = params["login_password"]
    if params["ca_cert"]:
        kwargs["sslrootcert"] = params["ca_cert"]
    conn = psycopg2.connect(**kwargs)
    conn.autocommit = True
    return conn


def describe_holder(cursor, key, where):
    """One line naming the session that holds the lock and how to stop the run behind it."""
    cursor.execute(HOLDER_QUERY, lock_parts(key))
    row = cursor.fetchone()
    if not row:
        return f"another session on {where} (it ended before it could be named: try again)"
    pid, application_name, client, since = row
    return (f"backend pid {pid} ({application_name or 'no application_name'}) from {client}, connected since {since}; "
            f"to stop that run, interrupt its ansible-playbook on {client} (the lock goes with it), "
            f"or end its session with SELECT pg_terminate_backend({pid}) on {where}")


def where_of(params):
    return f"{params['login_host'] or 'local socket'}:{params['login_port']}/{params['login_db']}"


def stat_fields(pid):
    """The fields of /proc/<pid>/stat after the command name (state, parent, ...), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def running_since(pid):
    """The process's start time (which tells a reused pid apart), or None once it has exited: gone, or a
    zombie, which holds no session and runs nothing but stays listed until its parent (for a detached
    holder: init) reaps it, seconds later on some machines."""
    fields = stat_fields(pid)
    return fields[19] if fields and fields[0] not in ("Z", "X") else None


def parent_of(pid):
    fields = stat_fields(pid)
    return int(fields[1]) if fields else 0


def find_playbook_process():
    """The outermost ansible-playbook ancestor: task workers are forks of it
    that carry the same command line but end with each task."""
    found = None
    pid = os.getppid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            break
        if any(os.path.basename(arg) == b"ansible-playbook" for arg in argv[:2]):
            found = pid
        pid = parent_of(pid)
    return found


def hold(params, watch_pid, report_fd):
    """Body of the detached holder: take the lock, report, wait, exit."""
    # SIGTERM (the release) stays pending until the wait below takes it, which
    # then ends at once rather than at the next poll.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    watch_started = running_since(watch_pid)
    try:
        conn = connect(params)
        cursor = conn.cursor()
        cursor.execute("SELECT pg_try_advisory_lock(%s)", (params["key"],))
        if not cursor.fetchone()[0]:
            report = {"acquired": False, "holder": describe_holder(cursor, params["key"], where_of(params))}
        else:
            report = {"acquired": True, "holder_pid": os.getpid(), "backend_pid": conn.get_backend_pid()}
    except Exception as error:  # any failure goes back to the module as one line
        report = {"acquired": False, "error": " ".join(str(error).split()) or "the lock session could not start"}
    os.write(report_fd, json.dumps(report).encode())
    os.close(report_fd)
    if not report.get("acquired"):
        os._exit(0)
    deadline = time.monotonic() + params["max_hold_seconds"]
    last_ping = time.monotonic()
    while time.monotonic() < deadline:
        if watch_started is None or running_since(watch_pid) != watch_started:
            break
        if time.monotonic() - last_ping > 30:
            try:
                cursor.execute("SELECT 1")
            except psycopg2.Error:
                break
            last_ping = time.monotonic()
        if signal.sigtimedwait({signal.SIGTERM}, 0.5):
            break
    try:
        conn.close()
    finally:
        os._exit(0)


def start_holder(params, watch_pid):
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        # Detach from the module's output so Ansible does not wait for us.
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.chdir("/")
        hold(params, watch_pid, write_fd)
    os.close(write_fd)
    os.waitpid(child, 0)
    chunks = []
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    return json.loads(b"".join(chunks) or b'{"acquired": false, "error": "the lock holder process died"}')


def check_free(module):
    params = module.params
    try:
        conn = connect(params)
        cursor = conn.cursor()
        cursor.execute(HOLDER_QUERY, lock_parts(params["key"]))
        row = cursor.fetchone()
        holder = describe_holder(cursor, params["key"], where_of(params)) if row else None
        conn.close()
    except psycopg2.Error as error:
        module.fail_json(msg=f"cannot check the migration lock on {where_of(params)}: {' '.join(str(error).split())}")
    if holder:
        module.fail_json(msg=f"a migration is already running: advisory lock {params['key']} on {where_of(params)} "
                             f"is held by {holder}", acquired=False)
    module.exit_json(changed=False, acquired=True, msg="the migration lock is free (check mode: not taken)")


def release(module):
    pid = module.params["holder_pid"]
    if not pid:
        module.exit_json(changed=False, acquired=False, msg="no lock holder to release")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            alive = bool(cmdline.read())
    except OSError:
        alive = False
    if alive and not module.check_mode:
        os.kill(pid, signal.SIGTERM)
        for _ in range(40):
            if running_since(pid) is None:
                break
            time.sleep(0.25)
        else:
            module.fail_json(msg=f"the migration lock holder (pid {pid}) did not exit after SIGTERM")
    message = "migration lock released" if alive else "lock holder already gone"
    module.exit_json(changed=False, acquired=False, msg=message)


def main():
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "key": {"type": "int", "required": True},
            "holder_pid": {"type": "int"},
            "watch_pid": {"type": "int"},
            "max_hold_seconds": {"type": "int", "default": 86400},
            "application_name": {"type": "str", "default": "fileshare-migration-lock"},
            "login_host": {"type": "str", "default": ""},
            "login_port": {"type": "int", "default": 5432},
            "login_user": {"type": "str", "default": "postgres"},
            "login_password": {"type": "str", "default": "", "no_log": True},
            "login_db": {"type": "str", "required": True},
            "ssl_mode": {"type": "str", "default": "prefer"},
            "ca_cert": {"type": "str", "default": ""},
        },
        supports_check_mode=True,
    )
    if psycopg2 is None:
        module.fail_json(msg="pg_session_lock needs psycopg2 on the control node")
    if module.params["state"] == "absent":
        release(module)
    if module.check_mode:
        check_free(module)
    watch_pid = module.params["watch_pid"] or find_playbook_process()
    if not watch_pid:
        module.fail_json(msg="pg_session_lock: no ansible-playbook process to watch; run it on the control node "
                             "(delegate_to: localhost) or set watch_pid")
    sys.stdout.flush()
    result = start_holder(module.params, watch_pid)
    where = where_of(module.params)
    if result.get("error"):
        module.fail_json(msg=f"cannot take the migration lock on {where}: {result['error']}", acquired=False)
    if not result["acquired"]:
        module.fail_json(msg=f"a migration is already running: advisory lock {module.params['key']} on {where} "
                             f"is held by {result['holder']}", acquired=False)
    module.exit_json(changed=False, acquired=True, holder_pid=result["holder_pid"], backend_pid=result["backend_pid"],
                     watch_pid=watch_pid, msg=f"migration lock {module.params['key']} taken on {where}")


if __name__ == "__main__":
    main()
