"""The PostgreSQL side: connections, the catalog, the state table, DDL and post-data."""

import contextlib
import hashlib
import io
import sys
from dataclasses import dataclass, field

import psycopg2
from psycopg2 import sql

from .errors import MigrationError
from .names import derived_name, pg_name
from .typemap import from_catalog

STATE_TABLE = "sqlite_to_postgres_state"
SPANS_TABLE = "sqlite_to_postgres_spans"  # the state's page and cell checksums, one row per span (sync.py)
APPLICATION_NAME = "sqlite_to_postgres"
LOCK_NAMESPACE = "sqlite_to_postgres:"  # the run's advisory lock: one run per target schema
MAINTENANCE_WORK_MEM = "256MB"  # for this run's own index and foreign key builds only (SET, not ALTER SYSTEM)
# target_ddl runs in check mode on the live target: bounded, so a lock held by the application
# (or a slow catalog) makes the check fail quickly instead of queueing behind it.
DDL_STATEMENT_TIMEOUT = "30s"
DDL_LOCK_TIMEOUT = "5s"
# A server whose host dies or drops off the network sends no reset. Left to libpq's and the kernel's defaults,
# a session waiting on it (a lock, an index build, a commit) errs after more than two hours, one sending to it (a
# COPY, a query just sent) after about fifteen minutes, and a new connection after about two. Keepalive probes
# after 10 quiet seconds, a limit of 60 s on data the server has neither acknowledged nor read, and 10 s to connect
# end each within about a minute; a busy server's kernel still answers the probes, so a long statement runs on.
# Over a Unix socket libpq ignores all but connect_timeout. The caller's conninfo overrides any of them.
LIVENESS_OPTIONS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                    "tcp_user_timeout": 60_000, "connect_timeout": 10}
# The server's end of each session gets the same limits, and checks every 10 s during a statement that its client
# is still there (settings any role may set as it connects): a run whose host vanished would otherwise leave its
# sessions on the server for hours, holding the schema's lock, its tables' locks and an open load transaction in
# the way of a rerun, the rollback and the application.
SERVER_LIVENESS = " ".join(f"-c {setting}={value}" for setting, value in (
    ("tcp_keepalives_idle", LIVENESS_OPTIONS["keepalives_idle"]),
    ("tcp_keepalives_interval", LIVENESS_OPTIONS["keepalives_interval"]),
    ("tcp_keepalives_count", LIVENESS_OPTIONS["keepalives_count"]),
    ("tcp_user_timeout", LIVENESS_OPTIONS["tcp_user_timeout"]),
    ("client_connection_check_interval", 10_000)))
FK_ACTIONS = {"NO ACTION": "NO ACTION", "RESTRICT": "RESTRICT", "CASCADE": "CASCADE", "SET NULL": "SET NULL",
              "SET DEFAULT": "SET DEFAULT"}


def first_line(error, conninfo=None):
    """An exception as one line, with the password (if any) never in it."""
    text = " ".join(str(getattr(error, "pgerror", None) or error).split())
    password = (conninfo or {}).get("password")
    if password:
        text = text.replace(password, "********")
    return text


def server_address(conninfo):
    """host:port of a connection's server, as an operator names it."""
    return f"{conninfo.get('host') or 'the local socket'}:{conninfo.get('port') or 5432}"


def connect(conninfo, read_only=False):
    """A psycopg2 connection; read_only sessions (check mode) cannot write even by mistake."""
    options = dict(LIVENESS_OPTIONS, **conninfo)
    options.setdefault("application_name", APPLICATION_NAME)
    # The caller's settings come after the server's limits, so they win; read-only comes last, so nothing undoes it.
    options["options"] = " ".join(filter(None, (SERVER_LIVENESS, options.get("options"),
                                                "-c default_transaction_read_only=on" if read_only else None)))
    try:
        connection = psycopg2.connect(**options)
    except psycopg2.Error as error:
        where = options.get("host") or "the local socket"
        raise MigrationError(
            f"cannot connect to PostgreSQL at {where} port {options.get('port', 5432)} "
            f"as {options.get('user', 'the default user')}: {first_line(error, conninfo)}"
        ) from None
    return connection


def lock_schema(pg, schema):
    """One run per target schema at a time (a session-level advisory lock, released when the session ends)."""
    digest = hashlib.sha256((LOCK_NAMESPACE + schema).encode()).digest()
    with pg.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", (int.from_bytes(digest[:8], "big", signed=True),))
        if not cursor.fetchone()[0]:
            raise MigrationError(f"another sqlite_to_postgres run is loading schema {schema} "
                                 "of this database; wait for it to finish")
    pg.commit()


def close_releasing_locks(connection):
    """Close a run's session, its advisory locks released first when it is still open.

    A backend lets its session's locks go only as it exits, a moment after close() returned: a run started right
    after this one (the next step of a runbook) could find the lock still held and stop, saying another run is
    loading. pg_advisory_unlock_all() releases them before the server answers.
    """
    if not connection.closed:
        try:
            connection.rollback()
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock_all()")
            connection.commit()
        except psycopg2.Error:
            pass  # the session is gone, and its locks with it
    connection.close()


def copy_in(cursor, statement, stream, size=8192):
    """cursor.copy_expert(statement, stream, size), COPY ... FROM STDIN, with nothing printed when the connection goes.

    When the server ends the session during a COPY, psycopg2 (2.9) raises for the second error result while the
    first is still set, prints the resulting chain (the server's error, then a SystemError) to stderr itself and
    raises OperationalError. The caller turns that exception into its one line; the printed chain would reach the
    operator beside it as the module's STDERR, so it is dropped, and only when the connection is gone.
    """
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            cursor.copy_expert(statement, stream, size=size)
    finally:
        if not cursor.connection.closed:
            sys.stderr.write(printed.getvalue())


@dataclass
class TargetColumn:
    name: str
    type: object  # TargetType
    notnull: bool
    has_default: bool
    generated: bool


@dataclass
class TargetTable:
    name: str
    columns: list
    primary_key: list = field(default_factory=list)

    def column(self, name):
        """The column matched by name (as PostgreSQL cuts it): exactly, else case-insensitively if unambiguous."""
        name = pg_name(name)
        for column in self.columns:
            if column.name == name:
                return column
        folded = [c for c in self.columns if c.name.lower() == name.lower()]
        return folded[0] if len(folded) == 1 else None


def schema_exists(cursor, schema):
    cursor.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
    return cursor.fetchone() is not None


def read_table(cursor, schema, name):
    """The existing table ``schema.name`` as a TargetTable, or None."""
    cursor.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (schema, name),
    )
    found = cursor.fetchone()
    if not found:
        return None
    cursor.execute(
        """
        SELECT a.attname, a.attnotnull, a.atthasdef OR a.attidentity <> '', a.attgenerated <> '',
               format_type(a.atttypid, a.atttypmod),
               b.typname, CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END
        FROM pg_attribute a
        JOIN pg_type t ON t.oid = a.atttypid
        JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
        WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (found[0],),
    )
    columns = [TargetColumn(column, from_catalog(typname, typmod, formatted), notnull, has_default, generated)
               for column, notnull, has_default, generated, formatted, typname, typmod in cursor.fetchall()]
    cursor.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
        "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s AND i.indisprimary",
        (found[0],),
    )
    return TargetTable(name, columns, [r[0] for r in cursor.fetchall()])


def planned_tables(connection, schema, ddl, names):
    """{name: TargetTable} of the ``names`` that ``ddl`` creates in ``schema``, in a transaction always rolled back.

    The server itself runs the DDL and its catalog is read with read_table, so the types are
    exactly those of the real CREATE (lengths, domains, identity, NOT NULL); a parser here
    would have to know every spelling of every type, and extensions' types too. Nothing
    persists: the statements run inside a DO block, where a COMMIT or ROLLBACK in the text
    fails instead of ending the transaction, and the transaction is rolled back in any case.
    Effects that are not transactional (setval on an existing sequence, for one) are not
    undone: ``ddl`` should create tables and nothing else.
    """
    body = sql.SQL("BEGIN EXECUTE {}; END").format(sql.Literal(ddl)).as_string(connection)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION READ WRITE")  # a check-mode session is read-only by default
            cursor.execute("SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true)",
                           (DDL_STATEMENT_TIMEOUT, DDL_LOCK_TIMEOUT))
            if not schema_exists(cursor, schema):
                cursor.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            cursor.execute("SELECT set_config('search_path', %s, true)", (sql.Identifier(schema).as_string(cursor),))
            cursor.execute(sql.SQL("DO {}").format(sql.Literal(body)))
            found = {name: read_table(cursor, schema, name) for name in names}
    except psycopg2.Error as error:
        raise MigrationError(f"target_ddl cannot be applied to schema {schema} (tried in a transaction that was "
                             f"rolled back): {error.diag.message_primary or first_line(error)}") from None
    finally:
        if not connection.closed:
            connection.rollback()
    return {name: table for name, table in found.items() if table is not None}


def has_rows(cursor, schema, name):
    cursor.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {}.{})").format(sql.Identifier(schema), sql.Identifier(name)))
    return cursor.fetchone()[0]


def count_rows(cursor, schema, name):
    cursor.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(name)))
    return cursor.fetchone()[0]


# The state table ------------------------------------------------------------------------

def state_table_ddl(schema):
    """One row per (source snapshot, target table) loaded, committed in the same transaction as the rows.

    key_range_checksums holds what the source's page checksums assume (their
    format, column signature and span width) and the columns' declared types
    when the table was loaded; the checksums themselves are rows
    of SPANS_TABLE (spans_table_ddl). A load stores them right after its tables
    are loaded, every sync replaces those of the spans that changed. content_checksum stays
    NULL (the validation computes content checksums afresh). validated_at is set by the runbook once the
    validation of the whole migration passed, and cleared by every load: a
    run that finds loaded but unvalidated tables knows an earlier run stopped.
    prepared_gids names the prepared transactions of a table loaded in rowid
    ranges: the row is the decision to commit them (ranges.py).
    """
    return sql.SQL(
        """
        CREATE TABLE IF NOT EXISTS {0}.{1} (
            source_id           text NOT NULL,
            table_name          text NOT NULL,
            source_table        text NOT NULL,
            source_path         text NOT NULL,
            status              text NOT NULL,
            rows_loaded         bigint NOT NULL,
            rows_rejected       bigint NOT NULL DEFAULT 0,
            content_checksum    text,
            key_range_checksums jsonb,
            started_at          timestamptz NOT NULL,
            loaded_at           timestamptz NOT NULL DEFAULT now(),
            seconds             double precision NOT NULL,
            validated_at        timestamptz,
            PRIMARY KEY (source_id, table_name)
        );
        ALTER TABLE {0}.{1} ADD COLUMN IF NOT EXISTS validated_at timestamptz;
        ALTER TABLE {0}.{1} ADD COLUMN IF NOT EXISTS prepared_gids text[];
        """
    ).format(sql.Identifier(schema), sql.Identifier(STATE_TABLE)) + spans_table_ddl(schema)


def spans_table_ddl(schema):
    """The state's checksums of the source, one row per (snapshot, target table, span of rowids): the span's
    leaf page records and the digests of its cells (sync.py), so that a sync reads and writes them a span at a
    time, never a whole table's at once. A row is read only with the span width it was written with: the
    rows of a snapshot describe its pages whichever run wrote them, so a state row put back by an undo
    (undo.py) reads the rows of its snapshot that are there, and compares the other spans in full.

    The cells come zlib-compressed, so PostgreSQL stores them out of line as they are (STORAGE EXTERNAL):
    trying to compress them again cost more than writing them (0.2 s against 0.05 s for 1M files)."""
    return sql.SQL(
        """
        CREATE TABLE IF NOT EXISTS {0}.{1} (
            source_id  text NOT NULL,
            table_name text NOT NULL,
            span       bigint NOT NULL,
            width      bigint NOT NULL,
            pages      bytea NOT NULL,
            cells      bytea NOT NULL,
            PRIMARY KEY (source_id, table_name, span)
        );
        ALTER TABLE {0}.{1} ALTER COLUMN cells SET STORAGE EXTERNAL;
        """
    ).format(sql.Identifier(schema), sql.Identifier(SPANS_TABLE))


def state_has_column(cursor, schema, column):
    """Whether the state table has ``column``: one made by an older version may lack the newer ones."""
    cursor.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s "
                   "AND NOT attisdropped", (sql.Identifier(schema, STATE_TABLE).as_string(cursor), column))
    return bool(cursor.fetchone()[0])


def state_rows(cursor, schema):
    """{table_name: [(source_id, source_path, rows_loaded, rows_rejected, loaded_at, validated), ...]}, {} without
    state. A state table older than validated_at reads as never validated."""
    state = sql.Identifier(schema, STATE_TABLE)
    cursor.execute("SELECT to_regclass(%s)", (state.as_string(cursor),))
    if cursor.fetchone()[0] is None:
        return {}
    validated = sql.SQL("validated_at IS NOT NULL" if state_has_column(cursor, schema, "validated_at") else "false")
    cursor.execute(
        sql.SQL("SELECT table_name, source_id, source_path, rows_loaded, rows_rejected, loaded_at, {} FROM {} "
                "WHERE status = 'loaded' ORDER BY loaded_at").format(validated, state)
    )
    rows = {}
    for table_name, *rest in cursor.fetchall():
        rows.setdefault(table_name, []).append(tuple(rest))
    return rows


def record_load(cursor, schema, source_id, table_name, source_table, source_path, rows, rejected, started_at, seconds,
                prepared_gids=None):
    cursor.execute(
        sql.SQL(
            "INSERT INTO {}.{} (source_id, table_name, source_table, source_path, status, rows_loaded, "
            "rows_rejected, started_at, seconds, prepared_gids) VALUES (%s, %s, %s, %s, 'loaded', %s, %s, %s, %s, %s) "
            "ON CONFLICT (source_id, table_name) DO UPDATE SET source_table = EXCLUDED.source_table, "
            "source_path = EXCLUDED.source_path, status = EXCLUDED.status, rows_loaded = EXCLUDED.rows_loaded, "
            "rows_rejected = EXCLUDED.rows_rejected, started_at = EXCLUDED.started_at, loaded_at = now(), "
            "seconds = EXCLUDED.seconds, validated_at = NULL, prepared_gids = EXCLUDED.prepared_gids"
        ).format(sql.Identifier(schema), sql.Identifier(STATE_TABLE)),
        (source_id, table_name, source_table, source_path, rows, rejected, started_at, seconds, prepared_gids),
    )


def dropped_tables(cursor, schema, source_name, source_targets):
    """[(table, rows)] of the target tables whose newest state row names ``source_name`` but whose source table
    is gone (``source_targets``: the target names of every table the source has now), still in the target."""
    dropped = []
    for table, rows in sorted(state_rows(cursor, schema).items()):
        if table in source_targets or rows[-1][1] != source_name or read_table(cursor, schema, table) is None:
            continue
        dropped.append((table, count_rows(cursor, schema, table)))
    return dropped


@dataclass
class ForeignKey:
    """A foreign key of the target, as the sync needs it to order, defer or set aside its checks."""

    name: str
    namespace: str  # of the constraint
    child: int  # oid
    parent: int  # oid
    child_table: str  # regclass text: quoted and qualified as needed
    deferrable: bool
    deferred: bool
    no_action: bool  # ON DELETE NO ACTION: its parent-side check can be deferred, an action (or RESTRICT) cannot
    definition: str  # pg_get_constraintdef(), to add it again as it was


def foreign_keys_touching(cursor, relations):
    """The foreign keys whose child or parent is one of ``relations`` (oids), wherever their other side is."""
    cursor.execute(
        "SELECT k.conname, n.nspname, k.conrelid, k.confrelid, k.conrelid::regclass::text, k.condeferrable, "
        "k.condeferred, k.confdeltype = 'a', pg_get_constraintdef(k.oid) FROM pg_constraint k "
        "JOIN pg_namespace n ON n.oid = k.connamespace "
        "WHERE k.contype = 'f' AND (k.conrelid = ANY(%s::oid[]) OR k.confrelid = ANY(%s::oid[])) ORDER BY k.oid",
        (list(relations), list(relations)))
    return [ForeignKey(*row) for row in cursor.fetchall()]


def unique_column_sets(cursor, relation):
    """([columns tuple, ...] of the unique indexes (primary key included) and exclusion constraints of a table
    (oid), whether one of them is on expressions or partial, so that its columns cannot be listed)."""
    cursor.execute(
        "SELECT ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, n) JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n), "
        "i.indexprs IS NOT NULL OR i.indpred IS NOT NULL OR x.conname IS NOT NULL "
        "FROM pg_index i LEFT JOIN pg_constraint x ON x.conindid = i.indexrelid AND x.contype = 'x' "
        "WHERE i.indrelid = %s AND (i.indisunique OR x.conname IS NOT NULL)", (relation,))
    found = cursor.fetchall()
    return [tuple(columns) for columns, _opaque in found], any(opaque for _columns, opaque in found)


# DDL ------------------------------------------------------------------------------------

def create_table_sql(schema, name, columns):
    """CREATE TABLE for [(name, TargetType, notnull, default Composable or None)]; keys come after the load."""
    parts = []
    for column, target, notnull, default in columns:
        part = [sql.Identifier(column), sql.SQL(target.sql)]  # type text built by typemap from a fixed vocabulary
        if notnull and not target.identity:
            part.append(sql.SQL("NOT NULL"))
        if default is not None:
            part += [sql.SQL("DEFAULT"), default]
        parts.append(sql.SQL(" ").join(part))
    return sql.SQL("CREATE TABLE {}.{} ({})").format(sql.Identifier(schema), sql.Identifier(name),
                                                     sql.SQL(", ").join(parts))


def default_literal(text, target):
    """A typed constant for DEFAULT: the converted text as a literal, cast to the column's type."""
    return sql.SQL("{}::{}").format(sql.Literal(text), sql.SQL(target.sql.split(" GENERATED")[0]))


# Post-data ----------------------------------------------------------------------------

@dataclass
class Step:
    phase: int  # 1 indexes (parallel), 2 key constraints (one session), 3 validations (parallel), 4 sequences
    table: str
    kind: str
    name: str
    statement: object  # Composable
    note: str = ""
    foreign_key: tuple = ()  # validations: (child columns, parent table, parent columns), to name an orphan


def _relation_exists(cursor, schema, name):
    cursor.execute(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
        "AND c.relname = %s", (schema, name))
    return cursor.fetchone() is not None


def _existing_indexes(cursor, schema, table):
    """[(columns tuple, unique, primary)] of the table's indexes on plain columns."""
    cursor.execute(
        """
        SELECT i.indisunique, i.indisprimary,
               ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, n)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n)
        FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace s ON s.oid = c.relnamespace
        WHERE s.nspname = %s AND c.relname = %s AND i.indexprs IS NULL AND i.indpred IS NULL
        """,
        (schema, table),
    )
    return [(tuple(columns), unique, primary) for unique, primary, columns in cursor.fetchall()]


def _existing_foreign_keys(cursor, schema, table):
    """{(columns tuple, parent table, parent columns tuple)} of the table's foreign keys."""
    cursor.execute(
        """
        SELECT ARRAY(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, o)
                     JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.o),
               p.relname,
               ARRAY(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(n, o)
                     JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.o)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace s ON s.oid = c.relnamespace
        JOIN pg_class p ON p.oid = k.confrelid
        WHERE k.contype = 'f' AND s.nspname = %s AND c.relname = %s
        """,
        (schema, table),
    )
    return {(tuple(columns), parent, tuple(parent_columns)) for columns, parent, parent_columns in cursor.fetchall()}


def plan_post_data(cursor, schema, tables):
    """The post-data steps still missing in the target, skipping every object that already exists.

    ``tables``: [dict(source=SourceTable, name=target table, columns={source col: target col}, exists=bool)].
    Returns (steps, notes).
    """
    steps, notes = [], []
    by_source = {t["source"].name.lower(): t for t in tables}
    unique_sets = {}  # target table -> set of column tuples that are (or will be) unique
    taken = set()

    def free(name):
        candidate, number = name, 1
        while candidate in taken or _relation_exists(cursor, schema, candidate):
            number += 1
            candidate = pg_name(f"{name[:58]}{number}")
        taken.add(candidate)
        return candidate

    for entry in tables:
        source, target, mapping = entry["source"], entry["name"], entry["columns"]
        existing = _existing_indexes(cursor, schema, target) if entry["exists"] else []
        have = {(cols, unique) for cols, unique, _primary in existing}
        has_primary = any(primary for _c, _u, primary in existing)
        unique_sets[target] = {cols for cols, unique, _p in existing if unique}
        table_ident = sql.Identifier(schema, target)
        if source.primary_key:
            columns = tuple(mapping[c] for c in source.primary_key)
            unique_sets[target].add(columns)
            if not has_primary:
                name = free(derived_name(target, suffix="pkey"))
                steps.append(Step(1, target, "primary key index", name, sql.SQL(
                    "CREATE UNIQUE INDEX {} ON {} ({})").format(
                    sql.Identifier(name), table_ident, sql.SQL(", ").join(map(sql.Identifier, columns)))))
                steps.append(Step(2, target, "primary key", name, sql.SQL(
                    "ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY USING INDEX {}").format(
                    table_ident, sql.Identifier(name), sql.Identifier(name))))
                have.add((columns, True))
        for index in source.indexes:
            if index.origin == "pk":
                continue
            if index.skipped:
                notes.append(f"index {index.name} on {source.name} not rebuilt: {index.skipped}")
                continue
            columns = tuple(mapping[c] for c, _desc in index.columns)
            if index.unique:
                unique_sets[target].add(columns)
            if (columns, index.unique) in have or (index.unique and (columns, True) in have) or (
                    not index.unique and any(cols[: len(columns)] == columns for cols, _u in have)):
                continue
            have.add((columns, index.unique))
            base = derived_name(target, *columns, suffix="key") if index.origin == "u" else pg_name(index.name)
            name = free(base)
            keys = sql.SQL(", ").join(
                sql.SQL("{}{}").format(sql.Identifier(mapping[c]), sql.SQL(" DESC" if desc else ""))
                for c, desc in index.columns)
            statement = sql.SQL("CREATE {}INDEX {} ON {} ({})").format(
                sql.SQL("UNIQUE " if index.unique else ""), sql.Identifier(name), table_ident, keys)
            steps.append(Step(1, target, "unique index" if index.unique else "index", name, statement))

    for entry in tables:
        source, target, mapping = entry["source"], entry["name"], entry["columns"]
        existing = _existing_foreign_keys(cursor, schema, target) if entry["exists"] else set()
        for fk in source.foreign_keys:
            parent = by_source.get(fk.parent.lower())
            if parent is None:
                notes.append(f"foreign key of {source.name} ({', '.join(fk.columns)}) not built: "
                             f"its parent {fk.parent} is not migrated")
                continue
            parent_columns = fk.parent_columns or parent["source"].primary_key
            if not parent_columns or len(parent_columns) != len(fk.columns):
                notes.append(f"foreign key of {source.name} ({', '.join(fk.columns)}) not built: "
                             f"{fk.parent} has no matching key")
                continue
            try:
                child_cols = tuple(mapping[c] for c in fk.columns)
                parent_cols = tuple(parent["columns"][_source_name(parent["source"], c)] for c in parent_columns)
            except (KeyError, StopIteration):
                notes.append(f"foreign key of {source.name} ({', '.join(fk.columns)}) not built: unknown column")
                continue
            if (child_cols, parent["name"], parent_cols) in existing:
                continue
            if not any(set(cols) == set(parent_cols) for cols in unique_sets.get(parent["name"], ())):
                notes.append(f"foreign key of {source.name} ({', '.join(fk.columns)}) not built: "
                             f"{fk.parent} ({', '.join(parent_columns)}) is not unique")
                continue
            name = free(derived_name(target, *child_cols, suffix="fkey"))
            on_delete = FK_ACTIONS.get((fk.on_delete or "").upper(), "NO ACTION")
            on_update = FK_ACTIONS.get((fk.on_update or "").upper(), "NO ACTION")
            table_ident = sql.Identifier(schema, target)
            steps.append(Step(2, target, "foreign key", name, sql.SQL(
                "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}) "
                "ON DELETE {} ON UPDATE {} NOT VALID").format(
                table_ident, sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, child_cols)),
                sql.Identifier(schema, parent["name"]), sql.SQL(", ").join(map(sql.Identifier, parent_cols)),
                sql.SQL(on_delete), sql.SQL(on_update))))
            steps.append(Step(3, target, "foreign key validation", name, sql.SQL(
                "ALTER TABLE {} VALIDATE CONSTRAINT {}").format(table_ident, sql.Identifier(name)),
                foreign_key=(child_cols, parent["name"], parent_cols)))
    return steps, notes


def _source_name(source, name):
    """The source column a foreign key names (SQLite matches names case-insensitively)."""
    return next(c.name for c in source.columns if c.name.lower() == name.lower())


def sequence_steps(cursor, schema, tables):
    """setval steps for identity and serial columns whose sequence would give a value the column already holds.

    The sequence's next value is compared with max(column) (min(column) for a descending one): a sequence
    that has never been used gives its start value next, so a table whose largest id is 0 or negative needs
    no step (setval(0) is out of bounds for a sequence starting at 1).
    """
    steps = []
    for table in tables:
        cursor.execute(
            "SELECT a.attname, pg_get_serial_sequence(quote_ident(n.nspname) || '.' || quote_ident(c.relname), "
            "a.attname) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
            (schema, table),
        )
        for column, sequence in cursor.fetchall():
            if not sequence:
                continue
            cursor.execute("SELECT seqincrement FROM pg_sequence WHERE seqrelid = %s::regclass", (sequence,))
            increment = cursor.fetchone()[0]
            extreme = "max" if increment > 0 else "min"
            cursor.execute(sql.SQL("SELECT {}({}) FROM {}").format(sql.SQL(extreme), sql.Identifier(column),
                                                                    sql.Identifier(schema, table)))
            bound = cursor.fetchone()[0]
            if bound is None:
                continue
            cursor.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(sql.SQL(sequence)))
            last_value, is_called = cursor.fetchone()
            next_value = last_value + increment if is_called else last_value
            if (next_value > bound) if increment > 0 else (next_value < bound):
                continue
            steps.append(Step(4, table, "sequence", sequence, sql.SQL("SELECT setval({}::regclass, {}, true)").format(
                sql.Literal(sequence), sql.Literal(bound))))
    return steps
