#!/usr/bin/env python3
"""Where the CPU goes: the module's load, the pipeline and DuckDB, per process and per task, in one run.

    python bench/cpu_account.py --files 1000000 --rounds 3
    python bench/cpu_account.py --files 100000 --systems module --engine /tmp/before/module_utils
    python bench/cpu_account.py --files 1000000 --also-engine /tmp/before/module_utils   # both, interleaved

Each round loads the sample into a fresh database of the benchmark's own
server (the pre-data tables, as bench/run.py does) with each system in turn,
then applies the schema's post-data section, and records from /proc
(run.ProcessAccount) the CPU seconds (user + system) of every process: the
system's own (for the module: the process that calls ``migrate()`` and its
worker processes) and PostgreSQL's (the sessions of the database, autovacuum,
the background processes), apart for the load and for the post-data.

The module runs as the runbook runs it (``jobs: 2``, ``post_data: false``,
``integrity_check: quick``) but without Ansible, in a child process whose
stages and worker tasks are wrapped to log their own CPU seconds
(``time.process_time()`` in a worker, ``time.thread_time()`` per thread in
the parent): the source's sha256, PRAGMA quick_check, the foreign keys'
check in SQLite, each table's load (the SQLite query and the COPY it
feeds), and the page and cell checksums the load ends by recording (the
sync of the snapshot it loaded). Prints a table; writes the JSON to
``--results-dir``. Measure with several rounds and compare within a run:
the machine's other work moves wall times, much less CPU seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402 - the benchmark's sample, server, systems and process accounting

# The module's run, in a child process: migrate() with its worker tasks and stages wrapped to log their CPU.
# Arguments: module_utils, the sample, the conninfo (JSON), the task log. A name the engine no longer has is
# left unwrapped (its time stays in the process's total).
MODULE_RUN = """\
import functools, json, os, sys, time
sys.path.insert(0, sys.argv[1])
from sqlite_pg import checks, engine, load, migrate
from sqlite_pg import sync as sync_module
log = open(sys.argv[4], "a", buffering=1)

def note(**entry):
    log.write(json.dumps(entry) + "\\n")

def task(module, name, label):
    original = getattr(module, name, None)
    if original is None:
        return
    @functools.wraps(original)
    def timed(*args, **kwargs):
        started = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            note(task=label(args), pid=os.getpid(), cpu_s=round(time.process_time() - started, 3))
    setattr(module, name, timed)

def step(cls, name, label):
    original = getattr(cls, name, None)
    if original is None:
        return
    @functools.wraps(original)
    def timed(self, *args, **kwargs):
        started = time.thread_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            note(task=label(args), pid=os.getpid(), cpu_s=round(time.thread_time() - started, 3), thread=True)
    setattr(cls, name, timed)

task(checks, "_identity_task", lambda a: "sha256 of the source")
task(checks, "_integrity_task", lambda a: "PRAGMA quick_check")
task(checks, "_table_task", lambda a: f"{a[3].__name__.replace('_', ' ')}: {a[1].name}")
task(load, "_load_task", lambda a: f"load: {a[2].source_table}" + (" (a range)" if a[2].gid else ""))
step(sync_module.Sync, "_scan_table", lambda a: f"page checksums (dbstat, crc32): {a[0].name}")
step(sync_module.Sync, "_narrow_to_cells", lambda a: f"cell digests: {a[0].name}")
step(sync_module.Sync, "_close_state", lambda a: "checksums stored in the state rows")
started = time.monotonic()
result = migrate(sys.argv[2], json.loads(sys.argv[3]), create_tables=False, post_data=False, jobs=2,
                 integrity="quick")
note(task="migrate()", pid=os.getpid(), wall_s=round(time.monotonic() - started, 3))
"""


def load_module_instrumented(ctx: run.Context, database: str, engine: Path, task_log: Path) -> run.Outcome:
    conninfo = {"host": "127.0.0.1", "port": ctx.server.port, "user": "postgres", "dbname": database}
    usage = run.run_processes([[sys.executable, "-c", MODULE_RUN, str(engine), str(ctx.sample.path),
                                json.dumps(conninfo), str(task_log)]],
                              ctx.run_dir / "module.log", ctx.deadline, labels=["module"],
                              server=ctx.server.watch(database))
    return run.Outcome(usage)


def tasks_of(task_log: Path, usage: run.Usage) -> dict:
    """{task: CPU seconds} from the log, plus what the module's processes spent outside the tasks."""
    tasks: dict[str, float] = {}
    inside: dict[int, float] = {}
    for line in task_log.read_text().splitlines():
        entry = json.loads(line)
        if "cpu_s" not in entry:
            continue
        tasks[entry["task"]] = round(tasks.get(entry["task"], 0.0) + entry["cpu_s"], 3)
        inside[entry["pid"]] = inside.get(entry["pid"], 0.0) + entry["cpu_s"]
    for process in usage.processes:
        if process.role in ("module", "worker"):
            label = "the parent process, outside these" if process.role == "module" else "workers, between tasks"
            tasks[label] = round(tasks.get(label, 0.0) + process.cpu_s - inside.get(process.pid, 0.0), 3)
    return tasks


def one_round(ctx: run.Context, name: str, engine: Path) -> dict:
    database = f"account_{name.split()[0]}"
    ctx.server.admin(f'DROP DATABASE IF EXISTS "{database}"')
    ctx.server.admin(f'CREATE DATABASE "{database}" TEMPLATE template0')
    try:
        ctx.server.execute(database, ctx.pre_data)
        ctx.deadline = time.monotonic() + ctx.timeout
        run.progress(f"{name}: loading {ctx.sample.rows:,} rows")
        started = time.monotonic()
        task_log = ctx.run_dir / "tasks.jsonl"
        task_log.unlink(missing_ok=True)
        if name.startswith("module"):
            outcome = load_module_instrumented(ctx, database, engine, task_log)
        else:
            outcome = run.SYSTEMS[name].load(ctx, database)
        loaded = time.monotonic()
        with run.ProcessAccount([], server=ctx.server.watch(database)) as post_data:
            ctx.server.execute(database, ctx.post_data)
        finished = time.monotonic()
        counts = ctx.server.counts(database)
        if counts != ctx.sample.counts:
            raise run.BenchError(f"{name} loaded {counts}, the sample holds {ctx.sample.counts}")
        entry = {"load_average": round(os.getloadavg()[0], 2), "load_s": round(loaded - started, 2),
                 "post_data_s": round(finished - loaded, 2), **outcome.usage.figures(),
                 "post_data_cpu_s": post_data.usage().cpu(server=True)}
        if name.startswith("module"):
            entry["tasks_cpu_s"] = tasks_of(task_log, outcome.usage)
        run.progress(f"{name}: load {entry['load_s']:.1f} s, CPU client {entry['cpu_s']['client']:.1f} s, "
                     f"server {entry['cpu_s']['server']:.1f} s")
        return entry
    finally:
        ctx.server.admin(f'DROP DATABASE IF EXISTS "{database}"')


def medians(rounds: list[dict]) -> dict:
    """Per figure, the median over the rounds (a role or task missing from a round counts 0)."""
    def median_of(key):
        return round(statistics.median(r.get(key, 0.0) for r in rounds), 2)

    summary = {key: median_of(key) for key in ("load_s", "post_data_s", "post_data_cpu_s")}
    summary["cpu_s"] = {side: round(statistics.median(r["cpu_s"][side] for r in rounds), 2)
                        for side in ("client", "server")}
    roles = {role for r in rounds for role in r["processes"]}
    summary["processes"] = {role: {
        "processes": max(r["processes"].get(role, {}).get("processes", 0) for r in rounds),
        "cpu_s": round(statistics.median(r["processes"].get(role, {}).get("cpu_s", 0.0) for r in rounds), 2),
        "peak_rss_mb": max(r["processes"].get(role, {}).get("peak_rss_mb", 0.0) for r in rounds)}
        for role in roles}
    if "tasks_cpu_s" in rounds[0]:
        tasks = {task for r in rounds for task in r["tasks_cpu_s"]}
        summary["tasks_cpu_s"] = {task: round(statistics.median(r["tasks_cpu_s"].get(task, 0.0) for r in rounds),
                                              2) for task in sorted(tasks)}
    return summary


def print_account(results: dict):
    for name, summary in results.items():
        print(f"\n{name}: load {summary['load_s']:.1f} s + post-data {summary['post_data_s']:.1f} s wall; "
              f"CPU s client {summary['cpu_s']['client']:.1f}, server {summary['cpu_s']['server']:.1f}, "
              f"post-data (server) {summary['post_data_cpu_s']:.1f}")
        for role, entry in sorted(summary["processes"].items(), key=lambda item: -item[1]["cpu_s"]):
            print(f"  {role:<22} {entry['processes']:>3} processes {entry['cpu_s']:>8.2f} CPU s "
                  f"{entry['peak_rss_mb']:>8.1f} MB peak RSS (one process)")
        for task, seconds in sorted(summary.get("tasks_cpu_s", {}).items(), key=lambda item: -item[1]):
            print(f"    {task:<52} {seconds:>8.2f} CPU s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--systems", default="pipeline,duckdb,module")
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--engine", type=Path, default=HERE.parent / "module_utils",
                        help="the module_utils directory whose sqlite_pg is measured")
    parser.add_argument("--also-engine", type=Path, default=None,
                        help="another module_utils directory, measured in the same rounds as `module (<path>)`")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    names = [name.strip() for name in args.systems.split(",") if name.strip()]
    engines = {name: args.engine.resolve() for name in names}
    if args.also_engine:
        other = f"module ({args.also_engine})"
        names.append(other)
        engines[other] = args.also_engine.resolve()
    seed = run.sample_script_default_seed() if args.seed is None else args.seed
    sample = run.build_sample(args.data_dir.resolve(), args.files, seed)
    run_dir = Path(tempfile.mkdtemp(prefix="cpu-account-", dir=args.data_dir))
    run_dir.chmod(0o755)
    server = run.Server(Path(run.DEFAULT_PG_BIN), run_dir / "pg", run_dir / "server.log")
    pre_data, post_data = run.schema_sections()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report = {"started_utc": stamp, "machine": run.machine_info(), "engine": str(args.engine.resolve()),
              "also_engine": str(args.also_engine.resolve()) if args.also_engine else None,
              "sample": {"files": sample.files, "rows": sample.rows, "size_bytes": sample.size_bytes},
              "rounds": args.rounds, "runs": {}}
    report["runs"] = {name: [] for name in names}
    try:
        server.start()
        ctx = run.Context(sample, server, run_dir, args.timeout, 0.0, pre_data, post_data, 2, "quick")
        for number in range(args.rounds):
            run.progress(f"round {number + 1} of {args.rounds}")
            for name in names:
                report["runs"][name].append(one_round(ctx, name, engines[name]))
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
    report["machine"]["load_average_after"] = os.getloadavg()
    report["systems"] = {name: medians(runs) for name, runs in report["runs"].items()}
    print_account(report["systems"])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{stamp}-cpu-account-{sample.files}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nload average {report['machine']['load_average_before'][0]:.2f} before, "
          f"{report['machine']['load_average_after'][0]:.2f} after; results: {out}")


if __name__ == "__main__":
    main()
