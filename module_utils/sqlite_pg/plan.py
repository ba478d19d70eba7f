"""The run's plan: options, the source's schema, the target's tables, and per table what to do.

Everything here happens before the first write: a run that stops here leaves
nothing behind. Per table the decision is skip (already loaded from this
source), load (empty), create (missing), or a one-line refusal.
"""

import dataclasses
import json
import os

from psycopg2 import sql

from .errors import MigrationError
from .names import pg_name, sqlite_ident
from .profile import DATE_CATEGORIES, describe_key, display, resolve_datetime_formats
from .rules import Invalid, check_timezone, rule_for, storage_class_of
from .source import foreign_key_order, read_schema
from .sync import dropped_note, dropped_refusal
from .target import (
    SPANS_TABLE,
    STATE_TABLE,
    count_rows,
    default_literal,
    dropped_tables,
    has_rows,
    planned_tables,
    read_table,
    schema_exists,
    state_rows,
)
from .typemap import clock_default, parse_default

MAX_COLUMNS = 1600  # PostgreSQL's limit per table
FINDINGS_SHOWN = 5  # a failed run lists this many of its findings, one line each


@dataclasses.dataclass
class TablesPlan:
    """What the plan decided, handed on to the checks, the load and the keys: the tables in foreign-key order and,
    per source table, what it is and becomes. Filled in the order the run learns it: the source's schema, the
    target's tables, the profiles (checks.py), then the actions."""

    order: list  # the selected source tables, parents first
    tables: dict  # {table: source.SourceTable}
    target_names: dict  # {table: its name in PostgreSQL}
    highest: dict  # {table: max(rowid)}, of every source table: rows, roughly, without reading them
    sizes: dict  # {table: highest * columns}, the dispatch order's weight
    rowid_aliases: dict  # {table: its INTEGER PRIMARY KEY column}, of every source table (foreign keys reach any)
    datetime_formats: dict  # {table: {column: how a date column reads numbers}} (rules.DATETIME_FORMATS)
    schema_present: bool = False  # whether the target schema exists
    kept_dropped: list = dataclasses.field(default_factory=list)  # tables the source dropped, kept as they are
    existing: dict = dataclasses.field(default_factory=dict)  # {table: target.TargetTable or None (missing)}
    targets: dict = dataclasses.field(default_factory=dict)  # {table: {column: TargetType, or None to choose}}
    notnull: dict = dataclasses.field(default_factory=dict)  # {table: source columns loaded NOT NULL}
    column_names: dict = dataclasses.field(default_factory=dict)  # {table: {source column: target column}}
    profiles: dict = dataclasses.field(default_factory=dict)  # {table: profile.TableProfile}
    actions: dict = dataclasses.field(default_factory=dict)  # {table: skip, load, create or sync}


def validate_options(*, on_invalid, reject_file, jobs, max_rejects, integrity, source_timezone, progress_file):
    """The run's options, each refused in one line before anything is read."""
    if on_invalid not in ("fail", "reject"):
        raise MigrationError(f"on_invalid must be 'fail' or 'reject', not {on_invalid!r}")
    if on_invalid == "reject" and not reject_file:
        raise MigrationError("on_invalid: reject needs reject_file (where rejected rows are written)")
    if not isinstance(jobs, int) or jobs < 1:
        raise MigrationError(f"jobs must be a whole number of at least 1, not {jobs!r}")
    if not isinstance(max_rejects, int) or max_rejects < 0:
        raise MigrationError(f"max_rejects must be 0 or more, not {max_rejects!r}")
    if integrity not in ("full", "quick"):
        raise MigrationError(f"integrity_check must be 'full' or 'quick', not {integrity!r}")
    try:
        check_timezone(source_timezone)
    except ValueError as error:
        raise MigrationError(f"source_timezone: {error}") from None
    for option, path in (("reject_file", reject_file), ("progress_file", progress_file)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise MigrationError(f"{option}: directory {os.path.dirname(os.path.abspath(path))} does not exist")


def more(count, what):
    """' (and 3 more problems)': what a one-line message leaves out."""
    return f" (and {count} more {what}{'s' if count != 1 else ''})" if count > 0 else ""


def pragma_name(integrity):
    """The PRAGMA the integrity option runs."""
    return "quick_check" if integrity == "quick" else "integrity_check"


class Planner:
    """Reading the source and the target, and deciding per table (stage 1 of engine.Run), before any write.

    ``read_source()`` returns the TablesPlan; ``read_target(pg)`` adds what the target holds and the types each
    column becomes; once the checks added the profiles, ``decide(pg, source_id, integrity_problems)`` refuses what
    cannot be loaded and adds each table's action. The run's ``result`` is handed in: the plan fills its table
    entries, its findings and its notes on dropped tables; ``progress`` marks the tables it skips.
    """

    def __init__(self, *, source, schema, requested, create_tables, check_mode, target_ddl, keep_dropped,
                 datetime_option, source_timezone, integrity, on_invalid, max_rejects, reject_file, progress, result):
        self.source, self.schema, self.requested, self.create_tables = source, schema, requested, create_tables
        self.check_mode, self.target_ddl, self.keep_dropped = check_mode, target_ddl, keep_dropped
        self.datetime_option, self.source_timezone, self.integrity = datetime_option, source_timezone, integrity
        self.on_invalid, self.max_rejects, self.reject_file = on_invalid, max_rejects, reject_file
        self.progress, self.result = progress, result
        self.plan = None
        self.notes = []  # what the plan found worth saying: renamed tables and columns, foreign-key cycles
        # From the source's schema, for the dropped tables' check against the target.
        self._source_targets = set()  # every source table's name in PostgreSQL
        self._missing = []  # requested tables the source lacks: dropped since they were migrated, or unknown
        self._available = "none"  # the source's tables, for the message naming an unknown one

    def read_source(self):
        """The TablesPlan of the selected tables, from the source's schema."""
        connection = self.source.connect()
        try:
            tables, notes = read_schema(connection)
            # Foreign keys of a selected table may reference any table of the source.
            rowid_aliases = {t.name: t.rowid_alias for t in tables if t.rowid and t.rowid_alias}
            # Row totals for progress and the dispatch order, without reading the tables.
            highest = {t.name: _highest_rowid(connection, t) for t in tables}
        except Exception as error:  # sqlite3 raises DatabaseError and friends for corrupt schemas
            raise MigrationError(f"source {self.source.path} cannot be read: {error}") from None
        finally:
            connection.close()
        self.notes += notes
        by_name = {t.name: t for t in tables}
        self._source_targets = {pg_name(t.name) for t in tables}
        self._available = ", ".join(sorted(by_name)) or "none"
        if self.requested:
            selected = []
            for name in self.requested:
                match = by_name.get(name) or next((t for t in tables if t.name.lower() == str(name).lower()), None)
                if match is None:
                    self._missing.append(str(name))
                    continue
                if match not in selected:
                    selected.append(match)
        else:
            selected = tables
        order, order_notes = foreign_key_order(selected)
        self.notes += order_notes
        self.plan = TablesPlan(order=order, tables={t.name: t for t in selected},
                               target_names={name: pg_name(name) for name in order}, highest=highest,
                               sizes={t.name: highest[t.name] * len(t.columns) for t in tables},
                               rowid_aliases=rowid_aliases,
                               datetime_formats=resolve_datetime_formats(self.datetime_option, tables))
        seen = {}
        for name, target in self.plan.target_names.items():
            if target in seen:
                raise MigrationError(f"tables {seen[target]} and {name} both become {target} in PostgreSQL "
                                     "(names are cut to 63 bytes)")
            if target in (STATE_TABLE, SPANS_TABLE):
                raise MigrationError(f"source table {name} has the name of this module's state table {target}")
            seen[target] = name
            if target != name:
                self.notes.append(f"table {name} becomes {target} in PostgreSQL (names are cut to 63 bytes)")
            if len(self.plan.tables[name].columns) > MAX_COLUMNS:
                raise MigrationError(f"table {name} has {len(self.plan.tables[name].columns)} columns; PostgreSQL "
                                     f"allows at most {MAX_COLUMNS:,} per table: split it before migrating; nothing "
                                     "was written")
        return self.plan

    def read_target(self, pg):
        """Adds to the plan what the target holds: its tables, and per column its type and name there."""
        problems = []
        with pg.cursor() as cursor:
            self.plan.schema_present = schema_exists(cursor, self.schema)
            self._dropped(cursor)
            if not self.plan.schema_present and not self.create_tables and not self._uses_target_ddl():
                raise MigrationError(f"schema {self.schema} does not exist in the target database "
                                     "(and create_tables is false)")
            for name in self.plan.order:
                self.plan.existing[name] = read_table(cursor, self.schema, self.plan.target_names[name]) \
                    if self.plan.schema_present else None
        pg.commit()
        planned = self._planned_tables(pg)
        for name in self.plan.order:
            existing = self.plan.existing[name] or planned.get(name)
            if existing is None and not self.create_tables:
                raise MigrationError(f"target table {self.schema}.{self.plan.target_names[name]} does not exist "
                                     "(and create_tables is false)")
            problems += self._match_columns(self.plan.tables[name], existing)
            for column in self.plan.datetime_formats.get(name, {}):
                target = self.plan.targets[name].get(column)
                if target is not None and target.category not in DATE_CATEGORIES:
                    problems.append(f"datetime_formats: {name}.{column} becomes {target.sql}, not a date or "
                                    "timestamp, so a date representation does not apply to it")
        if problems:
            raise MigrationError(problems[0] + more(len(problems) - 1, "problem"))

    def _dropped(self, cursor):
        """Tables migrated from this source that it no longer has (among those requested, when tables are named):
        refused before anything is written, unless keep_dropped_tables keeps them as they are."""
        found = dropped_tables(cursor, self.schema, self.source.name, self._source_targets) \
            if self.plan.schema_present else []
        if self.requested:
            named = {pg_name(n) for n in self._missing}
            found = [(table, rows) for table, rows in found if table in named]
            unknown = [n for n in self._missing if pg_name(n) not in {table for table, _rows in found}]
            if unknown:
                raise MigrationError(f"table {unknown[0]} does not exist in source {self.source.path} "
                                     f"(its tables: {self._available})")
        if found and not self.keep_dropped:
            raise MigrationError(dropped_refusal(self.schema, self.source.path, found))
        self.plan.kept_dropped = self.result["dropped_tables"] = [table for table, _rows in found]
        self.result["sync_notes"] = [dropped_note(self.schema, table, rows) for table, rows in found]

    def _load_with_the_sync(self, cursor):
        """Empty tables tied by a foreign key of the target to a table being synced (either way, or through
        other such tables) are loaded inside the sync, in one transaction with it: loaded before it, a child
        would refer to parent rows not synced yet; after it, the sync would wait on the child."""
        if "sync" not in self.plan.actions.values():
            return
        by_target = {self.plan.target_names[n]: n for n in self.plan.order}
        cursor.execute(
            "SELECT c.relname, p.relname FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
            "JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE k.contype = 'f' AND n.nspname = %s AND c.oid <> p.oid", (self.schema,))
        ties = [(by_target[child], by_target[parent]) for child, parent in cursor.fetchall()
                if child in by_target and parent in by_target]
        moved = True
        while moved:
            moved = False
            for pair in ties:
                for one, other in (pair, pair[::-1]):
                    if self.plan.actions[one] == "load" and self.plan.actions[other] == "sync":
                        self.plan.actions[one] = "sync"
                        self.result["tables"][one]["action"] = "sync"
                        moved = True

    def _uses_target_ddl(self):
        return self.check_mode and bool(self.target_ddl)

    def _planned_tables(self, pg):
        """Check mode: {source table: TargetTable} of the missing tables as target_ddl creates them.

        The real run loads into the tables the schema stage makes from that SQL, so the profile
        must check the values against those types, not the ones this engine would pick.
        """
        missing = [self.plan.target_names[name] for name in self.plan.order if self.plan.existing[name] is None]
        if not (self._uses_target_ddl() and missing):
            return {}
        found = planned_tables(pg, self.schema, self.target_ddl, missing)
        return {name: found[self.plan.target_names[name]] for name in self.plan.order
                if self.plan.target_names[name] in found}

    def _match_columns(self, source, existing):
        """Fill targets/notnull/column_names for one table; return problems (one line each)."""
        problems, targets, notnull, names = [], {}, set(), {}
        if existing is None:
            seen = {}
            for column in source.columns:
                target_name = pg_name(column.name)
                if target_name in seen:
                    problems.append(f"table {source.name}: columns {seen[target_name]} and {column.name} both "
                                    f"become {target_name} in PostgreSQL (names are cut to 63 bytes)")
                seen[target_name] = column.name
                if target_name != column.name:
                    self.notes.append(f"table {source.name}: column {column.name} becomes {target_name} in "
                                      "PostgreSQL (names are cut to 63 bytes)")
                names[column.name] = target_name
                targets[column.name] = None
                if column.notnull or column.pk_position:
                    notnull.add(column.name)
        else:
            for column in source.columns:
                match = existing.column(column.name)
                if match is None:
                    problems.append(
                        f"table {source.name}: column {column.name} has no column in target table "
                        f"{self.schema}.{existing.name} (it has {', '.join(c.name for c in existing.columns)})")
                    continue
                if match.generated:
                    problems.append(f"table {source.name}: target column {existing.name}.{match.name} is generated "
                                    "and cannot be loaded")
                    continue
                names[column.name] = match.name
                targets[column.name] = match.type
                if match.notnull:
                    notnull.add(column.name)
            loaded = set(names.values())
            for column in existing.columns:
                if column.name not in loaded and column.notnull and not column.has_default and not column.generated:
                    problems.append(f"table {source.name}: target column {existing.name}.{column.name} is NOT NULL "
                                    "without a default and has no source column")
        self.plan.targets[source.name], self.plan.notnull[source.name] = targets, notnull
        self.plan.column_names[source.name] = names
        return problems

    def decide(self, pg, source_id, integrity_problems):
        """Refuses what the checks found or the target cannot take (one line, nothing written), else adds each
        table's action to the plan and its entry to the result; writes the reject file when rows are rejected."""
        if integrity_problems:
            self.result["findings"] = integrity_problems[:FINDINGS_SHOWN]
            raise MigrationError(f"source {self.source.path} fails PRAGMA {pragma_name(self.integrity)}: "
                                 f"{integrity_problems[0]}" + more(len(integrity_problems) - 1, "problem"))
        problems = [p for name in self.plan.order for p in self.plan.profiles[name].problems]
        if problems:
            self.result["findings"] = problems[:FINDINGS_SHOWN]
            raise MigrationError(problems[0] + more(len(problems) - 1, "problem") + "; nothing was written")
        bad = [(name, b) for name in self.plan.order for b in self.plan.profiles[name].bad_values]
        rejected = sum(self.plan.profiles[name].rejected_rows for name in self.plan.order)
        if bad and (self.on_invalid == "fail" or rejected > self.max_rejects):
            self.result["findings"] = [self._bad_message(name, b) for name, b in bad[:FINDINGS_SHOWN]]
        if bad and self.on_invalid == "fail":
            name, first = bad[0]
            total_invalid = sum(c.invalid for p in self.plan.profiles.values() for c in p.columns) or len(bad)
            raise MigrationError(self._bad_message(name, first) + more(total_invalid - 1, "invalid value")
                                 + "; nothing was written")
        if rejected > self.max_rejects:
            name, first = bad[0]
            raise MigrationError(f"{rejected} rows are invalid, more than max_rejects ({self.max_rejects}); "
                                 f"first: {self._bad_message(name, first)}; nothing was written")
        problems = []
        with pg.cursor() as cursor:
            recorded = state_rows(cursor, self.schema) if self.plan.schema_present else {}
            for name in self.plan.order:
                problem = self._decide_table(cursor, name, recorded.get(self.plan.target_names[name], []), source_id)
                if problem:
                    problems.append(problem)
            if not problems:
                self._load_with_the_sync(cursor)
        pg.commit()
        if problems:
            raise MigrationError(problems[0] + more(len(problems) - 1, "problem") + "; nothing was written")
        if rejected and not self.check_mode:
            self._write_rejects()

    def _decide_table(self, cursor, name, recorded, source_id):
        target = self.plan.target_names[name]
        mine = [r for r in recorded if r[0] == source_id]
        entry = {"total_rows": self.plan.profiles[name].rows, "migrated": 0, "rejected": 0, "status": "pending",
                 "seconds": 0.0, "rows_per_second": 0.0, "action": "load"}
        self.result["tables"][name] = entry
        if self.plan.existing[name] is None:
            self.plan.actions[name] = "create"
            return ""
        present = count_rows(cursor, self.schema, target) if mine else None
        if mine:
            _source_id, _path, loaded, rejected, _loaded_at, validated = mine[-1]
            if present == loaded:
                # Nothing of it can differ from this snapshot: a validation after it compares no key.
                entry.update(migrated=present, rejected=rejected, status="completed", action="skipped",
                             validated=validated, changed_keys={"since": source_id, "keys": ""})
                self.plan.actions[name] = "skip"
                self.progress.finish(name, "skipped", present)
                return ""
            if present:
                return (f"target table {self.schema}.{target} holds {present} rows but {loaded} were loaded from this "
                        "source: it was changed after the migration; empty it to load it again")
        elif has_rows(cursor, self.schema, target):
            other = recorded[-1] if recorded else None
            if other and other[1] == self.source.name:
                # An earlier snapshot of this very file: bring it up to date (sync.py) instead of refusing.
                entry["action"] = "sync"
                self.plan.actions[name] = "sync"
                return ""
            origin = (f"loaded from another source ({other[1]}, snapshot {other[0][:12]}, {other[4]:%Y-%m-%d %H:%M})"
                      if other else "not loaded by this module")
            return (f"target table {self.schema}.{target} already holds rows {origin}; "
                    "empty it or choose another schema")
        self.plan.actions[name] = "load"
        return ""

    def _bad_message(self, name, bad):
        profile = self.plan.profiles[name]
        where = f"table {name}"
        if bad.column:
            where += f", column {bad.column}"
        where += f", {describe_key(profile.key_columns, bad.key)}"
        shown = f"value {display(bad.value)} " if bad.value is not None else ""
        return f"{where}: {shown}{bad.reason}"

    def _write_rejects(self):
        temporary = self.reject_file + ".partial"
        with open(temporary, "w", encoding="utf-8") as stream:
            for name in self.plan.order:
                profile = self.plan.profiles[name]
                for bad in profile.bad_values:
                    stream.write(json.dumps(bad.record(name, profile.key_columns), ensure_ascii=False,
                                            default=repr) + "\n")
        os.replace(temporary, self.reject_file)

    def column_definitions(self, name):
        """([(target column, TargetType, NOT NULL, default or None)], notes on the defaults dropped) of a table the
        load creates."""
        source, profile = self.plan.tables[name], self.plan.profiles[name]
        columns, notes = [], []
        for column, column_profile in zip(source.columns, profile.columns):
            target = column_profile.target
            default = None
            if column.default is not None and not target.identity:
                default, dropped = self._default(name, column, target)
                notes += dropped
            columns.append((self.plan.column_names[name][column.name], target, column.name in self.plan.notnull[name],
                            default))
        return columns, notes

    def _default(self, table, column, target):
        """(the column's default in PostgreSQL or None, [a note when SQLite's default was dropped])."""
        kind, value = parse_default(column.default)
        where = f"{table}.{column.name}"
        if kind == "clock":
            keyword = clock_default(value, target)
            if keyword:
                return sql.SQL(keyword), []
            return None, [f"{where}: default {column.default} dropped (no equivalent for {target.sql})"]
        if kind == "expression":
            return None, [f"{where}: default {column.default} is SQLite SQL and was dropped"]
        if value is None:
            return None, []
        try:
            datetime_format = self.plan.datetime_formats.get(table, {}).get(column.name, "auto")
            text = rule_for(target, self.source_timezone, datetime_format).convert(storage_class_of(value), value)
        except Invalid as error:
            return None, [f"{where}: default {column.default} dropped: it {error}"]
        return default_literal(_unescape_copy(text), target), []


def _highest_rowid(connection, table):
    """max(rowid): the row count, roughly, without reading the table (a b-tree descent); 0 without rowids."""
    if not table.rowid:
        return 0
    highest = connection.execute(f"SELECT max({table.rowid}) FROM {sqlite_ident(table.name)}").fetchone()[0]  # noqa: S608
    return max(highest or 0, 0)


def _unescape_copy(field):
    """A COPY text field back to the plain text (for default literals)."""
    text = field.decode("utf-8")
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            out.append({"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}.get(text[index + 1], text[index + 1]))
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)
