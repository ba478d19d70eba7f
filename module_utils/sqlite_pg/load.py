"""The load: every table streamed into PostgreSQL by the worker processes, parents first, largest first.

Each table loads in its own transaction with its state row (loader.py); what
commits is recorded in the run's journal, so that a failure of any table puts
back the tables loaded before it (undo.py).
"""

from concurrent.futures import FIRST_COMPLETED, wait

from psycopg2 import sql

from .copyplan import load_plan
from .errors import MigrationError
from .loader import load_table
from .target import STATE_TABLE, create_table_sql, state_table_ddl


class Load:
    """Dispatching the tables' loads to the workers (a stage of engine.Run)."""

    def _plan(self, name):
        create = ""
        if self.actions[name] == "create":
            create = create_table_sql(self.schema, self.target_names[name], self._column_ddl(name)).as_string(self.pg)
        profile = self.profiles[name]
        return load_plan(index=self.order.index(name), name=name, target_table=self.target_names[name],
                         schema=self.schema, source=self.tables[name], profile=profile,
                         column_names=self.column_names[name], create_sql=create,
                         source_timezone=self.source_timezone, source_id=self.source_id,
                         streamed=profile.columns[0].conversion == "streamed" if profile.columns else False,
                         notnull=self.notnull[name])

    def _load(self, counters):
        self.progress.phase = "load"
        self.progress.write(force=True)
        to_load = [name for name in self.order if self.actions[name] in ("load", "create")]
        if not to_load:
            return
        state = sql.Identifier(self.schema, STATE_TABLE)
        with self.pg.cursor() as cursor:
            cursor.execute("SELECT to_regclass(%s)", (state.as_string(cursor),))
            state_existed = cursor.fetchone()[0] is not None
            if state_existed:
                # A table loaded again replaces its state row: the undo puts the old one back.
                cursor.execute(sql.SQL("SELECT to_jsonb(s) FROM {} s WHERE source_id = %s AND table_name = ANY(%s)")
                               .format(state), (self.source_id, [self.target_names[n] for n in to_load]))
                self.journal.replaced_state = [row[0] for row in cursor.fetchall()]
            if not self.schema_present:
                cursor.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            cursor.execute(state_table_ddl(self.schema))
        self.pg.commit()
        self.journal.created_schema = not self.schema_present
        self.journal.created_state_table = not state_existed
        self.result["changed"] = True
        self._stream(to_load, counters)

    def _stream(self, to_load, counters):
        plans = {name: self._plan(name) for name in to_load}
        waits_for = self._existing_dependencies(to_load)
        parents = self._earlier_parents(to_load)
        futures, done, submitted, first_error = {}, set(), set(), None
        # Parents before children (FK order), larger tables first among those free to go.
        queue = sorted(to_load, key=lambda n: -self.sizes[n])
        while queue or futures:
            moved = True
            while moved and first_error is None:
                moved = False
                for name in list(queue):
                    if parents[name] <= submitted and waits_for[name] <= done:
                        queue.remove(name)
                        submitted.add(name)
                        futures[self.pool.submit(_load_task, self.source, self.conninfo, plans[name],
                                                 self.baseline)] = name
                        self.progress.start(name)
                        self.result["tables"][name]["status"] = "loading"
                        moved = True
            if first_error is not None:
                queue = []
            if not futures:
                if queue:
                    raise MigrationError(
                        f"tables {', '.join(queue)} wait for each other through foreign keys that already exist "
                        f"in {self.schema}: drop those constraints before loading (post_data rebuilds them)")
                break
            finished, _ = wait(set(futures), timeout=1.0, return_when=FIRST_COMPLETED)
            if self.lease and self.lease.lost and first_error is None:
                # The run is gone: start nothing more (the lease ends the sessions of running loads).
                first_error = MigrationError(self.lease.lost)
                for future in futures:
                    future.cancel()
            for future in finished:
                name = futures.pop(future)
                entry = self.result["tables"][name]
                if future.cancelled():
                    entry["status"] = "pending"
                    continue
                try:
                    outcome = future.result()
                except MigrationError as error:
                    first_error = first_error or error
                    entry["status"] = "failed"
                    self.progress.finish(name, "failed")
                    continue
                done.add(name)
                self.journal.loaded(self.target_names[name], created=self.actions[name] == "create")
                seconds = outcome["seconds"]
                streamed = plans[name].expected_rows is None
                entry.update(migrated=outcome["rows"], total_rows=outcome["rows"] if streamed else entry["total_rows"],
                             rejected=0 if streamed else self.profiles[name].rows - outcome["rows"],
                             status="completed", action="loaded", seconds=round(seconds, 3),
                             rows_per_second=round(outcome["rows"] / seconds, 1) if seconds > 0 else 0.0)
                self.progress.finish(name, "completed", outcome["rows"])
            for name in futures.values():
                self.progress.update(name, counters[self.order.index(name)])
            self.progress.write(force=bool(finished))  # a table's end shows at once
        if first_error is not None:
            raise first_error

    def _earlier_parents(self, to_load):
        """{table: its foreign-key parents among to_load that come before it in FK order (cycles broken)}."""
        position = {name: index for index, name in enumerate(self.order)}
        by_lower = {name.lower(): name for name in to_load}
        parents = {}
        for name in to_load:
            found = {by_lower.get(fk.parent.lower()) for fk in self.tables[name].foreign_keys}
            parents[name] = {p for p in found if p and position[p] < position[name]}
        return parents

    def _existing_dependencies(self, to_load):
        """{table: parents it must wait for}: only where the target already has a foreign key between them,
        since COPY into the child would check it against the parent's committed rows."""
        waits = {name: set() for name in to_load}
        by_target = {self.target_names[n]: n for n in to_load}
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
