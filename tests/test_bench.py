"""bench/run.py on a tiny sample: the JSON it writes, its row-count check, and
that it stops its own PostgreSQL. No timing is asserted: speed is what the
benchmark reports, not what a test decides."""

import importlib.util
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import processes_with

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "bench" / "run.py"
MODULE = REPO / "library" / "sqlite_to_postgres.py"
TABLES = ("storage_nodes", "files", "tasks", "replication_logs")


@pytest.fixture(scope="module")
def data_dir():
    # In the system's temp directory, not pytest's tmp or the checkout: the
    # server runs as the postgres account, which must traverse every parent
    # (root's pytest directories and a checkout in a private directory are not).
    path = Path(tempfile.mkdtemp(prefix="bench-pytest-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def bench(data_dir, results_dir, *args, **kwargs):
    return subprocess.run([sys.executable, str(HARNESS), "--data-dir", str(data_dir),
                           "--results-dir", str(results_dir), *args],
                          capture_output=True, text=True, timeout=900, **kwargs)


@pytest.fixture(scope="module")
def report(data_dir, tmp_path_factory):
    results_dir = tmp_path_factory.mktemp("results")
    systems = ["pipeline", "module", "duckdb"] + (["pgloader"] if shutil.which("pgloader") else [])
    run = bench(data_dir, results_dir, "--files", "200", "--rounds", "2", "--systems", ",".join(systems))
    assert run.returncode == 0, run.stderr
    written = list(results_dir.glob("*-200.json"))
    assert len(written) == 1, written
    return json.loads(written[0].read_text()), run


def test_report_describes_machine_sample_and_server(report):
    data, _ = report
    assert {"cpu_model", "cores", "memory_mb", "postgresql", "sqlite_cli", "sqlite_library",
            "load_average_before", "load_average_after"} <= set(data["machine"])
    assert data["machine"]["postgresql"].startswith("15.")
    assert data["sample"]["files"] == 200
    with sqlite3.connect(data["sample"]["path"]) as db:
        actual = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}  # noqa: S608
    assert data["sample"]["counts"] == actual == {"storage_nodes": 3, "files": 200, "tasks": 180,
                                                   "replication_logs": 108}
    assert data["sample"]["rows"] == sum(actual.values())
    assert data["server"]["settings"]["wal_level"] == "replica"
    assert data["baseline"] == "pipeline"
    assert data["rounds"] == 2


def systems(data):
    return {entry["system"]: entry for entry in data["systems"]}


def assert_loaded_everything(entry, sample_counts):
    assert entry["status"] == "passed", entry
    assert entry["row_check"]["passed"] is True
    assert {t: c["postgresql"] for t, c in entry["row_check"]["tables"].items()} == sample_counts
    assert len(entry["runs"]) == 2
    for run in entry["runs"]:
        assert {t: c["postgresql"] for t, c in run["row_check"]["tables"].items()} == sample_counts
    for key in ("wall_s", "load_s", "post_data_s", "rows_per_s", "source_mb_per_s", "peak_rss_mb", "peak_pss_mb",
                "speedup_vs_baseline", "peak_rss_process_mb"):
        assert isinstance(entry[key], (int, float)) and entry[key] > 0, key
    for run in entry["runs"]:
        # Each process's CPU and memory, by role; the server's processes apart from the client's.
        assert set(run["cpu_s"]) == {"client", "server"}
        assert run["cpu_s"]["client"] == round(sum(role["cpu_s"] for name, role in run["processes"].items()
                                                   if not name.startswith("postgres ")), 2)
        # A client that lived less than one sampling interval (0.2 s) is not seen: then 0.
        assert run["peak_rss_process_mb"] == max((role["peak_rss_mb"] for name, role in run["processes"].items()
                                                  if not name.startswith("postgres ")), default=0.0)
        assert run["disk_mb"]["target"] > 0 and run["disk_mb"]["wal"] > 0


def test_pipeline_baseline_loads_every_row(report):
    data, _ = report
    pipeline = systems(data)["pipeline"]
    assert_loaded_everything(pipeline, data["sample"]["counts"])
    assert pipeline["speedup_vs_baseline"] == 1.0


def test_module_is_timed_when_present_and_skipped_with_a_reason_otherwise(report):
    data, _ = report
    module = systems(data)["module"]
    if MODULE.exists():
        assert_loaded_everything(module, data["sample"]["counts"])
        for run in module["runs"]:
            # Only the module's own processes count; the controller is reported beside them.
            assert 0 < run["peak_pss_mb"] < run["with_controller_peak_pss_mb"]
            assert run["validate_s"] > 0 and run["validate_peak_pss_mb"] > 0
            # The process Ansible starts on the host, its two workers, and the controller, each apart.
            assert run["processes"]["module"]["processes"] == 1 and run["processes"]["worker"]["processes"] == 2
            assert run["processes"]["controller"]["cpu_s"] > 0 and run["processes"]["module"]["cpu_s"] > 0
            assert run["validate_processes"]["module"]["processes"] == 1
            assert run["backup"]["sqlite_copy_mb"] > 0 and run["backup"]["seconds"] > 0
        assert module["validate_vs_migrate"] > 0
        assert {"module_vs_pipeline", "module_vs_duckdb", "module_vs_faster_peer", "validation_vs_module",
                "module_and_validation_vs_pipeline"} <= set(data["module_ratios"])
    else:
        assert module["status"] == "skipped"
        assert "library/sqlite_to_postgres.py" in module["reason"]


def test_duckdb_loads_every_row(report):
    data, _ = report
    duckdb = systems(data)["duckdb"]
    assert_loaded_everything(duckdb, data["sample"]["counts"])
    assert data["machine"]["duckdb"] == duckdb["runs"][0]["version"]
    assert list(duckdb["runs"][0]["processes"])[0] in ("duckdb", "postgres backend")


@pytest.mark.skipif(not shutil.which("pgloader"), reason="pgloader is not installed")
def test_pgloader_loads_every_row(report):
    data, _ = report
    assert_loaded_everything(systems(data)["pgloader"], data["sample"]["counts"])


def test_run_prints_a_table_and_leaves_no_server_behind(report, data_dir):
    _, run = report
    assert "pipeline" in run.stdout and "peak RSS MB" in run.stdout
    assert processes_with(str(data_dir)) == []
    assert list(data_dir.glob("run-*")) == []


def test_keep_logs_keeps_a_passed_runs_directory_and_stops_its_server(data_dir, tmp_path):
    run = bench(data_dir, tmp_path, "--files", "200", "--systems", "pipeline", "--keep-logs")
    kept = list(data_dir.glob("run-*"))
    try:
        assert run.returncode == 0, run.stderr
        assert len(kept) == 1 and f"logs kept in {kept[0]}" in run.stderr
        assert (kept[0] / "pipeline.log").exists()
        assert "ready to accept connections" in (kept[0] / "server.log").read_text()
        assert processes_with(str(data_dir)) == []
    finally:
        for directory in kept:
            shutil.rmtree(directory)


def test_two_sample_sizes_report_how_time_and_memory_grow(data_dir, tmp_path):
    run = bench(data_dir, tmp_path, "--files", "400,200", "--systems", "pipeline")
    assert run.returncode == 0, run.stderr
    assert len(list(tmp_path.glob("*-200.json"))) == len(list(tmp_path.glob("*-400.json"))) == 1
    (written,) = tmp_path.glob("*-scaling.json")
    scaling = json.loads(written.read_text())
    assert scaling["files"] == [200, 400]
    assert scaling["data_growth"] == round(scaling["rows"][1] / scaling["rows"][0], 2)
    pipeline = scaling["systems"]["pipeline"]
    for figure in ("wall_s", "peak_pss_mb", "peak_rss_process_mb", "disk_mb.target", "disk_mb.wal"):
        assert set(pipeline[figure]["values"]) == {"200", "400"}, figure
    wall = pipeline["wall_s"]["values"]
    assert pipeline["time_growth"] == pipeline["wall_s"]["growth"] == round(wall["400"] / wall["200"], 2)
    assert "wall_s" in run.stdout and "growth of" in run.stdout


def test_unknown_system_is_one_line_and_exit_2(data_dir, tmp_path):
    run = bench(data_dir, tmp_path, "--files", "200", "--systems", "pipeline,bogus")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "bogus" in run.stderr


def interrupted_at_load(data_dir, results_dir, loads, *args, while_loading=lambda: None):
    """The harness stopped by SIGTERM once its ``loads``-th pipeline load began (``while_loading()`` checked
    then); it must exit 130. Returns what it printed to stderr afterwards."""
    process = subprocess.Popen([sys.executable, str(HARNESS), "--data-dir", str(data_dir), "--results-dir",
                                str(results_dir), *args, "--systems", "pipeline"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if sum("pipeline: loading" in seen for seen in lines) == loads:
                break
        assert lines and "pipeline: loading" in lines[-1], "".join(lines)
        while_loading()
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=120) == 130, rest
    finally:
        if process.poll() is None:
            process.kill()
    return rest


def test_interrupt_stops_the_server(data_dir, tmp_path):
    data_dir = data_dir / "interrupted"

    def server_running():
        assert processes_with(str(data_dir)), "the server should be running while loading"

    rest = interrupted_at_load(data_dir, tmp_path, 1, "--files", "20000", while_loading=server_running)
    assert "interrupted" in rest
    assert processes_with(str(data_dir)) == []
    assert list(data_dir.glob("run-*")) == []
    assert list(tmp_path.glob("*.json")) == []


def test_a_larger_size_interrupted_keeps_the_smaller_sizes_report(data_dir, tmp_path):
    interrupted_at_load(data_dir, tmp_path, 2, "--files", "20000,40000", "--rounds", "1,1")  # in the second size
    [report] = tmp_path.glob("*.json")
    assert report.name.endswith("-20000.json")
    assert json.loads(report.read_text())["systems"][0]["status"] == "passed"


def load_harness():
    spec = importlib.util.spec_from_file_location("bench_run", HARNESS)
    harness = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = harness  # dataclasses look their module up while the file executes
    spec.loader.exec_module(harness)
    return harness


def test_a_system_that_loads_too_little_fails_the_row_check(data_dir):
    harness = load_harness()
    sample = harness.build_sample(data_dir, 200, harness.sample_script_default_seed())
    run_dir = data_dir / "short-load"
    run_dir.mkdir(mode=0o755)
    server = harness.Server(Path(harness.DEFAULT_PG_BIN), run_dir / "pg", run_dir / "server.log")

    def load_storage_nodes_only(ctx, database):
        with ctx.server.connection(database) as connection, connection, connection.cursor() as cursor:
            cursor.execute("INSERT INTO storage_nodes (node_id, hostname) VALUES ('node-01', 'storage-1')")
        return harness.Outcome(harness.Usage())

    harness.SYSTEMS["short"] = harness.System(load_storage_nodes_only, description="loads one row")
    try:
        server.start()
        pre_data, post_data = harness.schema_sections()
        ctx = harness.Context(sample, server, run_dir, 60, 0.0, pre_data, post_data, 2, "full")
        (entry,) = harness.run_systems(ctx, ["short"], rounds=1)
    finally:
        server.stop()
    assert entry["status"] == "failed"
    assert "row counts differ" in entry["error"] and "files sqlite=200 postgresql=0" in entry["error"]
    assert entry["runs"][0]["row_check"]["passed"] is False


def test_an_unexpected_error_in_one_system_fails_its_round_and_the_run_goes_on(data_dir, tmp_path):
    harness = load_harness()
    data_dir = data_dir / "unexpected"

    def load_from_a_missing_file(ctx, database):  # an OSError that no system catches
        (ctx.run_dir / "absent.csv").read_text()

    harness.SYSTEMS["broken"] = harness.System(load_from_a_missing_file, description="reads a file that is absent")
    terminate = signal.getsignal(signal.SIGTERM)
    try:
        # Two rounds: the pipeline's second round runs after the broken system's first failed.
        code = harness.main(["--data-dir", str(data_dir), "--results-dir", str(tmp_path), "--files", "200",
                             "--rounds", "2", "--systems", "pipeline,broken"])
    finally:
        signal.signal(signal.SIGTERM, terminate)  # main() points SIGTERM at KeyboardInterrupt
    assert code == 1  # a failed system fails the run, as a failed row check does
    [report] = tmp_path.glob("*-200.json")
    entries = systems(json.loads(report.read_text()))
    assert entries["broken"]["status"] == "failed"
    assert entries["broken"]["error"].startswith("FileNotFoundError: [Errno 2] No such file or directory")
    assert [run["status"] for run in entries["broken"]["runs"]] == ["failed", "failed"]
    assert entries["pipeline"]["status"] == "passed" and len(entries["pipeline"]["runs"]) == 2
    assert processes_with(str(data_dir)) == []  # the server stopped all the same


def test_runbook_row_is_opt_in():
    # The runbook row brings up a lab cluster (root, Patroni, etcd, PgBouncer): only when named.
    harness = load_harness()
    assert "runbook" not in harness.parse_args(["--files", "200"]).systems
    assert harness.parse_args(["--files", "200", "--systems", "runbook"]).systems == ["pipeline", "runbook"]


@pytest.fixture(scope="module")
def bench_server(data_dir):
    """The benchmark's own server (trust on loopback, as the bench runs it), for the tests that load directly."""
    harness = load_harness()
    run_dir = data_dir / "peers"
    run_dir.mkdir(mode=0o755)
    server = harness.Server(Path(harness.DEFAULT_PG_BIN), run_dir / "pg", run_dir / "server.log")
    server.start()
    try:
        yield harness, server, run_dir
    finally:
        server.stop()


def peer_context(harness, server, run_dir, sample):
    pre_data, post_data = harness.schema_sections()
    return harness.Context(sample, server, run_dir, 120, 0.0, pre_data, post_data, 2, "quick")


def test_duckdb_loads_the_sample_exactly(data_dir, bench_server):
    # Row counts are the bench's check; here the runbook's own validation compares every value.
    from sqlite_pg.validate import validate

    harness, server, run_dir = bench_server
    sample = harness.build_sample(data_dir, 200, harness.sample_script_default_seed())
    ctx = peer_context(harness, server, run_dir, sample)
    server.admin('CREATE DATABASE "duckdb_exact" TEMPLATE template0')
    server.execute("duckdb_exact", ctx.pre_data)
    ctx.deadline = harness.time.monotonic() + 120
    harness.load_duckdb(ctx, "duckdb_exact")
    server.execute("duckdb_exact", ctx.post_data)
    result = validate(str(sample.path), {"host": "127.0.0.1", "port": server.port, "user": "postgres",
                                         "dbname": "duckdb_exact"})
    assert result["status"] == "completed", result["msg"]
    assert {table: entry["sqlite_rows"] for table, entry in result["tables"].items()} == sample.counts


def test_duckdb_stops_at_the_first_value_its_type_does_not_match(data_dir, bench_server):
    harness, server, run_dir = bench_server
    sample = harness.build_sample(data_dir, 200, harness.sample_script_default_seed())
    dirty = run_dir / "dirty.db"
    shutil.copyfile(sample.path, dirty)
    with sqlite3.connect(dirty) as db:
        db.execute("UPDATE files SET size_bytes = 'unknown' WHERE id = 7")  # text in a BIGINT column
    db.close()
    ctx = peer_context(harness, server, run_dir, harness.replace(sample, path=dirty))
    (entry,) = harness.run_systems(ctx, ["duckdb"], rounds=1)
    assert entry["status"] == "failed"
    assert "Mismatch Type Error" in entry["error"] and "size_bytes" in entry["error"]
