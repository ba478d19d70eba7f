"""Post-data: primary keys, unique and secondary indexes, foreign keys and sequences, after the load.

Indexes build in ``jobs`` parallel sessions; foreign keys are added NOT VALID in
one session, then validated in parallel (VALIDATE CONSTRAINT takes only SHARE
UPDATE EXCLUSIVE on the child, so parallel validations cannot deadlock);
sequences last. What is built is recorded in the run's journal (undo.py), and a
sequence's value is read before it moves, so that a failure puts it back. A
validation that finds a child row without its parent names that row, read
from the target.
"""

import queue
from concurrent.futures import ThreadPoolExecutor

import psycopg2
from psycopg2 import sql

from .errors import MigrationError, shorten
from .target import MAINTENANCE_WORK_MEM, connect, first_line, plan_post_data, sequence_steps

FOREIGN_KEY_VIOLATION = "23503"


def build(conninfo, schema, jobs, steps, journal, built, progress, created):
    """Run ``steps`` (target.Step) phase by phase; ``built`` collects dict(table, kind, name) of each object.

    ``created``: target tables this run created (their objects go with them on undo).
    Raises MigrationError naming the first object that could not be built.
    """
    # One session per parallel builder, kept for every step (a connection costs more than a small index).
    sessions = queue.SimpleQueue()
    opened = []
    try:
        for _ in range(jobs):
            connection = connect(conninfo)
            opened.append(connection)
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SET maintenance_work_mem = %s", (MAINTENANCE_WORK_MEM,))
            sessions.put(connection)

        def run(step):
            connection = sessions.get()
            try:
                return _run_step(connection, schema, step, journal, built, created, conninfo)
            finally:
                sessions.put(connection)

        for phase in (1, 2, 3, 4):
            batch = [s for s in steps if s.phase == phase]
            parallel = jobs if phase in (1, 3) else 1
            with ThreadPoolExecutor(max_workers=parallel) as threads:
                errors = [e for e in threads.map(run, batch) if e]
            if errors:
                more = len(errors) - 1
                raise MigrationError(errors[0] + (f" (and {more} more error{'s' * (more != 1)})" if more else ""))
            progress.write()
    finally:
        for connection in opened:
            connection.close()


def _run_step(connection, schema, step, journal, built, created, conninfo):
    try:
        with connection.cursor() as cursor:
            nullable = []
            if step.kind == "sequence":
                cursor.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(sql.SQL(step.name)))
                journal.sequences.append((step.name, *cursor.fetchone()))
            elif step.kind == "primary key":
                # A primary key makes its columns NOT NULL; dropping it later does not make them nullable again.
                cursor.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                               "AND NOT attisdropped AND NOT attnotnull",
                               (sql.Identifier(schema, step.table).as_string(cursor),))
                nullable = [r[0] for r in cursor.fetchall()]
            cursor.execute(step.statement)
        if step.kind not in ("sequence", "foreign key validation") and step.table not in created:
            journal.objects.append((step.kind, step.table, step.name, nullable))
        built.append({"table": step.table, "kind": step.kind, "name": step.name})
        return ""
    except psycopg2.Error as error:
        if step.foreign_key and getattr(error, "pgcode", None) == FOREIGN_KEY_VIOLATION:
            orphan = _orphan(connection, schema, step)
            if orphan:
                return orphan
        if connection.closed:
            raise
        return f"post-data: {step.kind} {step.name} on {step.table} could not be built: {first_line(error, conninfo)}"


def _orphan(connection, schema, step):
    """'table child, column c, key (id=5): value 99 references a row missing from parent' read from the target."""
    child_columns, parent, parent_columns = step.foreign_key
    child = sql.Identifier(schema, step.table)
    with connection.cursor() as cursor:
        cursor.execute("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                       "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary "
                       "ORDER BY array_position(i.indkey::int2[], a.attnum)", (child.as_string(cursor),))
        key_columns = [r[0] for r in cursor.fetchall()]
        shown = key_columns + list(child_columns)
        match = sql.SQL(" AND ").join(
            sql.SQL("p.{} = c.{}").format(sql.Identifier(pc), sql.Identifier(cc))
            for pc, cc in zip(parent_columns, child_columns))
        present = sql.SQL(" AND ").join(sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(cc)) for cc in child_columns)
        cursor.execute(sql.SQL("SELECT {} FROM {} c WHERE {} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {}) "
                               "LIMIT 1").format(
            sql.SQL(", ").join(sql.SQL("c.{}").format(sql.Identifier(c)) for c in shown), child, present,
            sql.Identifier(schema, parent), match))
        found = cursor.fetchone()
    if not found:
        return ""
    key = found[: len(key_columns)]
    values = found[len(key_columns):]
    where = (" key (" + ", ".join(f"{c}={shorten(v)}" for c, v in zip(key_columns, key)) + ")") if key_columns else ""
    value = shorten(values[0]) if len(values) == 1 else "(" + ", ".join(shorten(v) for v in values) + ")"
    return (f"table {step.table}, column {', '.join(child_columns)},{where or ' a row'}: value {value} references "
            f"a row missing from {parent} ({', '.join(parent_columns)}), found when foreign key {step.name} was "
            "validated")


def plan(pg, schema, tables, sequences_of):
    """The post-data steps for ``tables`` (dicts of target.plan_post_data) and the sequences of the target tables
    ``sequences_of``, with the notes on what cannot be built; read in ``pg``'s session."""
    with pg.cursor() as cursor:
        steps, notes = plan_post_data(cursor, schema, tables)
        steps += sequence_steps(cursor, schema, sequences_of)
    pg.commit()
    return steps, notes
