"""The load: every table streamed into PostgreSQL by the worker processes, parents first, largest first.

Each table loads in its own transaction with its state row (loader.py); what
commits is recorded in the run's journal, so that a failure of any table puts
back the tables loaded before it (undo.py). A large table is split into
``jobs`` rowid ranges that the workers stream together, committed together by
two-phase commit (ranges.py); the other tables go whole.
"""

import datetime
import secrets
import time
from concurrent.futures import FIRST_COMPLETED, wait

import psycopg2
from psycopg2 import sql

from . import ranges
from .copyplan import load_plan
from .errors import MigrationError
from .loader import load_table
from .target import STATE_TABLE, create_table_sql, record_load, state_table_ddl


def resolve_interrupted(pg, schema, check_mode):
    """Prepared range transactions an interrupted run left hold locks on their tables: resolved first (in check
    mode only named). Returns the notes saying what was found."""
    if check_mode:
        tables = ranges.pending(pg, schema)
        return [f"prepared transactions of an interrupted run hold locks on tables {', '.join(tables)}; the next "
                "run resolves them before it loads"] if tables else []
    committed, rolled_back = ranges.resolve(pg, schema, ranges.schema_prefix(schema))
    notes = []
    if committed:
        notes.append(f"tables {', '.join(committed)}: the ranges an interrupted run had decided to commit were "
                     "committed")
    if rolled_back:
        notes.append(f"tables {', '.join(rolled_back)}: the ranges an interrupted run had left prepared were "
                     "rolled back")
    return notes


def prepare_target(pg, schema, schema_present, source_id, targets, journal):
    """Before the first table loads: the schema and the state table created where missing, and the state rows of
    ``targets`` (target tables) a reload replaces read; all journaled, so that the undo puts them back."""
    state = sql.Identifier(schema, STATE_TABLE)
    with pg.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", (state.as_string(cursor),))
        state_existed = cursor.fetchone()[0] is not None
        if state_existed:
            # A table loaded again replaces its state row: the undo puts the old one back.
            cursor.execute(sql.SQL("SELECT to_jsonb(s) FROM {} s WHERE source_id = %s AND table_name = ANY(%s)")
                           .format(state), (source_id, targets))
            journal.replaced_state = [row[0] for row in cursor.fetchall()]
        if not schema_present:
            cursor.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        cursor.execute(state_table_ddl(schema))
    pg.commit()
    journal.created_schema = not schema_present
    journal.created_state_table = not state_existed


class Load:
    """The tables' loads dispatched to the workers, parents first, largest first (stage 3 of engine.Run).

    Everything it reads or writes comes in as an argument: ``plan`` (plan.TablesPlan: per table its source, target
    name and columns, profile, size and action) and ``created_columns`` ({table: its column definitions} of the
    tables it creates); the run's session ``pg`` and worker ``pool``; where it reports (``entries``: the result's
    table entries, updated as tables start and end; ``progress`` and its shared ``slots``; ``note(text)``) and what it
    writes into (``journal``). ``start_checks()`` queues the checks beside the load behind the loads dispatched so
    far; ``lease``, when lost, stops the load.
    """

    def __init__(self, *, plan, created_columns, pool, pg, conninfo, schema, jobs, source, baseline, source_id,
                 source_timezone, journal, entries, progress, slots, note, start_checks, lease):
        self.plan, self.created_columns = plan, created_columns
        self.pool, self.pg, self.conninfo, self.schema, self.jobs = pool, pg, conninfo, schema, jobs
        self.source, self.baseline, self.source_id = source, baseline, source_id
        self.source_timezone = source_timezone
        self.journal, self.entries, self.progress, self.slots = journal, entries, progress, slots
        self.note, self.start_checks, self.lease = note, start_checks, lease
        # Tables loading in ranges, until decided: their pieces, the ranges' outcomes, how many still run.
        self._ranged_tables = {}

    def run(self, to_load):
        """Load the tables ``to_load`` (in the run's order); returns those loaded, in that order. Raises the first
        failure once the loads running beside it ended."""
        done = self._stream(to_load)
        return [name for name in to_load if name in done]

    def _load_plan(self, name):
        create = ""
        if name in self.created_columns:
            create = create_table_sql(self.schema, self.plan.target_names[name],
                                      self.created_columns[name]).as_string(self.pg)
        profile = self.plan.profiles[name]
        return load_plan(index=self.plan.order.index(name), name=name, target_table=self.plan.target_names[name],
                         schema=self.schema, source=self.plan.tables[name], profile=profile,
                         column_names=self.plan.column_names[name], create_sql=create,
                         source_timezone=self.source_timezone, source_id=self.source_id,
                         streamed=profile.columns[0].conversion == "streamed" if profile.columns else False,
                         notnull=self.plan.notnull[name])

    def _ranged(self, to_load, plans):
        """{table: its range LoadPlans} for the tables worth splitting (ranges.RANGE_MIN_ROWS, RANGE_DOMINANCE),
        and how many range transactions may be prepared at once."""
        total = sum(self.plan.sizes[n] for n in to_load)
        candidates = [n for n in to_load if self.jobs > 1 and self.plan.actions[n] == "load"
                      and self.plan.tables[n].rowid
                      and plans[n].expected_rows is None and self.plan.highest[n] >= ranges.RANGE_MIN_ROWS
                      and self.plan.sizes[n] * self.jobs > ranges.RANGE_DOMINANCE * total]
        if not candidates:
            return {}, 0
        free, limit = ranges.prepared_slots(self.pg)
        if free < self.jobs:
            self.note(f"tables {', '.join(candidates)} load in one session each, not in {self.jobs} rowid ranges: "
                      f"the server's max_prepared_transactions is {limit}"
                      + (f" ({limit - free} in use)" if free < limit else "")
                      + f"; ranges need at least {self.jobs} (one prepared transaction per range)")
            return {}, 0
        self.journal.prefix = f"{ranges.schema_prefix(self.schema)}{secrets.token_hex(4)} "
        lite = self.source.connect()
        try:
            split = {}
            for name in candidates:
                table = self.plan.tables[name]
                low = lite.execute(f"SELECT min({table.rowid}) FROM {plans[name].table_sql}").fetchone()[0]  # noqa: S608
                if low is None or self.plan.highest[name] - low + 1 < ranges.RANGE_MIN_ROWS:
                    continue
                index = self.plan.order.index(name)
                slots = [len(self.plan.order) + index * self.jobs + k for k in range(self.jobs)]
                split[name] = ranges.split(plans[name], table.rowid, low, self.plan.highest[name], self.jobs, slots,
                                           self.journal.prefix)
        finally:
            lite.close()
        return split, free

    def _decide_ranges(self, name, outcomes, started, started_at):
        """Every range of ``name`` is prepared: record the decision (its state row), then commit the ranges."""
        mixed = ranges.mixed_dates(name, outcomes.values())
        gids = [outcomes[k]["gid"] for k in sorted(outcomes)]
        if mixed:
            ranges.finish(self.pg, gids, commit=False)
            raise MigrationError(mixed)
        rows = sum(o["rows"] for o in outcomes.values())
        with self.pg.cursor() as cursor:
            record_load(cursor, self.schema, self.source_id, self.plan.target_names[name], name, self.source.name, rows,
                        0, started_at, time.monotonic() - started, prepared_gids=gids)
        # Journaled before the decision commits: if the commit's outcome is unknown (a lost connection), the
        # undo resolves the ranges by the state row and then empties the table either way.
        self.journal.loaded(self.plan.target_names[name], created=False)
        self.pg.commit()
        ranges.finish(self.pg, gids, commit=True)
        return {"rows": rows, "seconds": time.monotonic() - started}

    def _stream(self, to_load):
        plans = {name: self._load_plan(name) for name in to_load}
        split, prepared_free = self._ranged(to_load, plans)
        waits_for = self._existing_dependencies(to_load)
        parents = self._earlier_parents(to_load)
        futures, done, submitted, first_error = {}, set(), set(), None
        ranged = self._ranged_tables
        # Parents before children (FK order), larger tables first among those free to go.
        queue = sorted(to_load, key=lambda n: -self.plan.sizes[n])
        while queue or futures:
            moved = True
            while moved and first_error is None:
                moved = False
                for name in list(queue):
                    if not (parents[name] <= submitted and waits_for[name] <= done):
                        continue
                    pieces = split.get(name, [plans[name]])
                    if name in split and sum(len(r["pieces"]) for r in ranged.values()) + len(pieces) > prepared_free:
                        continue  # its ranges could not all be prepared now: after the ranged tables in flight
                    queue.remove(name)
                    submitted.add(name)
                    for number, piece in enumerate(pieces):
                        futures[self.pool.submit(_load_task, self.source, self.conninfo, piece,
                                                 self.baseline)] = (name, number)
                    if name in split:
                        ranged[name] = {"pieces": pieces, "outcomes": {}, "open": len(pieces), "failed": False,
                                        "started": time.monotonic(),
                                        "started_at": datetime.datetime.now(datetime.timezone.utc)}
                    self.progress.queue(name)
                    self.entries[name]["status"] = "loading"
                    moved = True
            if first_error is not None:
                queue = []
            self.start_checks()  # behind the loads dispatched so far
            if not futures:
                if queue:
                    raise MigrationError(
                        f"tables {', '.join(queue)} wait for each other through foreign keys that already exist "
                        f"in {self.schema}: drop those constraints before loading (post_data rebuilds them)")
                break
            finished, _ = wait(set(futures), timeout=1.0, return_when=FIRST_COMPLETED)
            for name in {name for name, _ in futures.values()}:
                self._note_start(name, split.get(name, [plans[name]]))
            if self.lease and self.lease.lost and first_error is None:
                # The run is gone: start nothing more (the lease ends the sessions of running loads).
                first_error = MigrationError(self.lease.lost)
                for future in futures:
                    future.cancel()
            for future in finished:
                name, number = futures.pop(future)
                entry = self.entries[name]
                outcome = None
                if not future.cancelled():
                    try:
                        outcome = future.result()
                    except MigrationError as error:
                        first_error = first_error or error
                        entry["status"] = "failed"
                        self.progress.finish(name, "failed")
                if name in ranged:
                    try:
                        outcome = self._range_done(name, number, outcome, first_error)
                    except MigrationError as error:  # the ranges disagree on a date column: rolled back
                        first_error = first_error or error
                        entry["status"] = "failed"
                        self.progress.finish(name, "failed")
                        continue
                    if outcome is None:
                        continue
                elif outcome is None:
                    entry["status"] = "pending" if future.cancelled() else entry["status"]
                    continue
                else:
                    self.journal.loaded(self.plan.target_names[name], created=self.plan.actions[name] == "create")
                done.add(name)
                seconds = outcome["seconds"]
                streamed = plans[name].expected_rows is None
                entry.update(migrated=outcome["rows"], total_rows=outcome["rows"] if streamed else entry["total_rows"],
                             rejected=0 if streamed else self.plan.profiles[name].rows - outcome["rows"],
                             status="completed", action="loaded", seconds=round(seconds, 3),
                             rows_per_second=round(outcome["rows"] / seconds, 1) if seconds > 0 else 0.0)
                if name in split:
                    entry["ranges"] = len(split[name])
                self.progress.finish(name, "completed", outcome["rows"])
            for name, _ in set(futures.values()):
                pieces = split.get(name, [plans[name]])
                self.progress.update(name, sum(self.slots.rows[piece.index] for piece in pieces))
            self.progress.write(force=bool(finished))  # a table's end shows at once
        if first_error is not None:
            raise first_error
        return done

    def _note_start(self, name, pieces):
        """A table submitted waits in the pool's queue until a worker takes one of its pieces: its rate and ETA
        count from then."""
        taken = [self.slots.started[piece.index] for piece in pieces if self.slots.started[piece.index]]
        if taken:
            self.progress.start(name, min(taken))

    def _range_done(self, name, number, outcome, first_error):
        """One range of ``name`` ended (outcome None: failed or cancelled). Once all have, the table is decided
        (returns its outcome) or, when a range or anything else of the run failed, its ranges rolled back."""
        table = self.entries[name]
        state = self._ranged_tables[name]
        state["open"] -= 1
        if outcome is None:
            state["failed"] = True
        else:
            state["outcomes"][number] = dict(outcome, gid=state["pieces"][number].gid)
        if state["open"]:
            return None
        del self._ranged_tables[name]
        if state["failed"] or first_error is not None:
            try:
                ranges.finish(self.pg, [o["gid"] for o in state["outcomes"].values()], commit=False)
            except psycopg2.Error:
                pass  # this session is lost too: the undo resolves them (journal.prefix) on a new one
            if table["status"] == "loading":
                table["status"] = "pending"
            return None
        return self._decide_ranges(name, state["outcomes"], state["started"], state["started_at"])

    def _earlier_parents(self, to_load):
        """{table: its foreign-key parents among to_load that come before it in FK order (cycles broken)}."""
        position = {name: index for index, name in enumerate(self.plan.order)}
        by_lower = {name.lower(): name for name in to_load}
        parents = {}
        for name in to_load:
            found = {by_lower.get(fk.parent.lower()) for fk in self.plan.tables[name].foreign_keys}
            parents[name] = {p for p in found if p and position[p] < position[name]}
        return parents

    def _existing_dependencies(self, to_load):
        """{table: parents it must wait for}: only where the target already has a foreign key between them,
        since COPY into the child would check it against the parent's committed rows."""
        waits = {name: set() for name in to_load}
        by_target = {self.plan.target_names[n]: n for n in to_load}
        with self.pg.cursor() as cursor:
            cursor.execute(
                "SELECT c.relname, p.relname FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
                "JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE k.contype = 'f' AND n.nspname = %s AND c.oid <> p.oid", (self.schema,))
            for child, parent in cursor.fetchall():
                if child in by_target and parent in by_target:
                    waits[by_target[child]].add(by_target[parent])
        self.pg.commit()
        return waits


def _load_task(source, conninfo, plan, baseline):
    return load_table(source, conninfo, plan, baseline)
