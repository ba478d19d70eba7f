"""The cutover's hooks judged as the role judges them (roles/cutover/tasks/hook.yml), and named with secrets masked.

No lab: a playbook calls hook.yml against a small HTTP server of the test's own
and against commands, and the test reads what the role recorded.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))
SPEC = importlib.util.spec_from_file_location("hook_description",
                                              ROOT / "roles/cutover/filter_plugins/hook_description.py")
hook_description = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(hook_description)


@pytest.mark.parametrize(("url", "shown"), [
    ("https://app1.example.net/admin/db", "https://app1.example.net/admin/db"),
    ("https://admin:pw@app1:8443/switch?token=abc&x=1#frag", "https://***@app1:8443/switch?token=***&x=***"),
    ("http://user@app1/switch?", "http://***@app1/switch"),
])
def test_a_url_keeps_its_host_and_path_and_loses_its_secrets(url, shown):
    assert hook_description.cutover_masked_url(url) == shown


@pytest.mark.parametrize(("argv", "shown"), [
    (["/opt/app/bin/admin", "maintenance", "on", "--wait-idle"], "/opt/app/bin/admin maintenance on --wait-idle"),
    (["admin", "--token", "abc", "on"], "admin --token *** on"),
    (["admin", "--api-key=abc", "PASSWORD=x y", "--password"], "admin --api-key=*** PASSWORD=*** --password"),
    (["curl", "https://u:p@h/x?sig=1"], "curl 'https://***@h/x?sig=***'"),
    (["admin", "two words"], "admin 'two words'"),
])
def test_a_command_keeps_its_arguments_but_not_the_values_of_secret_options(argv, shown):
    assert hook_description.cutover_masked_command(argv) == shown


class Answers(BaseHTTPRequestHandler):
    """POST /<status> answers that status."""

    def do_POST(self):  # noqa: N802 - the name http.server calls
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(int(self.path.strip("/").split("?")[0]))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args):
        pass


@pytest.fixture(scope="module")
def server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call_hooks(tmp_path, steps):
    """Runs hook.yml (not fatal) once per step with the given hook variables; returns what the role recorded."""
    tasks = [{"name": f"Call {name}", "ansible.builtin.include_role": {"name": "cutover", "tasks_from": "hook.yml"},
              "vars": {"__cutover_hook_step": "switch", "__cutover_hook_fatal": False, **hook}}
             for name, hook in steps.items()]
    tasks = [task for name, task in zip(steps, tasks)
             for task in (task, {"name": f"Keep {name}", "ansible.builtin.set_fact": {
                 "recorded": f"{{{{ recorded | combine({{'{name}': cutover_steps.switch}}) }}}}",
                 "cutover_steps": {}}})]
    playbook = tmp_path / "hooks.yml"
    playbook.write_text(yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False,
        "vars": {"migration_run_id": "test", "cutover_steps": {}, "cutover_not_done": [], "recorded": {},
                 "cutover_hook_timeout": 5, "cutover_hook_retry_delay": 0},
        "tasks": tasks + [{"name": "Write", "ansible.builtin.copy": {
            "dest": str(tmp_path / "recorded.json"), "content": "{{ recorded | to_json }}", "mode": "0600"}}]}]))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    done = subprocess.run([ANSIBLE_PLAYBOOK, "-i", "localhost,", "-c", "local", "-e",
                           f"ansible_python_interpreter={sys.executable}", str(playbook)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    return json.loads((tmp_path / "recorded.json").read_text()), done.stdout


def test_a_hook_fails_on_its_status_exit_code_or_silence_and_says_which(tmp_path, server):
    refused = f"http://admin:s3cretpw@127.0.0.1:{closed_port()}/switch?token=t0kenvalue"
    recorded, output = call_hooks(tmp_path, {
        "ok": {"cutover_switch_url": f"{server}/204"},
        "error_500": {"cutover_switch_url": f"{server}/500"},
        "refused": {"cutover_switch_url": refused, "__cutover_hook_retries": 1},
        "exit_3": {"cutover_switch_command": [sys.executable, "-c", "import sys; sys.exit('went wrong')"]},
        "exit_0": {"cutover_switch_command": [sys.executable, "-c", "pass"]},
    })
    assert recorded["ok"]["error"] is None and recorded["ok"]["status"] == 204
    assert recorded["error_500"]["status"] == 500
    assert recorded["error_500"]["error"] == (f"the switch hook failed: URL {server}/500 answered HTTP 500 (accepted: "
                                              "200, 201, 202, 204)")
    assert recorded["refused"]["status"] == -1 and recorded["refused"]["calls"] == 2
    assert "did not answer: " in recorded["refused"]["error"] and "Connection refused" in recorded["refused"]["error"]
    assert recorded["refused"]["hook"].startswith("URL http://***@127.0.0.1:")
    assert recorded["exit_3"]["rc"] == 1 and recorded["exit_3"]["error"].endswith("exited 1: went wrong")
    assert recorded["exit_0"]["error"] is None and recorded["exit_0"]["rc"] == 0
    assert "s3cretpw" not in output and "t0kenvalue" not in output
