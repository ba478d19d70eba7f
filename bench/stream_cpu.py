"""CPU accounting of the one-pass load: per column of the streamed query, and per run.

    python bench/stream_cpu.py --files 100000              # per column, then 3 runs of each kind
    python bench/stream_cpu.py --files 100000 --no-runs    # per column only
    python bench/stream_cpu.py --files 100000 --no-columns --rounds 1   # one run of each kind
    python bench/stream_cpu.py --engine /tmp/old/module_utils  # another version of the engine

Per column: the CPU seconds SQLite spends on each field of a table's streamed
COPY query (``SELECT max(length(<field>)) FROM t`` less the same over the bare
column), the Python-format pairs beside it, and the whole query fetched as the
load fetches it. Per run: ``migrate()`` in a child process into the bench's own
PostgreSQL (pre-data tables, ``post_data: false``, ``jobs: 2``), alternating
one pass (the default) and ``preflight: true``; client CPU is user + system
time of the child and its workers, PostgreSQL's backends are not counted.
Prints one JSON document.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402 - the benchmark's sample and server

TABLES = ("files", "tasks", "replication_logs")


def cpu(connection, query, repeat):
    """Least CPU seconds of ``repeat`` runs of a one-row query."""
    best = None
    for _ in range(repeat):
        started = time.process_time()
        connection.execute(query).fetchall()
        spent = time.process_time() - started
        best = spent if best is None else min(best, spent)
    return best


def plans(source, pg_connection):
    from sqlite_pg.copyplan import load_plan, streamed_profile
    from sqlite_pg.source import read_table
    from sqlite_pg.target import read_table as read_target

    lite = source.connect()
    found = {}
    with pg_connection.cursor() as cursor:
        for name in TABLES:
            table = read_table(lite, name)
            target = read_target(cursor, "public", name)
            targets = {c.name: target.column(c.name).type for c in table.columns}
            notnull = {c.name for c in table.columns if target.column(c.name).notnull}
            profile = streamed_profile(table, targets, 0, {})
            found[name] = load_plan(index=0, name=name, target_table=name, schema="public", source=table,
                                    profile=profile, column_names={c.name: c.name for c in table.columns},
                                    create_sql="", source_timezone="UTC", source_id="", streamed=True,
                                    notnull=notnull)
    lite.close()
    return found


def per_column(source, table_plans, repeat):
    from sqlite_pg import loader
    from sqlite_pg.names import sqlite_ident

    lite = source.connect(text_as_bytes=True)
    report = {}
    for name, plan in table_plans.items():
        # the numbers SQL cannot format, formatted as the load formats them
        lite.create_function(loader.NUMBER_FUNCTION, 2, loader.NumberFormatter(plan))
        table = plan.table_sql
        columns = {}
        for column, field in zip(plan.copy_sources, plan.sql_fields):
            bare = cpu(lite, f"SELECT max(length({sqlite_ident(column)})) FROM {table}", repeat)  # noqa: S608
            full = cpu(lite, f"SELECT max(length({field})) FROM {table}", repeat)  # noqa: S608
            columns[column] = round(full - bare, 3)
        line = loader.copy_line_sql(plan.sql_fields)  # the line alone, without the fields beside it
        started = time.process_time()
        rows = lite.execute(plan.select_sql)
        while rows.fetchmany(2000):
            pass
        whole = time.process_time() - started
        report[name] = {"columns": columns,
                        "line": round(cpu(lite, f"SELECT max(length({line})) FROM {table}", repeat), 3),  # noqa: S608
                        "query_fetched": round(whole, 3), "fields_beside": len(plan.raw_types)}
    lite.close()
    return report


def one_run(engine, sample, server, database, preflight):
    server.admin(f'DROP DATABASE IF EXISTS "{database}"')
    server.admin(f'CREATE DATABASE "{database}"')
    server.execute(database, run.schema_sections()[0])
    conninfo = {"host": "127.0.0.1", "port": server.port, "user": "postgres", "dbname": database}
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from sqlite_pg import migrate; "
            "migrate(sys.argv[2], eval(sys.argv[3]), create_tables=False, post_data=False, jobs=2, "
            "preflight=sys.argv[4] == 'true')")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code, str(engine), str(sample.path), repr(conninfo),
                    "true" if preflight else "false"], check=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"preflight": preflight, "wall_s": round(wall, 2), "client_cpu_s": round(client, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run.engine_and_sample_arguments(parser, files=100000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="per-column queries: best of this many")
    parser.add_argument("--no-runs", action="store_true")
    parser.add_argument("--no-columns", action="store_true")
    args = parser.parse_args()
    sample, server = run.engine_and_sample(args, "stream-cpu")
    from sqlite_pg.source import Source
    result = {"engine": str(args.engine), "files": args.files, "rows": sample.rows, "loadavg_before": os.getloadavg()}
    try:
        server.start()
        server.execute("postgres", run.schema_sections()[0])
        with server.connection() as connection:
            table_plans = plans(Source(str(sample.path)), connection)
        if not args.no_columns:
            result["per_column"] = per_column(Source(str(sample.path)), table_plans, args.repeat)
        if not args.no_runs:
            result["runs"] = [one_run(args.engine, sample, server, "stream_cpu", preflight)
                              for _ in range(args.rounds) for preflight in (False, True)]
    finally:
        server.stop()
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
