"""What each table's load reads and how: the SQLite query that formats its COPY lines.

Two kinds of plan:

* **streamed** (the default run): no profile came first, so the query and
  PostgreSQL together must refuse every value the rules refuse. Each field is
  the rule's formatting expression behind the rule's stream test
  (rules.Rule.stream_sql): what PostgreSQL's input would accept although the
  rule refuses it ('now' as a timestamp, a UUID in braces, a varchar whose
  excess is spaces, a NUL that printf() would cut at). A value that fails it
  becomes byte 0x01 (UNCONVERTED) and the load names it (loader.CopyStream).
  What PostgreSQL's input refuses exactly as the rule does (calendar dates,
  the year 0, UUID digits, jsonb syntax, invalid UTF-8) it refuses during COPY,
  and the load maps the COPY line back to its rowid and the rule's reason.
  Numbers SQL cannot format exactly (REAL into double precision or numeric, a
  number into a timestamp without zone read in another zone) are formatted by
  the rule's Python form called from the query (loader.NUMBER_FUNCTION): one
  call per value, no row object. Other classes SQL cannot format (text in
  integer columns, ...) arrive beside the line, NULL for every other row, and
  are converted by the rule's Python form; a class a column seldom holds (a
  blob in a text column) is found by its 0x01 and read again by rowid.
* **profiled** (check mode, ``on_invalid: reject``, ``preflight``, tables the
  run creates): the profile found each column's storage classes and bad rows,
  so the query formats exactly those classes and leaves out rejected rows.
"""

import json

from .loader import NUMBER_FUNCTION, LoadPlan, copy_line_sql
from .names import sqlite_ident
from .profile import ColumnProfile, TableProfile
from .rules import DateRule, TimestampRule, rule_for

STORAGE_CLASSES = ("integer", "real", "text", "blob")
NUMBER_CLASSES = ("integer", "real")  # what Python gets from SQLite as it is (int, float)


def streamed_profile(table, targets, estimated_rows, datetime_formats):
    """A stand-in TableProfile for a table loaded without a profile: its target types, an estimated row count."""
    columns = [ColumnProfile(c.name, c.declared, targets[c.name], [], conversion="streamed",
                             datetime_format=datetime_formats.get(c.name, "auto")) for c in table.columns]
    return TableProfile(table.name, estimated_rows, columns, table.key_columns)


def _copy_escape(q):
    """SQL escaping a text value for COPY; instr() finds the four bytes faster than one GLOB class does."""
    return (f"CASE WHEN instr({q}, char(9)) OR instr({q}, char(10)) OR instr({q}, char(13)) OR instr({q}, '\\') "
            f"THEN replace(replace(replace(replace({q}, '\\', '\\\\'), char(9), '\\t'), char(10), '\\n'), "
            f"char(13), '\\r') ELSE {q} END")


# The storage class a column of each rule's category mostly holds: its CASE arm comes first.
_USUAL_CLASS = {"integer": "integer", "boolean": "integer", "float": "real", "numeric": "integer"}
_BYTES_CLASSES = ("text", "blob", "zoned text")  # what arrives as bytes (text_factory=bytes)


def streamed_field(rule, q, null_allowed=True, position=None):
    """(SQL of the COPY field, the storage classes Python formats, SQL true for a value of those).

    One arm per storage class the rule's SQL formats exactly, the usual class first, each
    behind the rule's stream test (rules.Rule.stream_sql): the field is NULL (then char(1))
    for a value the rule refuses and PostgreSQL would accept silently (a timestamp 'now' or
    'infinity', a number out of a column's range); what PostgreSQL refuses itself it refuses
    during COPY. Numbers the SQL cannot format go to the rule's Python form through
    loader.NUMBER_FUNCTION with the field's ``position``; the other classes are left to Python
    (see raw_fields and load_plan).
    """
    usual = _USUAL_CLASS.get(rule.category, "text")
    order = [usual, "null"] + [c for c in STORAGE_CLASSES if c != usual]
    null = "'\\N'" if null_allowed else "NULL"
    branches, python_classes = [], []
    for storage_class in order:
        if storage_class == "null":
            branches.append(f"WHEN 'null' THEN {null}")
            continue
        formatted = rule.format_sql(q, {storage_class}, specials=False)
        if formatted is None and storage_class in NUMBER_CLASSES and position is not None:
            # The rule's convert() judges the number whole: no SQL test before it.
            branches.append(f"WHEN '{storage_class}' THEN {NUMBER_FUNCTION}({position}, {q})")
            continue
        if formatted is None:
            python_classes.append(storage_class)
            continue
        test = rule.stream_sql(q, storage_class)
        if storage_class == "text" and rule.text_scan:
            # printf() would end the line's text at a NUL silently; PostgreSQL judges the UTF-8 itself.
            test = f"({test}) AND instr({q}, char(0)) = 0" if test else f"instr({q}, char(0)) = 0"
            formatted = _copy_escape(q) if formatted == q else formatted.replace(
                f"ELSE {q} END", f"ELSE {_copy_escape(q)} END")
        checked = f"CASE WHEN {test} THEN {formatted} END" if test else formatted
        if storage_class == "text" and isinstance(rule, TimestampRule) and not rule.aware:
            # PostgreSQL would drop a zone silently from timestamp without time zone: Python converts those.
            checked = f"CASE WHEN {TimestampRule.has_zone_sql(q)} THEN NULL ELSE {checked} END"
            python_classes.append("zoned text")
        branches.append(f"WHEN '{storage_class}' THEN {checked}")
    field = f"CASE typeof({q}) {' '.join(branches)} END"
    if not python_classes:
        return field, [], ""
    plain = [repr(c) for c in python_classes if c != "zoned text"]
    conditions = [f"typeof({q}) IN ({', '.join(plain)})"] if plain else []
    if "zoned text" in python_classes:
        conditions.append(TimestampRule.has_zone_sql(q))
    return field, python_classes, " OR ".join(conditions)


def raw_fields(q, python_classes, condition):
    """(SQL of the raw field(s) beside the line, the storage class of a raw value that arrives as bytes).

    The value, NULL for every row whose value SQL formats; its storage class is its Python
    type (int, float; bytes are of the class the second item names, "" when none). Only
    when text and blobs both go to Python does a typeof() field come first (second item None).
    """
    as_bytes = [c for c in python_classes if c in _BYTES_CLASSES]
    if len(as_bytes) > 1:
        return f"CASE WHEN {condition} THEN typeof({q}) END, CASE WHEN {condition} THEN {q} END", None
    return f"CASE WHEN {condition} THEN {q} END", as_bytes[0].split()[-1] if as_bytes else ""


def seldom_in_python(rule, python_classes, declared):
    """Whether the classes Python formats are ones the column seldom holds, by its target type and its
    declared type (a blob in a TEXT column, a number in a uuid column): then no raw field, the row is
    read again by rowid when one comes."""
    usual = {_USUAL_CLASS.get(rule.category, "text")} | _affinity_classes(declared)
    if isinstance(rule, (TimestampRule, DateRule)):
        usual |= {"integer", "real", "zoned text"}  # Julian days, Unix times; zones into timestamp
    return not usual & set(python_classes)


def _affinity_classes(declared):
    """The storage classes SQLite's type affinity (https://sqlite.org/datatype3.html) leaves most values of a
    column of this declared type in."""
    declared = (declared or "").upper()
    if "INT" in declared:
        return {"integer"}
    if "CHAR" in declared or "CLOB" in declared or "TEXT" in declared:
        return {"text"}
    if "BLOB" in declared or not declared:
        return set(STORAGE_CLASSES)  # no affinity: anything
    if "REAL" in declared or "FLOA" in declared or "DOUB" in declared:
        return {"real"}
    return {"integer", "real", "text"}  # NUMERIC: numbers, and text that reads as none (such as dates)


def load_plan(*, index, name, target_table, schema, source, profile, column_names, create_sql, source_timezone,
              source_id, streamed, notnull=()):
    """The LoadPlan of one table (see the module docstring for the two kinds)."""
    table_sql = sqlite_ident(source.name)
    sql_fields, sql_columns, field_sources, field_types = [], [], [], []
    python_fields, python_columns, python_types, raws, raw_types = [], [], [], [], []
    seldom_types = []
    for column in profile.columns:
        q = sqlite_ident(column.name)
        # A streamed 'auto' date column watches for a mix of Julian days and Unix times (rules.NumberDates).
        rule = rule_for(column.target, source_timezone, column.datetime_format,
                        stream_label=(name, column.name) if streamed else None)
        if streamed:
            # A NULL into a NOT NULL column is refused here, by name, before PostgreSQL would refuse it.
            field, python_classes, condition = streamed_field(rule, q, column.name not in notnull,
                                                              position=len(sql_fields))
            if python_classes and source.rowid and seldom_in_python(rule, python_classes, column.declared):
                seldom_types.append((len(sql_fields), column.target, tuple(python_classes)))
            elif python_classes:
                raw, storage = raw_fields(q, python_classes, condition)
                raws.append(raw)
                raw_types.append((len(sql_fields), column.target, storage))
        else:
            classes = set(column.storage) - {"null"}
            formatted = rule.format_sql(q, classes, zoned_text=bool(column.zoned_text), specials=column.specials)
            if formatted is None:
                python_fields.append(f"typeof({q}), {q}")
                python_columns.append(column_names[column.name])
                python_types.append(column.target)
                continue
            # A NULL that is not a SQLite NULL means a value escaped the profile: the load stops on it.
            field = f"CASE WHEN {q} IS NULL THEN '\\N' ELSE {formatted} END"
        sql_fields.append(field)
        sql_columns.append(column_names[column.name])
        field_sources.append(column.name)
        field_types.append(column.target)
    if seldom_types:
        # No test per value for them: the line's 0x01 shows such a value, and the row's rowid, the query's
        # last field (one integer, cheaper than any typeof()), finds it again.
        raws.append(source.rowid)
    where, parameters = ["1"], []
    if profile.invalid_sql:
        where.append(f"NOT ({profile.invalid_sql})")
    if profile.python_excluded:
        key = source.key_columns
        if source.rowid:
            where.append(f"{source.rowid} NOT IN (SELECT value FROM json_each(?))")  # noqa: S608 - fixed alias
            parameters.append(json.dumps([k[0] for k in profile.python_excluded]))
        else:
            match = " AND ".join(f"{sqlite_ident(c)} IS json_extract(j.value, '$[{i}]')" for i, c in enumerate(key))
            where.append(f"NOT EXISTS (SELECT 1 FROM json_each(?) j WHERE {match})")  # noqa: S608 - quoted
            parameters.append(json.dumps([[_jsonable(v) for v in k] for k in profile.python_excluded]))
    where_sql = " AND ".join(where)
    row_sql = [copy_line_sql(sql_fields)] if sql_fields else []
    select_sql = (f"SELECT {', '.join(row_sql + python_fields + raws)} "  # noqa: S608 - quoted identifiers
                  f"FROM {table_sql} WHERE {where_sql}")
    key_sql = ", ".join(c if c in ("rowid", "_rowid_", "oid") else sqlite_ident(c) for c in source.key_columns)
    python_sources = [c.name for c in profile.columns if column_names[c.name] in python_columns]
    return LoadPlan(
        index=index, source_table=name, target_table=target_table, schema=schema, create_sql=create_sql,
        copy_columns=sql_columns + python_columns, copy_sources=field_sources + python_sources,
        sql_fields=sql_fields, field_types=field_types, raw_types=raw_types, select_sql=select_sql,
        parameters=tuple(parameters), python_types=python_types,
        datetime_formats={c.name: c.datetime_format for c in profile.columns}, source_rows=profile.rows,
        expected_rows=None if streamed else profile.rows - profile.rejected_rows, key_sql=key_sql,
        key_columns=source.key_columns, table_sql=table_sql, where_sql=where_sql, source_timezone=source_timezone,
        source_id=source_id, seldom_types=seldom_types, rowid_sql=source.rowid if seldom_types else "",
    )


def _jsonable(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
