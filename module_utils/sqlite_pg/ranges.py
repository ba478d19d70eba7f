"""One table in several sessions: rowid ranges loaded in parallel, committed together by two-phase commit.

A table whose rowids span at least RANGE_MIN_ROWS is split into ``jobs``
ranges of equal rowid width; each range streams in its own worker and session
(loader.py) and ends with ``PREPARE TRANSACTION`` instead of a commit: its rows
are on disk but invisible, as if nothing had happened. Once every range of the
table is prepared, the run commits the table's state row naming the ranges'
transactions (the decision), then ``COMMIT PREPARED`` each. Whatever stops the
run, a prepared transaction is resolved by that decision alone: committed when
a state row names it, rolled back otherwise. The run resolves its own on any
failure (undo.py); a run that was killed leaves them to the next run, which
resolves them first (they hold a lock on their table). So a table is, at any
moment, loaded or as it was; only between the decision and the last ``COMMIT
PREPARED`` (a few milliseconds) may a reader see part of it, and whoever
resolves next completes it.
"""

import dataclasses
import hashlib
import json
import time

import psycopg2
from psycopg2 import sql

from .rules import mixed_reason
from .target import APPLICATION_NAME, STATE_TABLE

# Ranges cost a session each, the fsyncs of the prepared transactions and of the decision, and COPY
# without FREEZE (no range can truncate the shared table): measured on the 20k-file sample (files
# 20,000 rows, about a second to stream), ranges made the load slower, so only tables that stream for
# several seconds are split.
RANGE_MIN_ROWS = 100_000
# Whole tables, dispatched largest first, already keep `jobs` workers busy unless one table is most of the
# load: a table is split only when it is more than RANGE_DOMINANCE times its even share (1/jobs) of what the
# run loads (by rows times columns). On the 1M-file sample, files (about half of it) in two ranges took the
# load from 28 to 42 s on two cores: each stream's server work grows without FREEZE and with two sessions
# extending one table, and whole tables left no core idle to gain.
RANGE_DOMINANCE = 1.5
# A range's COPY waits at most this long for a lock. The one wait that can occur in a migration is on
# a row of another range of the same table with the same key (a duplicate in a unique column): that
# range is prepared and waits for this one, so without a bound both would wait forever.
RANGE_LOCK_WAIT = "10s"
PREPARE_WAIT_SECONDS = 5  # how long a resolution waits for PREPAREs still running in a dead run's sessions
UNDEFINED_OBJECT = "42704"  # COMMIT/ROLLBACK PREPARED of a transaction someone else resolved meanwhile


def schema_prefix(schema):
    """What every prepared transaction of a load into ``schema`` (of this database) is named by first."""
    return f"{APPLICATION_NAME} {hashlib.sha256(schema.encode()).hexdigest()[:12]} "


def range_gid(prefix, table, number, count):
    """The name of one range's prepared transaction: run prefix, range, table (at most 200 bytes)."""
    return f"{prefix}{number}/{count} {table}"


def split(plan, rowid, low, high, count, slots, prefix):
    """``count`` LoadPlans of one table, each the rows with ``low + k*width <= rowid < low + (k+1)*width``.

    Each range has its own WHERE, so its COPY line N is row N of its own query: the loader maps a
    refused line back to its rowid with that same WHERE. The table's query ends with its WHERE
    (copyplan.load_plan), so the bound is appended to both.
    """
    edges = [low + (high - low + 1) * k // count for k in range(count)] + [high + 1]
    plans = []
    for number, slot in zip(range(count), slots):
        bound = f"{rowid} >= ? AND {rowid} < ?"
        plans.append(dataclasses.replace(
            plan, index=slot, select_sql=f"{plan.select_sql} AND {bound}", where_sql=f"{plan.where_sql} AND {bound}",
            parameters=plan.parameters + (edges[number], edges[number + 1]),
            gid=range_gid(prefix, plan.target_table, number + 1, count)))
    return plans


def prepared_slots(connection):
    """How many more prepared transactions the server accepts now, and its max_prepared_transactions."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('max_prepared_transactions')::int, count(*) FROM pg_prepared_xacts")
        limit, used = cursor.fetchone()
    connection.commit()
    return limit - used, limit


def finish(connection, gids, commit):
    """COMMIT (or ROLLBACK) PREPARED each of ``gids``; one resolved meanwhile by another session is skipped."""
    if not gids:
        return
    statement = "COMMIT PREPARED {}" if commit else "ROLLBACK PREPARED {}"
    connection.autocommit = True  # neither may run inside a transaction block
    try:
        with connection.cursor() as cursor:
            for gid in gids:
                try:
                    cursor.execute(sql.SQL(statement).format(sql.Literal(gid)))
                except psycopg2.Error as error:
                    if getattr(error, "pgcode", None) != UNDEFINED_OBJECT:
                        raise
    finally:
        if not connection.closed:
            connection.autocommit = False


def resolve(connection, schema, prefix):
    """Commit the prepared transactions named by ``prefix`` that a state row records, roll back the others.

    Returns (tables committed, tables rolled back), each sorted. First waits (briefly) for PREPAREs
    still running in the sessions of a run that just died, so none appears after the listing.
    """
    deadline = time.monotonic() + PREPARE_WAIT_SECONDS
    with connection.cursor() as cursor:
        while True:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state = 'active' "
                           "AND query LIKE 'PREPARE TRANSACTION %%' AND strpos(query, %s) > 0", (prefix,))
            if not cursor.fetchone()[0] or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        cursor.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database() "
                       "AND starts_with(gid, %s) ORDER BY gid", (prefix,))
        gids = [row[0] for row in cursor.fetchall()]
        decided = set()
        state = sql.Identifier(schema, STATE_TABLE).as_string(cursor)
        cursor.execute("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'prepared_gids'",
                       (state,))
        if gids and cursor.fetchone():
            cursor.execute(sql.SQL("SELECT g FROM {} s, unnest(s.prepared_gids) g WHERE g = ANY(%s)").format(
                sql.Identifier(schema, STATE_TABLE)), (gids,))
            decided = {row[0] for row in cursor.fetchall()}
    connection.commit()
    finish(connection, [g for g in gids if g in decided], commit=True)
    finish(connection, [g for g in gids if g not in decided], commit=False)

    def tables(chosen):
        return sorted({_table_of(g, schema) for g in chosen})

    return tables(g for g in gids if g in decided), tables(g for g in gids if g not in decided)


def _table_of(gid, schema):
    """The table a range's transaction belongs to: what follows the run's token and the range's number."""
    return gid[len(schema_prefix(schema)):].split(" ", 2)[2]


def pending(connection, schema):
    """The tables of the prepared transactions of loads into ``schema`` (check mode reports them, resolves nothing)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database() "
                       "AND starts_with(gid, %s)", (schema_prefix(schema),))
        found = sorted({_table_of(row[0], schema) for row in cursor.fetchall()})
    connection.commit()
    return found


def mixed_dates(table, outcomes):
    """The message for an 'auto' date column whose ranges saw different kinds of numbers, or ""."""
    kinds = {}
    for outcome in outcomes:
        for label, seen in outcome.get("dates", {}).items():
            for is_julian, value in seen.items():
                kinds.setdefault(label, {}).setdefault(is_julian, value)
    for label, seen in kinds.items():
        if len(seen) == 2:
            column = json.loads(label)[1]
            return (f"table {table}, column {column}: value {seen[False]!r} {mixed_reason(False, seen[True])}; "
                    "nothing of this table was written")
    return ""
