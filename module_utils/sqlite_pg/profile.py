"""Profiling one source table against its target types, before anything is written.

One aggregate query per table (SQLite's C code does the per-value work): row
count, storage classes and NULLs per column, integer ranges where a new
table's width depends on them, and per column the number of values its target
type would refuse. Python then looks only at what SQL cannot judge: values of
storage classes a rule marks as Python-checked, text that must pass UTF-8/NUL
checks (read in slices of a few MB that SQLite concatenates, so Python
touches a slice, not a value), and the first offending rows for the messages.
"""

import json
import re
import sqlite3
from dataclasses import dataclass, field

from .errors import MigrationError, shorten
from .names import sqlite_ident
from .rules import (
    DATETIME_FORMATS,
    EPOCH_MS_THRESHOLD,
    JULIAN_LIMIT,
    Invalid,
    TimestampRule,
    mixed_reason,
    rule_for,
)
from .typemap import map_declared

TEXT_SCAN_ROWS = 8192
TEXT_SCAN_BYTES = 1 << 20
PATTERN_SCAN_ROWS = 16384
PATTERN_VALUE_CHARS = 40  # longer than any value a rule's text_pattern accepts
# The foreign-key bitmap: at most 16 bits (2 bytes) per parent row and 32 MB in all.
BITMAP_SPARSENESS = 16
BITMAP_MAX_BITS = 1 << 28
STORAGE_CLASSES = ("integer", "real", "text", "blob")
DATE_CATEGORIES = ("timestamptz", "timestamp", "date")


@dataclass
class BadValue:
    key: list  # rowid, or the primary key values of a WITHOUT ROWID table
    column: str
    reason: str
    value: object

    def record(self, table, key_columns):
        """A reject-file line (JSON-ready)."""
        rowid = self.key[0] if len(key_columns) == 1 and key_columns[0] in ("rowid", "_rowid_", "oid") else None
        record = {"table": table, "rowid": rowid, "column": self.column, "reason": self.reason,
                  "value": _json_value(self.value)}
        if rowid is None:
            record["key"] = dict(zip(key_columns, (_json_value(v) for v in self.key)))
        return record


@dataclass
class ColumnProfile:
    name: str
    declared: str
    target: object  # TargetType
    storage: list
    invalid: int = 0
    conversion: str = "sql"  # 'sql': SQLite formats it; 'python': Python formats it
    zoned_text: int = 0
    specials: bool = False  # holds characters COPY must escape
    note: str = ""
    datetime_format: str = "auto"  # how a date column reads numbers (rules.DATETIME_FORMATS)
    dates: dict = None  # date columns: values per representation (text, Julian days, Unix seconds, milliseconds)

    def summary(self):
        summary = {"declared": self.declared, "target": self.target.sql, "storage": self.storage,
                   "invalid": self.invalid, "conversion": self.conversion}
        if self.dates is not None:
            summary["dates"] = dict(self.dates, datetime_format=self.datetime_format)
        if self.note:
            summary["note"] = self.note
        return summary


@dataclass
class TableProfile:
    table: str
    rows: int
    columns: list
    key_columns: list
    bad_values: list = field(default_factory=list)  # BadValue, first ones per column (all in reject mode)
    invalid_sql: str = ""  # SQL true for rows SQL judged invalid
    invalid_sql_rows: int = 0
    python_excluded: list = field(default_factory=list)  # keys of rows only Python (or PRAGMAs) found invalid
    uncollected_rejects: int = 0  # invalid rows past the collection limit (the run fails on them anyway)
    problems: list = field(default_factory=list)  # one-line messages that fail the run whatever on_invalid says
    notes: list = field(default_factory=list)

    def exclude(self, key):
        """Leave the row out of the load (reject mode); each row counts once whatever its problems."""
        if key not in self.python_excluded:
            self.python_excluded.append(key)

    @property
    def rejected_rows(self):
        return self.invalid_sql_rows + len(self.python_excluded) + self.uncollected_rejects

    def summary(self):
        return {
            "rows": self.rows,
            "invalid_rows": self.rejected_rows,
            "columns": {c.name: c.summary() for c in self.columns},
            "problems": self.problems,
            "notes": self.notes,
        }


def _json_value(value):
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return "\\x" + bytes(value).hex()
    return value


def display(value):
    """A value read with bytes as text factory, shortened for a message."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return shorten(value)


def describe_key(key_columns, key):
    if len(key_columns) == 1 and key_columns[0] in ("rowid", "_rowid_", "oid"):
        return f"rowid {key[0]}"
    return "key (" + ", ".join(f"{c}={display(v)}" for c, v in zip(key_columns, key)) + ")"


def profile_table(connection, table, targets, options):
    """Profile ``table`` (a SourceTable) read through ``connection`` (bytes text factory, read transaction open).

    ``targets`` maps column names to the existing target column's TargetType, or
    None when the table will be created (the type is then chosen here).
    ``options``: dict with on_invalid, max_rejects, source_timezone, notnull (set
    of target columns that are NOT NULL), datetime_formats ({column: format} of
    the date columns whose representation the operator declared).
    """
    ident = sqlite_ident(table.name)
    key_columns = table.key_columns
    if not key_columns:
        raise MigrationError(f"table {table.name} has neither a rowid nor a primary key: rows cannot be identified")
    key_sql = ", ".join(sqlite_ident(c) if c not in ("rowid", "_rowid_", "oid") else c for c in key_columns)
    timezone = options.get("source_timezone", "UTC")
    notnull = options.get("notnull", set())
    collect = options.get("on_invalid") == "reject"
    limit = (options.get("max_rejects", 0) + 1) if collect else 1
    formats = options.get("datetime_formats", {})

    # What the declaration (or the existing column) fixes before any value is seen. A new table's
    # integer width and content-typed columns are settled after, from the values; neither can make a
    # value invalid (the width is chosen to fit, content typing to hold every storage class found).
    provisional = {}
    for column in table.columns:
        target = targets.get(column.name)
        if target is None:
            target, _ = map_declared(column, table.rowid_alias, STORAGE_CLASSES, None)
            if target.category == "integer":
                target, _ = map_declared(column, table.rowid_alias, ("integer",), (-(2**63), 2**63 - 1))
        provisional[column.name] = rule_for(target, timezone, formats.get(column.name, "auto"))

    select, slots, checks, aggregated, patterns = ["count(*)"], {}, {}, {}, {}
    for column in table.columns:
        q = sqlite_ident(column.name)
        slots[column.name] = {"storage": len(select)}
        select.append(f"group_concat(DISTINCT typeof({q}))")
        if targets.get(column.name) is None and provisional[column.name].target.category == "integer":
            slots[column.name]["range"] = len(select)
            select += [f"min(CASE WHEN typeof({q}) IN ('integer', 'real') THEN {q} END)",
                       f"max(CASE WHEN typeof({q}) IN ('integer', 'real') THEN {q} END)"]
        if provisional[column.name].target.category == "timestamp":
            slots[column.name]["zoned"] = len(select)
            select.append(f"sum({TimestampRule.has_zone_sql(q)})")
        if provisional[column.name].target.category in DATE_CATEGORIES:
            slots[column.name]["dates"] = len(select)
            select += _representation_sql(q, formats.get(column.name, "auto"))
        rule = provisional[column.name]
        valid = _valid_sql(rule.valid_sql(q), q, column, notnull)
        if valid:
            checks[column.name] = aggregated[column.name] = valid
            if rule.text_pattern and table.rowid:
                # Text values are matched against the pattern in slices below; the aggregate tests the rest.
                # Possessive: a matched line is never revisited, so the match keeps no state per line.
                patterns[column.name] = re.compile(b"(?:(?:" + rule.text_pattern + b")\n)*+")
                aggregated[column.name] = _valid_sql(
                    f"CASE WHEN typeof({q}) = 'text' THEN 1 ELSE ({rule.valid_sql(q)}) END", q, column, notnull)
    if checks:
        # One test for the whole row (short-circuit, one aggregate); per-column counts only if it fails.
        select.append("sum(NOT (" + " AND ".join(f"({v})" for v in aggregated.values()) + "))")
    row = _fetch_one(connection, table, "SELECT " + ", ".join(select) + " FROM " + ident)  # noqa: S608 - quoted
    unmatched = _pattern_scan(connection, table, patterns) if patterns and row[0] else set()
    invalid_counts = {}
    if checks and (row[-1] or unmatched):
        counts = _fetch_one(connection, table, "SELECT " + ", ".join(  # noqa: S608 - quoted identifiers
            f"sum(NOT ({v}))" for v in checks.values()) + " FROM " + ident)
        invalid_counts = dict(zip(checks, counts))

    profile = TableProfile(table.name, row[0], [], key_columns)
    invalid_terms = []
    for column in table.columns:
        q = sqlite_ident(column.name)
        slot = slots[column.name]
        storage = sorted(_text(row[slot["storage"]]).split(",")) if row[slot["storage"]] else []
        target = targets.get(column.name)
        note = ""
        if target is None:
            int_range = (row[slot["range"]], row[slot["range"] + 1]) if "range" in slot else None
            if int_range and int_range[0] is None:
                int_range = None
            target, note = map_declared(column, table.rowid_alias, storage, int_range)
        datetime_format = formats.get(column.name, "auto")
        rule = rule_for(target, timezone, datetime_format)
        column_profile = ColumnProfile(column.name, column.declared, target, storage, note=note,
                                       datetime_format=datetime_format)
        column_profile.zoned_text = row[slot["zoned"]] if "zoned" in slot else 0
        profile.columns.append(column_profile)
        if column.name in formats and target.category not in DATE_CATEGORIES:
            profile.problems.append(f"datetime_formats: {table.name}.{column.name} becomes {target.sql}, not a date "
                                    "or timestamp, so a date representation does not apply to it")
        if "dates" in slot and target.category in DATE_CATEGORIES:
            _representations(profile, column_profile, row[slot["dates"]:slot["dates"] + 6])
        if note:
            profile.notes.append(f"{table.name}.{column.name}: {note}")
        if invalid_counts.get(column.name):
            column_profile.invalid += invalid_counts[column.name]
            invalid_terms.append(f"NOT ({checks[column.name]})")
            _collect_sql_bad(connection, profile, table, column, rule, q, checks[column.name], key_sql, limit)
        for storage_class in sorted(set(storage) & rule.python_classes):
            _python_check(connection, profile, table, column, rule, q, storage_class, key_sql, limit, collect)

    text_columns = [c for c in profile.columns if rule_for(c.target, timezone).text_scan and "text" in c.storage]
    if text_columns and profile.rows:
        _text_scan(connection, profile, table, text_columns, key_sql, limit, collect)
    for column_profile in profile.columns:
        rule = rule_for(column_profile.target, timezone, column_profile.datetime_format)
        classes = set(column_profile.storage) - {"null"}
        if rule.format_sql("x", classes, zoned_text=bool(column_profile.zoned_text),
                           specials=column_profile.specials) is None:
            column_profile.conversion = "python"

    if not _references_resolve(connection, profile, table, options.get("rowid_aliases", {})):
        _foreign_key_check(connection, profile, table, collect, limit)
    if invalid_terms:
        profile.invalid_sql = " OR ".join(invalid_terms)
        profile.invalid_sql_rows = _fetch_one(
            connection, table, f"SELECT count(*) FROM {ident} WHERE {profile.invalid_sql}")[0]  # noqa: S608
        if profile.python_excluded and table.rowid:
            # Rows SQL already leaves out must not be counted twice.
            overlap = {found[0] for found in connection.execute(
                f"SELECT {table.rowid} FROM {ident} WHERE ({profile.invalid_sql}) "  # noqa: S608 - quoted
                f"AND {table.rowid} IN (SELECT value FROM json_each(?))",
                (json.dumps([key[0] for key in profile.python_excluded]),))}
            profile.python_excluded = [key for key in profile.python_excluded if key[0] not in overlap]
    return profile


def resolve_datetime_formats(formats, tables):
    """{table: {column: format}} from the datetime_formats option ({"table.column": format}), names matched
    as SQLite matches them (exactly, else ignoring case); raises MigrationError naming an unknown one."""
    if not isinstance(formats, dict):
        raise MigrationError("datetime_formats must be a mapping of table.column to a representation")
    resolved = {}
    for key, datetime_format in formats.items():
        if datetime_format not in DATETIME_FORMATS:
            raise MigrationError(f"datetime_formats: {key} is {datetime_format!r}, not one of "
                                 f"{', '.join(DATETIME_FORMATS)}")
        found = None
        for position, char in enumerate(str(key)):  # table and column names may hold dots themselves
            if char == ".":
                found = found or _find_column(tables, key[:position], key[position + 1:])
        if found is None:
            raise MigrationError(f"datetime_formats: {key} names no column of the source "
                                 "(write it as table.column)")
        table, column = found
        resolved.setdefault(table, {})[column] = datetime_format
    return resolved


def _find_column(tables, table_name, column_name):
    for fold in (str, str.lower):
        for table in tables:
            for column in table.columns:
                if (fold(table.name), fold(column.name)) == (fold(table_name), fold(column_name)):
                    return table.name, column.name
    return None


def _representation_sql(q, datetime_format):
    """Aggregates of a date column: its text values, its numbers by representation, one number of each kind.

    Numbers are counted as the column reads them: by SQLite's 'auto' rule, or all
    under the representation datetime_formats declares (whether they fit is the
    validity test's business).
    """
    number = f"typeof({q}) IN ('integer', 'real')"
    julian = f"{number} AND {q} >= 0 AND {q} < {JULIAN_LIMIT!r}"
    unix = f"{number} AND NOT ({q} >= 0 AND {q} < {JULIAN_LIMIT!r})"
    if datetime_format in ("julian", "unixepoch", "unixepoch_ms"):
        counts = [f"sum({number})" if datetime_format == kind else "0"
                  for kind in ("julian", "unixepoch", "unixepoch_ms")]
    else:
        counts = [f"sum({julian})", f"sum({unix} AND abs({q}) < {EPOCH_MS_THRESHOLD})",
                  f"sum({unix} AND abs({q}) >= {EPOCH_MS_THRESHOLD})"]
    return [f"sum(typeof({q}) = 'text')", *counts, f"min(CASE WHEN {julian} THEN {q} END)",
            f"min(CASE WHEN {unix} THEN {q} END)"]


def _representations(profile, column, found):
    """Record a date column's representations; an 'auto' column holding Julian days and Unix times both
    cannot be read safely (some of its dates would move by decades): a problem that stops the run."""
    text, julian, seconds, millis, julian_example, unix_example = (value or 0 for value in found)
    column.dates = {"iso": text, "julian": julian, "unixepoch": seconds, "unixepoch_ms": millis}
    if column.datetime_format == "auto" and julian and (seconds or millis):
        profile.problems.append(f"table {profile.table}, column {column.name}: value {unix_example!r} "
                                f"{mixed_reason(False, julian_example)}")


def _valid_sql(valid, q, column, notnull):
    """The column's validity test from its rule's ``valid``, or None when nothing can fail.

    Never NULL: a NULL would hide the row from sum() and from NOT (...). A NULL value is valid
    unless the target column is NOT NULL; a value whose test yields NULL is not.
    """
    null_allowed = column.name not in notnull or column.notnull  # SQLite enforced NOT NULL itself
    if valid is None and null_allowed:
        return None
    return f"CASE WHEN {q} IS NULL THEN {int(null_allowed)} ELSE coalesce({valid or 1}, 0) END"


def _pattern_scan(connection, table, patterns):
    """Names of the columns whose text values do not all match their rule's pattern.

    SQLite concatenates each column's text values over a slice of rows, one per
    line; one regular-expression match then checks the slice. A value longer than
    any valid one, or one holding a newline (the line count then differs), makes
    the column's slice fail, and the caller tests that column with SQL instead.
    """
    names = list(patterns)
    inner = ", ".join(
        f"CASE WHEN typeof({sqlite_ident(n)}) <> 'text' THEN NULL WHEN length({sqlite_ident(n)}) <= "
        f"{PATTERN_VALUE_CHARS} THEN {sqlite_ident(n)} ELSE '' END AS c{i}" for i, n in enumerate(names))
    outer = ", ".join(f"count(c{i}), group_concat(c{i}, char(10))" for i in range(len(names)))
    query = (f"SELECT max(r), {outer} FROM (SELECT {table.rowid} AS r, {inner} FROM {sqlite_ident(table.name)} "  # noqa: S608
             f"WHERE {table.rowid} > ? ORDER BY {table.rowid} LIMIT {PATTERN_SCAN_ROWS})")
    matching = set(names)
    last = -(2**63)
    while matching:
        found = _fetch_one(connection, table, query, (last,))
        if found[0] is None:
            break
        for position, name in enumerate(names):
            count, lines = found[1 + 2 * position], found[2 + 2 * position]
            if name in matching and count and (
                    lines.count(b"\n") + 1 != count or not patterns[name].fullmatch(lines + b"\n")):
                matching.discard(name)
        last = found[0]
    return set(names) - matching


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _fetch_one(connection, table, query, parameters=()):
    try:
        return connection.execute(query, parameters).fetchone()
    except sqlite3.DatabaseError as error:
        raise MigrationError(f"source table {table.name} cannot be read: {error}") from None


def _reason(rule, storage_class, value):
    if value is None:
        return f"is NULL but the target column is NOT NULL ({rule.target.sql})"
    try:
        rule.convert(_text(storage_class), value)
    except Invalid as error:
        return str(error)
    return f"cannot become {rule.target.sql}"


def _collect_sql_bad(connection, profile, table, column, rule, q, valid, key_sql, limit):
    query = f"SELECT {key_sql}, typeof({q}), {q} FROM {sqlite_ident(table.name)} WHERE NOT ({valid}) LIMIT ?"  # noqa: S608
    try:
        rows = connection.execute(query, (limit,)).fetchall()
    except sqlite3.DatabaseError as error:
        raise MigrationError(f"source table {table.name} cannot be read: {error}") from None
    width = len(profile.key_columns)
    for found in rows:
        key, storage_class, value = list(found[:width]), found[width], found[width + 1]
        profile.bad_values.append(BadValue(key, column.name, _reason(rule, storage_class, value), value))


def _python_check(connection, profile, table, column, rule, q, storage_class, key_sql, limit, collect):
    query = f"SELECT {key_sql}, {q} FROM {sqlite_ident(table.name)} WHERE typeof({q}) = ?"  # noqa: S608
    width = len(profile.key_columns)
    column_profile = next(c for c in profile.columns if c.name == column.name)
    column_profile.conversion = "python"
    try:
        cursor = connection.execute(query, (storage_class,))
        for found in cursor:
            try:
                rule.convert(storage_class, found[width])
            except Invalid as error:
                key = list(found[:width])
                column_profile.invalid += 1
                if len([b for b in profile.bad_values if b.column == column.name]) < limit:
                    profile.bad_values.append(BadValue(key, column.name, str(error), found[width]))
                profile.exclude(key)
                if not collect and len(profile.python_excluded) >= limit:
                    break
    except sqlite3.DatabaseError as error:
        raise MigrationError(f"source table {table.name} cannot be read: {error}") from None


def _text_scan(connection, profile, table, columns, key_sql, limit, collect):
    """UTF-8 and NUL checks over every text value that reaches PostgreSQL as it is, and whether a
    column holds characters COPY must escape (tab, newline, CR, backslash): the load escapes only those.

    SQLite has no UTF-8 validation, so Python decodes; SQLite concatenates each
    column over a slice of rows first, so Python does one decode per slice and
    column, never one per value.
    """
    ident = sqlite_ident(table.name)
    if not table.rowid:
        # WITHOUT ROWID: no cheap slicing by rowid; these tables are rare and usually small.
        _text_detail(connection, profile, table, columns, key_sql, "1", (), limit, collect, scan_specials=True)
        return
    rowid = table.rowid
    names = [sqlite_ident(c.name) for c in columns]
    concatenated = ", ".join(f"group_concat(c{i}, x'')" for i in range(len(names)))
    renamed = ", ".join(f"{name} AS c{i}" for i, name in enumerate(names))
    query = (f"SELECT max(r), {concatenated} FROM (SELECT {rowid} AS r, {renamed} FROM {ident} "  # noqa: S608
             f"WHERE {rowid} > ? ORDER BY {rowid} LIMIT ?)")
    pending = set(range(len(columns)))  # columns not yet known to hold special characters
    last, rows = -(2**63), 8
    while True:
        found = _fetch_one(connection, table, query, (last, rows))
        high = found[0]
        if high is None:
            return
        # Slices of about TEXT_SCAN_BYTES whatever the width of the rows: memory stays flat.
        size = sum(len(blob) for blob in found[1:] if blob)
        rows = max(1, min(TEXT_SCAN_ROWS, rows * 2 if size < TEXT_SCAN_BYTES // 2 else
                          rows * TEXT_SCAN_BYTES // max(size, 1)))
        broken = False
        for position, blob in enumerate(found[1:]):
            if not blob:
                continue
            if position in pending and any(ch in blob for ch in _SPECIALS):
                columns[position].specials = True
                pending.discard(position)
            if b"\x00" in blob or not _is_utf8(blob):
                broken = True
        if broken:
            _text_detail(connection, profile, table, columns, key_sql, f"{rowid} > ? AND {rowid} <= ?",
                         (last, high), limit, collect)
            if not collect:
                return
        last = high


_SPECIALS = (b"\\", b"\t", b"\n", b"\r")


def _is_utf8(blob):
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _text_detail(connection, profile, table, columns, key_sql, where, parameters, limit, collect,
                 scan_specials=False):
    names = ", ".join(sqlite_ident(c.name) for c in columns)
    query = f"SELECT {key_sql}, {names} FROM {sqlite_ident(table.name)} WHERE {where}"  # noqa: S608
    width = len(profile.key_columns)
    for found in connection.execute(query, parameters):
        for column, value in zip(columns, found[width:]):
            if not isinstance(value, bytes):
                continue
            if scan_specials and not column.specials and any(ch in value for ch in _SPECIALS):
                column.specials = True
            reason = ""
            if b"\x00" in value:
                reason = "contains a NUL character, which PostgreSQL text cannot hold"
            else:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError as error:
                    reason = f"is not valid UTF-8 (byte {error.start})"
            if not reason:
                continue
            key = list(found[:width])
            column.invalid += 1
            if len(profile.bad_values) < limit * len(profile.columns):
                profile.bad_values.append(BadValue(key, column.name, reason, value))
            profile.exclude(key)
            if not collect:
                return


def _references_resolve(connection, profile, table, rowid_aliases):
    """True when every foreign key of ``table`` is shown to hold without PRAGMA foreign_key_check.

    The pragma looks every child row's parent up in the parent's b-tree (a few
    seconds per million rows). A single-column key that references a parent's
    rowid is checked instead against a bitmap of the parent's rowids: one
    sequential read of each table, as long as the child column holds only
    integers (or NULL): its first other value (known from the profile, or met
    in the read of a table loaded without one) ends the bitmap's check.
    False (the pragma runs and names the rows) for any other key, a parent whose
    rowids are too sparse for a small bitmap, a child value that is not an
    integer, or a reference that does not resolve.
    """
    if not table.foreign_keys:
        return True
    storage = {column.name: set(column.storage) for column in profile.columns}
    parents = {name.lower(): (name, alias) for name, alias in rowid_aliases.items()}  # SQLite names ignore case
    for fk in table.foreign_keys:
        name, alias = parents.get(fk.parent.lower(), (None, None))
        classes = storage.get(fk.columns[0], {"text"})
        # All of them: a table loaded without a profile, whose values the read below tells.
        holds_others = classes - {"integer", "null"} and not set(STORAGE_CLASSES) <= classes
        if (len(fk.columns) != 1 or alias is None or holds_others
                or (fk.parent_columns and fk.parent_columns[0].lower() != alias.lower())):
            return False
        parent, key = sqlite_ident(name), sqlite_ident(alias)
        low, high, count = connection.execute(
            f"SELECT min({key}), max({key}), count(*) FROM {parent}").fetchone()  # noqa: S608 - quoted
        if not count or high - low + 1 > min(max(BITMAP_SPARSENESS * count, 1 << 16), BITMAP_MAX_BITS):
            return False
        present = bytearray(((high - low) >> 3) + 1)
        for (rowid,) in connection.execute(f"SELECT {key} FROM {parent}"):  # noqa: S608 - quoted
            offset = rowid - low
            present[offset >> 3] |= 1 << (offset & 7)
        column = sqlite_ident(fk.columns[0])
        for (value,) in connection.execute(
                f"SELECT {column} FROM {sqlite_ident(table.name)} WHERE {column} IS NOT NULL"):  # noqa: S608
            if type(value) is not int:
                return False  # text, a real or a blob: SQLite's own comparison decides
            offset = value - low
            if offset < 0 or value > high or not present[offset >> 3] & (1 << (offset & 7)):
                return False
    return True


def _foreign_key_check(connection, profile, table, collect, limit):
    # Only the first `limit` violations are kept; the others are counted, so memory stays flat.
    violations, count = [], 0
    try:
        for violation in connection.execute(
                "SELECT rowid, parent, fkid FROM pragma_foreign_key_check(?)", (table.name,)):
            count += 1
            if count <= limit:
                violations.append(violation)
    except sqlite3.DatabaseError as error:
        profile.problems.append(f"table {table.name}: PRAGMA foreign_key_check failed: {error}")
        return
    for rowid, parent, fk_id in violations:
        fk = table.foreign_keys[fk_id] if fk_id < len(table.foreign_keys) else None
        columns = ", ".join(fk.columns) if fk else "?"
        reason = f"foreign key ({columns}) references a row missing from {_text(parent)}"
        if rowid is None:
            profile.problems.append(f"table {table.name}: {reason} (WITHOUT ROWID table: the row cannot be named)")
            continue
        profile.bad_values.append(BadValue([rowid], fk.columns[0] if fk else "", reason, None))
        profile.exclude([rowid])
    profile.uncollected_rejects += max(0, count - limit)


def foreign_key_findings(connection, table, storage, rowid_aliases):
    """One-line messages for the first child rows of ``table`` whose parent is missing ([] when none).

    For a table loaded without a profile: ``storage`` maps its columns to the storage classes they may
    hold (all of them when unknown, which rules out the bitmap only for keys that are not rowids).
    """
    profile = TableProfile(table.name, 0, [ColumnProfile(c, "", None, list(s)) for c, s in storage.items()],
                           table.key_columns)
    if not _references_resolve(connection, profile, table, rowid_aliases):
        _foreign_key_check(connection, profile, table, False, 1)
    return profile.problems + [
        f"table {table.name}, column {bad.column}, {describe_key(profile.key_columns, bad.key)}: {bad.reason}"
        for bad in profile.bad_values]


def integrity_check(connection, quick=False):
    """[] when the database passes PRAGMA integrity_check (or quick_check), else the first problems."""
    pragma = "quick_check" if quick else "integrity_check"
    rows = connection.execute(f"PRAGMA {pragma}(20)").fetchall()
    # SQLite heads the first problem with a line "*** in database main ***": one problem, one line.
    messages = [line for r in rows for line in _text(r[0]).splitlines()
                if line and not line.startswith("*** in database ")]
    return [] if messages == ["ok"] else messages
