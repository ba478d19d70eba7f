"""Content checksums of a table, computed alike in SQLite and in PostgreSQL.

Every column value is reduced to a canonical JSON value that depends only on
the value as the PostgreSQL column type sees it: PostgreSQL computes it with
a SQL expression, the SQLite side computes it in Python from the source value
converted by the migration's own rules. A row is the JSON array of its
canonical values (PostgreSQL's ``json_build_array`` output, which Python's
``json.dumps`` reproduces byte for byte), its hash the first 60 bits of the
md5 of that text, and a table's checksum the row count plus the sum of the row
hashes. Sums do not depend on row order and add up across key ranges, so any
key range can be compared on its own (``checksum(key_range=...)``), which is
what locates differences here and what an incremental sync needs later.

Canonical values per PostgreSQL type (NULL is JSON null for every type):

=====================  ========================================  ==========================
type                   PostgreSQL expression                     from the converted value
=====================  ========================================  ==========================
smallint/int/bigint    the value (JSON number)                   int
boolean                ``c::int`` (0 or 1)                       0 or 1
text, varchar, enum    ``c::text`` (JSON string)                 the string
char(n)                ``c::text`` (trailing blanks dropped)     ``s.rstrip(" ")``
json                   ``c::text`` (the stored text)             the string
jsonb                  ``c::text`` (jsonb's canonical output)    ``jsonb_text()``
uuid                   ``c::text`` (lowercase, hyphenated)       ``str(UUID)``
timestamptz/timestamp  microseconds since 1970-01-01 UTC         the same, in Python ints
date                   seconds since 1970-01-01                  days * 86400
time                   microseconds since midnight               the same
double precision       ``float8send`` in hex (the IEEE bits)     ``struct.pack(">d")``
real                   ``float4send`` in hex                     ``struct.pack(">f")``
numeric                ``trim_scale(c)::text``                   the same digits
bytea                  hex                                       ``bytes.hex()``
=====================  ========================================  ==========================

Infinite timestamps and dates, NaN numerics and values the migration cannot
convert become JSON strings that no converted source value produces, so they
never compare equal by accident.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import re
import sqlite3
import struct
import uuid
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from json.encoder import c_make_encoder, encode_basestring

from psycopg2 import sql

from .names import key_intervals_join, sqlite_ident
from .rules import Invalid, rule_for, storage_class_of
from .typemap import TargetType

# json_build_array takes at most 100 arguments (FUNC_MAX_ARGS); wider rows
# are arrays of arrays of 100 columns, on both sides.
JSON_ARRAY_MAX_ARGS = 100

EPOCH_UTC = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
EPOCH_NAIVE = datetime.datetime(1970, 1, 1)
ONE_MICROSECOND = datetime.timedelta(microseconds=1)
UNIX_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()

SHORT_JSON = 64  # characters
REMEMBERED_JSON = 4096  # documents per column

CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _json_encoder():
    """json.dumps(value, ensure_ascii=False, allow_nan=False), without the set-up json.dumps
    repeats on every call (a third of the time of a row hash)."""
    encoder = json.JSONEncoder(ensure_ascii=False, check_circular=False, allow_nan=False)
    if c_make_encoder is None:  # a Python built without the _json accelerator
        return encoder.encode
    chunks = c_make_encoder(None, encoder.default, encode_basestring, None, ": ", ", ", False, False, False)
    return lambda value: "".join(chunks(value, 0))


_encode_json = _json_encoder()


@dataclass(frozen=True)
class Checksum:
    """Row count and sum of row hashes of some rows of a table; add them up freely."""

    rows: int = 0
    total: int = 0

    def __add__(self, other: Checksum) -> Checksum:
        return Checksum(self.rows + other.rows, self.total + other.total)

    @property
    def digest(self) -> str:
        """The sum as hex (21 digits hold the sum of 16 million rows)."""
        return f"{self.total:021x}"


def row_hash(values: list) -> int:
    """The first 60 bits of the md5 of a row's canonical JSON text."""
    text = _encode_json(_nest_wide_row(values))
    digest = hashlib.md5(text.encode("utf-8", "surrogatepass"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") >> 4


def _nest_wide_row(values: list) -> list:
    if len(values) <= JSON_ARRAY_MAX_ARGS:
        return values
    return [values[start:start + JSON_ARRAY_MAX_ARGS] for start in range(0, len(values), JSON_ARRAY_MAX_ARGS)]


class CannotConvert(str):
    """Canonical value of a source value the migration cannot convert.

    It starts with a NUL character, which no PostgreSQL text holds, so it never
    equals a canonical value read from PostgreSQL.
    """

    def __new__(cls, reason: str):
        return super().__new__(cls, "\x00cannot convert: " + reason)


# --- jsonb's text output, in Python ------------------------------------------
# PostgreSQL prints jsonb with object keys ordered by length in bytes and then
# bytewise (the last of duplicate keys wins), ", " and ": " as separators,
# strings escaped as escape_json() does (which is what json.dumps does with
# ensure_ascii=False) and numbers as numeric's text.

class _ExactNumber:
    """A JSON number whose float repr would not be numeric's text (json.dumps refuses it)."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _json_float(text: str):
    value = float(text)
    # Most numbers print back as written, and numeric prints them as written too.
    if repr(value) == text and "e" not in text and "E" not in text and not (value == 0 and text[0] == "-"):
        return value
    number = Decimal(text)
    if number.is_zero():
        number = number.copy_abs()  # numeric has no negative zero
    return _ExactNumber(format(number, "f"))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid in jsonb")


def _jsonb_key(pair):
    key = pair[0]
    # Code point order within one UTF-8 length is byte order.
    return len(key.encode("utf-8", "surrogatepass")), key


def _jsonb_object(pairs: list) -> dict:
    if len(pairs) > 1:
        pairs.sort(key=_jsonb_key)  # stable: of duplicate keys dict() keeps the last
    return dict(pairs)


_jsonb_decoder = json.JSONDecoder(parse_float=_json_float, parse_constant=_reject_constant,
                                  object_pairs_hook=_jsonb_object)
_jsonb_scan = _jsonb_decoder.scan_once


def _parse_json(document: str):
    # scan_once is what decode() calls after skipping whitespace; calling it
    # directly saves a third of the parse of a small document.
    try:
        value, end = _jsonb_scan(document, 0)
    except StopIteration:  # leading whitespace, or not JSON at all
        end = -1
    if end != len(document):
        return _jsonb_decoder.decode(document)
    return value


def _jsonb_serialise(value) -> str:
    """Slow path of jsonb_text(), for values holding an _ExactNumber."""
    if isinstance(value, _ExactNumber):
        return value.text
    if isinstance(value, str):
        return encode_basestring(value)
    if isinstance(value, dict):
        members = (encode_basestring(key) + ": " + _jsonb_serialise(item) for key, item in value.items())
        return "{" + ", ".join(members) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_jsonb_serialise(item) for item in value) + "]"
    return _encode_json(value)


def jsonb_text(document) -> str:
    """PostgreSQL's jsonb text output of a JSON document given as text."""
    value = _parse_json(document)
    try:
        return _encode_json(value)
    except TypeError:  # an _ExactNumber somewhere in the document
        return _jsonb_serialise(value)


def decimal_text(number: Decimal) -> str:
    """numeric's text after trim_scale(): no exponent, no trailing fractional zeros."""
    if number.is_nan():
        return "NaN"
    if number.is_infinite():
        return "-Infinity" if number < 0 else "Infinity"
    if number.is_zero():
        return "0"
    text = format(number, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


# --- From the migration's COPY field to the canonical value --------------------
# The migration's rules (rules.py) turn a SQLite value into the COPY text field
# PostgreSQL receives. The slow path here applies those very rules and reads
# the field as PostgreSQL's input function would, so validation has no
# conversion rules of its own: it checks what the migration promised.

_COPY_ESCAPE = re.compile(r"\\(.)")
_COPY_UNESCAPES = {"t": "\t", "n": "\n", "r": "\r"}


def copy_field_text(field: bytes) -> str:
    """The text PostgreSQL reads from one COPY text-format field of the migration.

    The migration escapes backslash, tab, newline and carriage return only;
    COPY reads any other backslashed character as itself.
    """
    return _COPY_ESCAPE.sub(lambda match: _COPY_UNESCAPES.get(match.group(1), match.group(1)), field.decode("utf-8"))


def _time_of_day(text: str) -> int:
    """Microseconds since midnight of HH:MM[:SS[.fraction]], rounded as time_in() rounds."""
    hours, minutes, *rest = text.split(":")
    seconds, _, fraction = (rest[0] if rest else "0").partition(".")
    micros = round(float("0." + fraction) * 1_000_000) if fraction else 0
    return ((int(hours) * 60 + int(minutes)) * 60 + int(seconds)) * 1_000_000 + micros


def _numeric(target):
    """numeric's canonical text of a field, rounded to the column's scale as numeric(p, s) rounds."""
    exponent = Decimal(1).scaleb(-target.scale) if target.precision else None

    def canonical(text):
        number = Decimal(text)
        if exponent is not None and number.is_finite():
            number = number.quantize(exponent, rounding=ROUND_HALF_UP)
        return decimal_text(number)
    return canonical


def _date_seconds(text):
    return (datetime.date.fromisoformat(text).toordinal() - UNIX_EPOCH_ORDINAL) * 86_400


def _timestamp_microseconds(text):
    return _microseconds(datetime.datetime.fromisoformat(text))


def _microseconds(moment: datetime.datetime) -> int:
    if moment.tzinfo is None:
        return (moment - EPOCH_NAIVE) // ONE_MICROSECOND
    return (moment - EPOCH_UTC) // ONE_MICROSECOND


def _epoch(expression: sql.Composable, scale: int) -> sql.Composable:
    if scale == 1:
        return sql.SQL("extract(epoch FROM {})").format(expression)
    return sql.SQL("round(extract(epoch FROM {}) * {})").format(expression, sql.Literal(scale))


def _as_text(column):
    return sql.SQL("{}::text").format(column)


class _Kind:
    """How one PostgreSQL type is compared.

    ``expression`` builds the canonical SQL expression of a column;
    ``from_field(target)`` gives the function from a COPY field's text to the
    canonical value; ``identity`` is the Python type of SQLite values that are
    canonical as they are; ``fast`` (or None) wraps the slow path with a
    shortcut for the common source form.
    """

    def __init__(self, expression, from_field, identity=None, fast=None):
        self.expression = expression
        self.from_field = from_field
        self.identity = identity
        self.fast = fast


def _fast_boolean(slow, zone_is_utc):
    def canonical(raw):
        if type(raw) is int and (raw == 0 or raw == 1):
            return raw
        return slow(raw)
    return canonical


def _fast_uuid(slow, zone_is_utc):
    match = CANONICAL_UUID.fullmatch

    def canonical(raw):
        if type(raw) is str and match(raw):
            return raw
        return slow(raw)
    return canonical


def _fast_timestamp(naive_only_in_utc):
    def wrap(slow, zone_is_utc):
        if naive_only_in_utc and not zone_is_utc:
            return slow  # naive text is in source_timezone: the rule's own path handles zones
        parse = datetime.datetime.fromisoformat

        def canonical(raw):
            # The form SQLAlchemy writes: naive, space-separated, 0 or 6 fractional digits.
            if type(raw) is str and len(raw) in (19, 26) and raw[10] == " ":
                try:
                    moment = parse(raw)
                except ValueError:
                    return slow(raw)
                if moment.tzinfo is None:
                    return (moment - EPOCH_NAIVE) // ONE_MICROSECOND
            return slow(raw)
        return canonical
    return wrap


def _fast_float8(slow, zone_is_utc):
    pack = struct.Struct(">d").pack

    def canonical(raw):
        if type(raw) is float:
            return pack(raw).hex()
        return slow(raw)
    return canonical


def _fast_bpchar(slow, zone_is_utc):
    def canonical(raw):
        if type(raw) is str:
            return raw.rstrip(" ")
        return slow(raw)
    return canonical


def _fast_jsonb(slow, zone_is_utc):
    # Short documents repeat (lists of node names, flags, small settings):
    # each column remembers the canonical text of a few thousand of them.
    remembered = {}

    def canonical(raw):
        if type(raw) is str:
            known = remembered.get(raw)
            if known is not None:
                return known
            try:
                text = jsonb_text(raw)
            except ValueError:
                return slow(raw)
            if len(raw) <= SHORT_JSON and len(remembered) < REMEMBERED_JSON:
                remembered[raw] = text
            return text
        return slow(raw)
    return canonical


def _same(target):
    return lambda text: text


_KINDS = {
    "integer": _Kind(lambda c: c, lambda target: int, identity=int),
    "boolean": _Kind(lambda c: sql.SQL("{}::int").format(c), lambda target: lambda text: int(text == "t"),
                     fast=_fast_boolean),
    # text, varchar, json (kept as written) and the types the migration passes through as text
    "text": _Kind(_as_text, _same, identity=str),
    "bpchar": _Kind(_as_text, lambda target: lambda text: text.rstrip(" "), fast=_fast_bpchar),
    "jsonb": _Kind(_as_text, lambda target: jsonb_text, fast=_fast_jsonb),
    "uuid": _Kind(_as_text, lambda target: lambda text: str(uuid.UUID(text)), fast=_fast_uuid),
    "timestamptz": _Kind(lambda c: _epoch(c, 1_000_000), lambda target: _timestamp_microseconds,
                         fast=_fast_timestamp(naive_only_in_utc=True)),
    # naive text stays as written whatever source_timezone says
    "timestamp": _Kind(lambda c: _epoch(c, 1_000_000), lambda target: _timestamp_microseconds,
                       fast=_fast_timestamp(naive_only_in_utc=False)),
    "date": _Kind(lambda c: _epoch(c, 1), lambda target: _date_seconds),
    "time": _Kind(lambda c: _epoch(c, 1_000_000), lambda target: _time_of_day),
    "float8": _Kind(lambda c: sql.SQL("encode(float8send({}), 'hex')").format(c),
                    lambda target: lambda text: struct.pack(">d", float(text)).hex(), fast=_fast_float8),
    "float4": _Kind(lambda c: sql.SQL("encode(float4send({}), 'hex')").format(c),
                    lambda target: lambda text: struct.pack(">f", float(text)).hex()),
    "numeric": _Kind(lambda c: sql.SQL("trim_scale({})::text").format(c), _numeric),
    "bytea": _Kind(lambda c: sql.SQL("encode({}, 'hex')").format(c),
                   lambda target: lambda text: text[2:].lower()),  # the field is \x and hex digits
}

# PostgreSQL base type names (pg_type.typname) with their own kind; other
# types go by the migration's category of the type.
_KIND_OF_TYPE = {
    "bpchar": "bpchar", "jsonb": "jsonb", "json": "text", "timestamptz": "timestamptz", "timestamp": "timestamp",
    "float8": "float8", "float4": "float4",
}
_KIND_OF_CATEGORY = {
    "integer": "integer", "boolean": "boolean", "text": "text", "other": "text", "uuid": "uuid", "date": "date",
    "time": "time", "numeric": "numeric", "bytea": "bytea",
}
# time with time zone: the migration hands PostgreSQL a bare time of day, which
# takes the session's zone; there is no source value to compare it with.
_NOT_COMPARED = {"timetz"}


def comparable_kind(type_name: str, category: str):
    """The comparison kind of a column (its base type name and the migration's category), or None."""
    if type_name in _NOT_COMPARED:
        return None
    return _KIND_OF_TYPE.get(type_name) or _KIND_OF_CATEGORY.get(category)


@dataclass(frozen=True)
class Column:
    name: str  # PostgreSQL's name; SQLite matches it case-insensitively
    type_name: str  # PostgreSQL base type name (pg_type.typname)
    kind: str  # a key of _KINDS, from comparable_kind()
    target: TargetType  # the migration's view of the column type (rules.rule_for() takes it)


@dataclass(frozen=True)
class TableSpec:
    """A table compared column by column; ``key`` is its integer primary key, if any."""

    name: str  # in PostgreSQL
    columns: tuple  # of Column, in PostgreSQL column order
    key: str | None = None
    sqlite_name: str | None = None  # when SQLite spells the table differently
    rowid: str = "rowid"  # how SQLite addresses the rowid (a column may be named rowid)
    rejected: tuple = ()  # rowids of source rows the migration rejected: left out of the comparison

    @property
    def source_name(self) -> str:
        return self.sqlite_name or self.name

    @property
    def key_index(self) -> int | None:
        names = [column.name for column in self.columns]
        return names.index(self.key) if self.key in names else None


def postgres_row_expression(spec: TableSpec) -> sql.Composable:
    """SQL of a row's canonical JSON text (json_build_array of canonical values)."""
    expressions = [_KINDS[column.kind].expression(sql.Identifier(column.name)) for column in spec.columns]
    return sql.SQL("{}::text").format(_json_array(expressions))


def _json_array(expressions: list) -> sql.Composable:
    if len(expressions) > JSON_ARRAY_MAX_ARGS:
        expressions = [_json_array(expressions[start:start + JSON_ARRAY_MAX_ARGS])
                       for start in range(0, len(expressions), JSON_ARRAY_MAX_ARGS)]
    return sql.SQL("json_build_array({})").format(sql.SQL(", ").join(expressions))


def postgres_hash_expression(spec: TableSpec) -> sql.Composable:
    """SQL of a row's hash: the first 60 bits of the md5 of its canonical text, as bigint."""
    return sql.SQL("('x' || left(md5({}), 15))::bit(60)::bigint").format(postgres_row_expression(spec))


class UndecodableText(bytes):
    """A SQLite text value that is not UTF-8 (read with undecodable_text_factory)."""


def undecodable_text_factory(raw: bytes):
    """sqlite3 text factory that keeps going past invalid UTF-8 (the migration refuses such text)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return UndecodableText(raw)


def _storage_class(raw) -> str:
    return "text" if isinstance(raw, UndecodableText) else storage_class_of(raw)


def source_canonicaliser(column: Column, source_timezone: str = "UTC", shortcuts: bool = True):
    """A function from a SQLite value (not NULL) to its canonical value, by the migration's rules.

    With shortcuts (the default) the common source forms skip the COPY field
    round trip; the result is the same.
    """
    kind = _KINDS[column.kind]
    rule = rule_for(column.target, source_timezone)
    from_field = kind.from_field(column.target)

    def canonical(raw):
        try:
            # The rules read text as bytes, as the migration's reads do.
            field = rule.convert(_storage_class(raw), raw.encode("utf-8") if type(raw) is str else raw)
            return from_field(copy_field_text(field))
        except (Invalid, ValueError, TypeError, ArithmeticError, UnicodeError) as error:
            return CannotConvert(str(error))

    if kind.fast is None or not shortcuts:
        return canonical
    return kind.fast(canonical, source_timezone.upper() == "UTC")


def row_canonicaliser(spec: TableSpec, source_timezone: str = "UTC"):
    """A function from a SQLite row (values in spec.columns order) to its canonical values."""
    kinds = [_KINDS[column.kind] for column in spec.columns]
    full = [source_canonicaliser(column, source_timezone) for column in spec.columns]
    converted = [(index, full[index]) for index, kind in enumerate(kinds) if kind.identity is None]
    expected = [kind.identity for kind in kinds]
    # Whether a row's value types let the identity columns pass as they are,
    # per tuple of value types (few distinct ones: NULLs and the odd text in a
    # number column).
    identity_ok = {}
    none_type = type(None)

    def canonical(row):
        types = tuple(map(type, row))
        ok = identity_ok.get(types)
        if ok is None:
            ok = identity_ok[types] = all(
                wanted is None or found is wanted or found is none_type for wanted, found in zip(expected, types)
            )
        if ok:
            values = list(row)
            for index, convert in converted:
                value = values[index]
                if value is not None:
                    values[index] = convert(value)
            return values
        return [None if value is None else convert(value) for convert, value in zip(full, row)]

    return canonical


# --- The two sides --------------------------------------------------------------

def _tolerating_undecodable_text(method):
    """Run a read again with undecodable_text_factory when a text value is not UTF-8.

    The default text factory is the fast one; sqlite3 stops with an error on
    the first invalid value, and the read starts over with the tolerant one.
    """
    @functools.wraps(method)
    def read(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as error:
            if "decode" not in str(error) or self.connection.text_factory is undecodable_text_factory:
                raise
            self.connection.text_factory = undecodable_text_factory
            return method(self, *args, **kwargs)
    return read


class SqliteTable:
    """A table of the SQLite source, hashed in Python from the migration's converted values."""

    def __init__(self, connection: sqlite3.Connection, spec: TableSpec, source_timezone: str = "UTC"):
        self.connection = connection
        self.spec = spec
        self.canonical_row = row_canonicaliser(spec, source_timezone)
        columns = ", ".join(sqlite_ident(column.name) for column in spec.columns)
        self._table = sqlite_ident(spec.source_name)
        self._select = f"SELECT {columns} FROM {self._table}"  # noqa: S608 - quoted names
        self._key = sqlite_ident(spec.key) if spec.key else None

    def _where(self, key_range=None):
        conditions, parameters = [], []
        if key_range is not None:
            conditions.append(f"{self._key} BETWEEN ? AND ?")
            parameters += key_range
        if self.spec.rejected:
            # rowid is SQLite's own word for it (rowid, _rowid_ or oid), not a name from the data
            conditions.append(f"{self.spec.rowid} NOT IN (SELECT value FROM json_each(?))")  # noqa: S608
            parameters.append(json.dumps(self.spec.rejected))
        return (" WHERE " + " AND ".join(conditions) if conditions else ""), parameters

    def _rows(self, key_range=None, intervals=None):
        if intervals is not None:
            return self._interval_rows(intervals)
        where, parameters = self._where(key_range)
        order = f" ORDER BY {self._key}" if self._key else ""
        return self.connection.execute(self._select + where + order, parameters)

    def _interval_rows(self, intervals):
        """Rows whose key lies in one of the sorted, disjoint inclusive ``intervals``, in key order."""
        # The table's columns are qualified: json_each has columns of its own.
        columns = ", ".join(f"src.{sqlite_ident(column.name)}" for column in self.spec.columns)
        query = f"SELECT {columns} {key_intervals_join(self.spec.source_name, self.spec.key)}"  # noqa: S608
        parameters = [json.dumps(intervals)]
        if self.spec.rejected:
            query += f" WHERE src.{self.spec.rowid} NOT IN (SELECT value FROM json_each(?))"  # noqa: S608
            parameters.append(json.dumps(self.spec.rejected))
        return self.connection.execute(query + f" ORDER BY span.id, src.{self._key}", parameters)

    @_tolerating_undecodable_text
    def checksum(self, key_range=None) -> Checksum:
        """Rows and hash sum of the table, or of the rows whose key is in key_range (inclusive)."""
        canonical_row = self.canonical_row
        rows = total = 0
        for row in self._rows(key_range):
            total += row_hash(canonical_row(row))
            rows += 1
        return Checksum(rows, total)

    @_tolerating_undecodable_text
    def bucket_checksums(self, origin: int, width: int, key_range=None, intervals=None) -> dict:
        """Checksums per bucket of keys: bucket b holds origin + b*width ... origin + (b+1)*width - 1.

        ``intervals``: only the rows whose key lies in these sorted, disjoint [low, high] intervals.
        """
        canonical_row, key_index = self.canonical_row, self.spec.key_index
        buckets = {}
        current, rows, total = None, 0, 0
        for row in self._rows(key_range, intervals):
            key = row[key_index]
            if type(key) is not int:
                continue  # not a key PostgreSQL can hold; the row count check reports it
            bucket = (key - origin) // width
            if bucket != current:
                if current is not None:
                    buckets[current] = Checksum(rows, total)
                current, rows, total = bucket, 0, 0
            total += row_hash(canonical_row(row))
            rows += 1
        if current is not None:
            buckets[current] = Checksum(rows, total)
        return buckets

    @_tolerating_undecodable_text
    def canonical_rows(self, key_range=None) -> dict:
        """key -> (canonical values, source values) of the rows in key_range (all rows by default)."""
        key_index = self.spec.key_index
        return {row[key_index]: (self.canonical_row(row), row) for row in self._rows(key_range)}

    def row_count(self) -> int:
        """Rows of the table, rejected ones left out."""
        where, parameters = self._where()
        return self.connection.execute(f"SELECT count(*) FROM {self._table}{where}", parameters).fetchone()[0]  # noqa: S608

    def odd_key_count(self) -> int:
        """Rows (rejected ones left out) whose key is not an integer, so no key range holds them."""
        where, parameters = self._where()
        where += (" AND " if where else " WHERE ") + f"typeof({self._key}) <> 'integer'"
        return self.connection.execute(f"SELECT count(*) FROM {self._table}{where}", parameters).fetchone()[0]  # noqa: S608

    def key_bounds(self):
        """(min, max) of the integer keys, (None, None) when there are none."""
        key = self._key
        query = f"SELECT min({key}), max({key}) FROM {self._table} WHERE typeof({key}) = 'integer'"  # noqa: S608
        return tuple(self.connection.execute(query).fetchone())


class PostgresTable:
    """The same table in PostgreSQL, hashed by the server."""

    def __init__(self, connection, schema: str, spec: TableSpec):
        self.connection = connection
        self.spec = spec
        self._table = sql.Identifier(schema, spec.name)
        self._key = sql.Identifier(spec.key) if spec.key else None
        self._hash = postgres_hash_expression(spec)

    def _where(self, key_range):
        if key_range is None:
            return sql.SQL(""), {}
        return sql.SQL(" WHERE {} BETWEEN %(low)s AND %(high)s").format(self._key), {
            "low": key_range[0], "high": key_range[1]}

    def _rows_in(self, intervals):
        """FROM-clause items of the rows whose key lies in ``intervals``, and their parameters: one index range
        scan per interval (OFFSET 0 keeps the planner from turning it into a join that tests every row against
        every interval)."""
        return sql.SQL("unnest(%(lows)s::bigint[], %(highs)s::bigint[]) AS "
                       "sqlite_to_postgres_span(sqlite_to_postgres_low, sqlite_to_postgres_high) CROSS JOIN LATERAL "
                       "(SELECT * FROM {} WHERE {} BETWEEN sqlite_to_postgres_low AND sqlite_to_postgres_high "
                       "OFFSET 0) AS sqlite_to_postgres_rows").format(self._table, self._key), {
            "lows": [low for low, _high in intervals], "highs": [high for _low, high in intervals]}

    def _fetch(self, query, parameters):
        with self.connection.cursor() as cursor:
            cursor.execute(query, parameters)
            return cursor.fetchall()

    def checksum(self, key_range=None) -> Checksum:
        where, parameters = self._where(key_range)
        query = sql.SQL("SELECT count(*), coalesce(sum({}), 0) FROM {}{}").format(self._hash, self._table, where)
        rows, total = self._fetch(query, parameters)[0]
        return Checksum(rows, int(total))

    def bucket_checksums(self, origin: int, width: int, key_range=None, intervals=None) -> dict:
        """As SqliteTable.bucket_checksums()."""
        if intervals is None:
            where, parameters = self._where(key_range)
            rows = sql.SQL("{}{}").format(self._table, where)
        else:
            rows, parameters = self._rows_in(intervals)
        parameters.update(origin=origin, width=width)
        # Keys are never below origin, so integer division is floor division, as in Python.
        query = sql.SQL(
            "SELECT ({key} - %(origin)s) / %(width)s, count(*), sum({hash}) FROM {rows} GROUP BY 1"
        ).format(key=self._key, hash=self._hash, rows=rows)
        return {bucket: Checksum(rows, int(total)) for bucket, rows, total in self._fetch(query, parameters)}

    def canonical_rows(self, key_range=None) -> dict:
        """key -> canonical values of the rows in key_range (all rows by default)."""
        where, parameters = self._where(key_range)
        query = sql.SQL("SELECT {}, {} FROM {}{}").format(
            self._key, postgres_row_expression(self.spec), self._table, where)
        return {key: _flatten_wide_row(json.loads(text)) for key, text in self._fetch(query, parameters)}

    def display_values(self, keys) -> dict:
        """key -> the columns' text output, for showing differences."""
        columns = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c.name)) for c in self.spec.columns)
        query = sql.SQL("SELECT {}, {} FROM {} WHERE {} = ANY(%(keys)s)").format(
            self._key, columns, self._table, self._key)
        return {row[0]: row[1:] for row in self._fetch(query, {"keys": list(keys)})}

    def key_bounds(self):
        query = sql.SQL("SELECT min({key}), max({key}) FROM {table}").format(key=self._key, table=self._table)
        return tuple(self._fetch(query, {})[0])

    def written_since(self, snapshot: str, limit: int) -> tuple:
        """(rows, keys): the row count now, and the keys of the rows written by a transaction that
        ``snapshot`` (pg_current_snapshot() text) may not have seen; keys is None when there are more
        than ``limit`` of them, or any in a table without a key.

        "May not have seen": an xmin at or above the snapshot's lowest running xid. That also takes
        some transactions the snapshot did see (those that had ended between it and the newest), but
        never misses one: the snapshot's list of running xids leaves out subtransactions. A row
        version's xmin has 32 bits, the snapshot's xids 64: they are compared modulo 2^32, which is
        exact for 2^31 transactions; an older row that compares as newer is only compared again.
        """
        lowest = int(snapshot.split(":")[0]) % (1 << 32)
        newer = sql.SQL("((xmin::text::bigint - %(lowest)s) %% 4294967296 + 4294967296) %% 4294967296 < 2147483648")
        key = self._key if self._key else sql.SQL("NULL::bigint")
        query = sql.SQL("SELECT count(*), count(*) FILTER (WHERE {newer}), "
                        "(array_agg({key} ORDER BY {key}) FILTER (WHERE {newer}))[1:%(limit)s] FROM {table}").format(
            key=key, newer=newer, table=self._table)
        rows, written, keys = self._fetch(query, {"lowest": lowest, "limit": limit})[0]
        if written and (written > limit or self._key is None):
            return rows, None
        return rows, keys or []


def _flatten_wide_row(values: list) -> list:
    if values and isinstance(values[0], list):
        return [value for chunk in values for value in chunk]
    return values
