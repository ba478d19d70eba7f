"""Identifiers on both sides.

PostgreSQL identifiers go through psycopg2.sql.Identifier everywhere. SQLite has
no client-side identifier quoting in the standard library, so SQLite names are
quoted here (double quotes, inner quotes doubled: the SQL standard rule SQLite
documents); values are always bound parameters.
"""

PG_MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL silently cuts longer names


def sqlite_ident(name):
    return '"' + name.replace('"', '""') + '"'


def key_intervals_join(table, key):
    """FROM clause of the rows (alias ``src``) of SQLite ``table`` whose ``key`` lies in one of the inclusive
    [low, high] intervals bound as a JSON parameter: one range scan per interval, in the intervals' order."""
    return (f"FROM json_each(?) span JOIN {sqlite_ident(table)} src ON src.{sqlite_ident(key)} BETWEEN "
            "json_extract(span.value, '$[0]') AND json_extract(span.value, '$[1]')")


def intervals_text(intervals):
    """Inclusive key intervals as one string, "3,7:12,40" for [[3, 3], [7, 12], [40, 40]]. A sync's changed keys
    ride in its result through Ansible, whose controller holds about 1 KB per interval of a list of lists
    (the 1 % sync of the 1M-file sample: 93 MB) and one byte per character of a string."""
    return ",".join(str(low) if low == high else f"{low}:{high}" for low, high in intervals)


def intervals_from_text(text):
    """The [low, high] intervals of intervals_text()'s string."""
    intervals = []
    for part in filter(None, text.split(",")):
        low, _colon, high = part.partition(":")
        intervals.append([int(low), int(high or low)])
    return intervals


def pg_name(name):
    """The name PostgreSQL will actually store for ``name`` (cut to 63 bytes on a character boundary)."""
    encoded = name.encode("utf-8")
    if len(encoded) <= PG_MAX_IDENTIFIER_BYTES:
        return name
    return encoded[:PG_MAX_IDENTIFIER_BYTES].decode("utf-8", "ignore")


def derived_name(*parts, suffix):
    """A constraint or index name in PostgreSQL's own style (table_col_suffix), cut to fit."""
    base = "_".join(parts)
    room = PG_MAX_IDENTIFIER_BYTES - len(suffix.encode("utf-8")) - 1
    return pg_name(base.encode("utf-8")[:room].decode("utf-8", "ignore") + "_" + suffix)
