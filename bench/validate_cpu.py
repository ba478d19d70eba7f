"""CPU accounting of validation's SQLite side: per table, per step of a row's hash, and per column.

    python bench/validate_cpu.py --files 1000000 --rounds 3
    python bench/validate_cpu.py --files 100000 --engine /tmp/old/module_utils  # another version of the engine

Validation reads the source on its own and hashes every row in Python
(checksum.SqliteTable), while PostgreSQL hashes the loaded rows with one SQL
expression. A row's hash is four steps: the row read from SQLite, each value
converted by the migration's rules to its canonical value, the row's
canonical JSON, and its md5; validation then adds the hashes up per bucket of
keys. Each step is measured as one more pass over the table than the step
before it (CPU seconds of this process, median of ``--rounds``), so the
difference between two passes is that step's cost. Per column: the
conversion of every non-NULL value of each column that is not compared as it
is. The target tables and their keys are made from the runbook's schema in
the benchmark's own server: only their catalog is read (the column types
decide the conversions), no row is loaded. Prints one JSON document.
"""

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402 - the benchmark's sample and server


def cpu(function, rounds):
    """Median CPU seconds of ``rounds`` calls of ``function``."""
    spent = []
    for _ in range(rounds):
        started = time.process_time()
        function()
        spent.append(time.process_time() - started)
    return statistics.median(spent)


def passes(table):
    """One pass per step of a row's hash, each doing the steps before it too; the last is validation's own loop."""
    from sqlite_pg.checksum import _encode_json

    canonical = table.canonical_row

    def read():
        for _row in table._rows():
            pass

    def convert():
        for row in table._rows():
            canonical(row)

    def as_json():
        for row in table._rows():
            _encode_json(canonical(row))

    def md5():
        for row in table._rows():
            hashlib.md5(_encode_json(canonical(row)).encode("utf-8", "surrogatepass"), usedforsecurity=False).digest()

    low, _high = table.key_bounds()
    return {"read": read, "convert": convert, "json": as_json, "md5": md5,
            "buckets": lambda: table.bucket_checksums(low or 0, 1000)}


def per_column(lite, spec, rounds):
    """{column: CPU seconds converting its non-NULL values} for the columns not compared as they are."""
    from sqlite_pg.checksum import _KINDS, source_canonicaliser
    from sqlite_pg.names import sqlite_ident

    found = {}
    for column in spec.columns:
        if _KINDS[column.kind].identity is not None:
            continue
        convert = source_canonicaliser(column)
        values = [row[0] for row in lite.execute(
            f"SELECT {sqlite_ident(column.name)} FROM {sqlite_ident(spec.source_name)} "  # noqa: S608
            f"WHERE {sqlite_ident(column.name)} IS NOT NULL")]

        def all_values(convert=convert, values=values):
            for value in values:
                convert(value)
        found[column.name] = {"kind": column.kind, "values": len(values), "cpu_s": round(cpu(all_values, rounds), 3)}
    return found


def account(sample_path, connection, rounds):
    from sqlite_pg.checksum import SqliteTable
    from sqlite_pg.source import Source, read_schema
    from sqlite_pg.validate import describe_table

    lite = Source(str(sample_path)).connect()  # as validation's workers open it
    tables, _notes = read_schema(lite)
    report, totals = {}, {}
    for source_table in tables:
        spec, problem = describe_table(source_table, connection, "public")
        if spec is None:
            raise SystemExit(problem)
        table = SqliteTable(lite, spec)
        rows = table.row_count()
        cumulative = {step: cpu(function, rounds) for step, function in passes(table).items()}
        steps, before = {}, 0.0
        for step, seconds in cumulative.items():
            steps[step] = round(seconds - before, 3)
            before = seconds
            totals[step] = round(totals.get(step, 0.0) + steps[step], 3)
        report[spec.name] = {"rows": rows, "cpu_s": round(before, 3), "steps_cpu_s": steps,
                             "us_per_row": round(before / rows * 1e6, 2) if rows else 0.0,
                             "columns": per_column(lite, spec, rounds)}
    lite.close()
    return report, totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run.engine_and_sample_arguments(parser, files=100000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sample, server = run.engine_and_sample(args, "validate-cpu")
    result = {"engine": str(args.engine), "files": args.files, "rows": sample.rows, "rounds": args.rounds,
              "loadavg_before": os.getloadavg()}
    try:
        server.start()
        server.execute("postgres", "\n".join(run.schema_sections()))
        with server.connection() as connection:
            result["tables"], result["steps_cpu_s"] = account(sample.path, connection, args.rounds)
    finally:
        server.stop()
    result["cpu_s"] = round(sum(result["steps_cpu_s"].values()), 3)
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
