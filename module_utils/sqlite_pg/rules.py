"""Conversion rules: how a SQLite value becomes text in a COPY stream for a target type.

Each rule exists twice, on purpose:

* as SQLite SQL, evaluated by SQLite's C code while it reads: a validity test
  (used by the profile, and to leave bad rows out in reject mode) and a
  formatting expression (used by the load). These cost no Python per value,
  which is what keeps the load fast;
* as Python (``convert``), for the storage classes SQL cannot format exactly
  (REAL values: SQLite prints 15 digits, and even quote() rounds some doubles
  wrongly in 3.40), for values only Python can judge (a number stored as text
  in an integer column), for defaults, and to say why a value is invalid.

Every formatting result is already escaped for COPY's text format, so the load
only joins fields with tabs and rows with newlines.
"""

import datetime
import json
import math
import re
import uuid
from decimal import Decimal, InvalidOperation

from .typemap import FLOAT4_MAX

try:
    from zoneinfo import ZoneInfo
except ImportError:  # Python < 3.9
    ZoneInfo = None

# A number in a date column (https://sqlite.org/lang_datefunc.html) is a Julian day number or Unix time.
# datetime_formats names the representation of a column; 'auto' reads each number as SQLite's own 'auto'
# modifier does (0 <= n < JULIAN_LIMIT: a Julian day; other numbers: Unix time), and keeps this module's
# older rule for milliseconds: |n| >= EPOCH_MS_THRESHOLD is Unix time in milliseconds.
DATETIME_FORMATS = ("auto", "iso", "julian", "unixepoch", "unixepoch_ms")
EPOCH_MS_THRESHOLD = 100_000_000_000  # |n| below this is epoch seconds (to year 5138), above it milliseconds
JULIAN_LIMIT = 5373484.5  # SQLite's 'auto': Julian day numbers are 0 <= n < this (to 9999-12-31)
JULIAN_FIRST = 1721425.5  # 0001-01-01 00:00 UTC, the first instant converted (as for text and Unix time)
JULIAN_UNIX_DAY = 2440588  # the Julian day whose noon is 1970-01-01 12:00 UTC
JULIAN_UNIX_MS = 210866760000000  # 1970-01-01 00:00 UTC in milliseconds from the start of Julian day 0
EPOCH_MIN_S, EPOCH_END_S = -62135596800, 253402300800  # 0001-01-01 00:00 and 10000-01-01 00:00 UTC
EPOCH_MIN_MS, EPOCH_END_MS = EPOCH_MIN_S * 1000, EPOCH_END_S * 1000
MICROS_FROM_YEAR_1 = -EPOCH_MIN_S * 1_000_000  # shifts Unix microseconds so that every valid instant is >= 0
UTC = datetime.timezone.utc
UNIX_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)
# The SQL function a source connection provides for loads no profile has vetted (source.py):
# same_date_representation(column, is_julian, value) is 1 while the column's numbers are all Julian days or
# all Unix times, NULL once both have appeared (the field's formatting then gives NULL and the load stops).
SAME_REPRESENTATION = "same_date_representation"
TRUE_WORDS = ("true", "t", "yes", "y", "on", "1")
FALSE_WORDS = ("false", "f", "no", "n", "off", "0")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_INTEGER_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")
_DECIMAL_TEXT = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")
_FLOAT_TEXT = re.compile(r"^\s*[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)\s*$", re.IGNORECASE)
_TIMESTAMP_TEXT = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?\s*(Z|z|[+-]\d{2}:\d{2})?\s*$"
)
_TIME_TEXT = re.compile(r"^\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")
_UUID_TEXT = re.compile(
    r"^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32})$")
# SQLite's date parser skips tabs and line breaks that COPY would take as field and row ends.
_NO_BREAKS = "instr({q}, char(9)) = 0 AND instr({q}, char(10)) = 0 AND instr({q}, char(13)) = 0"
_HEX_DIGIT = "[0-9a-fA-F]"
_UUID_GROUPS = (8, 4, 4, 4, 12)  # hex digits between the dashes
_UUID_GLOB = "-".join(_HEX_DIGIT * n for n in _UUID_GROUPS)
_DATE_PREFIX = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-"  # year and month of YYYY-MM-DD, for GLOB
# The stream's first test of a text timestamp, for the shapes applications write (SQLAlchemy:
# 'YYYY-MM-DD HH:MM:SS.ffffff'): one cheap GLOB, then julianday() requires digits in every '?'
# of the date and time and a fraction of digits only (the last one a digit, so no zone or space
# follows). What these let through and valid_sql refuses (year 0000, a day past its month's end)
# PostgreSQL refuses itself; any other text gets valid_sql's whole test.
_TIMESTAMP_SHAPES = ("????-??-??[ T]??:??:??.?????[0-9]", "????-??-??[ T]??:??:??")
_UUID_SHAPES = ("????????-????-????-????-????????????", "?" * 32)  # PostgreSQL's uuid input checks the digits
_ISO_DATE = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]"

# Text values a rule's valid_sql surely accepts, as one regular expression over bytes: the profile
# tries it first on whole slices of a column (one match per slice in C, not one SQL test per value)
# and falls back to valid_sql for the column when a slice does not match. Each pattern is a subset
# of its valid_sql: a value it accepts, valid_sql accepts too.
_LEAP_YEAR = rb"(?:\d\d(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
_CALENDAR_DATE = (
    rb"(?!0000)(?:\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
    rb"|02-(?:0[1-9]|1\d|2[0-8]))|" + _LEAP_YEAR + rb"-02-29)"
)
_TIMESTAMP_PATTERN = (
    _CALENDAR_DATE
    + rb"(?:[ T](?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d+)?)?(?:Z|[+-](?:0\d|1[0-3]):[0-5]\d)?)?"
)
_UUID_PATTERN = b"-".join(b"[0-9a-fA-F]{%d}" % n for n in _UUID_GROUPS) + b"|[0-9a-fA-F]{32}"


class Invalid(ValueError):
    """A value that cannot become the target type; the message says why."""


def escape_copy(text):
    return text.translate(_COPY_ESCAPES).encode("utf-8")


def sql_escape(q):
    """SQL that escapes a text value for COPY; only values holding a special character pay for replace()."""
    return (
        f"CASE WHEN {q} GLOB '*[' || char(9, 10, 13, 92) || ']*' THEN "
        f"replace(replace(replace(replace({q}, '\\', '\\\\'), char(9), '\\t'), char(10), '\\n'), char(13), '\\r') "
        f"ELSE {q} END"
    )


def decode_text(value):
    if isinstance(value, str):
        text = value
    else:
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise Invalid(f"is not valid UTF-8 (byte {error.start})") from None
    if "\x00" in text:
        raise Invalid("contains a NUL character, which PostgreSQL text cannot hold")
    return text


def float_text(value):
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)  # the shortest text that reads back as exactly this double


class Rule:
    """The conversion for one target type. Subclasses fill in the category's details."""

    category = ""
    python_classes = frozenset()  # storage classes only Python can validate
    text_scan = False  # text values pass through as they are: UTF-8 and NUL must be checked
    text_pattern = None  # bytes regex of text values valid_sql surely accepts (see _TIMESTAMP_PATTERN)

    def __init__(self, target, source_timezone="UTC", datetime_format="auto", stream_label=None):
        self.target = target
        self.source_timezone = source_timezone

    def valid_sql(self, q):
        """SQL true for every value of any storage class that converts (NULL included), or None: all do."""
        return None

    def stream_sql(self, q, storage_class):
        """SQL true for a value of ``storage_class`` the streamed load may hand PostgreSQL, or None: any.

        The stream's half of valid_sql: it keeps only what PostgreSQL's input would
        accept although this rule refuses it; what PostgreSQL refuses itself it refuses
        during COPY, and the load names the value (loader._refused). The profile keeps
        valid_sql whole.
        """
        return self.valid_sql(q)

    def format_sql(self, q, classes, zoned_text=False, specials=True):
        """SQL giving the COPY field for the given storage classes, or None when Python must format some.

        ``zoned_text``: the profile found text timestamps with a zone (matters for timestamp without time zone).
        ``specials``: the profile found tabs, newlines, CRs or backslashes in the column's text (else no escaping).
        """
        return None

    def convert(self, storage_class, value):
        """The COPY field (bytes) for one value; raises Invalid with the reason."""
        raise NotImplementedError

    def field(self, storage_class, value):
        if value is None:
            return b"\\N"
        return self.convert(storage_class, value)


class TextRule(Rule):
    category = "text"
    python_classes = frozenset({"blob"})
    text_scan = True

    def valid_sql(self, q):
        if not self.target.length:
            return None
        return f"length({q}) <= {int(self.target.length)}"

    def format_sql(self, q, classes, zoned_text=False, specials=True):
        text = sql_escape(q) if specials else q
        if classes <= {"text"}:
            return text
        if classes <= {"integer"}:
            return f"CAST({q} AS TEXT)"
        if classes <= {"text", "integer"}:
            return f"CASE WHEN typeof({q}) = 'integer' THEN CAST({q} AS TEXT) ELSE {text} END"
        return None

    def convert(self, storage_class, value):
        if storage_class == "real":
            text = float_text(value)
        elif storage_class == "integer":
            text = str(value)
        else:
            text = decode_text(value)
        if self.target.length and len(text) > self.target.length:
            raise Invalid(f"is {len(text)} characters long, more than {self.target.sql} holds")
        return escape_copy(text)


class OtherRule(TextRule):
    """Types the engine does not know (enums, inet, interval, ...): text goes through, PostgreSQL judges it."""

    category = "other"

    def valid_sql(self, q):
        return f"typeof({q}) <> 'blob'"

    def stream_sql(self, q, storage_class):
        return "0" if storage_class == "blob" else None

    def convert(self, storage_class, value):
        if storage_class == "blob":
            raise Invalid(f"is a BLOB, which cannot become {self.target.sql}")
        return super().convert(storage_class, value)


class IntegerRule(Rule):
    category = "integer"
    python_classes = frozenset({"text"})

    def valid_sql(self, q):
        return (
            f"CASE typeof({q}) WHEN 'integer' THEN {self.stream_sql(q, 'integer') or '1'} "
            f"WHEN 'real' THEN ({self.stream_sql(q, 'real')}) WHEN 'blob' THEN 0 ELSE 1 END"
        )

    def stream_sql(self, q, storage_class):
        low, high = self.target.low, self.target.high
        if storage_class == "integer":
            return None if high >= 2**63 - 1 else f"{q} BETWEEN {low} AND {high}"
        if storage_class == "real":
            return f"{q} = CAST({q} AS INTEGER) AND {q} >= {float(low)!r} AND {q} <= {float(high)!r}"
        return "0" if storage_class == "blob" else None

    def format_sql(self, q, classes, zoned_text=False, specials=True):
        if classes <= {"integer"}:
            return f"CAST({q} AS TEXT)"
        if classes <= {"integer", "real"}:
            return f"CAST(CAST({q} AS INTEGER) AS TEXT)"
        return None

    def convert(self, storage_class, value):
        if storage_class == "integer":
            number = value
        elif storage_class == "real":
            if not float(value).is_integer():
                raise Invalid(f"is not a whole number, so it cannot become {self.target.sql}")
            number = int(value)
        elif storage_class == "text":
            text = decode_text(value)
            if not _INTEGER_TEXT.match(text):
                raise Invalid(f"is not an integer, so it cannot become {self.target.sql}")
            number = int(text)
        else:
            raise Invalid(f"is a BLOB, which cannot become {self.target.sql}")
        if not self.target.low <= number <= self.target.high:
            raise Invalid(f"is out of range for {self.target.sql}")
        return str(number).encode()


class FloatRule(Rule):
    category = "float"
    python_classes = frozenset({"text"})

    def valid_sql(self, q):
        if self.target.float4:
            return f"CASE typeof({q}) WHEN 'blob' THEN 0 WHEN 'text' THEN 1 ELSE abs({q}) <= {FLOAT4_MAX!r} END"
        return f"typeof({q}) <> 'blob'"

    def format_sql(self, q, classes, zoned_text=False, specials=True):
        if classes <= {"integer"}:
            return f"CAST({q} AS TEXT)"
        return None

    def convert(self, storage_class, value):
        if storage_class == "integer":
            number = float(value)
            text = str(value)
        elif storage_class == "real":
            number = value
            text = float_text(value)
        elif storage_class == "text":
            raw = decode_text(value)
            if not _FLOAT_TEXT.match(raw):
                raise Invalid(f"is not a number, so it cannot become {self.target.sql}")
            number = float(raw)
            text = float_text(number)
        else:
            raise Invalid(f"is a BLOB, which cannot become {self.target.sql}")
        if self.target.float4 and abs(number) > FLOAT4_MAX and number != float("inf"):
            raise Invalid(f"is out of range for {self.target.sql}")
        return text.encode()


class NumericRule(Rule):
    category = "numeric"
    python_classes = frozenset({"text"})

    def _integer_digits(self):
        return self.target.precision - self.target.scale if self.target.precision else 0

    def valid_sql(self, q):
        digits = self._integer_digits()
        if not digits:
            return f"typeof({q}) <> 'blob'"
        # A value fits when, rounded to the scale, it has at most precision - scale integer digits.
        limit = f"1e{digits}"
        return (
            f"CASE typeof({q}) WHEN 'blob' THEN 0 WHEN 'text' THEN 1 "
            f"ELSE abs(round({q}, {int(self.target.scale)})) < {limit} END"
        )

    def format_sql(self, q, classes, zoned_text=False, specials=True):
        if classes <= {"integer"}:
            return f"CAST({q} AS TEXT)"
        return None

    def convert(self, storage_class, value):
        if storage_class == "integer":
            text = str(value)
        elif storage_class == "real":
            if value != value or value in (float("inf"), float("-inf")):
                if self.target.precision:
                    raise Invalid(f"is not finite, so it cannot become {self.target.sql}")
                return float_text(value).encode()
            text = repr(value)
        elif storage_class == "text":
            text = decode_text(value).strip()
            if not _DECIMAL_TEXT.match(text):
                raise Invalid(f"is not a decimal number, so it cannot become {self.target.sql}")
        else:
            raise Invalid(f"is a BLOB, which cannot become {self.target.sql}")
        digits = self._integer_digits()
        if digits:
            try:
                rounded = Decimal(text).quantize(Decimal(1).scaleb(-self.target.scale))
            except InvalidOperation:
                raise Invalid(f"does not fit {self.target.sql}") from None
            if rounded.adjusted() >= digits:
                raise Invalid(f"does not fit {self.target.sql}")
        return text.encode()


class BooleanRule(Rule):
    category = "boolean"
    _WORDS = ", ".join(f"'{word}'" for word in TRUE_WORDS + FALSE_WORDS)
    _TRUE = ", ".join(f"'{word}'" for word in TRUE_WORDS)

    def valid_sql(self, q):
        return (
            f"CASE typeof({q}) WHEN 'integer' THEN {self.stream_sql(q, 'integer')} "
            f"WHEN 'real' THEN {self.stream_sql(q, 'real')} "
            f"WHEN 'text' THEN {self.stream_sql(q, 'text')} WHEN 'blob' THEN 0 ELSE 1 END"
        )

    def stream_sql(self, q, storage_class):
        return {"integer": f"{q} IN (0, 1)", "real": f"{q} IN (0.0, 1.0)",
                "text": f"lower(trim({q})) IN ({self._WORDS})"}.get(storage_class, "0")

    def format_sql(self, q, classes, zoned_text=False, specials=True):
        numeric = f"CASE {q} WHEN 1 THEN 't' WHEN 0 THEN 'f' END"
        if classes <= {"integer", "real"}:
            return numeric
        word = f"CASE WHEN lower(trim({q})) IN ({self._TRUE}) THEN 't' ELSE 'f' END"
        if classes <= {"text"}:
            return word
        return f"CASE WHEN typeof({q}) IN ('integer', 'real') THEN {numeric} ELSE {word} END"

    def convert(self, storage_class, value):
        if storage_class in ("integer", "real") and value in (0, 1):
            return b"t" if value == 1 else b"f"
        if storage_class == "text":
            word = decode_text(value).strip().lower()
            if word in TRUE_WORDS:
                return b"t"
            if word in FALSE_WORDS:
                return b"f"
        raise Invalid("is not a boolean (0/1, true/false, t/f, yes/no, y/n, on/off)")


def sql_text(text):
    return "'" + text.replace("'", "''") + "'"


def _floor_sql(q):
    # CAST truncates towards zero; floor() is not in every SQLite build.
    return f"(CAST({q} AS INTEGER) - ({q} < CAST({q} AS INTEGER)))"


def _unix_micros_sql(q, per_unit, integers_only):
    """Unix microseconds of ``q`` in Unix seconds (per_unit 10**6) or milliseconds (10**3)."""
    if integers_only:
        return f"({q} * {per_unit})"
    whole = _floor_sql(q)
    return f"({whole} * {per_unit} + CAST(({q} - {whole}) * {float(per_unit)!r} + 0.5 AS INTEGER))"


def _julian_micros_sql(q, integers_only):
    """Unix microseconds of the Julian day number ``q`` (>= 0); see julian_micros()."""
    if integers_only:
        return f"(({q} - {JULIAN_UNIX_DAY}) * 86400000000 + 43200000000)"
    millis, day = f"CAST({q} * 86400000.0 + 0.5 AS INTEGER)", f"CAST({q} AS INTEGER)"
    return (f"(CASE WHEN {millis} / 86400000.0 = {q} THEN ({millis} - {JULIAN_UNIX_MS}) * 1000 "
            f"ELSE ({day} - {JULIAN_UNIX_DAY}) * 86400000000 + 43200000000 "
            f"+ CAST(({q} - {day}) * 86400000000.0 + 0.5 AS INTEGER) END)")


def _scaled_micros(value, per_unit):
    whole = math.floor(value)
    return whole * per_unit + int((value - whole) * float(per_unit) + 0.5)


def julian_micros(value):
    """Unix microseconds of a Julian day number (0 <= value < JULIAN_LIMIT), with the SQL's arithmetic.

    A double near today's Julian days resolves about 40 microseconds. When the
    instant SQLite itself reads (whole milliseconds, as datetime() and julianday()
    round) gives back this very double, that instant is the value; otherwise the
    double's nearest microsecond is. So what julianday() stored comes back exactly.
    """
    millis = int(value * 86400000.0 + 0.5)
    if millis / 86400000.0 == value:
        return (millis - JULIAN_UNIX_MS) * 1000
    day = int(value)
    return (day - JULIAN_UNIX_DAY) * 86_400_000_000 + 43_200_000_000 + int((value - day) * 86400000000.0 + 0.5)


def is_julian_day(value):
    """SQLite's 'auto' rule: whether a number in a date column is a Julian day number (else Unix time)."""
    return 0 <= value < JULIAN_LIMIT


_DECLARED = "which datetime_formats declares for this column"
_OUT_OF_RANGE = {
    "julian": f"is not a Julian day number from {JULIAN_FIRST} (0001-01-01) to below {JULIAN_LIMIT} (10000-01-01), "
              + _DECLARED,
    "unixepoch": "is not Unix time in seconds between 0001-01-01 and 9999-12-31, " + _DECLARED,
    "unixepoch_ms": "is not Unix time in milliseconds between 0001-01-01 and 9999-12-31, " + _DECLARED,
    "iso": "is a number, but datetime_formats declares ISO 8601 text for this column",
}
_EARLY_JULIAN = (f"is read as a Julian day number (SQLite's rule for numbers from 0 to {JULIAN_LIMIT}) and falls "
                 "before 0001-01-01; if the column holds Unix times, declare it unixepoch in datetime_formats")
_NO_REPRESENTATION = ("fits no date representation: neither a Julian day number nor Unix time in seconds or "
                      "milliseconds between 0001-01-01 and 9999-12-31")


def mixed_reason(is_julian, other):
    """Why a number cannot be read in a column whose earlier numbers were of the other kind (``other``)."""
    kind, other_kind = ("a Julian day number", "Unix times") if is_julian else ("Unix time", "Julian day numbers")
    return (f"is {kind} but the column also holds {other_kind} (such as {other!r}), so its dates cannot be told "
            "apart; declare the column in datetime_formats as julian, unixepoch or unixepoch_ms")


class RepresentationWatch:
    """Which kind of number (Julian day or Unix time) each column of one stream has shown first.

    Behind SQL function same_date_representation (source.py) and the Python
    conversion of columns no profile has vetted: a column that holds both kinds
    stops the load instead of moving some of its dates by decades.
    """

    def __init__(self):
        self.first = {}  # column label: (is_julian, value)
        self.mixed = ""  # the first mix found, as a message naming table and column

    def __call__(self, label, is_julian, value):
        first = self.first.get(label)
        if first is None:
            self.first[label] = (bool(is_julian), value)
            return 1
        if first[0] == bool(is_julian):
            return 1
        if not self.mixed:
            table, column = json.loads(label)
            self.mixed = f"table {table}, column {column}: value {value!r} {mixed_reason(bool(is_julian), first[1])}"
        return None


class NumberDates:
    """How one date column reads numbers: by its datetime_format, in SQL and in Python alike."""

    def __init__(self, datetime_format, stream_label=None):
        self.format = datetime_format
        # A load no profile vetted watches an 'auto' column for a mix of Julian days and Unix times.
        self.label = json.dumps(list(stream_label)) if stream_label and datetime_format == "auto" else None
        self.watch = RepresentationWatch() if self.label else None

    def text_sql(self, q, classes, date=False):
        """SQL: the UTC timestamp text (or the date) of the number ``q``, NULL when it fits the column's
        representation not. ``classes``: the number storage classes the column holds."""
        if self.format == "iso":
            return "NULL"
        integers_only = "real" not in classes

        def text(kind):
            if kind == "unixepoch" and integers_only:
                return f"date({q}, 'unixepoch')" if date else f"strftime('%Y-%m-%d %H:%M:%S', {q}, 'unixepoch')"
            micros = (_julian_micros_sql(q, integers_only) if kind == "julian" else
                      _unix_micros_sql(q, 1_000_000 if kind == "unixepoch" else 1000, integers_only))
            return _micros_date_sql(micros) if date else _micros_timestamp_sql(micros)

        ranges = {"julian": f"{q} >= {JULIAN_FIRST!r} AND {q} < {JULIAN_LIMIT!r}",
                  "unixepoch": f"{q} >= {EPOCH_MIN_S} AND {q} < {EPOCH_END_S}",
                  "unixepoch_ms": f"{q} >= {EPOCH_MIN_MS} AND {q} < {EPOCH_END_MS}"}
        if self.format != "auto":
            return f"(CASE WHEN {ranges[self.format]} THEN {text(self.format)} END)"
        julian = f"{q} >= 0 AND {q} < {JULIAN_LIMIT!r}"
        auto = (f"(CASE WHEN {julian} THEN (CASE WHEN {q} >= {JULIAN_FIRST!r} THEN {text('julian')} END) "
                f"WHEN abs({q}) < {EPOCH_MS_THRESHOLD} THEN (CASE WHEN {q} >= {EPOCH_MIN_S} THEN "
                f"{text('unixepoch')} END) "
                f"WHEN {ranges['unixepoch_ms']} THEN {text('unixepoch_ms')} END)")
        if not self.label:
            return auto
        return f"(CASE WHEN {SAME_REPRESENTATION}({sql_text(self.label)}, {julian}, {q}) THEN {auto} END)"

    def micros(self, value):
        """Unix microseconds of a number (int or float) by the column's representation; raises Invalid."""
        kind = self.format
        if kind == "auto":
            julian = is_julian_day(value)
            if self.watch and not self.watch(self.label, julian, value):
                raise Invalid(mixed_reason(julian, self.watch.first[self.label][1]))
            if julian:
                if value < JULIAN_FIRST:
                    raise Invalid(_EARLY_JULIAN)
                kind = "julian"
            elif abs(value) < EPOCH_MS_THRESHOLD:
                kind = "unixepoch"
            else:
                kind = "unixepoch_ms"
            reason = _NO_REPRESENTATION
        else:
            reason = _OUT_OF_RANGE[kind]
        if kind == "julian" and JULIAN_FIRST <= value < JULIAN_LIMIT:
            micros = julian_micros(value)
        elif kind == "unixepoch" and EPOCH_MIN_S <= value < EPOCH_END_S:
            micros = _scaled_micros(value, 1_000_000)
        elif kind == "unixepoch_ms" and EPOCH_MIN_MS <= value < EPOCH_END_MS:
            micros = _scaled_micros(value, 1000)
        else:
            raise Invalid(reason)
        if micros >= EPOCH_END_S * 1_000_000:  # rounded up into the year 10000
            raise Invalid(reason)
        return micros


def _micros_timestamp_sql(micros):
    """SQL: the UTC timestamp text of Unix microseconds, NULL when NULL or past 9999."""
    shifted = f"({micros} + {MICROS_FROM_YEAR_1})"  # >= 0, so / and % need no sign handling
    return (f"strftime('%Y-%m-%d %H:%M:%S', {shifted} / 1000000 + {EPOCH_MIN_S}, 'unixepoch') "
            f"|| printf('.%06d', {shifted} % 1000000)")


def _micros_date_sql(micros):
    return f"date(({micros} + {MICROS_FROM_YEAR_1}) / 1000000 + {EPOCH_MIN_S}, 'unixepoch')"


class TimestampRule(Rule):
    """timestamptz and timestamp: text dates in ISO 8601 shapes, Julian day numbers or Unix time (NumberDates)."""

    category = "timestamptz"
    text_pattern = _TIMESTAMP_PATTERN

    def __init__(self, target, source_timezone="UTC", datetime_format="auto", stream_label=None):
        super().__init__(target, source_timezone)
        self.aware = target.category == "timestamptz"
        self.zone = _zone(source_timezone)
        self.numbers = NumberDates(datetime_format, stream_label)

    def valid_sql(self, q):
        # The date GLOB rules out julian-day numbers, bare times and 'now'; julianday() then parses
        # every shape SQLite knows. SQLite accepts Feb 30 (and normalises it): days that could be past
        # a month's end (29, 30, 31) are checked against the calendar. Cheapest test first: this runs
        # once per value of the source. A number is valid when its formatting gives a timestamp.
        number = self.numbers.text_sql(q, {"integer", "real"})
        return (
            f"CASE typeof({q}) WHEN 'text' THEN ({self._valid_text_sql(q)}) "
            f"WHEN 'integer' THEN ({number}) IS NOT NULL WHEN 'real' THEN ({number}) IS NOT NULL "
            f"WHEN 'blob' THEN 0 ELSE 1 END"
        )

    @staticmethod
    def _valid_text_sql(q):
        return (f"{q} GLOB '{_DATE_PREFIX}[0-9][0-9]*' AND {q} NOT GLOB '0000*' AND julianday({q}) IS NOT NULL "
                f"AND (substr({q}, 9, 2) < '29' OR date(substr({q}, 1, 10), '+0 days') = substr({q}, 1, 10)) "
                f"AND {_NO_BREAKS.format(q=q)}")

    def stream_sql(self, q, storage_class):
        if storage_class in ("integer", "real"):
            return None  # the number's formatting is NULL for a number out of the column's representation
        if storage_class != "text":
            return self.valid_sql(q)
        shapes = " OR ".join(f"{q} GLOB '{shape}'" for shape in _TIMESTAMP_SHAPES)
        return (f"(({shapes}) AND julianday({q}) IS NOT NULL) OR ({self._valid_text_sql(q)})")

    @staticmethod
    def has_zone_sql(q):
        """SQL true for text timestamps that carry a zone (Z or an offset after the date)."""
        return f"(typeof({q}) = 'text' AND (substr({q}, 11) GLOB '*[+-]*' OR {q} GLOB '*[Zz]*'))"

    def format_sql(self, q, classes, zoned_text=False, specials=True):
        numbers = classes & {"integer", "real"}
        if "blob" in classes:
            return None
        if numbers and not (self.aware or self.source_timezone == "UTC"):
            return None  # instants become wall-clock time in the source zone: Python knows the zone's rules
        if "text" in classes and zoned_text and not self.aware:
            return None  # PostgreSQL would silently drop the zone: convert in Python
        if not numbers:
            return q  # validated: digits, dashes, colons, dot, T, Z, +: nothing to escape
        number = self.numbers.text_sql(q, numbers) + (" || '+00'" if self.aware else "")
        if "text" not in classes:
            return number
        return f"CASE WHEN typeof({q}) = 'text' THEN {q} ELSE {number} END"

    def parse(self, storage_class, value):
        """An aware datetime for numbers and zoned text, a naive one for naive text."""
        if storage_class in ("integer", "real"):
            return UNIX_EPOCH + datetime.timedelta(microseconds=self.numbers.micros(value))
        if storage_class != "text":
            raise Invalid(f"is a BLOB, which cannot become {self.target.sql}")
        text = decode_text(value)
        match = _TIMESTAMP_TEXT.match(text)
        if not match:
            raise Invalid(f"is not a timestamp (YYYY-MM-DD[ HH:MM[:SS[.ffffff]]][Z|±HH:MM], a Julian day number "
                          f"or Unix time), so it cannot become {self.target.sql}")
        year, month, day, hour, minute, second, fraction, zone = match.groups()
        # Round extra digits as PostgreSQL's input does (rint of the fraction in microseconds), so the
        # SQL path, which sends the text as it is, and this one store the same instant.
        micros = round(float("0." + (fraction or "0")) * 1_000_000)
        try:
            moment = datetime.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                                       int(second or 0)) + datetime.timedelta(microseconds=micros)
        except ValueError as error:
            raise Invalid(f"is not a valid timestamp ({error})") from None
        if zone:
            offset = datetime.timedelta(0) if zone in "Zz" else datetime.timedelta(
                hours=int(zone[1:3]), minutes=int(zone[4:6])) * (1 if zone[0] == "+" else -1)
            moment = moment.replace(tzinfo=datetime.timezone(offset))
        return moment

    def convert(self, storage_class, value):
        moment = self.parse(storage_class, value)
        if self.aware:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=self.zone)
            return moment.isoformat(" ").encode()
        if moment.tzinfo is not None:
            try:
                moment = moment.astimezone(self.zone).replace(tzinfo=None)
            except OverflowError:
                raise Invalid(f"is outside the years 1 to 9999 in {self.source_timezone}") from None
        return moment.isoformat(" ").encode()


class DateRule(Rule):
    """date: YYYY-MM-DD text, or the UTC calendar day of a Julian day number or Unix time."""

    category = "date"

    def __init__(self, target, source_timezone="UTC", datetime_format="auto", stream_label=None):
        super().__init__(target, source_timezone)
        self.numbers = NumberDates(datetime_format, stream_label)

    def valid_sql(self, q):
        number = self.numbers.text_sql(q, {"integer", "real"}, date=True)
        return (
            f"CASE typeof({q}) WHEN 'text' THEN ({q} GLOB '{_DATE_PREFIX}[0-9][0-9]' AND substr({q}, 1, 4) <> '0000' "
            f"AND date({q}, '+0 days') = {q}) "
            f"WHEN 'integer' THEN ({number}) IS NOT NULL WHEN 'real' THEN ({number}) IS NOT NULL "
            f"WHEN 'blob' THEN 0 ELSE 1 END"
        )

    def stream_sql(self, q, storage_class):
        if storage_class in ("integer", "real"):
            return None  # the number's formatting is NULL for a number out of the column's representation
        if storage_class == "text":
            return f"{q} GLOB '{_ISO_DATE}'"  # PostgreSQL refuses the year 0000 and days past a month's end
        return self.valid_sql(q)

    def format_sql(self, q, classes, zoned_text=False, specials=True):
        numbers = classes & {"integer", "real"}
        if "blob" in classes:
            return None
        if not numbers:
            return q
        number = self.numbers.text_sql(q, numbers, date=True)
        if "text" not in classes:
            return number
        return f"CASE WHEN typeof({q}) = 'text' THEN {q} ELSE {number} END"

    def convert(self, storage_class, value):
        if storage_class in ("integer", "real"):
            moment = UNIX_EPOCH + datetime.timedelta(microseconds=self.numbers.micros(value))
            return moment.date().isoformat().encode()
        if storage_class == "text":
            text = decode_text(value)
            try:
                if len(text) != 10:
                    raise ValueError
                return datetime.date.fromisoformat(text).isoformat().encode()
            except ValueError:
                raise Invalid("is not a date (YYYY-MM-DD, a Julian day number or Unix time)") from None
        raise Invalid(f"is not a date, so it cannot become {self.target.sql}")


class TimeRule(Rule):
    category = "time"

    def valid_sql(self, q):
        return (f"CASE typeof({q}) WHEN 'text' THEN ({q} GLOB '[0-2][0-9]:[0-5][0-9]*' AND time({q}) IS NOT NULL "
                f"AND {_NO_BREAKS.format(q=q)}) "
                f"WHEN 'null' THEN 1 ELSE 0 END")

    def format_sql(self, q, classes, zoned_text=False, specials=True):
        return q if classes <= {"text"} else None

    def convert(self, storage_class, value):
        if storage_class == "text":
            text = decode_text(value)
            if _TIME_TEXT.match(text):
                return text.encode()
        raise Invalid("is not a time of day (HH:MM[:SS[.ffffff]])")


class JsonRule(Rule):
    category = "json"
    python_classes = frozenset({"blob"})
    text_scan = True

    def valid_sql(self, q):
        # jsonb refuses the \u0000 escape (it cannot store NUL in text).
        return (f"CASE typeof({q}) WHEN 'text' THEN (json_valid({q}) AND instr({q}, '\\u0000') = 0) "
                f"WHEN 'real' THEN abs({q}) < 9e999 ELSE 1 END")

    def stream_sql(self, q, storage_class):
        if storage_class == "text":
            # jsonb's input refuses exactly what json_valid() and the \u0000 test refuse (a test compares
            # them), except documents nested deeper than SQLite's limit of 2000, which jsonb takes as they are.
            # json keeps the escape \u0000, which the rule refuses (no PostgreSQL text can hold it).
            return None if self.target.sql == "jsonb" else f"instr({q}, '\\u0000') = 0"
        if storage_class == "integer":
            return None
        if storage_class == "real":
            return f"abs({q}) < 9e999"
        return self.valid_sql(q)

    # JSON text and integers go into COPY exactly as text does.
    format_sql = TextRule.format_sql

    def convert(self, storage_class, value):
        if storage_class == "integer":
            return str(value).encode()
        if storage_class == "real":
            if value != value or value in (float("inf"), float("-inf")):
                raise Invalid("is not finite, so it cannot be a JSON number")
            return repr(value).encode()
        text = decode_text(value)
        try:
            json.loads(text, parse_constant=_reject_constant)
        except ValueError as error:
            raise Invalid(f"is not valid JSON ({str(error).split(':')[0]})") from None
        if "\\u0000" in text:
            raise Invalid("holds the JSON escape \\u0000, which jsonb cannot store")
        return escape_copy(text)


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


class UuidRule(Rule):
    category = "uuid"
    text_pattern = _UUID_PATTERN

    def valid_sql(self, q):
        return (
            f"CASE typeof({q}) WHEN 'text' THEN ({q} GLOB '{_UUID_GLOB}' OR {q} GLOB '{_HEX_DIGIT * 32}') "
            f"WHEN 'blob' THEN length({q}) = 16 WHEN 'null' THEN 1 ELSE 0 END"
        )

    def stream_sql(self, q, storage_class):
        if storage_class == "text":
            # The layouts the rule takes; PostgreSQL refuses what is not hexadecimal in them. Its other
            # layouts (braces, dashes elsewhere) have other lengths or dashes in other places.
            return " OR ".join(f"{q} GLOB '{shape}'" for shape in _UUID_SHAPES)
        return self.valid_sql(q)

    def format_sql(self, q, classes, zoned_text=False, specials=True):
        if classes <= {"text"}:
            return q  # validated hexadecimal and dashes
        if classes <= {"blob"}:
            h = f"lower(hex({q}))"
            return (f"substr({h}, 1, 8) || '-' || substr({h}, 9, 4) || '-' || substr({h}, 13, 4) || '-' || "
                    f"substr({h}, 17, 4) || '-' || substr({h}, 21, 12)")
        return None

    def convert(self, storage_class, value):
        if storage_class == "blob" and len(value) == 16:
            return str(uuid.UUID(bytes=bytes(value))).encode()
        if storage_class == "text":
            text = decode_text(value)
            if _UUID_TEXT.match(text):
                return text.encode()
        raise Invalid("is not a UUID")


class ByteaRule(Rule):
    category = "bytea"

    def format_sql(self, q, classes, zoned_text=False, specials=True):
        if classes <= {"blob", "text", "integer"}:
            return f"'\\\\x' || hex({q})"  # \\x in COPY text is \x: bytea's hex format
        return None

    def convert(self, storage_class, value):
        if storage_class == "real":
            raw = float_text(value).encode()
        elif storage_class == "integer":
            raw = str(value).encode()
        else:
            raw = bytes(value)
        return b"\\\\x" + raw.hex().encode()


RULES = {
    "text": TextRule, "other": OtherRule, "integer": IntegerRule, "float": FloatRule, "numeric": NumericRule,
    "boolean": BooleanRule, "timestamptz": TimestampRule, "timestamp": TimestampRule, "date": DateRule,
    "time": TimeRule, "json": JsonRule, "uuid": UuidRule, "bytea": ByteaRule,
}


def rule_for(target, source_timezone="UTC", datetime_format="auto", stream_label=None):
    """The rule for a target type. Date rules read numbers by ``datetime_format`` (DATETIME_FORMATS);
    ``stream_label`` (table, column) asks them to watch an 'auto' column for a mix of representations,
    for a load no profile has vetted (RepresentationWatch)."""
    return RULES[target.category](target, source_timezone, datetime_format, stream_label)


def _zone(name):
    if name.upper() == "UTC" or ZoneInfo is None:
        return UTC
    return ZoneInfo(name)


def check_timezone(name):
    """Raise ValueError unless ``name`` is a time zone both Python and PostgreSQL know (IANA name)."""
    if name.upper() == "UTC":
        return
    if ZoneInfo is None:
        raise ValueError("this Python has no zoneinfo: only UTC is supported")
    try:
        ZoneInfo(name)
    except Exception:  # zoneinfo raises several types for bad keys
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin)") from None



def storage_class_of(value):
    """The SQLite storage class of a Python value as sqlite3 returns it with str as the text factory
    (with bytes as the text factory, text and blobs both arrive as bytes: select typeof() alongside)."""
    if value is None:
        return "null"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "real"
    if isinstance(value, str):
        return "text"
    return "blob"
